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

const _: () = assert!(FRAME_BODY_MAX > WRITE_PAYLOAD_MAX + TEXT_LEN_MAX / 2);
const _: () = assert!(FRAME_BODY_MAX <= u32::MAX as usize);
