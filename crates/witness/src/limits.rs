//! Limits of the witness and its protocol, with what each costs.

use std::time::Duration;

/// Longest request or reply line in bytes (a group id and a site id of at most
/// `NAME_BYTES_MAX` each fit many times over); a longer line closes the connection.
pub const LINE_BYTES_MAX: usize = 4096;
/// Longest group or site id in bytes.
pub const NAME_BYTES_MAX: usize = 255;
/// Groups one witness holds leases for; each costs about 600 bytes of memory and of state file.
pub const GROUPS_MAX: usize = 4096;
/// Connections served at once (one thread each, 64 KiB of stack): more are closed at accept.
pub const CONNECTIONS_MAX: usize = 256;
/// A connection silent this long is closed (keepers renew every third of their lease, and
/// `lease_duration_ms_max` is at most 10 minutes, so a live keeper never trips it).
pub const CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Shortest lease a witness may be configured to grant: below this the fixed margin and
/// round trips eat the lease.
pub const LEASE_DURATION_MS_MIN: u64 = 500;
/// Longest lease a witness may be configured to grant.
pub const LEASE_DURATION_MS_MAX: u64 = 10 * 60 * 1000;
/// Highest drift rate a configuration may state (10 %: beyond that no clock is a clock).
pub const DRIFT_PPM_MAX: u64 = 100_000;

const _: () = assert!(NAME_BYTES_MAX * 4 < LINE_BYTES_MAX);
const _: () = assert!(LEASE_DURATION_MS_MIN < LEASE_DURATION_MS_MAX);
const _: () = assert!(LEASE_DURATION_MS_MAX < CONNECTION_IDLE_TIMEOUT.as_millis() as u64);
