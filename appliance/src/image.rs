//! Point-in-time images of a group, exported over NBD while protection goes on: virtual
//! (assembled from journal, undo stream and replica) or logged (the replica rolled back),
//! read-only, or writable through a scratch file discarded at release.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use cdp_nbd::export::Extent;
use cdp_nbd::limits::BLOCK_STATUS_EXTENTS_MAX;
use cdp_nbd::protocol::{NBD_STATE_HOLE, NBD_STATE_ZERO};
use cdp_nbd::{Export, ExportError, ExportFeatures, ExportRegistry, MetaContext};
use cdp_types::{BlockFile, Seq, TimestampNs};

use crate::error::ApplianceError;
use crate::group::{Group, GroupVolume};
use crate::history::BLOCK_BYTES;
use crate::limits::IMAGES_MAX;
use crate::point::ResolvedPoint;

/// How long opening an image waits for a restarted appliance's replica to be exact.
const REPLICA_EXACT_WAIT: Duration = Duration::from_secs(60);

/// An image as `cdp image list` shows it.
pub use cdp_control::{ImageExport, ImageInfo, ImageMode, ImageState};

struct OpenImage {
    info: ImageInfo,
    group: Arc<Group>,
    pin: u64,
    scratch_files: Vec<PathBuf>,
}

/// The appliance's open images and the NBD export registry that serves them.
pub struct Images {
    exports: ExportRegistry,
    nbd: String,
    scratch_dir: PathBuf,
    open: Mutex<BTreeMap<String, OpenImage>>,
    next_id: AtomicU64,
}

/// What `image_access` asks for.
pub struct AccessRequest {
    pub point: String,
    pub resolved: ResolvedPoint,
    pub writable: bool,
    pub logged: bool,
}

