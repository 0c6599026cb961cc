//! Bounds on the appliance's queues.

/// Bytes of changes received from splitters but not yet appended to a group's journal. Link
/// connections stop reading when it is reached, which pushes back on the splitters.
pub const APPEND_QUEUE_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Items in a group's append queue (a change or a flush request each).
pub const APPEND_QUEUE_ITEMS_MAX: usize = 4096;

/// Changes appended to the journal in one call (one write syscall batch).
pub const APPEND_BATCH_ITEMS_MAX: usize = 512;

/// Bytes appended to the journal in one call.
pub const APPEND_BATCH_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Bytes distributed to the replicas between two replica syncs and progress checkpoints.
/// A crash re-applies at most this much, which is harmless because applying is idempotent.
pub const DISTRIBUTION_CHECKPOINT_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// Split-link connections served at once.
pub const LINK_CONNECTIONS_MAX: usize = 1024;

/// Control connections served at once.
pub const CONTROL_CONNECTIONS_MAX: usize = 64;

/// Longest control request line.
pub const CONTROL_REQUEST_BYTES_MAX: usize = 64 * 1024;

/// One 32 MiB host write must fit in the append queue and in one append batch.
const _: () = assert!(APPEND_QUEUE_BYTES_MAX >= 2 * 32 * 1024 * 1024);
const _: () = assert!(APPEND_BATCH_BYTES_MAX >= 32 * 1024 * 1024 + 4096);
const _: () = assert!(APPEND_QUEUE_BYTES_MAX <= u32::MAX as usize);
