//! Bounds on the appliance's queues.

/// Flush requests waiting for a group's sync thread. A splitter sends at most one per host
/// FLUSH/FUA in flight, so reaching this means a misbehaving peer; its link is dropped.
pub const SYNC_REQUESTS_MAX: usize = 4096;

/// Changes a link connection appends to the journal in one call (one write syscall). Only
/// frames already buffered are batched, so batching never waits for more input.
pub const APPEND_BATCH_ITEMS_MAX: usize = 512;

/// Bytes a link connection appends to the journal in one call.
pub const APPEND_BATCH_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Bytes distributed to the replicas between two replica syncs and progress checkpoints.
/// A crash re-applies at most this much, which is harmless because applying is idempotent.
pub const DISTRIBUTION_CHECKPOINT_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// How long the host must not have written before distribution runs (unless it is overdue).
pub const DISTRIBUTION_HOST_QUIET: std::time::Duration = std::time::Duration::from_millis(100);

/// Records distributed between two checks for host activity.
pub const DISTRIBUTION_QUIET_CHECK_RECORDS: u64 = 64;

/// Default journal capacity of a group (`journal_capacity_bytes`): 8 GiB holds about a
/// minute of writes at full disk speed and hours of a typical VM's change rate, while
/// fitting beside the volumes on a small appliance disk.
pub const JOURNAL_CAPACITY_BYTES_DEFAULT: u64 = 8 * 1024 * 1024 * 1024;

/// A group's journal capacity is at least this many segments: retention never releases the
/// active segment, so one segment's worth could never be met.
pub const JOURNAL_CAPACITY_SEGMENTS_MIN: u64 = 2;

/// Split-link connections served at once.
pub const LINK_CONNECTIONS_MAX: usize = 1024;

/// Control connections served at once.
pub const CONTROL_CONNECTIONS_MAX: usize = 64;

/// One 32 MiB host write must fit in one append batch.
const _: () = assert!(APPEND_BATCH_BYTES_MAX >= 32 * 1024 * 1024 + 4096);

/// Longest bookmark name, in bytes: long enough for a descriptive name with a date, short
/// enough to show in a table. The journal's own bound (4 KiB) is far above.
pub const BOOKMARK_NAME_BYTES_MAX: usize = cdp_control::limits::BOOKMARK_NAME_BYTES_MAX;

/// Most activity buckets `cdp timeline` returns; with a longer window each bucket widens
/// (doubling from `TIMELINE_BUCKET_NS_DEFAULT`), so the answer stays small.
pub const TIMELINE_BUCKETS_MAX: usize = 1440;

/// Default activity bucket of `cdp timeline`: one minute.
pub const TIMELINE_BUCKET_NS_DEFAULT: u64 = 60_000_000_000;

/// Bookmark payload (12-byte header + name) must fit the journal's bookmark limit.
const _: () =
    assert!(BOOKMARK_NAME_BYTES_MAX as u64 + 12 <= cdp_journal::limits::BOOKMARK_NAME_BYTES_MAX);

/// How long `cdp bookmark create` waits for the answer beyond its timeout (a protocol limit).
pub use cdp_control::limits::BOOKMARK_ANSWER_GRACE;

/// How often a `bookmark create --wait` checks whether the group is recoverable again (a
/// blocking-pool thread waits; the wait itself is bounded by the request).
pub const BOOKMARK_RECOVERABLE_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Journal bytes distribution applies after one undo sync: the sync's cost is shared by
/// this much replica writing.
pub const DISTRIBUTION_BATCH_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// Records distribution applies after one undo sync.
pub const DISTRIBUTION_BATCH_RECORDS_MAX: usize = 1024;

/// Largest undo record: a long trim's before-image is split into pieces this big, each
/// either payload-less (it held zeroes) or carrying the bytes.
pub const UNDO_CHUNK_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Bytes of journal payloads image reads keep cached: sequential reads of a big write
/// would otherwise read and CRC-check it once per block.
pub const IMAGE_RECORD_CACHE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Payloads image reads keep cached, whatever their size.
pub const IMAGE_RECORD_CACHE_ENTRIES_MAX: usize = 4096;

/// Blocks one image block-status request classifies (under the history lock, so bounded;
/// 64 MiB of volume, and the client asks again for the rest).
pub const ALLOCATION_BLOCKS_MAX: u64 = 16 * 1024;

