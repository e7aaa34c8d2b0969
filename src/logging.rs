//! The broker's log: JSON lines on stderr in production (`log_format = "json"`), text in
//! development, filtered by `CREDBROKER_LOG` (default `info`).
//!
//! A JSON line is one event with the fields of its innermost span:
//! `{"timestamp":…,"level":"INFO","message":"request finished","status":200,…,"target":…,
//! "span":{"name":"request","request_id":…,"issuance_id":…,"role":…}}`.
//! [`JsonLines`] writes them instead of tracing-subscriber's JSON formatter, which parsed and
//! serialized a span's fields again each time one was recorded and for every line: a tenth of
//! the broker's CPU per exchange (bench/README.md). Here a span keeps its fields as JSON text,
//! written once, and a line is assembled in a per-thread buffer without allocating.
//!
//! **When a line is written.** On the runtime's worker threads, an `info` line (every request's
//! "request finished") waits in its thread's buffer until that thread next runs out of work
//! ([`thread_idle`], the runtime's park hook) or the buffer holds [`HOLD_LIMIT`] bytes, and the
//! buffer is then written in one call. A write per line was a system call on every request,
//! made before the response left (bench/README.md, fifteenth session). A warning or an error is
//! written at once, after what its thread holds, so each thread's lines keep their order; lines
//! of two threads may reach the file up to one buffer apart. What a SIGKILL loses is what the
//! busy threads held: nothing once they are idle, at most [`HOLD_LIMIT`] bytes each. The audit
//! row, not the log, is the record of every request.

use std::cell::RefCell;
use std::io::Write as _;
use std::sync::Arc;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// The most a thread holds before writing anyway: some fifty request lines, written in one call.
pub const HOLD_LIMIT: usize = 16 * 1024;

/// Installs the process's logger; call once, at start.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("CREDBROKER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry.with(JsonLines::held_until_idle(std::io::stderr)).init(),
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).init(),
    }
}

/// Writes each event as one JSON line to what `make_writer` makes.
pub struct JsonLines<W> {
    make_writer: Arc<W>,
    /// `info` and quieter lines of threads that call [`thread_idle`] wait for it.
    hold: bool,
}

impl<W> JsonLines<W> {
    /// Every line is written as it is made.
    pub fn new(make_writer: W) -> Self {
        Self { make_writer: Arc::new(make_writer), hold: false }
    }

    /// `info` and quieter lines of a thread that calls [`thread_idle`] when it runs out of work
    /// wait for that moment (module documentation); other threads' lines are written at once.
    pub fn held_until_idle(make_writer: W) -> Self {
        Self { make_writer: Arc::new(make_writer), hold: true }
    }
}

/// Call when the thread runs out of work (tokio's `on_thread_park`) and when it stops: writes
/// the lines it holds, and from then on lets it hold lines.
pub fn thread_idle() {
    // A thread's locals may be gone already while it stops.
    let _ = HELD.try_with(|held| {
        if let Ok(mut held) = held.try_borrow_mut() {
            held.idles = true;
            held.write();
        }
    });
}

/// Where a thread's held lines go: the writer of the layer that held them.
trait LineSink: Send + Sync {
    fn write_lines(&self, bytes: &[u8]);
}

impl<W> LineSink for W
where
    W: for<'writer> MakeWriter<'writer> + Send + Sync,
{
    fn write_lines(&self, bytes: &[u8]) {
        // A log line that cannot be written has nowhere else to go.
        let _ = self.make_writer().write_all(bytes);
    }
}

/// The lines a thread holds until it next idles.
#[derive(Default)]
struct Held {
    /// Set by the thread's first [`thread_idle`]: a thread nobody tells when it idles holds nothing.
    idles: bool,
    bytes: Vec<u8>,
    sink: Option<Arc<dyn LineSink>>,
}

impl Held {
    fn write(&mut self) {
        if let (false, Some(sink)) = (self.bytes.is_empty(), &self.sink) {
            sink.write_lines(&self.bytes);
        }
        self.bytes.clear();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.write();
    }
}

thread_local! {
    /// The line being assembled, reused so a line costs no allocation once the buffer has grown.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
    static HELD: RefCell<Held> = RefCell::new(Held::default());
}

