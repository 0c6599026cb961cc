//! Fixed newstyle handshake: greeting, client flags and option haggling up to transmission.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncBufRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use crate::error::NbdError;
use crate::export::{Export, ExportFeatures, MetaContext};
use crate::limits::{
    BLOCK_BYTES_MIN, BLOCK_BYTES_PREFERRED, META_CONTEXTS_SELECTED_MAX, META_CONTEXT_QUERIES_MAX,
    OPTIONS_PER_HANDSHAKE_MAX, OPTION_BYTES_MAX, OPTION_DISCARD_BYTES_MAX, REQUEST_BYTES_MAX,
};
use crate::protocol::*;
use crate::registry::{ExportRegistry, Found};

/// The export a client chose, with what it was promised in the handshake. Size and features
/// are taken once here: the client was told them and they must not change under it.
pub(crate) struct Session {
    pub name: String,
    pub export: Arc<dyn Export>,
    pub size: u64,
    pub features: ExportFeatures,
    /// The export's count of connections in the transmission phase.
    pub clients: Arc<AtomicUsize>,
    /// The client negotiated structured replies: READ answers in chunks, DF is offered.
    pub structured: bool,
    /// The metadata contexts BLOCK_STATUS answers, in the order they were selected.
    pub contexts: Vec<SelectedContext>,
}

/// What a metadata context reports from.
#[derive(Clone)]
pub(crate) enum ContextSource {
    /// `base:allocation`, from `Export::allocation`.
    Allocation,
    Export(Arc<dyn MetaContext>),
}

/// A metadata context chosen with `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone)]
pub(crate) struct SelectedContext {
    pub id: u32,
    pub source: ContextSource,
}

/// What option haggling has agreed so far, carried into the session at GO.
#[derive(Default)]
struct Agreed {
    structured: bool,
    /// The export the contexts were selected for, and the contexts; they apply only if
    /// the client then opens that same export.
    contexts: Option<(Vec<u8>, Vec<SelectedContext>)>,
}

impl Agreed {
    fn into_session(self, found: Found, name: &[u8]) -> Session {
        let mut session = open(found);
        session.structured = self.structured;
        if let Some((export, contexts)) = self.contexts {
            if export == name {
                session.contexts = contexts;
            }
        }
        session
    }
}

/// How option haggling ended.
pub(crate) enum Outcome {
    Transmission(Session),
    /// The client sent `NBD_OPT_ABORT` (and got its ACK).
    Aborted,
}

