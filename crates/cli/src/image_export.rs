//! `cdp image export`: copies a group's volumes at a point in time into sparse files through a read-only virtual image.
//!
//! Also holds what `cdp restore` shares with it: opening and always releasing an image,
//! running a copy that Ctrl-C stops between chunks, and the progress bar.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cdp_control::{ImageAccessed, ImageReleased, Request};
use cdp_nbd::client::Client;
use cdp_types::Endpoint;
use clap::Args;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::bookmark::ControlArgs;
use crate::units::format_bytes;

/// Bytes read (and compared, for restore) per NBD request: large enough that per-request
/// round trips do not matter, small enough that a Ctrl-C is honoured within one chunk.
pub(crate) const CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// Granularity inside a chunk: all-zero blocks stay holes in an exported file, and restore
/// writes only the blocks that differ. 64 KiB matches the splitter's dirty-bitmap regions.
pub(crate) const BLOCK_BYTES: usize = 64 * 1024;

const _: () = assert!(CHUNK_BYTES.is_multiple_of(BLOCK_BYTES));

/// Longest wait for any one NBD read or write of a chunk. Generous (a busy disk, a journal
/// being read back), but a hung server ends the command with an error instead of forever.
pub(crate) const NBD_IO_TIMEOUT: Duration = Duration::from_secs(300);

/// Connects to an image or production export with the CLI's I/O deadline.
pub(crate) fn connect(endpoint: &Endpoint, export: &str) -> anyhow::Result<Client> {
    Ok(Client::connect_with_timeout(
        endpoint,
        export,
        Some(NBD_IO_TIMEOUT),
    )?)
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// The consistency group (may be left out when the appliance has one).
    #[arg(long)]
    group: Option<String>,
    /// The point in time: a bookmark name, `seq:N`, an RFC 3339 time with milliseconds, or
    /// `-30s`, `-5m`, `-2h`, `-1d`.
    // Relative points start with '-' (`-5m`): a value, not a flag.
    #[arg(long, allow_hyphen_values = true)]
    at: String,
    /// Destination file; with several volumes (and no --volume), a directory that receives
    /// one VOL.img per volume.
    #[arg(long)]
    to: PathBuf,
    /// Export only this volume of the group (PATH is then a file).
    #[arg(long)]
    volume: Option<String>,
    /// Replace existing destination files.
    #[arg(long)]
    force: bool,
    /// Incremental: write only the blocks that differ between this earlier (or later)
    /// point and --at, found from the appliance's journal index (`cdp:changed:POINT`), all
    /// of their bytes (zeroes too, so they are allocated); every other block stays a hole.
    /// Patch a full export at POINT with the file's allocated extents to get --at (or
    /// let --patch do it).
    #[arg(long, allow_hyphen_values = true, value_name = "POINT")]
    changed_since: Option<String>,
    /// With --changed-since: --to is an existing full export at that point (a raw file or
    /// block device of the volume's size), and the changed blocks are written into it in
    /// place, turning it into the export at --at. Not atomic: an interrupted patch leaves
    /// a mixture; run it again to finish.
    #[arg(long, requires = "changed_since")]
    patch: bool,
}

/// One volume of an image, and an accessed image, as `image_access` answers them.
pub(crate) use cdp_control::{ImageExport as ImageVolume, ImageInfo};

/// Where the image's exports are served.
pub(crate) fn image_endpoint(info: &ImageInfo) -> anyhow::Result<Endpoint> {
    info.nbd
        .parse()
        .with_context(|| format!("the appliance gave image {} a bad NBD endpoint", info.id))
}

/// Words for an image's point in messages.
pub(crate) trait DescribePoint {
    /// "seq 123 (bookmark b1)".
    fn describe_point(&self, asked: &str) -> String;
}

impl DescribePoint for ImageInfo {
    /// "seq 123 (bookmark b1)" for messages.
    fn describe_point(&self, asked: &str) -> String {
        let point = if self.point.is_empty() {
            asked
        } else {
            self.point.as_str()
        };
        if point == format!("seq:{}", self.seq) || point == self.seq.to_string() {
            format!("seq {}", self.seq)
        } else {
            format!("seq {} ({point})", self.seq)
        }
    }
}