impl Images {
    pub fn new(exports: ExportRegistry, nbd: String, scratch_dir: PathBuf) -> Images {
        // Images do not survive the appliance: scratch files left by a crash hold writes
        // nobody can reach any more.
        if let Ok(entries) = std::fs::read_dir(&scratch_dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "scratch") {
                    match std::fs::remove_file(&path) {
                        Ok(()) => tracing::info!(
                            "removed the scratch file of a past image: {}",
                            path.display()
                        ),
                        Err(e) => tracing::warn!("removing {}: {e}", path.display()),
                    }
                }
            }
        }
        Images {
            exports,
            nbd,
            scratch_dir,
            open: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    /// Opens an image of `group` at the resolved point. Virtual images are ready at once;
    /// a logged one rolls the replica in the background (`state` says when it is ready).
    /// Blocks briefly (creating scratch files): call from a blocking thread.
    pub fn access(
        self: &Arc<Self>,
        group: &Arc<Group>,
        request: AccessRequest,
    ) -> Result<ImageInfo, ApplianceError> {
        let at = Seq(request.resolved.seq);
        if self.lock().len() >= IMAGES_MAX {
            return Err(ApplianceError::Busy(format!(
                "{IMAGES_MAX} images are open; release one first (cdp image release ID)"
            )));
        }
        if request.logged
            && self
                .lock()
                .values()
                .any(|i| i.group.name == group.name && i.info.mode == ImageMode::Logged)
        {
            // Busy, not refused: the same request succeeds once that image is released.
            return Err(ApplianceError::Busy(format!(
                "group {} already has a logged image; release it first",
                group.name
            )));
        }
        group.wait_replica_exact(REPLICA_EXACT_WAIT)?;
        let pin = group.pin_point(at)?;
        let id = format!("img{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let mut exports = Vec::new();
        let mut volumes = Vec::new();
        let mut scratch_files = Vec::new();
        let build = (|| -> Result<(), ApplianceError> {
            for volume in &group.volumes() {
                let scratch = if request.writable {
                    std::fs::create_dir_all(&self.scratch_dir).map_err(|e| {
                        io_context(
                            e,
                            &format!("scratch directory {}", self.scratch_dir.display()),
                        )
                    })?;
                    let path = self
                        .scratch_dir
                        .join(format!("{id}-{}.scratch", volume.name));
                    let _ = std::fs::remove_file(&path);
                    let file = BlockFile::create_sparse(&path, volume.size)
                        .map_err(|e| io_context(e, &format!("scratch file {}", path.display())))?;
                    scratch_files.push(path);
                    Some(Scratch::new(file, volume.size))
                } else {
                    None
                };
                let export = format!("{}@{id}/{}", group.name, volume.name);
                volumes.push((
                    export.clone(),
                    Arc::new(ImageVolume(Arc::new(VolumeAtPoint {
                        group: Arc::clone(group),
                        volume: Arc::clone(volume),
                        at,
                        scratch,
                    }))),
                ));
                exports.push(ImageExport {
                    volume: volume.name.clone(),
                    export,
                    size: volume.size,
                });
            }
            Ok(())
        })();
        if let Err(e) = build {
            group.unpin(pin);
            remove_files(&scratch_files);
            return Err(e);
        }
        let info = ImageInfo {
            id: id.clone(),
            group: group.name.clone(),
            seq: at.0,
            time_ns: request.resolved.timestamp_ns,
            time: request.resolved.time.clone(),
            point: request.point,
            bookmark: request.resolved.bookmark.clone(),
            writable: request.writable,
            mode: if request.logged {
                ImageMode::Logged
            } else {
                ImageMode::Virtual
            },
            state: if request.logged {
                ImageState::RollingBack
            } else {
                ImageState::Ready
            },
            error: None,
            rollback: None,
            opened_ns: TimestampNs::now().0,
            nbd: self.nbd.clone(),
            exports,
        };
        self.lock().insert(
            id.clone(),
            OpenImage {
                info: info.clone(),
                group: Arc::clone(group),
                pin,
                scratch_files,
            },
        );
        if !request.logged {
            self.publish(&id, volumes)?;
            tracing::info!(image = %id, group = %group.name, seq = at.0, writable = request.writable, "virtual image opened");
            return Ok(info);
        }
        let images = Arc::clone(self);
        let group = Arc::clone(group);
        let spawned = std::thread::Builder::new()
            .name(format!("rollback-{id}"))
            .spawn(move || {
                let result = group
                    .hold_replica(at)
                    .map_err(String::from)
                    .and_then(|()| images.publish(&id, volumes).map_err(|e| e.to_string()));
                let mut open = images.lock();
                if let Some(image) = open.get_mut(&id) {
                    match result {
                        Ok(()) => {
                            image.info.state = ImageState::Ready;
                            tracing::info!(image = %id, group = %group.name, seq = at.0, "logged image ready");
                        }
                        Err(e) => {
                            tracing::error!(image = %id, "logged access failed: {e}");
                            image.info.state = ImageState::Failed;
                            image.info.error = Some(e);
                        }
                    }
                } else if result.is_ok() {
                    // Released while rolling back.
                    group.release_replica();
                }
            });
        if let Err(e) = spawned {
            self.release(&info.id).ok();
            return Err(io_context(e, "starting the rollback"));
        }
        Ok(info)
    }

    fn publish(
        &self,
        id: &str,
        volumes: Vec<(String, Arc<ImageVolume>)>,
    ) -> Result<(), ApplianceError> {
        for (name, export) in volumes {
            let description = format!("cdp image {id}");
            self.exports
                .add(&name, &description, export)
                // The registry refuses a name that is taken or not a valid NBD string.
                .map_err(|e| ApplianceError::Refused(format!("exporting {name}: {e}")))?;
        }
        Ok(())
    }

    pub fn list(&self, group: Option<&str>) -> Vec<ImageInfo> {
        self.lock()
            .values()
            .filter(|i| group.is_none_or(|g| i.info.group == g))
            .map(|i| {
                let mut info = i.info.clone();
                if info.mode == ImageMode::Logged && info.state == ImageState::RollingBack {
                    info.rollback = Some(i.group.rollback_progress());
                }
                info
            })
            .collect()
    }

    /// Ends access: the exports disappear (connected clients are cut off at their next
    /// request), writes to the scratch area are discarded, a held replica is released.
    pub fn release(&self, id: &str) -> Result<ImageInfo, cdp_link::control_socket::ControlError> {
        // One guard for the lookup and the error text: taking the lock again inside
        // `ok_or_else` while the first guard lives would deadlock the appliance.
        let removed = {
            let mut open = self.lock();
            match open.remove(id) {
                Some(image) => Ok(image),
                None => Err(cdp_link::control_socket::ControlError::not_found(
                    no_open_image_message(id, open.keys()),
                )),
            }
        };
        let image = removed?;
        for e in &image.info.exports {
            self.exports.remove(&e.export);
        }
        if image.info.mode == ImageMode::Logged && image.info.state != ImageState::RollingBack {
            image.group.release_replica();
        }
        image.group.unpin(image.pin);
        remove_files(&image.scratch_files);
        tracing::info!(image = %id, group = %image.info.group, "image released");
        Ok(image.info)
    }

    /// Releases every image (appliance shutdown).
    pub fn release_all(&self) {
        let ids: Vec<String> = self.lock().keys().cloned().collect();
        for id in ids {
            let _ = self.release(&id);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, OpenImage>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn remove_files(paths: &[PathBuf]) {
    for p in paths {
        if let Err(e) = std::fs::remove_file(p) {
            tracing::warn!("removing scratch file {}: {e}", p.display());
        }
    }
}

/// Writes to an image: blocks written since access began live here, whole.
struct Scratch {
    file: BlockFile,
    /// One bit per block: set once the block's current bytes are in `file`.
    written: Mutex<Vec<u64>>,
}

impl Scratch {
    fn new(file: BlockFile, size: u64) -> Scratch {
        let blocks = size.div_ceil(BLOCK_BYTES);
        Scratch {
            file,
            written: Mutex::new(vec![0; blocks.div_ceil(64) as usize]),
        }
    }
}

fn bit(bits: &[u64], block: u64) -> bool {
    bits.get((block / 64) as usize)
        .is_some_and(|w| w & (1 << (block % 64)) != 0)
}

/// One volume of an image, as an NBD export (a handle the blocking pool can share).
struct ImageVolume(Arc<VolumeAtPoint>);

/// One volume of a group at a point, with its scratch area if writable.
struct VolumeAtPoint {
    group: Arc<Group>,
    volume: Arc<GroupVolume>,
    at: Seq,
    scratch: Option<Scratch>,
}

impl VolumeAtPoint {
    /// Reads from the scratch file where the image was written, from the point elsewhere.
    fn read_blocking(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        let Some(scratch) = &self.scratch else {
            return self.read_point(offset, buf);
        };
        let written = scratch.written.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let in_scratch = bit(&written, pos / BLOCK_BYTES);
            let mut run_end = ((pos / BLOCK_BYTES + 1) * BLOCK_BYTES).min(end);
            while run_end < end && bit(&written, run_end / BLOCK_BYTES) == in_scratch {
                run_end = (run_end + BLOCK_BYTES).min(end);
            }
            let dst = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            if in_scratch {
                dst.copy_from_slice(&scratch.file.read_at(pos, dst.len())?);
            } else {
                self.read_point(pos, dst)?;
            }
            pos = run_end;
        }
        Ok(())
    }

    /// `base:allocation`: the point's runs, with blocks written to the scratch file as data.
    fn allocation_blocking(&self, offset: u64, length: u32) -> Result<Vec<Extent>, ExportError> {
        let runs = self
            .group
            .allocation_at_point(
                &self.volume,
                self.at,
                offset,
                u64::from(length),
                BLOCK_STATUS_EXTENTS_MAX,
            )
            .map_err(|e| ExportError::Io(std::io::Error::other(e.to_string())))?;
        let written = self
            .scratch
            .as_ref()
            .map(|s| s.written.lock().unwrap_or_else(|p| p.into_inner()).clone());
        let mut extents: Vec<Extent> = Vec::new();
        let mut push = |len: u64, zero: bool| {
            let flags = if zero {
                NBD_STATE_HOLE | NBD_STATE_ZERO
            } else {
                0
            };
            match extents.last_mut() {
                Some(last) if last.flags == flags => last.length += len as u32,
                // Runs lie inside the request, so they fit its u32 length.
                _ => extents.push(Extent {
                    length: len as u32,
                    flags,
                }),
            }
        };
        let mut pos = offset;
        for (len, zero) in runs {
            let run_end = pos + len;
            match (&written, zero) {
                (Some(bits), true) => {
                    // A zero run may hold blocks the image's user wrote since.
                    while pos < run_end {
                        let block = pos / BLOCK_BYTES;
                        let to = ((block + 1) * BLOCK_BYTES).min(run_end);
                        push(to - pos, !bit(bits, block));
                        pos = to;
                    }
                }
                _ => push(len, zero),
            }
            pos = run_end;
        }
        Ok(extents)
    }

    fn read_point(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        self.group
            .read_at_point(&self.volume, self.at, offset, buf)
            .map_err(|e| ExportError::Io(std::io::Error::other(e.to_string())))
    }

    /// Applies a change to the scratch file block by block; partly changed blocks are
    /// first filled from the image (read-modify-write), so the file always holds whole
    /// blocks. `data` is `None` for zeroes.
    fn change_blocking(
        &self,
        offset: u64,
        length: u64,
        data: Option<&[u8]>,
    ) -> Result<(), ExportError> {
        let Some(scratch) = &self.scratch else {
            return Err(ExportError::NotPermitted("the image is read-only".into()));
        };
        let mut written = scratch.written.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset + length;
        let mut block = offset / BLOCK_BYTES;
        let mut block_buf = vec![0u8; BLOCK_BYTES as usize];
        while block * BLOCK_BYTES < end {
            let start = block * BLOCK_BYTES;
            let block_end = (start + BLOCK_BYTES).min(self.volume.size);
            let buf = &mut block_buf[..(block_end - start) as usize];
            let whole = offset <= start && end >= block_end;
            if !whole {
                if bit(&written, block) {
                    buf.copy_from_slice(&scratch.file.read_at(start, buf.len())?);
                } else {
                    self.read_point(start, buf)?;
                }
            }
            let from = offset.max(start);
            let to = end.min(block_end);
            let dst = &mut buf[(from - start) as usize..(to - start) as usize];
            match data {
                Some(d) => {
                    dst.copy_from_slice(&d[(from - offset) as usize..(to - offset) as usize])
                }
                None => dst.fill(0),
            }
            scratch.file.write_at(start, buf)?;
            if let Some(w) = written.get_mut((block / 64) as usize) {
                *w |= 1 << (block % 64);
            }
            block += 1;
        }
        Ok(())
    }
}

/// The prefix of the metadata context naming the extents changed since a point:
/// `cdp:changed:<point>`, the point as `cdp image access --at` takes it.
pub const CHANGED_CONTEXT_PREFIX: &str = "cdp:changed:";

/// Status bit of `cdp:changed:<point>`: the extent differs between that point and the
/// image's. Bit 0, as in qemu's dirty bitmaps, so `x-dirty-bitmap` reads it (as "not data").
pub const CHANGED_STATE_DIRTY: u32 = 1;

/// `cdp:changed:<point>` on one image volume; holds a retention pin on the point so the
/// records between it and the image stay indexed while a client uses it.
struct ChangedContext {
    name: String,
    image: Arc<VolumeAtPoint>,
    since: Seq,
    pin: u64,
}

impl Drop for ChangedContext {
    fn drop(&mut self) {
        self.image.group.unpin(self.pin);
    }
}

#[async_trait]
impl MetaContext for ChangedContext {
    fn name(&self) -> &str {
        &self.name
    }

    async fn extents(&self, offset: u64, length: u32) -> Result<Vec<Extent>, ExportError> {
        let image = Arc::clone(&self.image);
        let since = self.since;
        blocking(move || {
            let runs = image
                .group
                .changed_between(&image.volume, since, image.at, offset, u64::from(length))
                .map_err(point_error)?;
            // Blocks written to a writable image's scratch area differ from the point too.
            let runs = image.with_scratch_blocks(offset, runs, true);
            Ok(to_extents(runs, CHANGED_STATE_DIRTY))
        })
        .await
    }
}

fn point_error(e: ApplianceError) -> ExportError {
    ExportError::Io(std::io::Error::other(e.to_string()))
}

/// Runs of (length, flagged) as NBD extents, `flag` set on the flagged ones.
fn to_extents(runs: Vec<(u64, bool)>, flag: u32) -> Vec<Extent> {
    runs.into_iter()
        .map(|(length, flagged)| Extent {
            // Runs lie inside a request of u32 length.
            length: length as u32,
            flags: if flagged { flag } else { 0 },
        })
        .collect()
}

impl VolumeAtPoint {
    /// `runs` (from `offset`) with every block the scratch area holds set to `written`.
    fn with_scratch_blocks(
        &self,
        offset: u64,
        runs: Vec<(u64, bool)>,
        written: bool,
    ) -> Vec<(u64, bool)> {
        let Some(scratch) = &self.scratch else {
            return runs;
        };
        let bits = scratch.written.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(u64, bool)> = Vec::with_capacity(runs.len());
        let mut pos = offset;
        for (len, flag) in runs {
            let end = pos + len;
            while pos < end {
                let block = pos / BLOCK_BYTES;
                let to = ((block + 1) * BLOCK_BYTES).min(end);
                let f = if bit(&bits, block) { written } else { flag };
                match out.last_mut() {
                    Some((l, last)) if *last == f => *l += to - pos,
                    _ => out.push((to - pos, f)),
                }
                pos = to;
            }
        }
        out
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ExportError> + Send + 'static,
) -> Result<T, ExportError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ExportError::Io(std::io::Error::other(e.to_string())))?
}

#[async_trait]
impl Export for ImageVolume {
    fn size(&self) -> u64 {
        self.0.volume.size
    }

    fn features(&self) -> ExportFeatures {
        let writable = self.0.scratch.is_some();
        ExportFeatures {
            read_only: !writable,
            can_flush: writable,
            can_fua: writable,
            can_trim: writable,
            can_write_zeroes: writable,
            can_multi_conn: true,
        }
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, ExportError> {
        let this = Arc::clone(&self.0);
        blocking(move || {
            let mut buf = vec![0u8; length as usize];
            this.read_blocking(offset, &mut buf)?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn allocation(
        &self,
        offset: u64,
        length: u32,
    ) -> Result<Option<Vec<Extent>>, ExportError> {
        let this = Arc::clone(&self.0);
        blocking(move || this.allocation_blocking(offset, length).map(Some)).await
    }

    fn meta_context(&self, query: &str) -> Option<Arc<dyn MetaContext>> {
        let point = query.strip_prefix(CHANGED_CONTEXT_PREFIX)?;
        let image = &self.0;
        let resolved = match crate::control::resolve_point(&image.group, point) {
            Ok(resolved) => resolved,
            Err(e) => {
                tracing::info!(group = %image.group.name, point, error = %e.message, "cdp:changed context refused");
                return None;
            }
        };
        let since = Seq(resolved.seq);
        let pin = match image.group.pin_point(since) {
            Ok(pin) => pin,
            Err(e) => {
                tracing::info!(group = %image.group.name, point, error = %e, "cdp:changed context refused");
                return None;
            }
        };
        Some(Arc::new(ChangedContext {
            name: query.to_owned(),
            image: Arc::clone(image),
            since,
            pin,
        }))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), ExportError> {
        let this = Arc::clone(&self.0);
        blocking(move || this.change_blocking(offset, data.len() as u64, Some(&data))).await
    }

    async fn flush(&self) -> Result<(), ExportError> {
        // Scratch data is discarded at release; there is nothing to make durable.
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u32, _fua: bool) -> Result<(), ExportError> {
        let this = Arc::clone(&self.0);
        blocking(move || this.change_blocking(offset, length as u64, None)).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        _fua: bool,
        _may_trim: bool,
    ) -> Result<(), ExportError> {
        let this = Arc::clone(&self.0);
        blocking(move || this.change_blocking(offset, length as u64, None)).await
    }
}

/// The refusal for releasing an id that is not open, listing the ids that are.
fn no_open_image_message<'a>(id: &str, open: impl Iterator<Item = &'a String>) -> String {
    let ids: Vec<&str> = open.map(String::as_str).collect();
    let listed = if ids.is_empty() {
        "none".to_string()
    } else {
        ids.join(", ")
    };
    format!("no open image {id:?} (open: {listed})")
}

/// An I/O error with what was being done said first; its kind is kept.
fn io_context(e: std::io::Error, what: &str) -> ApplianceError {
    ApplianceError::Io(std::io::Error::new(e.kind(), format!("{what}: {e}")))
}
