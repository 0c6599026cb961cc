//! Bounds on everything an NBD client can make the server allocate, queue or wait for.

use std::time::Duration;

/// Largest READ or WRITE length, advertised as the maximum block size in `NBD_INFO_BLOCK_SIZE`.
/// Each READ or WRITE in flight pins this much memory at most (the payload lives in one buffer).
/// The spec asks servers not to treat anything below 2^25 as a denial of service.
pub const REQUEST_BYTES_MAX: u32 = 32 * 1024 * 1024;

/// Minimum block size advertised: any byte offset and length is accepted.
pub const BLOCK_BYTES_MIN: u32 = 1;

/// Preferred block size advertised: below this, backends may have to read-modify-write.
pub const BLOCK_BYTES_PREFERRED: u32 = 4096;

/// READ and WRITE payload bytes one connection may hold in memory at once (request buffers
/// plus replies waiting for the socket). Memory per connection is bounded by this; the
/// whole server by this times the connection limit.
pub const CONNECTION_PAYLOAD_BYTES_MAX: u32 = 64 * 1024 * 1024;

/// Largest option payload read into memory during the handshake. INFO/GO carry at most a
/// 4 KiB name and a short list; anything bigger is refused with `NBD_REP_ERR_TOO_BIG`.
pub const OPTION_BYTES_MAX: u32 = 64 * 1024;

/// Largest oversized option payload we read and throw away to keep the stream in sync before
/// answering `NBD_REP_ERR_TOO_BIG`; beyond this the client is cut off (costs only bandwidth
/// and handshake time, never memory).
pub const OPTION_DISCARD_BYTES_MAX: u32 = 1024 * 1024;

/// Longest string (export name, description) the protocol allows.
pub const STRING_BYTES_MAX: usize = 4096;

/// Options one handshake may send before being cut off; each costs one round trip and a
/// little CPU, and a client looping forever inside the handshake timeout is a nuisance.
pub const OPTIONS_PER_HANDSHAKE_MAX: u32 = 1024;

/// Upper bound on `ServerConfig::requests_in_flight_max`: each request in flight is one task
/// plus one queued reply.
pub const REQUESTS_IN_FLIGHT_LIMIT: usize = 4096;

/// Upper bound on `ServerConfig::connections_max`: each connection is a task, two socket
/// buffers and up to `CONNECTION_PAYLOAD_BYTES_MAX` of payload.
pub const CONNECTIONS_LIMIT: usize = 4096;

/// Default for `ServerConfig::connections_max`.
pub const CONNECTIONS_MAX_DEFAULT: usize = 256;

/// Default for `ServerConfig::requests_in_flight_max`.
pub const REQUESTS_IN_FLIGHT_MAX_DEFAULT: usize = 128;

/// Default handshake deadline. A guest VM may connect during boot and stay silent for ten
/// seconds or more, so this is generous; it only bounds how long a silent peer holds a
/// connection slot.
pub const HANDSHAKE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);

/// Bytes the socket reader buffers; small requests (headers, 4 KiB writes) are taken in
/// batches of up to this per syscall, larger payloads bypass it.
pub const READ_BUFFER_BYTES: usize = 128 * 1024;

/// Reply bytes gathered from the reply queue before one vectored write.
pub const REPLY_BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Buffers handed to one vectored write (well under the kernel's IOV_MAX of 1024).
pub const REPLY_IOVECS_MAX: usize = 128;

/// Queries one `NBD_OPT_{LIST,SET}_META_CONTEXT` may carry (each is resolved by the
/// export, which may cost a lookup of a point in time).
pub const META_CONTEXT_QUERIES_MAX: usize = 16;

/// Metadata contexts one connection may select; each BLOCK_STATUS answers all of them.
pub const META_CONTEXTS_SELECTED_MAX: usize = 4;

/// Extents in one BLOCK_STATUS chunk (8 bytes each on the wire). The spec lets a server
/// answer less than the requested range; clients ask again from where the reply ended.
pub const BLOCK_STATUS_EXTENTS_MAX: usize = 16 * 1024;

/// READs at least this long are answered sparsely (holes sent as OFFSET_HOLE chunks
/// without reading them) when the export can report allocation; shorter ones are not
/// worth the extra allocation lookup.
pub const SPARSE_READ_BYTES_MIN: u32 = 64 * 1024;

/// Consecutive accept() failures (EMFILE and the like) tolerated, with doubling backoff,
/// before the accept loop gives up.
pub const ACCEPT_RETRIES_MAX: u32 = 8;

const _: () = assert!(REQUEST_BYTES_MAX >= 1 << 25);
const _: () = assert!(REQUEST_BYTES_MAX <= CONNECTION_PAYLOAD_BYTES_MAX);
const _: () = assert!(BLOCK_BYTES_MIN.is_power_of_two());
const _: () = assert!(BLOCK_BYTES_PREFERRED.is_power_of_two());
const _: () = assert!(BLOCK_BYTES_PREFERRED >= 512);
const _: () = assert!(BLOCK_BYTES_PREFERRED >= BLOCK_BYTES_MIN);
const _: () = assert!(REQUEST_BYTES_MAX >= BLOCK_BYTES_PREFERRED);
// Both powers of two with max >= min, so the maximum is a multiple of the minimum (spec).
const _: () = assert!(REQUEST_BYTES_MAX.is_power_of_two());
const _: () = assert!(REQUEST_BYTES_MAX >= BLOCK_BYTES_MIN);
const _: () = assert!(OPTION_BYTES_MAX as usize >= 4 + STRING_BYTES_MAX + 2 + 2 * 16);
const _: () = assert!(OPTION_DISCARD_BYTES_MAX >= OPTION_BYTES_MAX);
const _: () = assert!(REQUESTS_IN_FLIGHT_MAX_DEFAULT <= REQUESTS_IN_FLIGHT_LIMIT);
const _: () = assert!(CONNECTIONS_MAX_DEFAULT <= CONNECTIONS_LIMIT);
const _: () = assert!(REPLY_BATCH_BYTES_MAX >= 1024 * 1024);
const _: () = assert!(REPLY_IOVECS_MAX >= 2);
const _: () = assert!(BLOCK_STATUS_EXTENTS_MAX >= 16);
const _: () = assert!(META_CONTEXTS_SELECTED_MAX >= 2);
const _: () = assert!(SPARSE_READ_BYTES_MIN <= REQUEST_BYTES_MAX);
const _: () = assert!(REPLY_IOVECS_MAX <= 1024);
