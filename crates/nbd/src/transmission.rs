//! Transmission phase: the request loop, request validation, dispatch to the export, and the reply writer.
//!
//! One reader parses requests in order and spawns one task per valid request, bounded by a
//! per-connection request semaphore and a payload-byte semaphore. Replies may complete out of
//! order; a single writer task owns the socket's write half and sends them in batches with
//! vectored writes, so a READ reply's header and data go out in one syscall with no copy.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use crate::error::NbdError;
use crate::export::{Export, ExportError, ExportFeatures};
use crate::handshake::Session;
use crate::limits::{
    CONNECTION_PAYLOAD_BYTES_MAX, REPLY_BATCH_BYTES_MAX, REPLY_IOVECS_MAX, REQUEST_BYTES_MAX,
};
use crate::protocol::*;
use crate::registry::ClientCount;
use crate::shutdown::Shutdown;

/// A request that passed validation, in the export's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Command {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
        may_trim: bool,
    },
    /// A zero-length READ, WRITE, TRIM or WRITE_ZEROES inside the export. The spec leaves
    /// the result open but says not to disconnect; we succeed without calling the export.
    Nothing,
}

/// What to do with one request header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Run(Command),
    /// Reply with this NBD error, after reading and dropping `discard` payload bytes so the
    /// stream stays in step.
    Refuse {
        error: u32,
        discard: u32,
    },
    /// `NBD_CMD_DISC`: finish what is in flight, then close.
    Disconnect,
    /// The stream cannot be kept in step (a WRITE payload too large to accept); hard disconnect.
    Drop(String),
}

/// The one place a request is judged. Nothing reaches the export unless this says `Run`.
pub(crate) fn validate(request: &RequestHeader, size: u64, features: &ExportFeatures) -> Verdict {
    let RequestHeader {
        flags,
        command,
        offset,
        length,
        ..
    } = *request;
    if command == NBD_CMD_DISC {
        return Verdict::Disconnect;
    }
    // In compact-header mode only WRITE carries a payload, so every other request (even an
    // unknown command) can be refused without losing our place in the stream.
    let payload = if command == NBD_CMD_WRITE { length } else { 0 };
    if payload > REQUEST_BYTES_MAX {
        return Verdict::Drop(format!(
            "WRITE of {payload} bytes exceeds the {REQUEST_BYTES_MAX} byte maximum"
        ));
    }
    let refuse = |error| Verdict::Refuse {
        error,
        discard: payload,
    };

    let (command_flags, advertised) = match command {
        NBD_CMD_READ | NBD_CMD_WRITE => (0, true),
        NBD_CMD_FLUSH => (0, features.can_flush),
        NBD_CMD_TRIM => (0, features.can_trim),
        NBD_CMD_WRITE_ZEROES => (NBD_CMD_FLAG_NO_HOLE, features.can_write_zeroes),
        _ => return refuse(NBD_EINVAL),
    };
    // Once SEND_FUA is advertised, FUA is valid on every command (the spec says to accept it
    // even where it means nothing); without it, FUA is an unknown flag.
    let fua_flag = if features.can_fua {
        NBD_CMD_FLAG_FUA
    } else {
        0
    };
    if flags & !(command_flags | fua_flag) != 0 || !advertised {
        return refuse(NBD_EINVAL);
    }
    let fua = flags & NBD_CMD_FLAG_FUA != 0;
    if command == NBD_CMD_FLUSH {
        // Offset and length are reserved for FLUSH; tolerate clients that fill them.
        return Verdict::Run(Command::Flush);
    }

    let writes = command != NBD_CMD_READ;
    if writes && features.read_only {
        return refuse(NBD_EPERM);
    }
    // READ and WRITE are bounded by the advertised maximum block size; TRIM and
    // WRITE_ZEROES carry no payload and the Linux client issues them up to 4 GiB, so they
    // are only bounded by the export size.
    if command == NBD_CMD_READ && length > REQUEST_BYTES_MAX {
        return refuse(NBD_EINVAL);
    }
    let inside = offset
        .checked_add(u64::from(length))
        .is_some_and(|end| end <= size);
    if !inside {
        let error = if command == NBD_CMD_WRITE || command == NBD_CMD_WRITE_ZEROES {
            NBD_ENOSPC
        } else {
            NBD_EINVAL
        };
        return refuse(error);
    }
    if length == 0 {
        return Verdict::Run(Command::Nothing);
    }
    Verdict::Run(match command {
        NBD_CMD_READ => Command::Read { offset, length },
        NBD_CMD_WRITE => Command::Write {
            offset,
            length,
            fua,
        },
        NBD_CMD_TRIM => Command::Trim {
            offset,
            length,
            fua,
        },
        _ => Command::WriteZeroes {
            offset,
            length,
            fua,
            may_trim: flags & NBD_CMD_FLAG_NO_HOLE == 0,
        },
    })
}

