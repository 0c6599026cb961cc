//! `cdp archive`: a group's journal on object storage. `push` archives a group's sealed
//! segments from its directory; `list`, `verify` and `restore` need only the URL (and the
//! store's credentials), no appliance and no config.

use std::path::PathBuf;

use anyhow::Context;
use cdp_archive::{
    ArchiveGroup, ArchiveTarget, Archiver, Point, S3Settings, UploadLimits, VolumeEntry,
};
use clap::{Args, Subcommand};

use crate::output::{CliError, ErrorKind};

#[derive(Subcommand, Debug)]
pub enum ArchiveCommand {
    /// Upload the sealed journal segments the archive lacks for one group of an appliance
    /// config (verified, zstd), then write the next manifest generation.
    Push(PushArgs),
    /// The groups in an archive and the points each can be restored at.
    List(UrlArgs),
    /// Check every archived object (size, BLAKE3, every record CRC) and that each group's
    /// chain of segments has no gap. Exit 1 if anything is damaged.
    Verify(UrlArgs),
    /// Rebuild every volume of a group at a point from the archive alone.
    Restore(RestoreArgs),
}

#[derive(Args, Debug)]
pub struct UrlArgs {
    /// `s3://bucket/prefix` (endpoint, region and keys from the AWS_* environment) or
    /// `file:///dir`.
    url: String,
}

#[derive(Args, Debug)]
pub struct PushArgs {
    url: String,
    /// The appliance's config (its data_dir and the group's volumes).
    #[arg(long, short)]
    config: PathBuf,
    #[arg(long)]
    group: String,
    /// Objects in flight at once.
    #[arg(long, default_value_t = 2)]
    parallelism: usize,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    url: String,
    #[arg(long)]
    group: String,
    /// `latest`, `seq:N`, an RFC 3339 time or a bookmark name.
    #[arg(long)]
    at: String,
    /// A directory (one NAME.img per volume) or, for a one-volume group, a file.
    #[arg(long)]
    to: PathBuf,
}

fn open(url: &str) -> anyhow::Result<ArchiveTarget> {
    ArchiveTarget::open(url, &S3Settings::default())
        .map_err(|e| CliError::new(ErrorKind::Usage, e.to_string()).into())
}

pub fn run(command: ArchiveCommand) -> anyhow::Result<()> {
    let rt = crate::runtime()?;
    match command {
        ArchiveCommand::Push(args) => rt.block_on(push(args)),
        ArchiveCommand::List(args) => rt.block_on(list(args)),
        ArchiveCommand::Verify(args) => rt.block_on(verify(args)),
        ArchiveCommand::Restore(args) => rt.block_on(restore(args)),
    }
}

async fn push(args: PushArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let config = cdp_appliance::ApplianceConfig::from_toml(&text)
        .with_context(|| format!("in {}", args.config.display()))?;
    let group = config
        .group
        .iter()
        .find(|g| g.name == args.group)
        .ok_or_else(|| {
            CliError::new(
                ErrorKind::NotFound,
                format!("no group {} in the config", args.group),
            )
        })?;
    let dir = config.data_dir.join("groups").join(&group.name);
    let meta = cdp_appliance::group_meta::GroupMeta::load(&dir)?.ok_or_else(|| {
        CliError::new(
            ErrorKind::NotFound,
            format!("{} holds no group yet", dir.display()),
        )
    })?;
    let mut volumes = Vec::new();
    for v in &group.volume {
        let id = *meta.volumes.get(&v.name).ok_or_else(|| {
            CliError::new(
                ErrorKind::NotFound,
                format!("volume {} has no id in {}", v.name, dir.display()),
            )
        })?;
        volumes.push(VolumeEntry {
            id,
            name: v.name.clone(),
            size_bytes: v.size,
        });
    }
    let archiver = Archiver::new(
        open(&args.url)?,
        ArchiveGroup {
            name: group.name.clone(),
            group_id: meta.group_id,
            archiver_id: cdp_archive::archiver_id(&dir)?,
            volumes,
        },
        UploadLimits {
            parallelism: args.parallelism,
            ..Default::default()
        },
    );
    // The appliance opens its journal at `GROUP_DIR/journal`, which keeps segments in its own
    // `journal/` subdirectory.
    let journal_dir = dir.join("journal").join(cdp_journal::JOURNAL_DIR_NAME);
    let sealed = cdp_archive::sealed_in_dir(&journal_dir)?;
    let report = archiver.archive_sealed(&journal_dir, &sealed).await?;
    crate::output::report(
        &serde_json::json!({
            "generation": report.generation, "segments_uploaded": report.segments_uploaded,
            "raw_bytes": report.raw_bytes, "stored_bytes": report.stored_bytes,
            "archived_seq": report.archived_seq,
        }),
        || {
            format!(
        "generation {}: {} segments uploaded ({} bytes, {} stored); archived through seq {}",
        report.generation, report.segments_uploaded, report.raw_bytes, report.stored_bytes, report.archived_seq
    )
        },
    )
}