/// Runs the handshake on a fresh connection. Errors mean the connection must be dropped.
pub(crate) async fn negotiate<R, W>(
    reader: &mut R,
    writer: &mut W,
    registry: &ExportRegistry,
) -> Result<Outcome, NbdError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(1024);
    encode_greeting(&mut out);
    writer.write_all(&out).await?;

    let client_flags = reader.read_u32().await?;
    if client_flags & !CLIENT_FLAGS_KNOWN != 0 {
        return Err(NbdError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    // Fixed newstyle is honoured even for clients that did not set the bit (the spec allows
    // it): our replies are only sent for options such clients would not send anyway.
    let no_zeroes = client_flags & NBD_FLAG_C_NO_ZEROES != 0;
    let mut agreed = Agreed::default();

    for _ in 0..OPTIONS_PER_HANDSHAKE_MAX {
        out.clear();
        let mut raw = [0u8; OPTION_HEADER_BYTES];
        reader.read_exact(&mut raw).await?;
        let header = decode_option_header(&raw)?;
        let option = header.option;

        if header.length > OPTION_BYTES_MAX {
            // EXPORT_NAME cannot be answered with an error, and a huge payload is not worth
            // reading just to refuse it.
            if option == NBD_OPT_EXPORT_NAME || header.length > OPTION_DISCARD_BYTES_MAX {
                return Err(NbdError::Protocol(format!(
                    "option {option} carries {} bytes",
                    header.length
                )));
            }
            discard(reader, header.length).await?;
            encode_option_reply(
                &mut out,
                option,
                NBD_REP_ERR_TOO_BIG,
                b"option data too large",
            );
            writer.write_all(&out).await?;
            continue;
        }
        let mut data = vec![0u8; header.length as usize];
        reader.read_exact(&mut data).await?;

        match option {
            NBD_OPT_EXPORT_NAME => {
                let Some(found) = registry.find(&data) else {
                    return Err(NbdError::UnknownExport(
                        String::from_utf8_lossy(&data).into_owned(),
                    ));
                };
                let session = agreed.into_session(found, &data);
                let flags = transmission_flags(&session.features, session.structured);
                encode_export_name_reply(&mut out, session.size, flags, no_zeroes);
                writer.write_all(&out).await?;
                return Ok(Outcome::Transmission(session));
            }
            NBD_OPT_ABORT => {
                encode_option_reply(&mut out, option, NBD_REP_ACK, &[]);
                // The client may already have closed; the ACK is a courtesy.
                let _ = writer.write_all(&out).await;
                return Ok(Outcome::Aborted);
            }
            NBD_OPT_LIST => {
                if data.is_empty() {
                    for (name, description) in registry.list() {
                        encode_option_reply(
                            &mut out,
                            option,
                            NBD_REP_SERVER,
                            &encode_server_entry(&name, &description),
                        );
                    }
                    encode_option_reply(&mut out, option, NBD_REP_ACK, &[]);
                } else {
                    encode_option_reply(
                        &mut out,
                        option,
                        NBD_REP_ERR_INVALID,
                        b"LIST takes no data",
                    );
                }
            }
            NBD_OPT_INFO | NBD_OPT_GO => {
                match answer_info(&mut out, option, &data, registry, agreed.structured) {
                    Some((found, name)) if option == NBD_OPT_GO => {
                        writer.write_all(&out).await?;
                        return Ok(Outcome::Transmission(agreed.into_session(found, &name)));
                    }
                    _ => {}
                }
            }
            NBD_OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    encode_option_reply(
                        &mut out,
                        option,
                        NBD_REP_ERR_INVALID,
                        b"STRUCTURED_REPLY takes no data",
                    );
                } else {
                    agreed.structured = true;
                    encode_option_reply(&mut out, option, NBD_REP_ACK, &[]);
                }
            }
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                answer_meta_context(&mut out, option, &data, registry, &mut agreed);
            }
            NBD_OPT_EXTENDED_HEADERS => {
                // Neither libnbd 1.14 nor qemu 10.0 on the reference machine negotiates
                // them, so 64-bit requests stay unimplemented; the spec lets us refuse.
                encode_option_reply(
                    &mut out,
                    option,
                    NBD_REP_ERR_UNSUP,
                    b"extended headers are not supported; use compact headers",
                );
            }
            _ => {
                debug!(option, "unsupported NBD option");
                encode_option_reply(&mut out, option, NBD_REP_ERR_UNSUP, b"option not supported");
            }
        }
        writer.write_all(&out).await?;
    }
    Err(NbdError::Protocol(format!(
        "more than {OPTIONS_PER_HANDSHAKE_MAX} options"
    )))
}

