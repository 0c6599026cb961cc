//! A blocking NBD client (fixed newstyle, `NBD_OPT_GO`, simple replies, one request at a time;
//! a connection opened for a metadata context negotiates structured replies for BLOCK_STATUS).
//!
//! Used by the CLI to read point-in-time images and to write production through the splitter,
//! and by tests. It speaks the subset of `doc/proto.md` our own server offers and checks
//! everything the peer sends: magic numbers, option echoes, reply handles and lengths. A
//! reply that breaks the protocol poisons the connection; later calls fail at once instead of
//! reading from the middle of a stream.
//!
//! Requests longer than the server's maximum block size (at most [`REQUEST_BYTES_MAX`]) are
//! split into several, so callers may pass buffers of any length.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use cdp_types::Endpoint;

use crate::limits::{REQUEST_BYTES_MAX, STRING_BYTES_MAX};
use crate::protocol::*;

/// Longest BLOCK_STATUS chunk payload accepted (the server sends at most 16 Ki extents).
const BLOCK_STATUS_CHUNK_BYTES_MAX: u32 = 4 + 8 * 64 * 1024;

/// Longest option reply payload accepted during the handshake. Replies are an INFO item or
/// an error message; a server sending more is broken or hostile.
const OPTION_REPLY_BYTES_MAX: u32 = 64 * 1024;

/// Option replies accepted for one `NBD_OPT_GO` before giving up on the server.
const OPTION_REPLIES_MAX: usize = 64;

/// What went wrong talking to an NBD server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the NBD server at {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    #[error("NBD I/O with {endpoint}: {source}")]
    Io {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    /// The server sent something the protocol forbids; the connection is unusable.
    #[error("NBD server at {endpoint} broke the protocol: {why}")]
    Protocol { endpoint: String, why: String },
    /// The server refused the export during the handshake (`NBD_REP_ERR_*`).
    #[error("NBD server at {endpoint} refused export {export:?}: {reply}{}", message_suffix(.message))]
    ExportRefused {
        endpoint: String,
        export: String,
        /// The reply's name, e.g. `NBD_REP_ERR_UNKNOWN`.
        reply: &'static str,
        /// The server's free-text explanation, possibly empty.
        message: String,
    },
    /// The server answered a request with an error value.
    #[error("NBD {command} of {length} bytes at offset {offset} on export {export:?} failed: {errno_name} ({errno})")]
    Command {
        export: String,
        command: &'static str,
        offset: u64,
        length: u64,
        errno: u32,
        errno_name: &'static str,
    },
    /// A write, trim or zero on an export the server announced as read-only; not sent.
    #[error("NBD export {export:?} is read-only (EPERM): {command} refused")]
    ReadOnly {
        export: String,
        command: &'static str,
    },
    /// A command the server did not advertise for this export; not sent.
    #[error("NBD export {export:?} does not support {command}")]
    Unsupported {
        export: String,
        command: &'static str,
    },
    /// A request reaching past the end of the export; not sent.
    #[error("NBD {command} of {length} bytes at offset {offset} runs past the end of export {export:?} ({size} bytes)")]
    OutOfRange {
        export: String,
        command: &'static str,
        offset: u64,
        length: u64,
        size: u64,
    },
    /// An earlier failure left the stream in an unknown place.
    #[error("NBD connection to export {export:?} is unusable after an earlier error")]
    Poisoned { export: String },
}

fn message_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(" ({message})")
    }
}

impl ClientError {
    /// The NBD error value behind this error, when the server gave one (or would have: a
    /// write to a read-only export is `EPERM`).
    pub fn errno(&self) -> Option<u32> {
        match self {
            ClientError::Command { errno, .. } => Some(*errno),
            ClientError::ReadOnly { .. } => Some(NBD_EPERM),
            _ => None,
        }
    }
}

/// The symbolic name of an NBD error value (the spec's list).
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        NBD_OK => "OK",
        NBD_EPERM => "EPERM",
        NBD_EIO => "EIO",
        12 => "ENOMEM",
        NBD_EINVAL => "EINVAL",
        NBD_ENOSPC => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        NBD_ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown NBD error",
    }
}

