//! Transmission phase: the request loop, request validation, dispatch to the export, and the reply writer.
//!
//! One reader parses requests in order and spawns one task per valid request, bounded by a
//! per-connection request semaphore and a payload-byte semaphore. Replies may complete out of
//! order; a single writer task owns the socket's write half and sends them in batches with
//! vectored writes, so a READ reply's header and data go out in one syscall with no copy.
//!
//! With structured replies negotiated, READ answers in chunks (holes the export reports as
//! zero go out as OFFSET_HOLE without being read, unless the client set DF), errors of any
//! request go in an ERROR chunk, and BLOCK_STATUS answers every selected metadata context.
//! Other successful replies stay simple, as the spec allows.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use crate::error::NbdError;
use crate::export::{Export, ExportError, ExportFeatures, Extent};
use crate::handshake::{ContextSource, SelectedContext, Session};
use crate::limits::{
    BLOCK_STATUS_EXTENTS_MAX, CONNECTION_PAYLOAD_BYTES_MAX, REPLY_BATCH_BYTES_MAX,
    REPLY_IOVECS_MAX, REQUEST_BYTES_MAX, SPARSE_READ_BYTES_MIN,
};
use crate::protocol::*;
use crate::registry::ClientCount;
use crate::shutdown::Shutdown;

/// A request that passed validation, in the export's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Command {
    /// Length 0 is answered without calling the export (simple or NONE chunk).
    Read {
        offset: u64,
        length: u32,
        /// NBD_CMD_FLAG_DF: at most one content chunk.
        df: bool,
    },
    BlockStatus {
        offset: u64,
        length: u32,
        /// NBD_CMD_FLAG_REQ_ONE: one extent per context.
        req_one: bool,
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
        /// NBD_CMD_FLAG_FAST_ZERO: fail with ENOTSUP rather than zero slowly.
        fast: bool,
    },
    /// A prefetch hint.
    Cache {
        offset: u64,
        length: u32,
    },
    /// A zero-length WRITE, TRIM, WRITE_ZEROES or CACHE inside the export. The spec leaves
    /// zero lengths open but says not to disconnect; we succeed without calling the export.
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

/// What the handshake agreed that changes which requests are valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Negotiated {
    pub structured: bool,
    /// Metadata contexts selected; BLOCK_STATUS needs at least one.
    pub contexts: usize,
}

/// The one place a request is judged. Nothing reaches the export unless this says `Run`.
pub(crate) fn validate(
    request: &RequestHeader,
    size: u64,
    features: &ExportFeatures,
    negotiated: Negotiated,
) -> Verdict {
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

    let df_flag = if negotiated.structured {
        NBD_CMD_FLAG_DF
    } else {
        0
    };
    let (command_flags, advertised) = match command {
        NBD_CMD_READ => (df_flag, true),
        NBD_CMD_WRITE => (0, true),
        NBD_CMD_CACHE => (0, true),
        NBD_CMD_BLOCK_STATUS => (NBD_CMD_FLAG_REQ_ONE, negotiated.contexts > 0),
        NBD_CMD_FLUSH => (0, features.can_flush),
        NBD_CMD_TRIM => (0, features.can_trim),
        // SEND_FAST_ZERO is advertised exactly when WRITE_ZEROES is.
        NBD_CMD_WRITE_ZEROES => (
            NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
            features.can_write_zeroes,
        ),
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

    let writes = !matches!(command, NBD_CMD_READ | NBD_CMD_CACHE | NBD_CMD_BLOCK_STATUS);
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
    match command {
        NBD_CMD_READ => {
            return Verdict::Run(Command::Read {
                offset,
                length,
                df: flags & NBD_CMD_FLAG_DF != 0,
            })
        }
        // A status of nothing has no descriptor to carry it.
        NBD_CMD_BLOCK_STATUS if length == 0 => return refuse(NBD_EINVAL),
        NBD_CMD_BLOCK_STATUS => {
            return Verdict::Run(Command::BlockStatus {
                offset,
                length,
                req_one: flags & NBD_CMD_FLAG_REQ_ONE != 0,
            })
        }
        _ => {}
    }
    if length == 0 {
        return Verdict::Run(Command::Nothing);
    }
    if command == NBD_CMD_CACHE {
        return Verdict::Run(Command::Cache { offset, length });
    }
    Verdict::Run(match command {
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
            fast: flags & NBD_CMD_FLAG_FAST_ZERO != 0,
        },
    })
}

