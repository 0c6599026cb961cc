//! Every bound the journal enforces, in one place, with what each one costs.
//!
//! Anything a caller or a file controls is checked against these before memory is
//! allocated or bytes are written (TIGER_STYLE: put a limit on everything).

const MIB: u64 = 1024 * 1024;

/// Largest payload of one `Write` record: an NBD request is at most 32 MiB, so a
/// record never needs more. A reader allocates up to this much for one record.
pub const WRITE_PAYLOAD_BYTES_MAX: u64 = 32 * MIB;

/// Largest `payload_len` a decoder accepts from disk: the write limit plus a margin so a
/// later version may raise the write limit a little without old readers rejecting it.
/// Checked before any allocation, so a corrupt length cannot make a reader allocate more.
pub const RECORD_PAYLOAD_BYTES_MAX: u64 = WRITE_PAYLOAD_BYTES_MAX + MIB;

/// Longest bookmark name, in bytes. Bookmarks are few and small; this keeps a corrupt
/// or hostile name from costing more than a page.
pub const BOOKMARK_NAME_BYTES_MAX: u64 = 4096;

/// Write payloads shorter than this are stored as they are: a zstd frame has a few bytes
/// of overhead and tiny writes rarely compress.
pub const COMPRESS_PAYLOAD_BYTES_MIN: usize = 512;

/// zstd level for write payloads. Compression runs on the host's write path (before the
/// append lock), so a fast level; level -5 measured no faster end to end, with a worse ratio.
pub const COMPRESS_LEVEL: i32 = 1;

/// Most records one `append` call may carry. Each record costs one header in the
/// writer's scratch buffer and up to two iovecs.
pub const BATCH_RECORDS_MAX: usize = 16 * 1024;

/// Most bytes (headers plus payloads) one `append` call may carry. The batch is held
/// by the caller; this bounds how long the writer lock is held for one call.
pub const BATCH_BYTES_MAX: u64 = 256 * MIB;

/// Smallest segment a config may ask for; smaller values are clamped with a warning.
/// Tiny segments would cost a file, an fsync and a directory fsync per few records.
pub const SEGMENT_BYTES_MIN: u64 = MIB;

/// Default segment size: big enough that rollovers (two fsyncs) are rare, small enough
/// that retention can free space in useful steps.
pub const SEGMENT_BYTES_DEFAULT: u64 = 256 * MIB;

/// Largest segment a config may ask for; larger values are clamped with a warning.
/// Recovery scans the last segment fully on open when it has no valid tail checkpoint
/// (see `TAIL_CHECKPOINT_BYTES`), so this bounds open time.
pub const SEGMENT_BYTES_MAX: u64 = 16 * 1024 * MIB;

/// Most iovecs passed to one `pwritev` (Linux's `IOV_MAX`). A larger batch is written
/// with several calls at consecutive offsets.
pub const IOVECS_PER_WRITE_MAX: usize = 1024;

/// Payloads up to this size are copied next to their header in the scratch buffer
/// instead of costing an iovec of their own; copying 4 KiB is cheaper than the kernel's
/// per-iovec work and keeps big batches of small writes within few `pwritev` calls.
pub const PAYLOAD_COPY_BYTES_MAX: usize = 4096;

/// The writer's scratch buffer (record headers and small payloads of one batch) is
/// dropped after a batch that grew it beyond this, so memory returns after a burst.
pub const SCRATCH_BYTES_RETAINED_MAX: usize = 4 * 1024 * 1024;

/// Read-ahead buffer of one reader or scanner. Costs this much memory per open reader.
pub const READ_AHEAD_BYTES: usize = 256 * 1024;

/// The time index takes a mark (24 bytes in memory and in the sealed segment's marks file)
/// at a segment's first record and then after this many records or `TIME_MARK_BYTES`,
/// whichever comes first; a lookup by time scans at most that much past its mark. 10^7
/// small records cost about 40 000 marks (1 MB).
pub const TIME_MARK_RECORDS: u64 = 256;
/// See `TIME_MARK_RECORDS`: the bytes (headers and payloads) between two marks at most.
pub const TIME_MARK_BYTES: u64 = MIB;

/// A sync that finds at least this many bytes appended to the active segment since its
/// last tail checkpoint writes a new one (its marks file, after the fdatasync), so `open`
/// scans at most about this much of the last segment plus what the last sync did not
/// cover. Costs one small file write (24 bytes per mark) per this much journal.
pub const TAIL_CHECKPOINT_BYTES: u64 = 32 * MIB;

const _: () = assert!(RECORD_PAYLOAD_BYTES_MAX <= u32::MAX as u64);
const _: () = assert!(WRITE_PAYLOAD_BYTES_MAX <= RECORD_PAYLOAD_BYTES_MAX);
const _: () = assert!(BOOKMARK_NAME_BYTES_MAX <= RECORD_PAYLOAD_BYTES_MAX);
const _: () = assert!(SEGMENT_BYTES_MIN <= SEGMENT_BYTES_DEFAULT);
const _: () = assert!(SEGMENT_BYTES_DEFAULT <= SEGMENT_BYTES_MAX);
const _: () = assert!(PAYLOAD_COPY_BYTES_MAX < READ_AHEAD_BYTES);
const _: () = assert!(IOVECS_PER_WRITE_MAX >= 2);
