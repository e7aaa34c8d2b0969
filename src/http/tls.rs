//! TLS on the listener (rustls with ring). Certificates are read at startup and again on
//! SIGHUP: a new connection gets the files as they are now, an established one keeps the
//! session it has. Handshakes run in their own tasks, so a client that stalls mid-handshake
//! holds up nobody else's connection.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::serve::Listener;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::{ConfigError, TlsConfig};

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished handshakes waiting for the server to take them; a full queue stops accepting.
const ACCEPTED_QUEUE: usize = 64;

/// The files of `[tls]` and the server configuration last built from them.
pub struct Tls {
    files: TlsConfig,
    /// The configuration file, for error messages.
    source_name: String,
    current: ArcSwap<ServerConfig>,
}

impl Tls {
    /// Reads and checks every file; an error names the `[tls]` key whose file is wrong.
    pub fn load(files: TlsConfig, source_name: String) -> Result<Self, ConfigError> {
        let config = build_server_config(&files, &source_name)?;
        Ok(Self { files, source_name, current: ArcSwap::from_pointee(config) })
    }

    /// Reads the files again; on any error the certificate serving now stays.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let config = build_server_config(&self.files, &self.source_name)?;
        self.current.store(Arc::new(config));
        Ok(())
    }

    /// Serves TLS connections accepted on `listener`.
    pub fn listen(self: Arc<Self>, listener: TcpListener) -> TlsListener {
        let local_addr = listener.local_addr();
        let (accepted, incoming) = mpsc::channel(ACCEPTED_QUEUE);
        let acceptor = tokio::spawn(accept_connections(listener, self, accepted));
        TlsListener { incoming, local_addr, acceptor }
    }
}

fn build_server_config(files: &TlsConfig, source_name: &str) -> Result<ServerConfig, ConfigError> {
    let error = |key: &str, path: &Path, message: String| ConfigError::new(source_name, format!("tls.{key}"), format!("{}: {message}", path.display()));
    let certificates = read_certificates(&files.cert_file).map_err(|message| error("cert_file", &files.cert_file, message))?;
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .map_err(|e| error("key_file", &files.key_file, format!("cannot read a PEM private key: {}", pem_error(e))))?;
    let builder = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let builder = match &files.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for certificate in read_certificates(path).map_err(|message| error("client_ca_file", path, message))? {
                roots.add(certificate).map_err(|e| error("client_ca_file", path, format!("not a usable CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::new(rustls::crypto::ring::default_provider()))
                .build()
                .map_err(|e| error("client_ca_file", path, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certificates, key)
        .map_err(|e| error("key_file", &files.key_file, format!("does not fit the certificate in cert_file: {e}")))?;
    // The server speaks HTTP/1.1 only (axum's `http1`).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read PEM certificates: {}", pem_error(e)))?;
    if certificates.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certificates)
}

fn pem_error(error: rustls::pki_types::pem::Error) -> String {
    match error {
        rustls::pki_types::pem::Error::Io(error) => error.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM item of that kind in the file".into(),
        other => format!("{other:?}"),
    }
}

async fn accept_connections(listener: TcpListener, tls: Arc<Tls>, accepted: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(connection) => connection,
            Err(error) => {
                // Out of file descriptors and the like: pause rather than spin (as axum does).
                tracing::warn!(%error, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = TlsAcceptor::from(tls.current.load_full());
        let accepted = accepted.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let _ = accepted.send((stream, peer)).await;
                }
                Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

/// The listener `http::serve` takes: connections whose handshake has completed.
pub struct TlsListener {
    incoming: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: io::Result<SocketAddr>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(connection) => connection,
            // The accepting task lives as long as this listener; it ends only by panicking.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.local_addr.as_ref().copied().map_err(|e| io::Error::new(e.kind(), e.to_string()))
    }
}

impl Drop for TlsListener {
    /// Graceful shutdown drops the listener: stop taking new connections at once.
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

/// The TCP peer of a request, over plain HTTP and TLS alike (`http::serve` puts it in every
/// request's extensions as `ConnectInfo`).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);
