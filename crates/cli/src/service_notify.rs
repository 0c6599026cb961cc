//! systemd's readiness protocol (sd_notify(3)) for `Type=notify` units: one datagram of
//! `KEY=VALUE` lines sent to the unix socket named by `$NOTIFY_SOCKET`.
//!
//! The protocol is small enough that a dependency would cost more than it saves: the address
//! is a filesystem path (`/run/systemd/notify`) or, with a leading `@`, a Linux abstract
//! socket name. Without `$NOTIFY_SOCKET` (not started by systemd) every call does nothing.

use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixDatagram;

/// The variable systemd sets for a `Type=notify` service.
const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// The service is serving: systemd marks the unit active and starts what is ordered after it.
pub const READY: &str = "READY=1";
/// The service has begun its clean stop.
pub const STOPPING: &str = "STOPPING=1";

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to the service manager.
/// Returns false when no service manager asked for notifications.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(address) = std::env::var_os(NOTIFY_SOCKET_ENV) else {
        return Ok(false);
    };
    let address = address.into_encoded_bytes();
    let socket = UnixDatagram::unbound()?;
    match address.split_first() {
        Some((b'@', name)) => {
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &address)?;
        }
        Some((b'/', _)) => {
            let path = std::path::PathBuf::from(std::ffi::OsString::from_vec(address));
            socket.send_to(state.as_bytes(), path)?;
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{NOTIFY_SOCKET_ENV} must be an absolute path or an @abstract name"),
            ))
        }
    }
    Ok(true)
}

/// `notify`, with a failure logged rather than returned: a service manager that cannot be
/// told is no reason to stop serving (systemd then times the start out and says so).
pub fn notify_logged(state: &str) {
    match notify(state) {
        Ok(true) => tracing::debug!(state, "told the service manager"),
        Ok(false) => {}
        Err(e) => tracing::warn!("cannot notify the service manager ({state}): {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test for both address forms, because it sets the process-wide variable.
    #[test]
    fn notify_reaches_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        std::env::set_var(NOTIFY_SOCKET_ENV, &path);
        assert!(notify(READY).unwrap());
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], READY.as_bytes());

        use std::os::linux::net::SocketAddrExt;
        let name = format!("cdp-notify-test-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        let listener = UnixDatagram::bind_addr(&address).unwrap();
        std::env::set_var(NOTIFY_SOCKET_ENV, format!("@{name}"));
        assert!(notify(STOPPING).unwrap());
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], STOPPING.as_bytes());

        std::env::set_var(NOTIFY_SOCKET_ENV, "relative/path");
        assert!(notify(READY).is_err());
        std::env::remove_var(NOTIFY_SOCKET_ENV);
        assert!(!notify(READY).unwrap());
    }
}