/// A span's fields as JSON members (`,"name":value`), in one text, with where each lies: a
/// field recorded again replaces its member.
struct SpanFields {
    text: Vec<u8>,
    members: Vec<(&'static str, std::ops::Range<usize>)>,
}

impl SpanFields {
    fn record(&mut self, values: &impl RecordFields) {
        let written = {
            let mut visitor = Members { line: &mut self.text, which: Which::All, written: Vec::new() };
            values.record_into(&mut visitor);
            visitor.written
        };
        for (name, new) in written {
            match self.members.iter().position(|(existing, _)| *existing == name) {
                Some(index) => {
                    let old = self.members.remove(index).1;
                    self.text.drain(old.clone());
                    for (_, range) in &mut self.members[index..] {
                        *range = range.start - old.len()..range.end - old.len();
                    }
                    self.members.push((name, new.start - old.len()..new.end - old.len()));
                }
                None => self.members.push((name, new)),
            }
        }
    }
}

/// What carries field values: a new span's attributes or a later record.
trait RecordFields {
    fn record_into(&self, visitor: &mut dyn Visit);
}

impl RecordFields for Attributes<'_> {
    fn record_into(&self, visitor: &mut dyn Visit) {
        self.record(visitor)
    }
}

impl RecordFields for Record<'_> {
    fn record_into(&self, visitor: &mut dyn Visit) {
        self.record(visitor)
    }
}

/// Which of an event's fields a [`Members`] writes: the message goes first, as a reader looks for it.
#[derive(Clone, Copy, PartialEq)]
enum Which {
    Message,
    AllButMessage,
    All,
}

/// Writes fields as JSON members (`,"name":value`) onto a line, noting where each lies when
/// `written` has room (a span's fields).
struct Members<'a> {
    line: &'a mut Vec<u8>,
    which: Which,
    written: Vec<(&'static str, std::ops::Range<usize>)>,
}

impl Members<'_> {
    fn member(&mut self, field: &Field, value: impl FnOnce(&mut Vec<u8>)) {
        let message = field.name() == "message";
        if (self.which == Which::Message && !message) || (self.which == Which::AllButMessage && message) {
            return;
        }
        let start = self.line.len();
        self.line.push(b',');
        json_string(self.line, field.name());
        self.line.push(b':');
        value(self.line);
        if self.which == Which::All {
            self.written.push((field.name(), start..self.line.len()));
        }
    }
}

impl Visit for Members<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.member(field, |line| {
            line.push(b'"');
            // Writing into a Vec cannot fail; a Debug impl that errs leaves its text cut short.
            let _ = std::fmt::Write::write_fmt(&mut Escaping(line), format_args!("{value:?}"));
            line.push(b'"');
        });
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field, |line| json_string(line, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field, |line| {
            let _ = write!(line, "{value}");
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field, |line| {
            let _ = write!(line, "{value}");
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field, |line| line.extend_from_slice(if value { b"true" } else { b"false" }));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity.
        self.member(field, |line| match value.is_finite() {
            true => {
                let _ = write!(line, "{value}");
            }
            false => line.extend_from_slice(b"null"),
        });
    }
}

/// Writes `text` as a JSON string, quotes included.
fn json_string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    escape_into(out, text);
    out.push(b'"');
}

/// Escapes formatted text into a JSON string's inside.
struct Escaping<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Escaping<'_> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        escape_into(self.0, text);
        Ok(())
    }
}

/// Appends `text` escaped for the inside of a JSON string, copying the runs between the bytes
/// that need escaping whole (every such byte is ASCII, so a run is always whole characters).
fn escape_into(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    let mut run = 0;
    for (index, &byte) in bytes.iter().enumerate() {
        if !matches!(byte, b'"' | b'\\' | 0..=0x1f) {
            continue;
        }
        out.extend_from_slice(&bytes[run..index]);
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            control => {
                let _ = write!(out, "\\u{control:04x}");
            }
        }
        run = index + 1;
    }
    out.extend_from_slice(&bytes[run..]);
}