/// The symbolic name of an option reply type.
fn reply_name(reply_type: u32) -> &'static str {
    match reply_type {
        NBD_REP_ACK => "NBD_REP_ACK",
        NBD_REP_SERVER => "NBD_REP_SERVER",
        NBD_REP_INFO => "NBD_REP_INFO",
        NBD_REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        NBD_REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        NBD_REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        0x8000_0004 => "NBD_REP_ERR_PLATFORM",
        0x8000_0005 => "NBD_REP_ERR_TLS_REQD",
        NBD_REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN (no such export)",
        NBD_REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        0x8000_0008 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        NBD_REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        _ => "an unknown NBD_REP_ERR",
    }
}

/// A connected socket of either kind.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn connect(endpoint: &Endpoint) -> io::Result<Self> {
        match endpoint {
            Endpoint::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path)?)),
            Endpoint::Tcp(address) => {
                let stream = TcpStream::connect(address.as_str())?;
                // Requests are written whole; Nagle would only delay the next header.
                stream.set_nodelay(true)?;
                Ok(Stream::Tcp(stream))
            }
        }
    }

    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the handshake learned about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ExportInfo {
    size: u64,
    flags: u16,
    /// Largest READ/WRITE the server accepts (its `NBD_INFO_BLOCK_SIZE` maximum, capped).
    request_bytes_max: u32,
}

/// A connection to one export, in the transmission phase.
pub struct Client {
    stream: Stream,
    endpoint: String,
    export: String,
    info: ExportInfo,
    next_handle: u64,
    poisoned: bool,
    disconnected: bool,
    /// The metadata context asked for at connect, and the id the server gave it. Such a
    /// connection negotiates structured replies and serves `block_status` only.
    context: Option<String>,
    context_id: u32,
}

impl Client {
    /// Connects to `endpoint` and opens `export` with `NBD_OPT_GO` (falling back to
    /// `NBD_OPT_EXPORT_NAME` only if the server does not know GO).
    pub fn connect(endpoint: &Endpoint, export: &str) -> Result<Client, ClientError> {
        Self::connect_with_timeout(endpoint, export, None)
    }

    /// As `connect`, with a deadline on every socket read and write (None: wait forever).
    pub fn connect_with_timeout(
        endpoint: &Endpoint,
        export: &str,
        timeout: Option<Duration>,
    ) -> Result<Client, ClientError> {
        Self::open(endpoint, export, None, timeout)
    }

    /// Connects for `block_status` on metadata context `context` (structured replies and
    /// `NBD_OPT_SET_META_CONTEXT` before GO); refused if the server does not offer it.
    /// Other requests on this connection fail: its replies would be structured.
    pub fn connect_for_context(
        endpoint: &Endpoint,
        export: &str,
        context: &str,
        timeout: Option<Duration>,
    ) -> Result<Client, ClientError> {
        Self::open(endpoint, export, Some(context.to_owned()), timeout)
    }

    fn open(
        endpoint: &Endpoint,
        export: &str,
        context: Option<String>,
        timeout: Option<Duration>,
    ) -> Result<Client, ClientError> {
        let endpoint_text = endpoint.to_string();
        if export.len() > STRING_BYTES_MAX {
            return Err(ClientError::ExportRefused {
                endpoint: endpoint_text,
                export: export.chars().take(64).collect(),
                reply: "not sent",
                message: "export names are at most 4096 bytes".to_owned(),
            });
        }
        let connect_error = |source| ClientError::Connect {
            endpoint: endpoint_text.clone(),
            source,
        };
        let stream = Stream::connect(endpoint).map_err(connect_error)?;
        stream.set_timeout(timeout).map_err(connect_error)?;
        let mut client = Client {
            stream,
            endpoint: endpoint_text,
            export: export.to_owned(),
            info: ExportInfo {
                size: 0,
                flags: 0,
                request_bytes_max: REQUEST_BYTES_MAX,
            },
            next_handle: 1,
            poisoned: false,
            disconnected: false,
            context,
            context_id: 0,
        };
        client.info = client.handshake()?;
        Ok(client)
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// The export's transmission flags (`NBD_FLAG_*`).
    pub fn flags(&self) -> u16 {
        self.info.flags
    }

    pub fn read_only(&self) -> bool {
        self.info.flags & NBD_FLAG_READ_ONLY != 0
    }

    pub fn can_flush(&self) -> bool {
        self.info.flags & NBD_FLAG_SEND_FLUSH != 0
    }

    pub fn can_fua(&self) -> bool {
        self.info.flags & NBD_FLAG_SEND_FUA != 0
    }

    pub fn can_trim(&self) -> bool {
        self.info.flags & NBD_FLAG_SEND_TRIM != 0
    }

    pub fn can_write_zeroes(&self) -> bool {
        self.info.flags & NBD_FLAG_SEND_WRITE_ZEROES != 0
    }

    /// The export name this connection opened.
    pub fn export(&self) -> &str {
        &self.export
    }

    /// Largest single request this client sends; longer calls are split.
    pub fn request_bytes_max(&self) -> u32 {
        self.info.request_bytes_max
    }

    /// Fills `buf` from `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        self.check_range("READ", offset, buf.len() as u64)?;
        let step = self.info.request_bytes_max as usize;
        let mut at = offset;
        for piece in buf.chunks_mut(step) {
            // chunks_mut yields at most `step` (a u32) bytes.
            let length = piece.len() as u32;
            self.send_request(NBD_CMD_READ, 0, at, length, &[])?;
            self.receive_reply("READ", at, u64::from(length), Some(piece))?;
            at += u64::from(length);
        }
        Ok(())
    }

