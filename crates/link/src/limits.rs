//! Bounds on everything a link peer can make us allocate or queue.

/// Largest data payload of one Write frame. Equals the NBD server's request maximum so a host
/// write is never split; each frame in flight can pin this much memory.
pub const WRITE_PAYLOAD_MAX: usize = 32 * 1024 * 1024;

/// Largest frame body: a write payload plus its fixed fields, with room to spare.
pub const FRAME_BODY_MAX: usize = WRITE_PAYLOAD_MAX + 4096;

/// Longest volume name or error text carried in a frame.
pub const TEXT_LEN_MAX: usize = 4096;

/// Bytes of socket buffering per direction; small frames are coalesced up to this before a syscall.
pub const SOCKET_BUFFER_BYTES: usize = 256 * 1024;

/// Default `link_deadline_ms` of splitter and appliance: a peer that sends nothing for this
/// long is considered gone. A few seconds: long enough for a loaded machine's scheduling
/// hiccups (four heartbeats fit in it), short enough that a host under the `mark` policy
/// stalls at most this long on a silent partition.
pub const LINK_DEADLINE_MS_DEFAULT: u64 = 5000;
/// Smallest `link_deadline_ms`: below this, timer and scheduling jitter look like a partition.
pub const LINK_DEADLINE_MS_MIN: u64 = 200;
/// Largest `link_deadline_ms` (10 minutes): beyond it the deadline is TCP's again.
pub const LINK_DEADLINE_MS_MAX: u64 = 600_000;
/// Heartbeats per deadline: each end sends one every `deadline / LINK_HEARTBEATS_PER_DEADLINE`
/// (when it sent nothing else meanwhile), so three may be lost or late before the peer gives up.
pub const LINK_HEARTBEATS_PER_DEADLINE: u32 = 4;

/// TCP keepalive on link sockets (the backstop; see `codec.rs`): first probe after this many
/// idle seconds, then every `TCP_KEEPALIVE_INTERVAL_S`, dropped after `TCP_KEEPALIVE_COUNT`
/// unanswered probes: about 16 s.
pub const TCP_KEEPALIVE_IDLE_S: i32 = 10;
pub const TCP_KEEPALIVE_INTERVAL_S: i32 = 2;
pub const TCP_KEEPALIVE_COUNT: i32 = 3;

/// Bytes of one region checksum (BLAKE3, 256 bits).
pub const CHECKSUM_BYTES: usize = 32;

/// Smallest checksum region: the splitter's dirty-bitmap region, so a differing checksum
/// region is always a whole number of bitmap regions to copy.
pub const CHECKSUM_REGION_BYTES_MIN: u32 = 64 * 1024;

/// Largest checksum region: one write payload, so the appliance reads at most this much into
/// memory per checksum.
pub const CHECKSUM_REGION_BYTES_MAX: u32 = WRITE_PAYLOAD_MAX as u32;

/// Most checksums one request may ask for (a 32 KiB answer body). Bounds the replica bytes one
/// request makes the appliance read before it answers.
pub const CHECKSUMS_PER_REQUEST_MAX: usize = 1024;

/// Checksum requests a splitter may have unanswered on one connection; each pins a replica
/// read at the appliance. The appliance drops a connection that sends more.
pub const CHECKSUM_REQUESTS_IN_FLIGHT_MAX: usize = 4;

const _: () = assert!(CHECKSUMS_PER_REQUEST_MAX * CHECKSUM_BYTES + 64 <= FRAME_BODY_MAX);
const _: () = assert!(LINK_DEADLINE_MS_MIN <= LINK_DEADLINE_MS_DEFAULT);
const _: () = assert!(LINK_DEADLINE_MS_DEFAULT <= LINK_DEADLINE_MS_MAX);
const _: () = assert!(LINK_HEARTBEATS_PER_DEADLINE >= 2);
const _: () = assert!(CHECKSUM_REGION_BYTES_MIN.is_power_of_two());
const _: () = assert!(CHECKSUM_REGION_BYTES_MAX.is_power_of_two());
const _: () = assert!(CHECKSUM_REGION_BYTES_MIN <= CHECKSUM_REGION_BYTES_MAX);
const _: () = assert!(FRAME_BODY_MAX > WRITE_PAYLOAD_MAX + TEXT_LEN_MAX / 2);
const _: () = assert!(FRAME_BODY_MAX <= u32::MAX as usize);