async fn list(args: UrlArgs) -> anyhow::Result<()> {
    let target = open(&args.url)?;
    let mut out = Vec::new();
    for name in cdp_archive::list_groups(&target).await? {
        if let Some(m) = cdp_archive::load_latest_manifest(&target, &name).await? {
            out.push(m);
        }
    }
    let fmt = cdp_types::rfc3339::format_time;
    crate::output::report(&out, || {
        let mut s = String::new();
        for m in &out {
            let (Some(a), Some(b)) = (m.segments.first(), m.segments.last()) else {
                continue;
            };
            s += &format!(
                "group {} (generation {}): seq {}..{}, any time from {} to {}\n",
                m.group,
                m.generation,
                a.first_seq,
                b.last_seq,
                fmt(a.first_ns),
                fmt(b.last_ns)
            );
            for bm in &m.bookmarks {
                s += &format!(
                    "  bookmark {}  seq {}  {}\n",
                    bm.name,
                    bm.seq,
                    fmt(bm.timestamp_ns)
                );
            }
        }
        s.trim_end().to_string()
    })
}

async fn verify(args: UrlArgs) -> anyhow::Result<()> {
    let target = open(&args.url)?;
    let r = cdp_archive::verify(&target).await?;
    crate::output::report(
        &serde_json::json!({
            "groups": r.groups, "segments": r.segments, "stored_bytes": r.stored_bytes,
            "problems": r.problems, "unreferenced": r.unreferenced,
        }),
        || {
            let mut s = format!(
                "{} groups, {} segments, {} bytes checked",
                r.groups, r.segments, r.stored_bytes
            );
            for p in &r.problems {
                s += &format!("\ndamaged: {p}");
            }
            if !r.unreferenced.is_empty() {
                s += &format!(
                    "\n{} unreferenced objects (left by a cut upload; harmless)",
                    r.unreferenced.len()
                );
            }
            s
        },
    )?;
    if r.problems.is_empty() {
        Ok(())
    } else {
        Err(CliError::new(
            ErrorKind::Failed,
            format!("{} damaged objects", r.problems.len()),
        )
        .into())
    }
}

async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let target = open(&args.url)?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} fetched")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let point = Point::parse(&args.at);
    let r = cdp_archive::restore(&target, &args.group, &point, &args.to, |fetched, total| {
        bar.set_length(total);
        bar.set_position(fetched);
    })
    .await
    .map_err(|e| match e {
        cdp_archive::ArchiveError::NotRecoverable(..) => {
            CliError::new(ErrorKind::Refused, e.to_string()).into()
        }
        cdp_archive::ArchiveError::NoGroup(_) => {
            CliError::new(ErrorKind::NotFound, e.to_string()).into()
        }
        other => anyhow::Error::new(other),
    })?;
    bar.finish_and_clear();
    crate::output::report(
        &serde_json::json!({
            "seq": r.seq, "timestamp_ns": r.timestamp_ns, "bytes_fetched": r.bytes_fetched,
            "segments": r.segments, "files": r.files,
        }),
        || {
            format!(
                "restored {} at seq {} ({}) from {} segments, {} bytes fetched: {}",
                args.group,
                r.seq,
                cdp_types::rfc3339::format_time(r.timestamp_ns),
                r.segments,
                r.bytes_fetched,
                r.files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
    )
}