/// The one place an export's error becomes an NBD error value.
pub(crate) fn error_value(err: &ExportError) -> u32 {
    match err {
        ExportError::NotPermitted(_) => NBD_EPERM,
        ExportError::NoSpace(_) => NBD_ENOSPC,
        ExportError::Invalid(_) => NBD_EINVAL,
        ExportError::Shutdown => NBD_ESHUTDOWN,
        ExportError::Io(io) => io_error_value(io),
    }
}

fn io_error_value(err: &io::Error) -> u32 {
    // The spec asks for EDQUOT and EFBIG to be reported as ENOSPC.
    #[cfg(target_os = "linux")]
    const NO_SPACE: [i32; 3] = [
        28,  /* ENOSPC */
        27,  /* EFBIG */
        122, /* EDQUOT */
    ];
    #[cfg(not(target_os = "linux"))]
    const NO_SPACE: [i32; 2] = [28, 27];
    if err
        .raw_os_error()
        .is_some_and(|code| NO_SPACE.contains(&code))
    {
        return NBD_ENOSPC;
    }
    match err.kind() {
        io::ErrorKind::PermissionDenied => NBD_EPERM,
        io::ErrorKind::InvalidInput => NBD_EINVAL,
        _ => NBD_EIO,
    }
}

/// One reply on its way to the socket. The permits travel with it so memory and request
/// slots are released only once the bytes have been written.
struct Reply {
    handle: u64,
    error: u32,
    data: Option<Bytes>,
    _request: OwnedSemaphorePermit,
    _payload: Option<OwnedSemaphorePermit>,
}

/// Serves requests until the client disconnects, breaks the protocol, or the server shuts
/// down; in every case in-flight requests finish and their replies are sent before return.
pub(crate) async fn serve<R, W>(
    reader: R,
    writer: W,
    session: Session,
    requests_in_flight_max: usize,
    shutdown: &mut Shutdown,
) -> Result<(), NbdError>
where
    R: AsyncBufRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Counted from here until every reply has been sent, so a caller that sees zero knows
    // no host can still act on the export.
    let _counted = ClientCount::enter(Arc::clone(&session.clients));
    let (reply_tx, reply_rx) = mpsc::channel(requests_in_flight_max);
    let writer_task = tokio::spawn(write_replies(writer, reply_rx));
    let read_result =
        read_requests(reader, session, requests_in_flight_max, reply_tx, shutdown).await;
    // All senders are gone once the reader and every request task are done; the writer then
    // drains the queue and closes its half.
    let write_result = match writer_task.await {
        Ok(result) => result,
        Err(join) => Err(NbdError::Io(io::Error::other(format!(
            "reply writer failed: {join}"
        )))),
    };
    read_result.and(write_result)
}