impl<W> JsonLines<W>
where
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    /// Holds the line if its thread may hold it (module documentation), else writes it after
    /// whatever the thread holds.
    fn write(&self, metadata: &Metadata<'_>, line: &[u8]) {
        let held = self.hold
            && *metadata.level() > Level::WARN
            && HELD
                .try_with(|held| {
                    let Ok(mut held) = held.try_borrow_mut() else { return false };
                    if !held.idles {
                        return false;
                    }
                    // Compared before cloning: a clone per line would bounce the count between threads.
                    if !held.sink.as_ref().is_some_and(|sink| std::ptr::addr_eq(Arc::as_ptr(sink), Arc::as_ptr(&self.make_writer))) {
                        held.write();
                        held.sink = Some(self.make_writer.clone());
                    }
                    held.bytes.extend_from_slice(line);
                    if held.bytes.len() >= HOLD_LIMIT {
                        held.write();
                    }
                    true
                })
                .unwrap_or(false);
        if !held {
            let _ = HELD.try_with(|held| held.try_borrow_mut().map(|mut held| held.write()));
            // A log line that cannot be written has nowhere else to go.
            let _ = self.make_writer.make_writer_for(metadata).write_all(line);
        }
    }
}

impl<S, W> Layer<S> for JsonLines<W>
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    fn on_new_span(&self, attributes: &Attributes<'_>, id: &Id, context: Context<'_, S>) {
        let Some(span) = context.span(id) else { return };
        let mut fields = SpanFields { text: Vec::with_capacity(192), members: Vec::with_capacity(8) };
        fields.record(attributes);
        span.extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, context: Context<'_, S>) {
        let Some(span) = context.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(fields) = extensions.get_mut::<SpanFields>() {
            fields.record(values);
        }
    }

    fn on_event(&self, event: &Event<'_>, context: Context<'_, S>) {
        let write = |line: &mut Vec<u8>| {
            line.clear();
            line.extend_from_slice(b"{\"timestamp\":\"");
            let _ = time::OffsetDateTime::now_utc().format_into(line, &time::format_description::well_known::Rfc3339);
            let _ = write!(line, "\",\"level\":\"{}\"", event.metadata().level());
            for which in [Which::Message, Which::AllButMessage] {
                event.record(&mut Members { line, which, written: Vec::new() });
            }
            line.extend_from_slice(b",\"target\":");
            json_string(line, event.metadata().target());
            if let Some(span) = context.event_span(event) {
                line.extend_from_slice(b",\"span\":{\"name\":");
                json_string(line, span.name());
                if let Some(fields) = span.extensions().get::<SpanFields>() {
                    line.extend_from_slice(&fields.text);
                }
                line.push(b'}');
            }
            line.extend_from_slice(b"}\n");
            self.write(event.metadata(), line);
        };
        // A Debug impl that logs while its line is being assembled gets a buffer of its own.
        LINE.with(|buffer| match buffer.try_borrow_mut() {
            Ok(mut line) => write(&mut line),
            Err(_) => write(&mut Vec::new()),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::{json, Value};
    use tracing_subscriber::layer::SubscriberExt;

    use super::JsonLines;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn messages(captured: &Captured) -> Vec<String> {
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        text.lines().map(|line| serde_json::from_str::<Value>(line).unwrap()["message"].as_str().unwrap().to_owned()).collect()
    }

    fn lines(captured: &Captured) -> Vec<Value> {
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(text.ends_with('\n'), "{text}");
        text.lines().map(|line| serde_json::from_str(line).unwrap_or_else(|error| panic!("{error}: {line}"))).collect()
    }

    #[test]
    fn each_event_is_one_json_line_with_its_innermost_span() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::registry().with(JsonLines::new(move || writer.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside any span");
            let request = tracing::info_span!("request", request_id = "r-1", issuance_id = tracing::field::Empty, role = tracing::field::Empty);
            let _entered = request.enter();
            request.record("issuance_id", tracing::field::display("0192"));
            request.record("role", "first");
            request.record("role", "orders \"producer\"\n");
            tracing::info!(status = 200u16, elapsed_ms = 3u64, ok = true, ratio = f64::NAN, detail = ?Some("x"), "request finished");
            let inner = tracing::info_span!("mint", backend = "kafka");
            inner.in_scope(|| tracing::warn!(error = %"tab\there", "minting slowly"));
        });
        let lines = lines(&captured);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["message"], "outside any span");
        assert!(lines[0].get("span").is_none(), "{}", lines[0]);
        let finished = &lines[1];
        assert_eq!(finished["level"], "INFO");
        assert_eq!(finished["message"], "request finished");
        assert_eq!((finished["status"].clone(), finished["elapsed_ms"].clone(), finished["ok"].clone()), (json!(200), json!(3), json!(true)));
        assert_eq!(finished["ratio"], Value::Null);
        assert_eq!(finished["detail"], "Some(\"x\")");
        assert_eq!(finished["target"], module_path!());
        assert_eq!(finished["span"], json!({"name": "request", "request_id": "r-1", "issuance_id": "0192", "role": "orders \"producer\"\n"}));
        assert!(time::OffsetDateTime::parse(finished["timestamp"].as_str().unwrap(), &time::format_description::well_known::Rfc3339).is_ok());
        // A field recorded twice appears once, with its last value.
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().nth(1).unwrap().matches("\"role\"").count(), 1);
        assert_eq!(lines[2]["level"], "WARN");
        assert_eq!(lines[2]["error"], "tab\there");
        assert_eq!(lines[2]["span"], json!({"name": "mint", "backend": "kafka"}));
    }

    #[test]
    fn a_threads_info_lines_wait_until_it_idles_and_keep_their_order() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::registry().with(JsonLines::held_until_idle(move || writer.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("before the thread first idles");
            assert_eq!(messages(&captured), ["before the thread first idles"], "a thread nobody tells when it idles holds nothing");

            super::thread_idle();
            tracing::info!("first");
            tracing::info!("second");
            assert_eq!(messages(&captured).len(), 1, "held until the thread idles");
            tracing::warn!("a warning");
            assert_eq!(messages(&captured), ["before the thread first idles", "first", "second", "a warning"], "a warning is written at once, after what was held");

            tracing::info!("third");
            assert_eq!(messages(&captured).len(), 4);
            super::thread_idle();
            assert_eq!(messages(&captured).last().unwrap(), "third");

            // A thread that never idles writes what it holds once that reaches the limit.
            let padding = "x".repeat(1000);
            let before = captured.0.lock().unwrap().len();
            let mut held = 0;
            while captured.0.lock().unwrap().len() == before {
                tracing::info!(padding, "busy");
                held += 1;
                assert!(held <= super::HOLD_LIMIT / 1000 + 1, "{held} lines held");
            }
            assert!(captured.0.lock().unwrap().len() - before >= super::HOLD_LIMIT);
            assert_eq!(messages(&captured).len(), 5 + held, "every line, each whole");
        });
    }

    #[test]
    fn a_thread_that_ends_writes_what_it_holds() {
        let captured = Captured::default();
        let writer = captured.clone();
        std::thread::spawn(move || {
            let subscriber = tracing_subscriber::registry().with(JsonLines::held_until_idle(move || writer.clone()));
            tracing::subscriber::with_default(subscriber, || {
                super::thread_idle();
                tracing::info!("held as the thread ends");
            });
        })
        .join()
        .unwrap();
        assert_eq!(messages(&captured), ["held as the thread ends"]);
    }

    #[test]
    fn strings_are_escaped_and_a_span_field_recorded_again_replaces_only_itself() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::registry().with(JsonLines::new(move || writer.clone()));
        let awkward = "quote \" backslash \\ newline \n return \r tab \t bell \u{7} escape \u{1b} unicode é 🚀";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", first = "a", second = tracing::field::Empty, third = 3u64);
            let _entered = span.enter();
            span.record("second", "b");
            span.record("first", "a much longer value than before");
            span.record("third", 4u64);
            span.record("first", awkward);
            tracing::info!(text = awkward, debugged = ?awkward, "{awkward}");
        });
        let line = &lines(&captured)[0];
        assert_eq!(line["message"], awkward);
        assert_eq!(line["text"], awkward);
        assert_eq!(line["debugged"], format!("{awkward:?}"));
        assert_eq!(line["span"], json!({"name": "request", "first": awkward, "second": "b", "third": 4}));
    }
}
