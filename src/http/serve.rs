//! The accept loop. It does what `axum::serve` does, with one difference: each connection's
//! future runs inside [`PollAgainWhenSelfWoken`].
//!
//! That matters because hyper's HTTP/1 request body is a channel from the connection's
//! dispatcher to the handler. Taking the bytes out of it wakes the dispatcher
//! (`hyper::body::chan::Receiver::poll_next`), and the dispatcher runs in the same task, which
//! is being polled at that moment. Tokio's multi-thread scheduler handles a task that wakes
//! itself like a yield: it queues the task and wakes a parked worker to steal it. That costs
//! one cross-CPU wake-up and two context switches on every request with a body, for nothing.
//! Polling the future again on the spot gives the same result without involving the scheduler.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use atomic_waker::AtomicWaker;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tower::Service;

use super::tls::PeerAddr;

/// Serves `router` on `listener` until `shutdown` completes. It then stops accepting, lets
/// every connection finish the request it is on, and returns once all have closed.
pub async fn serve<L>(mut listener: L, router: Router, shutdown: impl Future<Output = ()>)
where
    L: Listener<Addr = SocketAddr>,
{
    // A connection task holds a `closed` receiver until it ends; `stop` tells it to finish.
    let (stop, stop_signal) = watch::channel(false);
    let (all_closed, closed) = watch::channel(());
    let mut shutdown = pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let router = router.clone();
        let mut stop_signal = stop_signal.clone();
        let closed = closed.clone();
        tokio::spawn(PollAgainWhenSelfWoken::new(async move {
            let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(PeerAddr(peer)));
                router.clone().call(request)
            });
            let mut connection = pin!(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), service));
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stop_signal.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
            drop(closed);
        }));
    }
    drop(listener);
    drop(closed);
    let _ = stop.send(true);
    all_closed.closed().await;
}

/// At most this many polls in a row for a future that keeps waking itself; then it goes back
/// to the scheduler like any yielding task, so it cannot starve the others. (A yield wakes the
/// task too: hyper's after 16 pipelined requests, tokio's when a task has used its budget.)
const MAX_POLLS_IN_A_ROW: usize = 4;

/// A future that, when it wakes itself while being polled, is polled again at once instead of
/// through the scheduler. Wakes from anywhere else (the I/O driver, another task) pass through.
struct PollAgainWhenSelfWoken<F> {
    future: Pin<Box<F>>,
    wake: Arc<SelfWake>,
    waker: Waker,
}

/// `POLLING` is set in `state` while the inner future is being polled; a wake then only sets
/// `WOKEN`, and the poll loop sees it.
struct SelfWake {
    state: AtomicU8,
    task: AtomicWaker,
}

const POLLING: u8 = 1;
const WOKEN: u8 = 2;

impl<F: Future> PollAgainWhenSelfWoken<F> {
    fn new(future: F) -> Self {
        let wake = Arc::new(SelfWake { state: AtomicU8::new(0), task: AtomicWaker::new() });
        Self { future: Box::pin(future), waker: Waker::from(wake.clone()), wake }
    }
}

impl<F: Future> Future for PollAgainWhenSelfWoken<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        // Registered first: a wake that comes after `polling` is cleared must find the task.
        this.wake.task.register(context.waker());
        let mut inner_context = Context::from_waker(&this.waker);
        for _ in 0..MAX_POLLS_IN_A_ROW {
            this.wake.state.store(POLLING, Ordering::Release);
            let result = this.future.as_mut().poll(&mut inner_context);
            let state = this.wake.state.swap(0, Ordering::AcqRel);
            if result.is_ready() || state & WOKEN == 0 {
                return result;
            }
        }
        context.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Wake for SelfWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.state.fetch_or(WOKEN, Ordering::AcqRel) & POLLING == 0 {
            self.task.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Counts the wakes that reach the task.
    struct CountWakes(AtomicUsize);

    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Pending `pending` times, waking itself on each, then ready with how often it was polled.
    struct WakesItself {
        pending: usize,
        polls: usize,
    }

    impl Future for WakesItself {
        type Output = usize;

        fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<usize> {
            self.polls += 1;
            if self.polls > self.pending {
                return Poll::Ready(self.polls);
            }
            context.waker().wake_by_ref();
            Poll::Pending
        }
    }

    fn poll_once<F: Future>(future: &mut PollAgainWhenSelfWoken<F>, task: &Arc<CountWakes>) -> Poll<F::Output> {
        let waker = Waker::from(task.clone());
        Pin::new(future).poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn a_self_wake_during_the_poll_is_answered_by_polling_again_not_by_waking_the_task() {
        let task = Arc::new(CountWakes(AtomicUsize::new(0)));
        let mut future = PollAgainWhenSelfWoken::new(WakesItself { pending: 2, polls: 0 });
        assert_eq!(poll_once(&mut future, &task), Poll::Ready(3));
        assert_eq!(task.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_future_that_keeps_waking_itself_goes_back_to_the_scheduler() {
        let task = Arc::new(CountWakes(AtomicUsize::new(0)));
        let mut future = PollAgainWhenSelfWoken::new(WakesItself { pending: 100, polls: 0 });
        assert_eq!(poll_once(&mut future, &task), Poll::Pending);
        assert_eq!(future.future.polls, MAX_POLLS_IN_A_ROW);
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "it must still be woken, or it would never run again");
    }

    #[test]
    fn a_wake_after_the_poll_reaches_the_task() {
        let task = Arc::new(CountWakes(AtomicUsize::new(0)));
        let (sender, receiver) = tokio::sync::oneshot::channel::<u8>();
        let mut future = PollAgainWhenSelfWoken::new(receiver);
        assert!(poll_once(&mut future, &task).is_pending());
        sender.send(7).unwrap();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        assert_eq!(poll_once(&mut future, &task), Poll::Ready(Ok(7)));
    }
}
