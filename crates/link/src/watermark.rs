//! Cumulative progress marks (acked, durable) shared between tasks through `watch` channels.

use tokio::sync::watch;

/// Raises a watermark to `to` if that is higher; waiters are woken only when it moves.
/// Marks never go backwards, so a late or duplicate report is harmless.
pub fn raise(mark: &watch::Sender<u64>, to: u64) {
    mark.send_if_modified(|current| {
        let newer = to > *current;
        if newer {
            *current = to;
        }
        newer
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_moves_forward() {
        let (tx, mut rx) = watch::channel(5u64);
        raise(&tx, 3);
        assert!(!rx.has_changed().unwrap());
        raise(&tx, 9);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 9);
    }
}