/// The one place an export's error becomes an NBD error value.
pub(crate) fn error_value(err: &ExportError) -> u32 {
    match err {
        ExportError::NotPermitted(_) => NBD_EPERM,
        ExportError::NoSpace(_) => NBD_ENOSPC,
        ExportError::Invalid(_) => NBD_EINVAL,
        ExportError::NotSupported(_) => NBD_ENOTSUP,
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
    body: Body,
    _request: OwnedSemaphorePermit,
    _payload: Option<OwnedSemaphorePermit>,
}

/// What a reply carries.
enum Body {
    /// A simple reply, with READ data when it succeeded.
    Simple { error: u32, data: Option<Bytes> },
    /// Structured reply chunks already encoded: headers and data buffers in wire order,
    /// the last chunk carrying NBD_REPLY_FLAG_DONE.
    Chunks(Vec<Bytes>),
}

impl Body {
    fn error(structured: bool, handle: u64, error: u32, message: &str) -> Body {
        if !structured {
            return Body::Simple { error, data: None };
        }
        let mut out = BytesMut::with_capacity(CHUNK_HEADER_BYTES + 6 + message.len());
        encode_error_chunk(&mut out, handle, error, message);
        Body::Chunks(vec![out.freeze()])
    }
}

/// Error text for an ERROR chunk refusing a request.
fn refusal_message(error: u32) -> &'static str {
    match error {
        NBD_EPERM => "the export is read-only",
        NBD_ENOSPC => "request runs past the end of the export",
        _ => "invalid request",
    }
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
        structured,
        contexts,
        ..
    } = session;
    let negotiated = Negotiated {
        structured,
        contexts: contexts.len(),
    };
    let contexts = Arc::new(contexts);
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

        let command = match validate(&request, size, &features, negotiated) {
            Verdict::Run(command) => command,
            Verdict::Disconnect => return Ok(()),
            Verdict::Drop(why) => return Err(NbdError::Protocol(why)),
            Verdict::Refuse { error, discard } => {
                debug!(?request, error, "refusing NBD request");
                skip(&mut reader, discard).await?;
                let reply = Reply {
                    handle: request.handle,
                    body: Body::error(structured, request.handle, error, refusal_message(error)),
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
        let contexts = Arc::clone(&contexts);
        let handle = request.handle;
        tokio::spawn(async move {
            let body = match command {
                Command::Read { .. } | Command::BlockStatus { .. } if structured => {
                    execute_structured(export.as_ref(), &contexts, command, handle).await
                }
                _ => {
                    let (error, data) = execute(export.as_ref(), command, payload).await;
                    Body::Simple { error, data }
                }
            };
            let reply = Reply {
                handle,
                body,
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
        Command::Read { length: 0, .. } => Ok(()),
        Command::Read { offset, length, .. } => {
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
            fast: false,
        } => export.write_zeroes(offset, length, fua, may_trim).await,
        Command::WriteZeroes {
            offset,
            length,
            fua,
            may_trim,
            fast: true,
        } => {
            export
                .write_zeroes_fast(offset, length, fua, may_trim)
                .await
        }
        Command::Cache { offset, length } => export.cache(offset, length).await,
        Command::Nothing => Ok(()),
        // Only valid once structured replies are negotiated, so never answered here.
        Command::BlockStatus { .. } => Err(ExportError::Invalid(
            "BLOCK_STATUS without structured replies".into(),
        )),
    };
    match result {
        Ok(()) => (NBD_OK, None),
        Err(err) => {
            debug!(?command, %err, "export failed a request");
            (error_value(&err), None)
        }
    }
}

/// Answers a READ or BLOCK_STATUS in structured reply chunks.
async fn execute_structured(
    export: &dyn Export,
    contexts: &[SelectedContext],
    command: Command,
    handle: u64,
) -> Body {
    let result = match command {
        Command::Read { offset, length, df } => {
            read_chunks(export, handle, offset, length, df).await
        }
        Command::BlockStatus {
            offset,
            length,
            req_one,
        } => block_status_chunks(export, contexts, handle, offset, length, req_one).await,
        _ => Err(ExportError::Invalid("not a structured command".into())),
    };
    match result {
        Ok(chunks) => Body::Chunks(chunks),
        Err(err) => {
            debug!(?command, %err, "export failed a request");
            Body::error(true, handle, error_value(&err), &err.to_string())
        }
    }
}

/// The chunks of a READ: holes the export reports as zero are sent as OFFSET_HOLE without
/// reading them, the rest as OFFSET_DATA. An error part-way ends the reply with an ERROR
/// chunk after the content chunks already encoded (the client may trust none of them).
async fn read_chunks(
    export: &dyn Export,
    handle: u64,
    offset: u64,
    length: u32,
    df: bool,
) -> Result<Vec<Bytes>, ExportError> {
    let mut out = BytesMut::with_capacity(CHUNK_HEADER_BYTES * 4);
    if length == 0 {
        encode_none_chunk(&mut out, handle);
        return Ok(vec![out.freeze()]);
    }
    let plan = if df || length < SPARSE_READ_BYTES_MIN {
        None
    } else {
        sparse_plan(export, offset, length).await?
    };
    let plan = plan.unwrap_or_else(|| vec![(offset, length, false)]);
    let mut chunks = Vec::with_capacity(plan.len() * 2);
    let last = plan.len() - 1;
    for (index, &(at, len, zero)) in plan.iter().enumerate() {
        let flags = if index == last {
            NBD_REPLY_FLAG_DONE
        } else {
            0
        };
        if zero {
            encode_hole_chunk(&mut out, flags, handle, at, len);
            continue;
        }
        let data = match export.read(at, len).await {
            Ok(data) if data.len() == len as usize => data,
            Ok(data) => {
                warn!(
                    offset = at,
                    length = len,
                    returned = data.len(),
                    "export returned the wrong number of bytes"
                );
                encode_error_chunk(&mut out, handle, NBD_EIO, "short read");
                chunks.push(out.split().freeze());
                return Ok(chunks);
            }
            Err(err) => {
                encode_error_chunk(&mut out, handle, error_value(&err), &err.to_string());
                chunks.push(out.split().freeze());
                return Ok(chunks);
            }
        };
        encode_data_chunk_header(&mut out, flags, handle, at, len);
        chunks.push(out.split().freeze());
        chunks.push(data);
    }
    if !out.is_empty() {
        chunks.push(out.split().freeze());
    }
    Ok(chunks)
}

/// Splits a read into (offset, length, reads-as-zero) runs covering all of it, from the
/// export's allocation; `None` if the export cannot tell or reports no zero run.
async fn sparse_plan(
    export: &dyn Export,
    offset: u64,
    length: u32,
) -> Result<Option<Vec<(u64, u32, bool)>>, ExportError> {
    let end = offset + u64::from(length);
    let mut pos = offset;
    let mut plan: Vec<(u64, u32, bool)> = Vec::new();
    // Each call covers at least one byte; the bound only guards against an export that
    // answers in tiny pieces.
    for _ in 0..BLOCK_STATUS_EXTENTS_MAX {
        if pos >= end {
            break;
        }
        let left = (end - pos) as u32;
        let Some(extents) = export.allocation(pos, left).await? else {
            return Ok(None);
        };
        let extents = clip_extents(extents, left, BLOCK_STATUS_EXTENTS_MAX);
        if extents.is_empty() {
            break;
        }
        for extent in extents {
            let zero = extent.flags & NBD_STATE_ZERO != 0;
            match plan.last_mut() {
                Some((_, len, z)) if *z == zero => *len += extent.length,
                _ => plan.push((pos, extent.length, zero)),
            }
            pos += u64::from(extent.length);
        }
    }
    if pos < end {
        match plan.last_mut() {
            Some((_, len, false)) => *len += (end - pos) as u32,
            _ => plan.push((pos, (end - pos) as u32, false)),
        }
    }
    if !plan.iter().any(|&(_, _, zero)| zero) {
        return Ok(None);
    }
    Ok(Some(plan))
}

/// Drops empty extents, cuts the list where it would pass `length` bytes or `count_max`
/// extents, and merges neighbours with equal flags.
fn clip_extents(extents: Vec<Extent>, length: u32, count_max: usize) -> Vec<Extent> {
    let mut left = length;
    let mut clipped: Vec<Extent> = Vec::with_capacity(extents.len().min(count_max));
    for extent in extents {
        if left == 0 {
            break;
        }
        let len = extent.length.min(left);
        if len == 0 {
            continue;
        }
        let full = clipped.len() == count_max;
        match clipped.last_mut() {
            Some(prev) if prev.flags == extent.flags => prev.length += len,
            _ if full => break,
            _ => clipped.push(Extent {
                length: len,
                flags: extent.flags,
            }),
        }
        left -= len;
    }
    clipped
}

/// One BLOCK_STATUS chunk per selected context, the last carrying DONE.
async fn block_status_chunks(
    export: &dyn Export,
    contexts: &[SelectedContext],
    handle: u64,
    offset: u64,
    length: u32,
    req_one: bool,
) -> Result<Vec<Bytes>, ExportError> {
    let mut out = BytesMut::new();
    let count_max = if req_one { 1 } else { BLOCK_STATUS_EXTENTS_MAX };
    for (index, context) in contexts.iter().enumerate() {
        let extents = match &context.source {
            ContextSource::Allocation => export
                .allocation(offset, length)
                .await?
                // Status 0 (allocated, contents unknown) is always a safe answer.
                .unwrap_or_else(|| vec![Extent { length, flags: 0 }]),
            ContextSource::Export(meta) => meta.extents(offset, length).await?,
        };
        let extents = clip_extents(extents, length, count_max);
        if extents.is_empty() {
            return Err(ExportError::Io(io::Error::other(
                "metadata context reported no extent",
            )));
        }
        let pairs: Vec<(u32, u32)> = extents.iter().map(|e| (e.length, e.flags)).collect();
        let flags = if index + 1 == contexts.len() {
            NBD_REPLY_FLAG_DONE
        } else {
            0
        };
        encode_block_status_chunk(&mut out, flags, handle, context.id, &pairs);
    }
    Ok(vec![out.freeze()])
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
            match &reply.body {
                Body::Simple { error, data } => {
                    encode_simple_reply(&mut headers, *error, reply.handle);
                    batch_bytes += SIMPLE_REPLY_BYTES;
                    if let Some(data) = data.as_ref().filter(|data| !data.is_empty()) {
                        chunks.push_back(headers.split().freeze());
                        chunks.push_back(data.clone());
                        batch_bytes += data.len();
                    }
                }
                Body::Chunks(parts) => {
                    if !headers.is_empty() {
                        chunks.push_back(headers.split().freeze());
                    }
                    for part in parts {
                        batch_bytes += part.len();
                        chunks.push_back(part.clone());
                    }
                }
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

    const SIMPLE: Negotiated = Negotiated {
        structured: false,
        contexts: 0,
    };
    const STRUCTURED: Negotiated = Negotiated {
        structured: true,
        contexts: 1,
    };

    fn judge(command: u16, flags: u16, offset: u64, length: u32) -> Verdict {
        validate(
            &request(command, flags, offset, length),
            SIZE,
            &features(false),
            SIMPLE,
        )
    }

    fn judge_structured(command: u16, flags: u16, offset: u64, length: u32) -> Verdict {
        validate(
            &request(command, flags, offset, length),
            SIZE,
            &features(false),
            STRUCTURED,
        )
    }

    #[test]
    fn structured_only_requests_need_their_negotiation() {
        let einval = Verdict::Refuse {
            error: NBD_EINVAL,
            discard: 0,
        };
        assert_eq!(judge(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512), einval);
        assert_eq!(
            judge_structured(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512),
            Verdict::Run(Command::Read {
                offset: 0,
                length: 512,
                df: true
            })
        );
        assert_eq!(judge(NBD_CMD_BLOCK_STATUS, 0, 0, 512), einval);
        assert_eq!(
            judge_structured(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 0, 512),
            Verdict::Run(Command::BlockStatus {
                offset: 0,
                length: 512,
                req_one: true
            })
        );
        assert_eq!(judge_structured(NBD_CMD_BLOCK_STATUS, 0, 0, 0), einval);
        assert_eq!(judge_structured(NBD_CMD_BLOCK_STATUS, 0, SIZE, 1), einval);
        assert_eq!(
            judge_structured(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_DF, 0, 1),
            einval
        );
        assert_eq!(
            judge(NBD_CMD_CACHE, 0, 0, 512),
            Verdict::Run(Command::Cache {
                offset: 0,
                length: 512
            })
        );
        assert_eq!(
            judge(NBD_CMD_CACHE, 0, 0, 0),
            Verdict::Run(Command::Nothing)
        );
        assert_eq!(judge(NBD_CMD_CACHE, 0, SIZE, 1), einval);
    }

    #[test]
    fn extents_are_clipped_merged_and_capped() {
        let e = |length, flags| Extent { length, flags };
        assert_eq!(
            clip_extents(vec![e(10, 0), e(0, 3), e(5, 0), e(20, 3)], 30, 16),
            vec![e(15, 0), e(15, 3)]
        );
        assert_eq!(clip_extents(vec![e(10, 0), e(5, 3)], 30, 1), vec![e(10, 0)]);
        assert!(clip_extents(vec![e(0, 0)], 30, 16).is_empty());
    }

    #[test]
    fn valid_requests_run() {
        assert_eq!(
            judge(NBD_CMD_READ, 0, 0, 4096),
            Verdict::Run(Command::Read {
                offset: 0,
                length: 4096,
                df: false
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
                may_trim: false,
                fast: false
            })
        );
        assert_eq!(
            judge(
                NBD_CMD_WRITE_ZEROES,
                NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_NO_HOLE,
                0,
                512
            ),
            Verdict::Run(Command::WriteZeroes {
                offset: 0,
                length: 512,
                fua: false,
                may_trim: false,
                fast: true
            })
        );
        assert_eq!(judge(NBD_CMD_FLUSH, 0, 0, 0), Verdict::Run(Command::Flush));
        assert_eq!(
            judge(NBD_CMD_READ, 0, SIZE, 0),
            Verdict::Run(Command::Read {
                offset: SIZE,
                length: 0,
                df: false
            })
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
        // FAST_ZERO belongs to WRITE_ZEROES only.
        assert_eq!(
            judge(NBD_CMD_TRIM, NBD_CMD_FLAG_FAST_ZERO, 0, 512),
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
            validate(&write_fua, SIZE, &no_fua, SIMPLE),
            Verdict::Refuse {
                error: NBD_EINVAL,
                discard: 512
            }
        );
        assert_eq!(
            validate(&request(NBD_CMD_FLUSH, 0, 0, 0), SIZE, &no_fua, SIMPLE),
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
            validate(&request(NBD_CMD_WRITE, 0, 0, 512), SIZE, &ro, SIMPLE),
            Verdict::Refuse {
                error: NBD_EPERM,
                discard: 512
            }
        );
        assert_eq!(
            validate(&request(NBD_CMD_TRIM, 0, 0, 512), SIZE, &ro, SIMPLE),
            Verdict::Refuse {
                error: NBD_EPERM,
                discard: 0
            }
        );
        assert_eq!(
            validate(&request(NBD_CMD_WRITE_ZEROES, 0, 0, 512), SIZE, &ro, SIMPLE),
            Verdict::Refuse {
                error: NBD_EPERM,
                discard: 0
            }
        );
        assert_eq!(
            validate(&request(NBD_CMD_READ, 0, 0, 512), SIZE, &ro, SIMPLE),
            Verdict::Run(Command::Read {
                offset: 0,
                length: 512,
                df: false
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
