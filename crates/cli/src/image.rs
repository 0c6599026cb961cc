//! `cdp image access|list|release|export`: a group at a point in time as NBD exports, while
//! protection goes on.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{bail, Context};
use cdp_control::{ImageAccessed, ImageInfo, ImageListed, ImageReleased, ImageState, Request};
use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;

use crate::bookmark::ControlArgs;

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Open every volume of a group at a point as NBD exports (read-only unless --writable).
    Access(AccessArgs),
    /// Show the open images.
    List(ListArgs),
    /// End access to an image: its exports go away, writes made to it are discarded, and a
    /// replica held for logged access is carried forward again.
    Release(ReleaseArgs),
    /// Write a group's volumes at a point in time to files.
    Export(crate::image_export::ExportArgs),
}

#[derive(Args, Debug)]
pub struct AccessArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// The consistency group (may be left out when the appliance has one).
    #[arg(long)]
    group: Option<String>,
    /// Same as --group (the older positional form, kept so existing scripts still run).
    #[arg(value_name = "GROUP", hide = true, conflicts_with = "group")]
    group_positional: Option<String>,
    /// The point: a bookmark name, `seq:N`, an RFC 3339 time (`2026-11-23T10:00:00.000Z`) or
    /// a relative time (`-5m`, `-90s`, `-2h`).
    // Relative points start with '-' (`-5m`): a value, not a flag.
    #[arg(long, allow_hyphen_values = true)]
    at: String,
    /// Accept writes; they go to a scratch area and vanish at release.
    #[arg(long)]
    writable: bool,
    /// Roll the replica itself back to the point (physical access; distribution waits until
    /// release, new writes keep being journaled). Default: virtual access, instant.
    #[arg(long)]
    logged: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    control: ControlArgs,
    #[arg(long)]
    group: Option<String>,
}

#[derive(Args, Debug)]
pub struct ReleaseArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// The image's id, as `cdp image access` or `cdp image list` show it.
    id: String,
}

/// How long `image access` waits for its answer: the appliance may wait up to 60 s for a
/// restarted replica to be exact before opening.
const IMAGE_ACCESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

pub fn run(command: ImageCommand) -> anyhow::Result<()> {
    match command {
        ImageCommand::Access(args) => access(args),
        ImageCommand::List(args) => list(args),
        ImageCommand::Release(args) => release(args),
        ImageCommand::Export(args) => crate::image_export::run(args),
    }
}

fn ask<A: DeserializeOwned>(control: &ControlArgs, req: &Request) -> anyhow::Result<A> {
    let socket = control.socket();
    // Opening waits up to a minute for a restarted appliance's replica to be exact.
    let timeout = match req {
        Request::ImageAccess { .. } => IMAGE_ACCESS_TIMEOUT,
        _ => crate::control_client::default_timeout(),
    };
    crate::control_client::request_within(&socket, "appliance", req, timeout)
}

fn access(args: AccessArgs) -> anyhow::Result<()> {
    let answer: ImageAccessed = ask(
        &args.control,
        &Request::ImageAccess {
            group: args.group.clone().or(args.group_positional.clone()),
            at: args.at.clone(),
            writable: args.writable,
            logged: args.logged,
        },
    )?;
    let mut image = answer.image;
    if image.state == ImageState::RollingBack {
        image = follow_rollback(&args.control, &image)?;
    }
    if crate::output::json() {
        return crate::output::print_json(&image);
    }
    print_image(&image);
    crate::out!("attach with, for example:");
    for e in &image.exports {
        crate::out!("  {}", nbd_uri(&image.nbd, &e.export));
    }
    crate::out!("release with: cdp image release {}", image.id);
    Ok(())
}

/// Shows the rollback of a logged image until it is ready (a bar on a terminal).
fn follow_rollback(control: &ControlArgs, image: &ImageInfo) -> anyhow::Result<ImageInfo> {
    let id = image.id.clone();
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(1);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "rolling the replica back [{bar:40}] {pos}/{len} undo records {elapsed_precise}, eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    loop {
        let answer: ImageListed = ask(control, &Request::ImageList { group: None })?;
        let current = answer
            .images
            .into_iter()
            .find(|i| i.id == id)
            .with_context(|| format!("image {id} disappeared while rolling back"))?;
        match current.state {
            ImageState::Ready => {
                if let Some(bar) = &bar {
                    bar.finish_and_clear();
                }
                return Ok(current);
            }
            ImageState::Failed => {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                let why = current.error.as_deref().unwrap_or("unknown error");
                // The image holds nothing useful; give its pin and replica back.
                let _ = ask::<ImageReleased>(control, &Request::ImageRelease { id: id.clone() });
                bail!("logged access to image {id} failed: {why}");
            }
            ImageState::RollingBack => {
                if let (Some(bar), Some((done, needed))) = (&bar, current.rollback) {
                    bar.set_length(needed.max(1));
                    bar.set_position(done);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn nbd_uri(endpoint: &str, export: &str) -> String {
    match endpoint.strip_prefix("unix:") {
        Some(path) => format!("nbd+unix:///{export}?socket={path}"),
        None => format!("nbd://{endpoint}/{export}"),
    }
}

fn print_image(image: &ImageInfo) {
    let point = match &image.bookmark {
        Some(b) => format!("bookmark {b}"),
        None => image.point.clone(),
    };
    crate::out!(
        "image {} of group {}: {} (seq {}, {}), {} {}",
        image.id,
        image.group,
        point,
        image.seq,
        image.time,
        image.mode.as_str(),
        if image.writable {
            "writable (scratch, discarded at release)"
        } else {
            "read-only"
        },
    );
}

fn list(args: ListArgs) -> anyhow::Result<()> {
    let answer: ImageListed = ask(&args.control, &Request::ImageList { group: args.group })?;
    if crate::output::json() {
        return crate::output::print_json(&answer.images);
    }
    if answer.images.is_empty() {
        crate::out!("no open images");
        return Ok(());
    }
    crate::out!(
        "{:<8} {:<12} {:>10} {:<24} {:<8} {:<9} {:<12} EXPORTS",
        "ID",
        "GROUP",
        "SEQ",
        "TIME",
        "MODE",
        "ACCESS",
        "STATE"
    );
    for i in &answer.images {
        let exports: Vec<&str> = i.exports.iter().map(|e| e.export.as_str()).collect();
        crate::out!(
            "{:<8} {:<12} {:>10} {:<24} {:<8} {:<9} {:<12} {}",
            i.id,
            i.group,
            i.seq,
            i.time,
            i.mode.as_str(),
            if i.writable { "writable" } else { "read-only" },
            i.state.as_str(),
            exports.join(" ")
        );
    }
    Ok(())
}

fn release(args: ReleaseArgs) -> anyhow::Result<()> {
    let answer: ImageReleased = ask(&args.control, &Request::ImageRelease { id: args.id })?;
    if crate::output::json() {
        crate::output::print_json(&answer.released)?;
    } else {
        crate::out!("image {} released", answer.released.id);
    }
    Ok(())
}