/// A read-only virtual image opened for the length of one command. Dropping it releases
/// the image, so an error or an interrupted copy never leaves an image accessed; `release`
/// does the same and reports the outcome.
pub(crate) struct OpenImage {
    socket: PathBuf,
    pub info: ImageInfo,
    released: bool,
}

impl OpenImage {
    pub fn open(socket: &Path, group: Option<&str>, at: &str) -> anyhow::Result<OpenImage> {
        let answer: ImageAccessed = crate::control_client::appliance(
            socket,
            &Request::ImageAccess {
                group: group.map(str::to_string),
                at: at.to_string(),
                writable: false,
                logged: false,
            },
        )
        .with_context(|| format!("opening an image at {at:?}"))?;
        Ok(OpenImage {
            socket: socket.to_path_buf(),
            info: answer.image,
            released: false,
        })
    }

    pub fn release(mut self) -> anyhow::Result<()> {
        self.released = true;
        self.send_release()
    }

    fn send_release(&self) -> anyhow::Result<()> {
        crate::control_client::appliance::<ImageReleased>(
            &self.socket,
            &Request::ImageRelease {
                id: self.info.id.clone(),
            },
        )
        .with_context(|| {
            format!(
                "releasing image {} (release it with `cdp image release {}`)",
                self.info.id, self.info.id
            )
        })?;
        Ok(())
    }
}

impl Drop for OpenImage {
    fn drop(&mut self) {
        if !self.released {
            if let Err(e) = self.send_release() {
                eprintln!("cdp: warning: {e:#}");
            }
        }
    }
}

/// Runs blocking copies so that SIGINT/SIGTERM stops them between chunks instead of
/// killing the process: the caller then still releases the image and says where things
/// stand. The handlers are installed by `install`, before the image is opened, so a signal
/// arriving at any moment after that is seen (it makes the next copy stop at once).
pub(crate) struct Interruptible {
    runtime: tokio::runtime::Runtime,
    interrupt: Signal,
    terminate: Signal,
}

impl Interruptible {
    pub fn install() -> anyhow::Result<Interruptible> {
        let runtime = crate::runtime()?;
        let (interrupt, terminate) = {
            let _context = runtime.enter();
            (
                signal(SignalKind::interrupt()).context("watching SIGINT")?,
                signal(SignalKind::terminate()).context("watching SIGTERM")?,
            )
        };
        Ok(Interruptible {
            runtime,
            interrupt,
            terminate,
        })
    }

    /// Runs `work` on a blocking thread with a stop flag it must check between chunks.
    pub fn run<T: Send + 'static>(
        &mut self,
        work: impl FnOnce(&AtomicBool) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let Interruptible {
            runtime,
            interrupt,
            terminate,
        } = self;
        runtime.block_on(async move {
            let stop = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&stop);
            let mut copy = tokio::task::spawn_blocking(move || work(&flag));
            tokio::select! {
                done = &mut copy => return done.context("the copy thread failed")?,
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            eprintln!("cdp: stopping after the current chunk");
            stop.store(true, Ordering::Relaxed);
            copy.await.context("the copy thread failed")?
        })
    }
}

/// Fails once a stop was asked for.
pub(crate) fn check_stop(stop: &AtomicBool) -> anyhow::Result<()> {
    if stop.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// A bytes/rate/ETA bar on a terminal (stderr); hidden otherwise, where callers print a
/// summary line instead.
pub(crate) fn progress_bar(total: u64) -> anyhow::Result<indicatif::ProgressBar> {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )?
        .progress_chars("=> "),
    );
    Ok(bar)
}

pub(crate) fn is_zero(data: &[u8]) -> bool {
    // OR-folding fixed blocks vectorises; checking after each block still stops early on
    // data, which is the common case for a used volume.
    let mut blocks = data.chunks_exact(256);
    blocks.all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && blocks.remainder().iter().all(|&b| b == 0)
}

