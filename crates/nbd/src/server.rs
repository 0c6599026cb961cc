//! Listeners: accept loops for TCP and unix sockets, connection limits, handshake deadline and shutdown.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{broadcast, mpsc, Semaphore};
use tracing::{debug, info, warn};

use crate::error::NbdError;
use crate::handshake::{self, Outcome};
use crate::limits::{
    ACCEPT_RETRIES_MAX, CONNECTIONS_LIMIT, CONNECTIONS_MAX_DEFAULT, HANDSHAKE_TIMEOUT_DEFAULT,
    READ_BUFFER_BYTES, REQUESTS_IN_FLIGHT_LIMIT, REQUESTS_IN_FLIGHT_MAX_DEFAULT,
};
use crate::registry::ExportRegistry;
use crate::shutdown::Shutdown;
use crate::transmission;

/// Server settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Deadline for the whole handshake (greeting to GO/EXPORT_NAME). Default 60 s, because
    /// a booting guest may connect and stay silent for ten seconds or more; minimum 1 s.
    /// The transmission phase has no idle timeout.
    pub handshake_timeout: Duration,
    /// Connections served at once across all listeners of this `Server`; further clients
    /// wait in the listen backlog. Default 256, between 1 and 4096.
    pub connections_max: usize,
    /// Requests one connection may have in flight; the reader stops reading until one
    /// completes. Default 128, between 1 and 4096.
    pub requests_in_flight_max: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: HANDSHAKE_TIMEOUT_DEFAULT,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            requests_in_flight_max: REQUESTS_IN_FLIGHT_MAX_DEFAULT,
        }
    }
}

impl ServerConfig {
    /// Clamps values outside their documented range, with a warning for each.
    pub fn sanitize(mut self) -> Self {
        if self.handshake_timeout < Duration::from_secs(1) {
            warn!(
                configured_ms = self.handshake_timeout.as_millis() as u64,
                "NBD handshake_timeout below 1 s; using 1 s"
            );
            self.handshake_timeout = Duration::from_secs(1);
        }
        let clamp = |name: &str, value: usize, limit: usize| {
            let clamped = value.clamp(1, limit);
            if clamped != value {
                warn!(
                    name,
                    value, clamped, "NBD server limit out of range; clamped"
                );
            }
            clamped
        };
        self.connections_max = clamp("connections_max", self.connections_max, CONNECTIONS_LIMIT);
        self.requests_in_flight_max = clamp(
            "requests_in_flight_max",
            self.requests_in_flight_max,
            REQUESTS_IN_FLIGHT_LIMIT,
        );
        self
    }
}

/// An NBD server over one export registry. One `Server` may run several listeners at
/// once (for instance TCP and a unix socket); they share the connection limit.
pub struct Server {
    registry: ExportRegistry,
    config: ServerConfig,
    connections: Arc<Semaphore>,
}

impl Server {
    pub fn new(registry: ExportRegistry, config: ServerConfig) -> Self {
        let config = config.sanitize();
        let connections = Arc::new(Semaphore::new(config.connections_max));
        Self {
            registry,
            config,
            connections,
        }
    }

    pub fn registry(&self) -> &ExportRegistry {
        &self.registry
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Serves clients from `listener` until `shutdown` completes, then stops accepting,
    /// lets every open connection finish its in-flight requests, and returns.
    pub async fn serve_tcp(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), NbdError> {
        self.serve(listener, shutdown).await
    }

    /// As `serve_tcp`, for a unix socket listener.
    pub async fn serve_unix(
        &self,
        listener: UnixListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), NbdError> {
        self.serve(listener, shutdown).await
    }

    async fn serve<L: Accept>(
        &self,
        listener: L,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), NbdError> {
        // Dropping the broadcast sender tells every connection to stop; each connection task
        // holds a clone of `done_tx`, so `done_rx` yields None once they have all ended.
        let (notify_tx, _) = broadcast::channel::<()>(1);
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        let result = tokio::select! {
            result = self.accept_loop(&listener, &notify_tx, &done_tx) => result,
            _ = shutdown => Ok(()),
        };
        drop(notify_tx);
        drop(done_tx);
        let _ = done_rx.recv().await;
        result
    }

    async fn accept_loop<L: Accept>(
        &self,
        listener: &L,
        notify_tx: &broadcast::Sender<()>,
        done_tx: &mpsc::Sender<()>,
    ) -> Result<(), NbdError> {
        loop {
            // Take the slot before accepting so a full server leaves clients in the backlog
            // instead of accepting and starving them.
            let permit = self
                .connections
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| NbdError::Io(io::Error::other("connection semaphore closed")))?;
            let (reader, writer, peer) = accept_with_backoff(listener).await?;
            let registry = self.registry.clone();
            let config = self.config.clone();
            let mut shutdown = Shutdown::new(notify_tx.subscribe());
            let done = done_tx.clone();
            tokio::spawn(async move {
                debug!(%peer, "NBD client connected");
                match handle_connection(reader, writer, &registry, &config, &mut shutdown).await {
                    Ok(()) => debug!(%peer, "NBD client disconnected"),
                    // A client that closes during the handshake (a readiness probe, an ABORT
                    // without reading the reply) is routine; only transmission errors are news.
                    Err(err @ NbdError::Io(_)) => {
                        debug!(%peer, %err, "NBD connection ended")
                    }
                    Err(err) => info!(%peer, %err, "NBD connection ended"),
                }
                drop(permit);
                drop(done);
            });
        }
    }
}

async fn accept_with_backoff<L: Accept>(
    listener: &L,
) -> Result<(L::Read, L::Write, String), NbdError> {
    let mut backoff = Duration::from_millis(50);
    let mut failures = 0;
    loop {
        match listener.accept().await {
            Ok(accepted) => return Ok(accepted),
            Err(err) => {
                failures += 1;
                if failures > ACCEPT_RETRIES_MAX {
                    return Err(err.into());
                }
                warn!(%err, backoff_ms = backoff.as_millis() as u64, "NBD accept failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
    }
}

async fn handle_connection<R, W>(
    reader: R,
    mut writer: W,
    registry: &ExportRegistry,
    config: &ServerConfig,
    shutdown: &mut Shutdown,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let handshake = tokio::time::timeout(
        config.handshake_timeout,
        handshake::negotiate(&mut reader, &mut writer, registry),
    );
    let outcome = tokio::select! {
        _ = shutdown.recv() => return Ok(()),
        outcome = handshake => outcome.map_err(|_| NbdError::HandshakeTimeout(config.handshake_timeout))??,
    };
    match outcome {
        Outcome::Aborted => Ok(()),
        Outcome::Transmission(session) => {
            debug!(export = %session.name, size = session.size, "NBD transmission phase");
            transmission::serve(
                reader,
                writer,
                session,
                config.requests_in_flight_max,
                shutdown,
            )
            .await
        }
    }
}

/// A listener that yields split, owned socket halves.
trait Accept: Send + Sync {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Read, Self::Write, String)>> + Send;
}

impl Accept for TcpListener {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;

    async fn accept(&self) -> io::Result<(Self::Read, Self::Write, String)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        // Replies are written whole; Nagle would only hold back the tail of each one.
        stream.set_nodelay(true)?;
        let (reader, writer) = stream.into_split();
        Ok((reader, writer, peer.to_string()))
    }
}

impl Accept for UnixListener {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;

    async fn accept(&self) -> io::Result<(Self::Read, Self::Write, String)> {
        let (stream, _) = UnixListener::accept(self).await?;
        let (reader, writer) = stream.into_split();
        Ok((reader, writer, "unix socket".to_owned()))
    }
}