async fn read_requests<R>(
    mut reader: R,
    session: Session,
    requests_in_flight_max: usize,
    reply_tx: mpsc::Sender<Reply>,
    shutdown: &mut Shutdown,
) -> Result<(), NbdError>
where
    R: AsyncBufRead + Unpin + Send,
{
    let requests = Arc::new(Semaphore::new(requests_in_flight_max));
    let payload_bytes = Arc::new(Semaphore::new(CONNECTION_PAYLOAD_BYTES_MAX as usize));
    let Session {
        export,
        size,
        features,
        ..
    } = session;
    loop {
        let mut raw = [0u8; REQUEST_HEADER_BYTES];
        tokio::select! {
            biased;
            // On server shutdown stop taking requests; what is in flight still completes.
            _ = shutdown.recv() => return Ok(()),
            // The writer has failed (peer gone): nothing more can be answered.
            _ = reply_tx.closed() => return Ok(()),
            more = read_header(&mut reader, &mut raw) => if !more? { return Ok(()) },
        }
        let request = decode_request(&raw)?;
        let request_permit = acquire(&requests, 1).await?;

        let command = match validate(&request, size, &features) {
            Verdict::Run(command) => command,
            Verdict::Disconnect => return Ok(()),
            Verdict::Drop(why) => return Err(NbdError::Protocol(why)),
            Verdict::Refuse { error, discard } => {
                debug!(?request, error, "refusing NBD request");
                skip(&mut reader, discard).await?;
                let reply = Reply {
                    handle: request.handle,
                    error,
                    data: None,
                    _request: request_permit,
                    _payload: None,
                };
                if reply_tx.send(reply).await.is_err() {
                    return Ok(());
                }
                continue;
            }
        };

        let (payload_permit, payload) = match command {
            Command::Read { length, .. } => {
                (Some(acquire(&payload_bytes, length).await?), Bytes::new())
            }
            Command::Write { length, .. } => {
                let permit = acquire(&payload_bytes, length).await?;
                (Some(permit), read_payload(&mut reader, length).await?)
            }
            _ => (None, Bytes::new()),
        };
        let export = export.clone();
        let reply_tx = reply_tx.clone();
        let handle = request.handle;
        tokio::spawn(async move {
            let (error, data) = execute(export.as_ref(), command, payload).await;
            let reply = Reply {
                handle,
                error,
                data,
                _request: request_permit,
                _payload: payload_permit,
            };
            // A closed queue means the writer already failed; the client is gone.
            let _ = reply_tx.send(reply).await;
        });
    }
}

async fn execute(export: &dyn Export, command: Command, payload: Bytes) -> (u32, Option<Bytes>) {
    let result = match command {
        Command::Read { offset, length } => {
            return match export.read(offset, length).await {
                Ok(data) if data.len() == length as usize => (NBD_OK, Some(data)),
                Ok(data) => {
                    // A short or long buffer would desynchronise the client; fail the read.
                    warn!(
                        offset,
                        length,
                        returned = data.len(),
                        "export returned the wrong number of bytes"
                    );
                    (NBD_EIO, None)
                }
                Err(err) => (error_value(&err), None),
            };
        }
        Command::Write { offset, fua, .. } => export.write(offset, payload, fua).await,
        Command::Flush => export.flush().await,
        Command::Trim {
            offset,
            length,
            fua,
        } => export.trim(offset, length, fua).await,
        Command::WriteZeroes {
            offset,
            length,
            fua,
            may_trim,
        } => export.write_zeroes(offset, length, fua, may_trim).await,
        Command::Nothing => Ok(()),
    };
    match result {
        Ok(()) => (NBD_OK, None),
        Err(err) => {
            debug!(?command, %err, "export failed a request");
            (error_value(&err), None)
        }
    }
}

async fn acquire(
    semaphore: &Arc<Semaphore>,
    permits: u32,
) -> Result<OwnedSemaphorePermit, NbdError> {
    // The semaphores are private to this connection and never closed.
    semaphore
        .clone()
        .acquire_many_owned(permits)
        .await
        .map_err(|_| NbdError::Io(io::Error::other("request semaphore closed")))
}

/// Reads one request header. `Ok(false)` is a clean end of stream between requests.
async fn read_header<R: AsyncRead + Unpin>(
    reader: &mut R,
    raw: &mut [u8; REQUEST_HEADER_BYTES],
) -> Result<bool, NbdError> {
    let first = reader.read(raw).await?;
    if first == 0 {
        return Ok(false);
    }
    reader.read_exact(&mut raw[first..]).await?;
    Ok(true)
}