    /// Writes `data` at `offset`; with `fua` the server makes it durable before answering.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        self.check_writable("WRITE")?;
        self.check_range("WRITE", offset, data.len() as u64)?;
        let step = self.info.request_bytes_max as usize;
        let flags = self.fua_flag(fua);
        let mut at = offset;
        for piece in data.chunks(step) {
            let length = piece.len() as u32;
            self.send_request(NBD_CMD_WRITE, flags, at, length, piece)?;
            self.receive_reply("WRITE", at, u64::from(length), None)?;
            at += u64::from(length);
        }
        self.emulate_fua(fua)
    }

    /// Makes every write completed so far durable.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        if !self.can_flush() {
            return Err(self.unsupported("FLUSH"));
        }
        self.send_request(NBD_CMD_FLUSH, 0, 0, 0, &[])?;
        self.receive_reply("FLUSH", 0, 0, None)
    }

    /// Tells the server the range's contents are no longer needed (reads may return anything).
    pub fn trim(&mut self, offset: u64, length: u64, fua: bool) -> Result<(), ClientError> {
        if !self.can_trim() {
            return Err(self.unsupported("TRIM"));
        }
        self.ranged_command(NBD_CMD_TRIM, "TRIM", 0, offset, length, fua)
    }

    /// Writes zeroes over the range; `may_trim` lets the server punch a hole instead
    /// (without it, `NBD_CMD_FLAG_NO_HOLE` is set).
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        length: u64,
        fua: bool,
        may_trim: bool,
    ) -> Result<(), ClientError> {
        if !self.can_write_zeroes() {
            return Err(self.unsupported("WRITE_ZEROES"));
        }
        let no_hole = if may_trim { 0 } else { NBD_CMD_FLAG_NO_HOLE };
        self.ranged_command(
            NBD_CMD_WRITE_ZEROES,
            "WRITE_ZEROES",
            no_hole,
            offset,
            length,
            fua,
        )
    }

    /// Ends the session politely (`NBD_CMD_DISC`, which has no reply) and closes the socket.
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        self.send_disconnect()
    }

    fn send_disconnect(&mut self) -> Result<(), ClientError> {
        if self.disconnected || self.poisoned {
            self.stream.shutdown();
            return Ok(());
        }
        self.disconnected = true;
        let result = self.send_request(NBD_CMD_DISC, 0, 0, 0, &[]);
        self.stream.shutdown();
        result
    }

    /// TRIM or WRITE_ZEROES over a range of any length, in requests the server accepts.
    fn ranged_command(
        &mut self,
        command: u16,
        name: &'static str,
        flags: u16,
        offset: u64,
        length: u64,
        fua: bool,
    ) -> Result<(), ClientError> {
        self.check_writable(name)?;
        self.check_range(name, offset, length)?;
        let flags = flags | self.fua_flag(fua);
        let step = u64::from(self.info.request_bytes_max);
        let end = offset + length;
        let mut at = offset;
        while at < end {
            // At most `step`, a u32.
            let piece = (end - at).min(step) as u32;
            self.send_request(command, flags, at, piece, &[])?;
            self.receive_reply(name, at, u64::from(piece), None)?;
            at += u64::from(piece);
        }
        self.emulate_fua(fua)
    }

    fn fua_flag(&self, fua: bool) -> u16 {
        if fua && self.can_fua() {
            NBD_CMD_FLAG_FUA
        } else {
            0
        }
    }

    /// A server without FUA support gets a FLUSH after the write instead, so `fua: true`
    /// always means "durable when this returns".
    fn emulate_fua(&mut self, fua: bool) -> Result<(), ClientError> {
        if fua && !self.can_fua() && self.can_flush() {
            return self.flush();
        }
        Ok(())
    }

    fn check_writable(&self, command: &'static str) -> Result<(), ClientError> {
        if self.read_only() {
            return Err(ClientError::ReadOnly {
                export: self.export.clone(),
                command,
            });
        }
        Ok(())
    }

    fn check_range(
        &self,
        command: &'static str,
        offset: u64,
        length: u64,
    ) -> Result<(), ClientError> {
        let inside = offset
            .checked_add(length)
            .is_some_and(|end| end <= self.info.size);
        if !inside {
            return Err(ClientError::OutOfRange {
                export: self.export.clone(),
                command,
                offset,
                length,
                size: self.info.size,
            });
        }
        Ok(())
    }

    fn unsupported(&self, command: &'static str) -> ClientError {
        ClientError::Unsupported {
            export: self.export.clone(),
            command,
        }
    }

    fn send_request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        if self.poisoned {
            return Err(ClientError::Poisoned {
                export: self.export.clone(),
            });
        }
        let handle = self.next_handle;
        let mut header = [0u8; REQUEST_HEADER_BYTES];
        header[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        header[4..6].copy_from_slice(&flags.to_be_bytes());
        header[6..8].copy_from_slice(&command.to_be_bytes());
        header[8..16].copy_from_slice(&handle.to_be_bytes());
        header[16..24].copy_from_slice(&offset.to_be_bytes());
        header[24..28].copy_from_slice(&length.to_be_bytes());
        let sent = self
            .stream
            .write_all(&header)
            .and_then(|()| self.stream.write_all(payload));
        self.guard_io(sent)
    }

    /// The status of `[offset, offset + length)` in the connection's metadata context, as
    /// (length, flags) extents from `offset`; they may cover less than asked (never nothing).
    pub fn block_status(
        &mut self,
        offset: u64,
        length: u32,
    ) -> Result<Vec<(u32, u32)>, ClientError> {
        if self.context.is_none() {
            return Err(self.unsupported("BLOCK_STATUS"));
        }
        self.send_request(NBD_CMD_BLOCK_STATUS, 0, offset, length, &[])?;
        let mut extents = Vec::new();
        let mut error = None;
        loop {
            let mut raw = [0u8; CHUNK_HEADER_BYTES];
            let received = self.stream.read_exact(&mut raw);
            self.guard_io(received)?;
            let magic = u32::from_be_bytes(field(&raw, 0));
            let flags = u16::from_be_bytes(field(&raw, 4));
            let kind = u16::from_be_bytes(field(&raw, 6));
            let handle = u64::from_be_bytes(field(&raw, 8));
            let chunk_len = u32::from_be_bytes(field(&raw, 16));
            if magic != STRUCTURED_REPLY_MAGIC {
                return Err(self.protocol(format!("BLOCK_STATUS reply magic {magic:#010x}")));
            }
            if handle != self.next_handle {
                return Err(self.protocol(format!("reply for handle {handle:#x}")));
            }
            if chunk_len > BLOCK_STATUS_CHUNK_BYTES_MAX {
                return Err(self.protocol(format!("chunk of {chunk_len} bytes")));
            }
            let mut payload = vec![0u8; chunk_len as usize];
            let received = self.stream.read_exact(&mut payload);
            self.guard_io(received)?;
            match kind {
                NBD_REPLY_TYPE_NONE => {}
                NBD_REPLY_TYPE_BLOCK_STATUS => {
                    if payload.len() < 12 || !(payload.len() - 4).is_multiple_of(8) {
                        return Err(
                            self.protocol(format!("BLOCK_STATUS chunk of {} bytes", payload.len()))
                        );
                    }
                    if u32::from_be_bytes(field(&payload, 0)) == self.context_id {
                        extents = payload[4..]
                            .chunks_exact(8)
                            .map(|d| {
                                (
                                    u32::from_be_bytes(field(d, 0)),
                                    u32::from_be_bytes(field(d, 4)),
                                )
                            })
                            .collect();
                    }
                }
                kind if kind & (1 << 15) != 0 && payload.len() >= 6 => {
                    error = Some(u32::from_be_bytes(field(&payload, 0)));
                }
                other => return Err(self.protocol(format!("chunk type {other} to BLOCK_STATUS"))),
            }
            if flags & NBD_REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        self.next_handle = self.next_handle.wrapping_add(1);
        if let Some(errno) = error {
            return Err(ClientError::Command {
                export: self.export.clone(),
                command: "BLOCK_STATUS",
                offset,
                length: u64::from(length),
                errno,
                errno_name: errno_name(errno),
            });
        }
        let covered: u64 = extents.iter().map(|&(l, _)| u64::from(l)).sum();
        if extents.is_empty() || covered > u64::from(length) || extents.iter().any(|e| e.0 == 0) {
            return Err(self.protocol(format!(
                "BLOCK_STATUS answered {} extents over {covered} bytes for {length}",
                extents.len()
            )));
        }
        Ok(extents)
    }

    /// Negotiates structured replies and selects the connection's metadata context.
    fn select_context(&mut self, context: &str) -> Result<(), ClientError> {
        self.send_option(NBD_OPT_STRUCTURED_REPLY, &[])?;
        let (reply, payload) = self.receive_option_reply(NBD_OPT_STRUCTURED_REPLY)?;
        if reply != NBD_REP_ACK {
            return Err(self.context_refused(reply, &payload, context));
        }
        let name = self.export.as_bytes();
        let mut data = Vec::with_capacity(12 + name.len() + context.len());
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name);
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(&(context.len() as u32).to_be_bytes());
        data.extend_from_slice(context.as_bytes());
        self.send_option(NBD_OPT_SET_META_CONTEXT, &data)?;
        let mut id = None;
        for _ in 0..OPTION_REPLIES_MAX {
            let (reply, payload) = self.receive_option_reply(NBD_OPT_SET_META_CONTEXT)?;
            match reply {
                NBD_REP_META_CONTEXT if payload.len() >= 4 => {
                    id = Some(u32::from_be_bytes(field(&payload, 0)))
                }
                NBD_REP_ACK => break,
                other => return Err(self.context_refused(other, &payload, context)),
            }
        }
        match id {
            Some(id) => {
                self.context_id = id;
                Ok(())
            }
            None => Err(self.context_refused(
                NBD_REP_ACK,
                b"the server offers no such context",
                context,
            )),
        }
    }

    fn context_refused(&mut self, reply: u32, payload: &[u8], context: &str) -> ClientError {
        let _ = self.send_option(NBD_OPT_ABORT, &[]);
        self.poisoned = true;
        self.stream.shutdown();
        ClientError::ExportRefused {
            endpoint: self.endpoint.clone(),
            export: self.export.clone(),
            reply: reply_name(reply),
            message: format!(
                "metadata context {context:?}: {}",
                String::from_utf8_lossy(payload).trim()
            ),
        }
    }

    /// Reads the simple reply to the request just sent; for a successful READ, its data
    /// into `data`.
    fn receive_reply(
        &mut self,
        command: &'static str,
        offset: u64,
        length: u64,
        data: Option<&mut [u8]>,
    ) -> Result<(), ClientError> {
        let mut raw = [0u8; SIMPLE_REPLY_BYTES];
        let received = self.stream.read_exact(&mut raw);
        self.guard_io(received)?;
        let magic = u32::from_be_bytes(field(&raw, 0));
        let errno = u32::from_be_bytes(field(&raw, 4));
        let handle = u64::from_be_bytes(field(&raw, 8));
        if magic == STRUCTURED_REPLY_MAGIC {
            return Err(self.protocol("structured reply, which was never negotiated".to_owned()));
        }
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(self.protocol(format!("reply magic {magic:#010x}")));
        }
        let expected = self.next_handle;
        if handle != expected {
            return Err(self.protocol(format!(
                "reply for handle {handle:#x}, but request {expected:#x} is the only one in flight"
            )));
        }
        self.next_handle = self.next_handle.wrapping_add(1);
        if errno != NBD_OK {
            // An error reply to a READ carries no data, so the stream is still in step.
            return Err(ClientError::Command {
                export: self.export.clone(),
                command,
                offset,
                length,
                errno,
                errno_name: errno_name(errno),
            });
        }
        if let Some(data) = data {
            let received = self.stream.read_exact(data);
            self.guard_io(received)?;
        }
        Ok(())
    }

    /// Runs the fixed-newstyle handshake up to the transmission phase.
    fn handshake(&mut self) -> Result<ExportInfo, ClientError> {
        let mut greeting = [0u8; GREETING_BYTES];
        let received = self.stream.read_exact(&mut greeting);
        self.guard_io(received)?;
        let magic = u64::from_be_bytes(field(&greeting, 0));
        let option_magic = u64::from_be_bytes(field(&greeting, 8));
        let server_flags = u16::from_be_bytes(field(&greeting, 16));
        if magic != NBD_MAGIC {
            return Err(self.protocol(format!("greeting magic {magic:#018x}, not NBDMAGIC")));
        }
        if option_magic != IHAVEOPT {
            return Err(self.protocol(format!(
                "greeting {option_magic:#018x} is not newstyle (IHAVEOPT); oldstyle servers are not supported"
            )));
        }
        if server_flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.protocol("server does not offer fixed newstyle".to_owned()));
        }
        let no_zeroes = server_flags & NBD_FLAG_NO_ZEROES != 0;
        let mut client_flags = NBD_FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            client_flags |= NBD_FLAG_C_NO_ZEROES;
        }
        let sent = self.stream.write_all(&client_flags.to_be_bytes());
        self.guard_io(sent)?;
        if let Some(context) = self.context.clone() {
            self.select_context(&context)?;
        }

        // GO data: name length, name, and one information request (block size), which also
        // promises the server that we honour its block size constraints.
        let name = self.export.as_bytes();
        let mut data = Vec::with_capacity(4 + name.len() + 4);
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name);
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(NBD_OPT_GO, &data)?;

        let mut export: Option<(u64, u16)> = None;
        let mut request_bytes_max = REQUEST_BYTES_MAX;
        for _ in 0..OPTION_REPLIES_MAX {
            let (reply_type, payload) = self.receive_option_reply(NBD_OPT_GO)?;
            match reply_type {
                NBD_REP_INFO => {
                    if payload.len() < 2 {
                        return Err(self.protocol("NBD_REP_INFO shorter than 2 bytes".to_owned()));
                    }
                    let info_type = u16::from_be_bytes(field(&payload, 0));
                    match info_type {
                        NBD_INFO_EXPORT => {
                            if payload.len() != 12 {
                                return Err(self.protocol(format!(
                                    "NBD_INFO_EXPORT of {} bytes, expected 12",
                                    payload.len()
                                )));
                            }
                            export = Some((
                                u64::from_be_bytes(field(&payload, 2)),
                                u16::from_be_bytes(field(&payload, 10)),
                            ));
                        }
                        NBD_INFO_BLOCK_SIZE => {
                            if payload.len() != 14 {
                                return Err(self.protocol(format!(
                                    "NBD_INFO_BLOCK_SIZE of {} bytes, expected 14",
                                    payload.len()
                                )));
                            }
                            let maximum = u32::from_be_bytes(field(&payload, 10));
                            if maximum == 0 {
                                return Err(
                                    self.protocol("maximum block size of 0 bytes".to_owned())
                                );
                            }
                            request_bytes_max = maximum.min(REQUEST_BYTES_MAX);
                        }
                        // Names, descriptions and future items are not needed here.
                        _ => {}
                    }
                }
                NBD_REP_ACK => {
                    let Some((size, flags)) = export else {
                        return Err(self.protocol(
                            "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".to_owned(),
                        ));
                    };
                    return Ok(ExportInfo {
                        size,
                        flags,
                        request_bytes_max,
                    });
                }
                NBD_REP_ERR_UNSUP => return self.export_name_fallback(no_zeroes),
                error if error & (1 << 31) != 0 => {
                    // The server keeps the connection in option haggling; leave politely.
                    let _ = self.send_option(NBD_OPT_ABORT, &[]);
                    self.poisoned = true;
                    self.stream.shutdown();
                    return Err(ClientError::ExportRefused {
                        endpoint: self.endpoint.clone(),
                        export: self.export.clone(),
                        reply: reply_name(error),
                        message: String::from_utf8_lossy(&payload).trim().to_owned(),
                    });
                }
                other => {
                    return Err(self.protocol(format!(
                        "unexpected option reply type {other:#x} to NBD_OPT_GO"
                    )))
                }
            }
        }
        Err(self.protocol(format!(
            "more than {OPTION_REPLIES_MAX} replies to one NBD_OPT_GO"
        )))
    }

    /// For servers that predate GO: `NBD_OPT_EXPORT_NAME`, whose only failure answer is a
    /// closed connection.
    fn export_name_fallback(&mut self, no_zeroes: bool) -> Result<ExportInfo, ClientError> {
        let name = self.export.clone().into_bytes();
        self.send_option(NBD_OPT_EXPORT_NAME, &name)?;
        let mut reply = [0u8; 10 + EXPORT_NAME_ZEROES_BYTES];
        let length = if no_zeroes { 10 } else { reply.len() };
        let received = self.stream.read_exact(&mut reply[..length]);
        if let Err(source) = received {
            self.poisoned = true;
            return Err(if source.kind() == io::ErrorKind::UnexpectedEof {
                ClientError::ExportRefused {
                    endpoint: self.endpoint.clone(),
                    export: self.export.clone(),
                    reply: "connection closed after NBD_OPT_EXPORT_NAME",
                    message: "the export probably does not exist".to_owned(),
                }
            } else {
                ClientError::Io {
                    endpoint: self.endpoint.clone(),
                    source,
                }
            });
        }
        Ok(ExportInfo {
            size: u64::from_be_bytes(field(&reply, 0)),
            flags: u16::from_be_bytes(field(&reply, 8)),
            request_bytes_max: REQUEST_BYTES_MAX,
        })
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), ClientError> {
        let mut frame = Vec::with_capacity(OPTION_HEADER_BYTES + data.len());
        frame.extend_from_slice(&IHAVEOPT.to_be_bytes());
        frame.extend_from_slice(&option.to_be_bytes());
        // Callers pass at most a 4 KiB name plus a few bytes.
        frame.extend_from_slice(&(data.len() as u32).to_be_bytes());
        frame.extend_from_slice(data);
        let sent = self.stream.write_all(&frame);
        self.guard_io(sent)
    }

    /// Reads one option reply to `option`: (reply type, payload).
    fn receive_option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), ClientError> {
        let mut header = [0u8; 20];
        let received = self.stream.read_exact(&mut header);
        self.guard_io(received)?;
        let magic = u64::from_be_bytes(field(&header, 0));
        let echo = u32::from_be_bytes(field(&header, 8));
        let reply_type = u32::from_be_bytes(field(&header, 12));
        let length = u32::from_be_bytes(field(&header, 16));
        if magic != OPTION_REPLY_MAGIC {
            return Err(self.protocol(format!("option reply magic {magic:#018x}")));
        }
        if echo != option {
            return Err(self.protocol(format!(
                "option reply for option {echo}, but option {option} was sent"
            )));
        }
        if length > OPTION_REPLY_BYTES_MAX {
            return Err(self.protocol(format!(
                "option reply of {length} bytes (at most {OPTION_REPLY_BYTES_MAX} accepted)"
            )));
        }
        let mut payload = vec![0u8; length as usize];
        let received = self.stream.read_exact(&mut payload);
        self.guard_io(received)?;
        Ok((reply_type, payload))
    }

    /// Turns an I/O failure into an error and poisons the connection: a partial read or
    /// write leaves the stream at an unknown place.
    fn guard_io<T>(&mut self, result: io::Result<T>) -> Result<T, ClientError> {
        result.map_err(|source| {
            self.poisoned = true;
            ClientError::Io {
                endpoint: self.endpoint.clone(),
                source,
            }
        })
    }

    fn protocol(&mut self, why: String) -> ClientError {
        self.poisoned = true;
        self.stream.shutdown();
        ClientError::Protocol {
            endpoint: self.endpoint.clone(),
            why,
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Best effort: a server sees a clean NBD_CMD_DISC rather than a reset.
        let _ = self.send_disconnect();
    }
}

/// Copies `N` bytes at `at`; callers pass buffers whose length they checked or fixed arrays.
fn field<const N: usize>(buf: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = buf.get(at..at + N) {
        out.copy_from_slice(src);
    }
    out
}