/// Images open at once on an appliance.
pub const IMAGES_MAX: usize = 64;

// --- remote replication ---
/// Replication links a remote appliance serves at once (each is one thread and up to
/// `cdp_link::replication::BATCHES_IN_FLIGHT_MAX` batches of buffered socket data); a group
/// takes one link at a time, further ones are refused.
pub const REPLICATION_LINKS_MAX: usize = 16;

/// Default `replication_deadline_ms`: a replication link that passes no bytes for this long
/// (either way) is dead; it is dropped and the shipper reconnects. Longer than the split
/// link's `link_deadline_ms` because a batch (up to 8 MiB) is acknowledged only after it
/// crossed a possibly slow or bandwidth-limited WAN link and the remote fsynced it.
pub const REPLICATION_DEADLINE_MS_DEFAULT: u64 = 30_000;

/// The idle timeout TLS handshakes leave on a replication socket; the shipper and the receiver
/// then set the configured deadline.
pub const REPLICATION_IDLE_TIMEOUT: std::time::Duration =
    std::time::Duration::from_millis(REPLICATION_DEADLINE_MS_DEFAULT);

/// How often an idle shipper proves the link alive (the receiver answers each heartbeat with
/// a `BatchAck`): a sixth of the deadline, so a few may be late or lost before it passes.
pub fn replication_heartbeat_interval(deadline: std::time::Duration) -> std::time::Duration {
    deadline / 6
}

/// Longest wait between two connection attempts of a shipper (it starts at 100 ms and doubles).
pub const REPLICATION_RECONNECT_BACKOFF_MAX: std::time::Duration =
    std::time::Duration::from_secs(5);

/// A replication link's TLS handshake must finish within this: a peer that connects and stays
/// silent holds one of the `REPLICATION_LINKS_MAX` link threads only this long.
pub const REPLICATION_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Socket bytes a TLS replication link reads at once before decrypting them (one buffer per
/// link; a TLS record is at most ~16 KiB, so this holds a few).
pub const REPLICATION_TLS_READ_BYTES: usize = 64 * 1024;

/// Sync mode: append batches of one split-link connection whose Acks wait for the remote
/// copy (16 bytes each). The splitter's unacked window keeps far fewer outstanding; past
/// this, batches merge into the newest entry, which delays their Acks but never drops one.
pub const SYNC_ACKS_PENDING_MAX: usize = 4096;

/// Sync mode: host writes waiting this long for the remote copy flag `sync_waiting` in
/// status and log one warning per episode.
pub const SYNC_WAIT_WARN: std::time::Duration = std::time::Duration::from_secs(1);

/// Dynamic mode: how long the remote must keep up (lag under a quarter of
/// `sync_wait_ms_max`, link connected) before a group running async returns to sync.
pub const DYNAMIC_SYNC_RETURN: std::time::Duration = std::time::Duration::from_secs(5);
// --- end remote replication ---

/// Blocks of one image read that must be assembled from journal or undo records (a record
/// read each) before the read is split across two threads: 128 blocks = 512 KiB.
pub const PARALLEL_ASSEMBLY_BLOCKS_MIN: usize = 128;

/// Body bytes of one small state file (`state_file.rs`). The largest is consolidation's kept
/// set, 8 bytes per kept point: 16 MiB is two million points, years of hourly points, and
/// bounds what a damaged length field can make the appliance allocate.
pub const STATE_BODY_BYTES_MAX: usize = 16 * 1024 * 1024;

// --- web timeline (`web.rs`) ---
/// Characters a `web_token` needs at least: a short token is guessable over loopback.
pub const WEB_TOKEN_CHARS_MIN: usize = 16;
/// Bytes of one web request's head; more is answered 431.
pub const WEB_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Bytes of one web request's body (a bookmark or image request is a few hundred).
pub const WEB_BODY_BYTES_MAX: usize = 16 * 1024;
/// Web connections served at once; more wait in the listen backlog.
pub const WEB_CONNECTIONS_MAX: usize = 16;
/// A web client must send its request, and take the answer, within this (image access may
/// roll a logged replica, so the answer may take a while).
pub const WEB_IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Samples of lag, write rate and journal fill the page charts: one a second, an hour.
pub const WEB_HISTORY_SAMPLES_MAX: usize = 3600;