/// Reads a WRITE payload straight into a buffer of exactly its size. Large payloads bypass
/// the read buffer and land in place; the spare capacity is never zero-filled.
async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    length: u32,
) -> Result<Bytes, NbdError> {
    let length = length as usize;
    let mut buf = BytesMut::with_capacity(length);
    let mut limited = reader.take(length as u64);
    while buf.len() < length {
        if limited.read_buf(&mut buf).await? == 0 {
            return Err(NbdError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
    }
    Ok(buf.freeze())
}

async fn skip<R: AsyncBufRead + Unpin>(reader: &mut R, length: u32) -> Result<(), NbdError> {
    if length == 0 {
        return Ok(());
    }
    let copied =
        tokio::io::copy_buf(&mut reader.take(u64::from(length)), &mut tokio::io::sink()).await?;
    if copied != u64::from(length) {
        return Err(NbdError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}

/// Owns the write half. Takes every reply that is ready (up to a batch limit), then sends
/// the batch with vectored writes: headers of consecutive data-less replies share one
/// buffer and READ data goes out from the export's own `Bytes`.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut replies: mpsc::Receiver<Reply>,
) -> Result<(), NbdError> {
    let mut headers = BytesMut::with_capacity(SIMPLE_REPLY_BYTES * 256);
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    let mut sent: Vec<Reply> = Vec::new();
    while let Some(first) = replies.recv().await {
        let mut batch_bytes = 0usize;
        let mut next = Some(first);
        while let Some(reply) = next.take() {
            encode_simple_reply(&mut headers, reply.error, reply.handle);
            batch_bytes += SIMPLE_REPLY_BYTES;
            if let Some(data) = reply.data.as_ref().filter(|data| !data.is_empty()) {
                chunks.push_back(headers.split().freeze());
                chunks.push_back(data.clone());
                batch_bytes += data.len();
            }
            sent.push(reply);
            if batch_bytes < REPLY_BATCH_BYTES_MAX {
                next = replies.try_recv().ok();
            }
        }
        if !headers.is_empty() {
            chunks.push_back(headers.split().freeze());
        }
        write_chunks(&mut writer, &mut chunks).await?;
        sent.clear();
    }
    writer.shutdown().await?;
    Ok(())
}

async fn write_chunks<W: AsyncWrite + Unpin>(
    writer: &mut W,
    chunks: &mut VecDeque<Bytes>,
) -> Result<(), NbdError> {
    while !chunks.is_empty() {
        let written = {
            let slices: Vec<IoSlice<'_>> = chunks
                .iter()
                .take(REPLY_IOVECS_MAX)
                .map(|chunk| IoSlice::new(chunk))
                .collect();
            writer.write_vectored(&slices).await?
        };
        if written == 0 {
            return Err(NbdError::Io(io::ErrorKind::WriteZero.into()));
        }
        let mut left = written;
        while left > 0 {
            let Some(front) = chunks.front_mut() else {
                break;
            };
            if front.len() <= left {
                left -= front.len();
                chunks.pop_front();
            } else {
                front.advance(left);
                left = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;

    fn features(read_only: bool) -> ExportFeatures {
        ExportFeatures {
            read_only,
            can_flush: true,
            can_fua: true,
            can_trim: true,
            can_write_zeroes: true,
            can_multi_conn: false,
        }
    }

    fn request(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            handle: 1,
            offset,
            length,
        }
    }

    fn judge(command: u16, flags: u16, offset: u64, length: u32) -> Verdict {
        validate(
            &request(command, flags, offset, length),
            SIZE,
            &features(false),
        )
    }

    #[test]
    fn valid_requests_run() {
        assert_eq!(
            judge(NBD_CMD_READ, 0, 0, 4096),
            Verdict::Run(Command::Read {
                offset: 0,
                length: 4096
            })
        );
        assert_eq!(
            judge(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, SIZE - 512, 512),
            Verdict::Run(Command::Write {
                offset: SIZE - 512,
                length: 512,
                fua: true
            })
        );
        assert_eq!(
            judge(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 0, 512),
            Verdict::Run(Command::WriteZeroes {
                offset: 0,
                length: 512,
                fua: false,
                may_trim: false
            })
        );
        assert_eq!(judge(NBD_CMD_FLUSH, 0, 0, 0), Verdict::Run(Command::Flush));
        assert_eq!(
            judge(NBD_CMD_READ, 0, SIZE, 0),
            Verdict::Run(Command::Nothing)
        );
        assert_eq!(judge(NBD_CMD_DISC, 0, 0, 0), Verdict::Disconnect);
    }

    #[test]
    fn out_of_range_requests_are_refused_by_kind() {
        assert_eq!(
            judge(NBD_CMD_READ, 0, SIZE - 1, 2),
            Verdict::Refuse {
                error: NBD_EINVAL,
                discard: 0
            }
        );
        assert_eq!(
            judge(NBD_CMD_WRITE, 0, SIZE - 1, 2),
            Verdict::Refuse {
                error: NBD_ENOSPC,
                discard: 2
            }
        );
        assert_eq!(
            judge(NBD_CMD_TRIM, 0, u64::MAX, 2),
            Verdict::Refuse {
                error: NBD_EINVAL,
                discard: 0
            }
        );
        assert_eq!(
            judge(NBD_CMD_WRITE_ZEROES, 0, u64::MAX - 1, 2),
            Verdict::Refuse {
                error: NBD_ENOSPC,
                discard: 0
            }
        );
        assert_eq!(
            judge(NBD_CMD_READ, 0, SIZE + 1, 0),
            Verdict::Refuse {
                error: NBD_EINVAL,
                discard: 0
            }
        );
    }

    #[test]
    fn bad_commands_and_flags_are_refused() {
        assert_eq!(
            judge(42, 0, 0, 512),
            Verdict::Refuse {
                error: NBD_EINVAL,
                discard: 0
            }
        );
        assert_eq!(
            judge(NBD_CMD_WRITE, 1 << 7, 0, 512),
            Verdict::Refuse {
                error: NBD_EINVAL,
                discard: 512
            }
        );
        assert_eq!(
            judge(NBD_CMD_READ, NBD_CMD_FLAG_NO_HOLE, 0, 512),
            Verdict::Refuse {
                error: NBD_EINVAL,
                discard: 0
            }
        );
        let mut no_fua = features(false);
        no_fua.can_fua = false;
        no_fua.can_flush = false;
        let write_fua = request(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 0, 512);
        assert_eq!(
            validate(&write_fua, SIZE, &no_fua),
            Verdict::Refuse {
                error: NBD_EINVAL,
                discard: 512
            }
        );
        assert_eq!(
            validate(&request(NBD_CMD_FLUSH, 0, 0, 0), SIZE, &no_fua),
            Verdict::Refuse {
                error: NBD_EINVAL,
                discard: 0
            }
        );
    }

    #[test]
    fn oversized_requests() {
        assert_eq!(
            judge(NBD_CMD_READ, 0, 0, REQUEST_BYTES_MAX + 1),
            Verdict::Refuse {
                error: NBD_EINVAL,
                discard: 0
            }
        );
        assert!(matches!(
            judge(NBD_CMD_WRITE, 0, 0, REQUEST_BYTES_MAX + 1),
            Verdict::Drop(_)
        ));
        // Trim is not a payload command: only the export size bounds it.
        assert_eq!(
            judge(NBD_CMD_TRIM, 0, 0, u32::MAX),
            Verdict::Refuse {
                error: NBD_EINVAL,
                discard: 0
            }
        );
    }

    #[test]
    fn read_only_refuses_every_write_kind() {
        let ro = features(true);
        assert_eq!(
            validate(&request(NBD_CMD_WRITE, 0, 0, 512), SIZE, &ro),
            Verdict::Refuse {
                error: NBD_EPERM,
                discard: 512
            }
        );
        assert_eq!(
            validate(&request(NBD_CMD_TRIM, 0, 0, 512), SIZE, &ro),
            Verdict::Refuse {
                error: NBD_EPERM,
                discard: 0
            }
        );
        assert_eq!(
            validate(&request(NBD_CMD_WRITE_ZEROES, 0, 0, 512), SIZE, &ro),
            Verdict::Refuse {
                error: NBD_EPERM,
                discard: 0
            }
        );
        assert_eq!(
            validate(&request(NBD_CMD_READ, 0, 0, 512), SIZE, &ro),
            Verdict::Run(Command::Read {
                offset: 0,
                length: 512
            })
        );
    }

    #[test]
    fn export_errors_map_to_nbd_values() {
        assert_eq!(
            error_value(&ExportError::NotPermitted(String::new())),
            NBD_EPERM
        );
        assert_eq!(
            error_value(&ExportError::NoSpace(String::new())),
            NBD_ENOSPC
        );
        assert_eq!(
            error_value(&ExportError::Invalid(String::new())),
            NBD_EINVAL
        );
        assert_eq!(error_value(&ExportError::Shutdown), NBD_ESHUTDOWN);
        assert_eq!(
            error_value(&ExportError::Io(io::Error::from_raw_os_error(28))),
            NBD_ENOSPC
        );
        assert_eq!(
            error_value(&ExportError::Io(io::Error::other("disk on fire"))),
            NBD_EIO
        );
    }
}
