//! Bounds on the splitter's queues.

/// Bytes of host writes that may be applied to production but not yet acknowledged by the
/// appliance. Host writes wait for room beyond this, which is how a slow or absent appliance
/// pushes back on the host instead of growing memory without bound. Each byte is held in
/// memory until the appliance's Ack so it can be resent after a reconnect.
pub const UNACKED_BYTES_MAX: usize = 256 * 1024 * 1024;
/// The smallest `link_window_bytes` accepted: a window this small already costs host
/// throughput (fewer changes in flight per round trip).
pub const UNACKED_BYTES_MIN: usize = 8 * 1024 * 1024;

/// Changes handed to the socket in one batch before the writer flushes.
pub const SEND_BATCH_MESSAGES_MAX: usize = 256;

/// Cost charged against `UNACKED_BYTES_MAX` for a change without payload (trim, zero), so that
/// a flood of them is bounded too.
pub const CHANGE_OVERHEAD_BYTES: usize = 64;

/// Largest run of all-zero regions a resync sends as one Zero change (no payload), so a
/// sparse volume initialises with a handful of records.
pub const RESYNC_ZERO_RUN_BYTES_MAX: u64 = 1024 * 1024 * 1024;

/// How often a running resync logs its progress.
pub const RESYNC_REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Longest pause between reconnect attempts to the appliance.
pub const RECONNECT_BACKOFF_MS_MAX: u64 = 2000;

/// Bytes one checksum covers when a resync verifies (verified seeding); at least one bitmap
/// region. Larger means fewer checksums to compute and exchange, but a single differing byte
/// then copies more.
pub const VERIFY_REGION_BYTES: u64 = 1024 * 1024;

/// Checksum regions asked for in one request: 64 MiB of production and of replica read and
/// hashed per round trip, enough to hide the round trip behind the hashing.
pub const VERIFY_REQUEST_REGIONS_MAX: u64 = 64;

/// Extra verify rounds for regions whose checksums differed while the host was writing them
/// (the two sides may have hashed different moments); still differing after these, they are
/// copied. Bounds the time a busy region delays the end of a resync.
pub const VERIFY_RETRIES_MAX: u32 = 3;

const _: () = assert!(VERIFY_REGION_BYTES.is_power_of_two());
const _: () =
    assert!(VERIFY_REQUEST_REGIONS_MAX as usize <= cdp_link::limits::CHECKSUMS_PER_REQUEST_MAX);

/// A host request is at most 32 MiB, which must fit in the unacked window or it could never start.
const _: () = assert!(UNACKED_BYTES_MAX >= 2 * 32 * 1024 * 1024);
const _: () = assert!(UNACKED_BYTES_MAX <= u32::MAX as usize);
