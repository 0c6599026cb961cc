//! The server-wide shutdown signal each connection listens for: one broadcast channel whose
//! sender the server drops to stop every connection at its next request.

use tokio::sync::broadcast;

/// Listens for the server-wide shutdown signal (the broadcast sender being dropped).
pub(crate) struct Shutdown {
    is_shutdown: bool,
    notify: broadcast::Receiver<()>,
}

impl Shutdown {
    pub(crate) fn new(notify: broadcast::Receiver<()>) -> Self {
        Self {
            is_shutdown: false,
            notify,
        }
    }

    /// Completes once shutdown has been signalled (at once if it already was).
    pub(crate) async fn recv(&mut self) {
        if self.is_shutdown {
            return;
        }
        let _ = self.notify.recv().await;
        self.is_shutdown = true;
    }
}
