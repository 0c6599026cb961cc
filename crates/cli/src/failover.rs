//! `cdp failover [GROUP]` and `cdp reprotect [GROUP]`: make a copy of a group primary
//! (planned at the primary, unplanned at a secondary) and make a diverged old primary follow
//! the new one.

use std::time::Duration;

use clap::Args;

#[derive(Args, Debug)]
pub struct FailoverArgs {
    #[command(flatten)]
    control: crate::group::ApplianceControlArgs,
    /// The consistency group (may be left out when the appliance has one).
    #[arg(value_name = "GROUP")]
    group: Option<String>,
    /// Run at the primary: drain host writes (they wait, they do not fail), ship everything,
    /// demote this copy and promote the peer. No acknowledged write is lost.
    #[arg(long)]
    planned: bool,
    /// Unplanned: promote this secondary even though its primary is still connected
    /// (writes the old primary takes until it next connects are lost to this copy).
    #[arg(long)]
    force: bool,
    /// Planned: how long host writes may wait for the drain and the peer, in seconds.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    timeout: u64,
}

#[derive(Args, Debug)]
pub struct ReprotectArgs {
    #[command(flatten)]
    control: crate::group::ApplianceControlArgs,
    /// The consistency group (may be left out when the appliance has one).
    #[arg(value_name = "GROUP")]
    group: Option<String>,
    /// Do not keep this copy's writes since the divergence as image files: they are lost.
    #[arg(long)]
    force: bool,
}

pub fn failover(args: FailoverArgs) -> anyhow::Result<()> {
    if args.planned && args.force {
        anyhow::bail!("--force applies to an unplanned failover; a planned one needs no force");
    }
    // The drain and the peer's promotion (which writes its production volumes) take longer
    // than a status request: the bound is the drain's plus the copy's.
    let within = Duration::from_secs(args.timeout.saturating_add(600));
    let answer: cdp_control::FailedOver = crate::control_client::request_within(
        &args.control.socket(),
        "appliance",
        &cdp_control::Request::Failover {
            group: args.group.clone(),
            planned: args.planned,
            force: args.force,
            timeout_ms: Some(args.timeout.saturating_mul(1000)),
        },
        within,
    )?;
    if crate::output::json() {
        return crate::output::print_json(&answer);
    }
    crate::out!("{}", failover_text(&answer));
    Ok(())
}

fn failover_text(a: &cdp_control::FailedOver) -> String {
    let mut text = if a.planned {
        format!(
            "Group {}: planned failover done. The peer ({}) is primary in generation {} from seq {}; \
             this copy is secondary and follows it.\nHost writes waited {:.3} s.",
            a.group,
            a.primary_site,
            a.generation,
            a.first_seq,
            a.pause_ms.unwrap_or(0) as f64 / 1000.0
        )
    } else {
        format!(
            "Group {}: this copy (site {}) is primary in generation {} from seq {}.",
            a.group, a.primary_site, a.generation, a.first_seq
        )
    };
    if let Some(lost) = &a.lost {
        text += &format!(
            "\nRecords the old primary journaled from seq {} on{} were not received here and are lost to this copy.",
            lost.first_seq,
            lost.after_ns
                .map(|ns| format!(" (after {})", cdp_types::rfc3339::format_time(ns)))
                .unwrap_or_default()
        );
    }
    if !a.production.is_empty() {
        text += "\nProduction volumes, written from this copy: start a splitter on them to serve hosts:";
        for (volume, path) in &a.production {
            text += &format!("\n  {volume}: {}", path.display());
        }
    }
    text
}

pub fn reprotect(args: ReprotectArgs) -> anyhow::Result<()> {
    let answer: cdp_control::Reprotected = crate::control_client::request_within(
        &args.control.socket(),
        "appliance",
        &cdp_control::Request::Reprotect {
            group: args.group.clone(),
            force: args.force,
        },
        Duration::from_secs(3600),
    )?;
    if crate::output::json() {
        return crate::output::print_json(&answer);
    }
    let kept = match &answer.kept_image_dir {
        Some(dir) => format!(
            "This copy's writes since seq {} (through seq {}) are kept as image files in {}.",
            answer.divergence_seq,
            answer.diverged_last_seq,
            dir.display()
        ),
        None => format!(
            "This copy's writes since seq {} were not kept (--force).",
            answer.divergence_seq
        ),
    };
    crate::out!(
        "Group {}: reprotect armed. {kept}\nThe primary resynchronises this copy by regions (only regions that differ are sent) when its replication link next connects; `cdp status` shows the progress.",
        answer.group
    );
    Ok(())
}
