//! Limits both sides of the control protocol agree on.

/// How long `cdp bookmark create` waits for the answer beyond its timeout. The appliance
/// appends within the timeout or not at all; the grace covers the journal sync that follows,
/// so a slow fsync is not mistaken for a lost bookmark.
pub const BOOKMARK_ANSWER_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Longest bookmark name in bytes.
pub const BOOKMARK_NAME_BYTES_MAX: usize = 128;