/// What one volume's export wrote.
struct Exported {
    volume: String,
    path: PathBuf,
    size: u64,
    data_bytes: u64,
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut interruptible = Interruptible::install()?;
    let image = OpenImage::open(&args.control.socket(), args.group.as_deref(), &args.at)?;
    let info = image.info.clone();
    let volumes: Vec<ImageVolume> = match &args.volume {
        Some(name) => {
            let Some(v) = info.exports.iter().find(|v| &v.volume == name) else {
                let names: Vec<&str> = info.exports.iter().map(|v| v.volume.as_str()).collect();
                bail!(
                    "group {} has no volume {name:?} (it has: {})",
                    info.group,
                    names.join(", ")
                );
            };
            vec![v.clone()]
        }
        None => info.exports.clone(),
    };
    if volumes.is_empty() {
        bail!("image {} of group {} has no volumes", info.id, info.group);
    }
    let plan = if args.patch {
        patch_targets(&args.to, &volumes)?
    } else {
        destinations(&args.to, &volumes, args.force)?
    };
    let endpoint = image_endpoint(&info)?;
    let total: u64 = volumes.iter().map(|v| v.size).sum();
    let mode = match &args.changed_since {
        None => Mode::Full,
        Some(point) if args.patch => Mode::Patch(point.clone()),
        Some(point) => Mode::Changed(point.clone()),
    };
    let exported = interruptible.run(move |stop| {
        let bar = progress_bar(total)?;
        let mut done = Vec::new();
        for (volume, path) in plan {
            bar.set_message(volume.volume.clone());
            done.push(export_volume(&endpoint, &volume, &path, &mode, stop, &bar)?);
        }
        bar.finish_and_clear();
        Ok(done)
    });
    let released = image.release();
    let exported = exported.with_context(|| {
        format!(
            "exporting group {} at {}",
            info.group,
            info.describe_point(&args.at)
        )
    })?;
    released?;
    let seconds = started.elapsed().as_secs_f64();
    let report = serde_json::json!({
        "group": info.group,
        "point": info.describe_point(&args.at),
        "seconds": seconds,
        "changed_since": args.changed_since,
        "patched": args.patch,
        "exported": exported
            .iter()
            .map(|e| serde_json::json!({
                "volume": e.volume,
                "path": e.path,
                "size": e.size,
                "data_bytes": e.data_bytes,
            }))
            .collect::<Vec<_>>(),
    });
    crate::output::report(&report, || {
        exported
            .iter()
            .map(|e| {
                let (verb, what) = match (&args.changed_since, args.patch) {
                    (None, _) => ("exported", "of data"),
                    (Some(_), false) => ("exported the changes of", "changed"),
                    (Some(_), true) => ("patched", "changed"),
                };
                let since = args
                    .changed_since
                    .as_ref()
                    .map(|p| format!(" since {p}"))
                    .unwrap_or_default();
                format!(
                    "{verb} {} of group {} at {}{since} to {}: {} ({} {what}) in {seconds:.1} s",
                    e.volume,
                    info.group,
                    info.describe_point(&args.at),
                    e.path.display(),
                    format_bytes(e.size),
                    format_bytes(e.data_bytes),
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// Where each volume goes: PATH itself for one volume, PATH/VOL.img for several. Existing
/// files are refused up front (unless `force`), before anything is copied.
fn destinations(
    to: &Path,
    volumes: &[ImageVolume],
    force: bool,
) -> anyhow::Result<Vec<(ImageVolume, PathBuf)>> {
    // `--to DIR/` names a directory even before it exists.
    let names_dir = to.as_os_str().as_encoded_bytes().ends_with(b"/");
    let plan: Vec<(ImageVolume, PathBuf)> = if volumes.len() == 1 && names_dir {
        std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
        vec![(
            volumes[0].clone(),
            to.join(format!("{}.img", volumes[0].volume)),
        )]
    } else if volumes.len() == 1 {
        if to.is_dir() {
            bail!(
                "{} is a directory; give a file name for volume {}",
                to.display(),
                volumes[0].volume
            );
        }
        if let Some(parent) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        vec![(volumes[0].clone(), to.to_path_buf())]
    } else {
        if to.exists() && !to.is_dir() {
            bail!(
                "the group has {} volumes, so --to must be a directory (or pick one with --volume); {} is a file",
                volumes.len(),
                to.display()
            );
        }
        std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
        volumes
            .iter()
            .map(|v| (v.clone(), to.join(format!("{}.img", v.volume))))
            .collect()
    };
    if !force {
        if let Some((_, path)) = plan.iter().find(|(_, p)| p.exists()) {
            bail!("{} exists; use --force to replace it", path.display());
        }
    }
    Ok(plan)
}

/// What `export` writes.
enum Mode {
    /// Every block into a new sparse file.
    Full,
    /// The blocks changed since a point into a new sparse file.
    Changed(String),
    /// The blocks changed since a point into an existing export at that point, in place.
    Patch(String),
}

/// Where each volume's patch goes: `to` itself for one volume, `to/VOL.img` for several;
/// each must exist already and have the volume's size (checked up front).
fn patch_targets(
    to: &Path,
    volumes: &[ImageVolume],
) -> anyhow::Result<Vec<(ImageVolume, PathBuf)>> {
    let plan: Vec<(ImageVolume, PathBuf)> = if volumes.len() == 1 && !to.is_dir() {
        vec![(volumes[0].clone(), to.to_path_buf())]
    } else {
        volumes
            .iter()
            .map(|v| (v.clone(), to.join(format!("{}.img", v.volume))))
            .collect()
    };
    for (volume, path) in &plan {
        let size = target_size(path)
            .with_context(|| format!("--patch needs an existing export at {}", path.display()))?;
        if size != volume.size {
            bail!(
                "{} holds {size} bytes but volume {} has {}; --patch writes into a full export of the same volume",
                path.display(),
                volume.volume,
                volume.size
            );
        }
    }
    Ok(plan)
}

/// The size of a file or block device.
fn target_size(path: &Path) -> anyhow::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // A block device's metadata length is 0; its end is its size.
    file.seek(SeekFrom::End(0))
        .with_context(|| format!("sizing {}", path.display()))
}

/// Copies one volume into `path`. A new file gets the data as `PATH.partial` first, renamed
/// over `path` only once complete and synced, so an interrupted export never leaves a file
/// that looks like a whole image; a patch writes into `path` itself.
fn export_volume(
    endpoint: &Endpoint,
    volume: &ImageVolume,
    path: &Path,
    mode: &Mode,
    stop: &AtomicBool,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Exported> {
    let mut client = connect(endpoint, &volume.export)
        .with_context(|| format!("opening volume {} of the image", volume.volume))?;
    if client.size() != volume.size {
        bail!(
            "export {} is {} bytes but the appliance announced {}",
            volume.export,
            client.size(),
            volume.size
        );
    }
    let partial = PathBuf::from(format!("{}.partial", path.display()));
    let point = match mode {
        Mode::Full => None,
        Mode::Changed(point) | Mode::Patch(point) => Some(point),
    };
    let mut status = match point {
        None => None,
        Some(point) => {
            let context = format!("cdp:changed:{point}");
            Some(
                Client::connect_for_context(
                    endpoint,
                    &volume.export,
                    &context,
                    Some(NBD_IO_TIMEOUT),
                )
                .with_context(|| format!("asking volume {} for {context}", volume.volume))?,
            )
        }
    };
    let copied = match (mode, &mut status) {
        (Mode::Patch(_), Some(changes)) => open_target_sized(path, false, volume.size)
            .and_then(|file| copy_changed(&mut client, changes, &file, path, stop, bar)),
        (Mode::Changed(_), Some(changes)) => open_target_sized(&partial, true, volume.size)
            .and_then(|file| copy_changed(&mut client, changes, &file, &partial, stop, bar)),
        _ => copy_to_file(&mut client, &partial, stop, bar),
    };
    if let Some(changes) = status {
        let _ = changes.disconnect();
    }
    if let Mode::Patch(_) = mode {
        let _ = client.disconnect();
        let data_bytes = copied.with_context(|| format!("patching volume {}", volume.volume))?;
        return Ok(Exported {
            volume: volume.volume.clone(),
            path: path.to_path_buf(),
            size: volume.size,
            data_bytes,
        });
    }
    let copied = copied.and_then(|data_bytes| {
        std::fs::rename(&partial, path)
            .with_context(|| format!("renaming {} to {}", partial.display(), path.display()))?;
        sync_parent(path)?;
        Ok(data_bytes)
    });
    let data_bytes = match copied {
        Ok(data_bytes) => data_bytes,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e.context(format!("exporting volume {}", volume.volume)));
        }
    };
    // The image is released next anyway; a failed goodbye changes nothing.
    let _ = client.disconnect();
    Ok(Exported {
        volume: volume.volume.clone(),
        path: path.to_path_buf(),
        size: volume.size,
        data_bytes,
    })
}

/// Writes the export into a new sparse file; returns the bytes of non-zero blocks written.
fn copy_to_file(
    client: &mut Client,
    path: &Path,
    stop: &AtomicBool,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<u64> {
    let size = client.size();
    let file: File = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    // All-zero blocks are never written, so they stay holes.
    file.set_len(size)
        .with_context(|| format!("sizing {}", path.display()))?;
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut data_bytes = 0;
    let mut offset = 0u64;
    while offset < size {
        check_stop(stop)?;
        let length = (size - offset).min(CHUNK_BYTES as u64) as usize;
        let chunk = &mut buf[..length];
        client.read(offset, chunk)?;
        for (index, block) in chunk.chunks(BLOCK_BYTES).enumerate() {
            if is_zero(block) {
                continue;
            }
            let at = offset + (index * BLOCK_BYTES) as u64;
            file.write_all_at(block, at)
                .with_context(|| format!("writing {}", path.display()))?;
            data_bytes += block.len() as u64;
        }
        offset += length as u64;
        bar.inc(length as u64);
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(data_bytes)
}

/// Status bit of `cdp:changed:POINT`: the extent differs (the appliance's
/// `CHANGED_STATE_DIRTY`).
const CHANGED_BIT: u32 = 1;

/// Largest range asked of BLOCK_STATUS at once (the server may answer less).
const STATUS_QUERY_BYTES: u64 = 1 << 30;

/// A new sparse file of `size` bytes (`create`), or an existing export opened for writing.
fn open_target_sized(path: &Path, create: bool, size: u64) -> anyhow::Result<File> {
    if !create {
        return OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()));
    }
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.set_len(size)
        .with_context(|| format!("sizing {}", path.display()))?;
    Ok(file)
}

/// Writes the extents `status` reports changed into `file` at their offsets, every byte of
/// them (zeroes too, so a new file has them allocated); returns the bytes written.
fn copy_changed(
    client: &mut Client,
    status: &mut Client,
    file: &File,
    path: &Path,
    stop: &AtomicBool,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<u64> {
    let size = client.size();
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut data_bytes = 0;
    let mut offset = 0u64;
    while offset < size {
        check_stop(stop)?;
        let asked = (size - offset).min(STATUS_QUERY_BYTES) as u32;
        for (length, flags) in status.block_status(offset, asked)? {
            let end = offset + u64::from(length);
            if flags & CHANGED_BIT != 0 {
                let mut at = offset;
                while at < end {
                    check_stop(stop)?;
                    let n = (end - at).min(CHUNK_BYTES as u64) as usize;
                    client.read(at, &mut buf[..n])?;
                    file.write_all_at(&buf[..n], at)
                        .with_context(|| format!("writing {}", path.display()))?;
                    data_bytes += n as u64;
                    at += n as u64;
                }
            }
            bar.inc(u64::from(length));
            offset = end;
        }
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(data_bytes)
}

/// Syncs the directory holding `path`, so the rename survives a crash.
fn sync_parent(path: &Path) -> anyhow::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("syncing directory {}", parent.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_sees_any_set_byte() {
        for len in [0, 1, 255, 256, 257, 4096 + 3] {
            let mut data = vec![0u8; len];
            assert!(is_zero(&data), "{len} zero bytes");
            for at in [0, len / 2, len.saturating_sub(1)] {
                if len == 0 {
                    continue;
                }
                data[at] = 1;
                assert!(!is_zero(&data), "byte {at} of {len}");
                data[at] = 0;
            }
        }
    }

    #[test]
    fn destinations_refuse_existing_files_and_use_a_directory_for_several_volumes() {
        let dir = std::env::temp_dir().join(format!("cdp-export-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let volume = |name: &str| ImageVolume {
            volume: name.into(),
            export: format!("g@img1/{name}"),
            size: 4096,
        };
        let file = dir.join("one.img");
        let plan = destinations(&file, &[volume("a")], false).unwrap();
        assert_eq!(plan[0].1, file);
        std::fs::write(&file, b"x").unwrap();
        let err = destinations(&file, &[volume("a")], false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert!(destinations(&file, &[volume("a")], true).is_ok());

        // Several volumes: a directory is created; a file there is an error.
        let two = [volume("a"), volume("b")];
        assert!(destinations(&file, &two, false).is_err());
        let out = dir.join("out");
        let plan = destinations(&out, &two, false).unwrap();
        assert_eq!(plan[1].1, out.join("b.img"));
        assert!(out.is_dir());
        // One volume but a directory as the target: refused, a file name is needed.
        assert!(destinations(&out, &[volume("a")], false).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
