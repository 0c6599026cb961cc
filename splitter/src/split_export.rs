//! The NBD export of a protected volume: reads from production, changes to production and the split link.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use cdp_link::Message;
use cdp_nbd::export::{Export, ExportError, ExportFeatures, Extent};
use cdp_nbd::limits::BLOCK_STATUS_EXTENTS_MAX;
use cdp_nbd::protocol::{NBD_STATE_HOLE, NBD_STATE_ZERO};
use cdp_types::BlockFile;

use crate::split_link::{DurableBy, SplitLink, Submitted};

/// Serves one production volume; every change is mirrored to the appliance before it is answered.
pub struct SplitExport {
    production: Arc<BlockFile>,
    link: Arc<SplitLink>,
    read_only: bool,
}

impl SplitExport {
    pub fn new(production: Arc<BlockFile>, link: Arc<SplitLink>, read_only: bool) -> Self {
        SplitExport {
            production,
            link,
            read_only,
        }
    }

    /// Applies a change to production and the link, then waits until the journal has it
    /// (or, while marking, until the dirty bitmap records it).
    async fn change(
        &self,
        offset: u64,
        length: u64,
        payload_bytes: usize,
        apply: impl FnOnce(&BlockFile) -> std::io::Result<()>,
        message: impl FnOnce(u64) -> Message,
        fua: bool,
    ) -> Result<(), ExportError> {
        if let Some(reason) = self.link.demoted() {
            return Err(ExportError::NotPermitted(reason));
        }
        let _permit = self.link.reserve(payload_bytes).await;
        let submitted = self
            .link
            .submit(offset, length, || apply(&self.production), message)
            .map_err(production_error)?;
        let through = match submitted {
            Submitted::Queued { source_seq, acked } => {
                if !self.link.wait_acked(acked).await {
                    if let Some(reason) = self.link.demoted() {
                        return Err(ExportError::NotPermitted(reason));
                    }
                }
                source_seq
            }
            Submitted::Marked => self.link.last_seq(),
        };
        if fua {
            self.make_durable(through).await?;
        }
        Ok(())
    }

    /// Production fdatasync and journal sync (or, while marking, dirty bitmap sync), both
    /// covering every change up to `source_seq`.
    async fn make_durable(&self, source_seq: u64) -> Result<(), ExportError> {
        let production = Arc::clone(&self.production);
        let sync = tokio::task::spawn_blocking(move || production.sync_data());
        let (durable_by, synced) = tokio::join!(self.link.wait_durable(source_seq), sync);
        match synced {
            Ok(result) => result.map_err(production_error)?,
            Err(join) => return Err(ExportError::Io(std::io::Error::other(join.to_string()))),
        }
        if durable_by == DurableBy::Bitmap {
            self.link.sync_bitmap().map_err(ExportError::Io)?;
        }
        Ok(())
    }
}

/// A full production volume is ENOSPC to the host, not a generic I/O error.
fn production_error(e: std::io::Error) -> ExportError {
    if e.kind() == std::io::ErrorKind::StorageFull {
        ExportError::NoSpace(e.to_string())
    } else {
        ExportError::Io(e)
    }
}

#[async_trait]
impl Export for SplitExport {
    fn size(&self) -> u64 {
        self.production.size()
    }

    fn features(&self) -> ExportFeatures {
        ExportFeatures {
            read_only: self.read_only,
            can_flush: true,
            can_fua: true,
            can_trim: true,
            can_write_zeroes: true,
            // Every change of the volume goes through one queue and a flush covers all of it.
            can_multi_conn: true,
        }
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, ExportError> {
        self.production
            .read_at(offset, length as usize)
            .map_err(production_error)
    }

    async fn allocation(
        &self,
        offset: u64,
        length: u32,
    ) -> Result<Option<Vec<Extent>>, ExportError> {
        // Holes of the production file (SEEK_DATA/SEEK_HOLE): what trims punched and what
        // was never written. A few lseeks, cheap enough to run on the reactor like reads.
        let runs = self
            .production
            .allocation(offset, u64::from(length), BLOCK_STATUS_EXTENTS_MAX)
            .map_err(production_error)?;
        Ok(runs.map(|runs| {
            runs.into_iter()
                .map(|(len, hole)| Extent {
                    // Runs lie inside the request, so they fit its u32 length.
                    length: len as u32,
                    flags: if hole {
                        NBD_STATE_HOLE | NBD_STATE_ZERO
                    } else {
                        0
                    },
                })
                .collect()
        }))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        let payload = data.clone();
        self.change(
            offset,
            data.len() as u64,
            data.len(),
            |p| p.write_at(offset, &data),
            |source_seq| Message::Write {
                source_seq,
                offset,
                data: payload,
            },
            fua,
        )
        .await
    }

    async fn flush(&self) -> Result<(), ExportError> {
        self.make_durable(self.link.last_seq()).await
    }

    async fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), ExportError> {
        self.change(
            offset,
            length as u64,
            0,
            |p| p.trim(offset, length as u64),
            |source_seq| Message::Trim {
                source_seq,
                offset,
                length: length as u64,
            },
            fua,
        )
        .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
        may_trim: bool,
    ) -> Result<(), ExportError> {
        self.change(
            offset,
            length as u64,
            0,
            |p| p.zero(offset, length as u64, may_trim),
            |source_seq| Message::Zero {
                source_seq,
                offset,
                length: length as u64,
            },
            fua,
        )
        .await
    }

    async fn write_zeroes_fast(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
        may_trim: bool,
    ) -> Result<(), ExportError> {
        // The journal side is fast already (a zero record has no payload); production
        // decides. A failed fast zero leaves production untouched and journals nothing.
        self.change(
            offset,
            length as u64,
            0,
            |p| p.zero_fast(offset, length as u64, may_trim),
            |source_seq| Message::Zero {
                source_seq,
                offset,
                length: length as u64,
            },
            fua,
        )
        .await
        .map_err(|e| match e {
            ExportError::Io(io) if io.kind() == std::io::ErrorKind::Unsupported => {
                ExportError::NotSupported(io.to_string())
            }
            other => other,
        })
    }

    async fn cache(&self, offset: u64, length: u32) -> Result<(), ExportError> {
        self.production.will_need(offset, u64::from(length));
        Ok(())
    }
}