/// Encodes the reply to LIST_META_CONTEXT or SET_META_CONTEXT; SET replaces `agreed`'s
/// contexts (even with none) when it succeeds.
fn answer_meta_context(
    out: &mut BytesMut,
    option: u32,
    data: &[u8],
    registry: &ExportRegistry,
    agreed: &mut Agreed,
) {
    if !agreed.structured {
        encode_option_reply(
            out,
            option,
            NBD_REP_ERR_INVALID,
            b"negotiate NBD_OPT_STRUCTURED_REPLY first",
        );
        return;
    }
    let request = match decode_meta_context_request(data, META_CONTEXT_QUERIES_MAX) {
        Ok(request) => request,
        Err(err) => {
            encode_option_reply(out, option, NBD_REP_ERR_INVALID, err.to_string().as_bytes());
            return;
        }
    };
    let Some(found) = registry.find(&request.export) else {
        encode_option_reply(out, option, NBD_REP_ERR_UNKNOWN, b"no such export");
        return;
    };
    let listing = option == NBD_OPT_LIST_META_CONTEXT;
    let mut contexts: Vec<(String, ContextSource)> = Vec::new();
    if listing && request.queries.is_empty() {
        // Parametric contexts (a point in time in the name) cannot be enumerated.
        contexts.push((BASE_ALLOCATION.to_owned(), ContextSource::Allocation));
    }
    for query in &request.queries {
        let resolved = if query == "base:" || query == BASE_ALLOCATION {
            Some((BASE_ALLOCATION.to_owned(), ContextSource::Allocation))
        } else if query.starts_with("base:") {
            None
        } else {
            found
                .export
                .meta_context(query)
                .map(|context| (context.name().to_owned(), ContextSource::Export(context)))
        };
        match resolved {
            Some((name, source)) if !contexts.iter().any(|(n, _)| *n == name) => {
                contexts.push((name, source))
            }
            Some(_) => {}
            None => debug!(query, "no such NBD metadata context"),
        }
    }
    if !listing && contexts.len() > META_CONTEXTS_SELECTED_MAX {
        encode_option_reply(
            out,
            option,
            NBD_REP_ERR_TOO_BIG,
            format!("at most {META_CONTEXTS_SELECTED_MAX} metadata contexts at once").as_bytes(),
        );
        return;
    }
    let mut selected = Vec::with_capacity(contexts.len());
    for (index, (name, source)) in contexts.into_iter().enumerate() {
        // LIST's ids are reserved and sent as zero; SET's are 1, 2, ...
        let id = if listing { 0 } else { index as u32 + 1 };
        encode_option_reply(
            out,
            option,
            NBD_REP_META_CONTEXT,
            &encode_meta_context(id, &name),
        );
        selected.push(SelectedContext { id, source });
    }
    encode_option_reply(out, option, NBD_REP_ACK, &[]);
    if !listing {
        agreed.contexts = Some((request.export, selected));
    }
}

/// Encodes the reply to INFO or GO; returns the export and its name when the reply ends
/// in ACK.
fn answer_info(
    out: &mut BytesMut,
    option: u32,
    data: &[u8],
    registry: &ExportRegistry,
    structured: bool,
) -> Option<(Found, Vec<u8>)> {
    let request = match decode_info_request(data) {
        Ok(request) => request,
        Err(err) => {
            encode_option_reply(out, option, NBD_REP_ERR_INVALID, err.to_string().as_bytes());
            return None;
        }
    };
    let Some(found) = registry.find(&request.name) else {
        encode_option_reply(out, option, NBD_REP_ERR_UNKNOWN, b"no such export");
        return None;
    };
    let description = found.description.clone();
    let size = found.export.size();
    let flags = transmission_flags(&found.export.features(), structured);
    encode_option_reply(out, option, NBD_REP_INFO, &encode_info_export(size, flags));
    // Sent whether asked or not: clients that did not ask must ignore it, and those that did
    // learn the 32 MiB request limit.
    encode_option_reply(
        out,
        option,
        NBD_REP_INFO,
        &encode_info_block_size(BLOCK_BYTES_MIN, BLOCK_BYTES_PREFERRED, REQUEST_BYTES_MAX),
    );
    if request.info_types.contains(&NBD_INFO_NAME) {
        encode_option_reply(
            out,
            option,
            NBD_REP_INFO,
            &encode_info_string(NBD_INFO_NAME, &found.name),
        );
    }
    if request.info_types.contains(&NBD_INFO_DESCRIPTION) && !description.is_empty() {
        encode_option_reply(
            out,
            option,
            NBD_REP_INFO,
            &encode_info_string(NBD_INFO_DESCRIPTION, &description),
        );
    }
    encode_option_reply(out, option, NBD_REP_ACK, &[]);
    Some((found, request.name))
}

fn open(found: Found) -> Session {
    let size = found.export.size();
    let features = found.export.features();
    Session {
        name: found.name,
        export: found.export,
        size,
        features,
        clients: found.clients,
        structured: false,
        contexts: Vec::new(),
    }
}

/// Reads and drops `length` bytes so the next option header is read from the right place.
async fn discard<R: AsyncBufRead + Unpin>(reader: &mut R, length: u32) -> Result<(), NbdError> {
    let copied = tokio::io::copy_buf(
        &mut (&mut *reader).take(u64::from(length)),
        &mut tokio::io::sink(),
    )
    .await?;
    if copied != u64::from(length) {
        return Err(NbdError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}
