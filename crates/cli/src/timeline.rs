//! `cdp timeline [GROUP]`: the recoverable window, the bookmarks in it, and write activity.

use anyhow::Context;
use cdp_appliance::control::Request;
use clap::Args;

use crate::bookmark::ControlArgs;
use crate::units::format_bytes;

#[derive(Args, Debug)]
pub struct TimelineArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// The consistency group (may be left out when the appliance has one).
    #[arg(long)]
    group: Option<String>,
    /// Same as --group (the older positional form, kept so existing scripts still run).
    #[arg(value_name = "GROUP", hide = true, conflicts_with = "group")]
    group_positional: Option<String>,
}

pub fn run(args: TimelineArgs) -> anyhow::Result<()> {
    let answer = crate::control_client::appliance(
        &args.control.socket(),
        &Request::Timeline {
            group: args.group.or(args.group_positional),
        },
    )?;
    if crate::output::json() {
        crate::out!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    crate::out_nonl!("{}", text(&answer).context("unexpected timeline answer")?);
    Ok(())
}

/// Kept points of consolidated history listed in the text output (all are in `--json`).
const TIMELINE_KEPT_SHOWN: usize = 24;

fn text(t: &serde_json::Value) -> Option<String> {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "group {}", t.get("group")?.as_str()?);
    let (first, last) = (t.get("first")?, t.get("last")?);
    if first.is_null() || last.is_null() {
        let _ = writeln!(out, "  no records yet");
        return Some(out);
    }
    let _ = writeln!(
        out,
        "  recoverable: seq {} ({}) .. seq {} ({})",
        first.get("seq")?.as_u64()?,
        first.get("time")?.as_str()?,
        last.get("seq")?.as_u64()?,
        last.get("time")?.as_str()?,
    );
    if let Some(c) = t.get("consolidated").filter(|c| c.is_object()) {
        let kept = c.get("kept")?.as_array()?;
        let _ = writeln!(
            out,
            "  consolidated below seq {}: only these {} kept points open there{}",
            c.get("below_seq")?.as_u64()?,
            kept.len(),
            if kept.len() > TIMELINE_KEPT_SHOWN {
                format!(" (newest {TIMELINE_KEPT_SHOWN} shown)")
            } else {
                String::new()
            }
        );
        for k in kept.iter().rev().take(TIMELINE_KEPT_SHOWN).rev() {
            let _ = writeln!(
                out,
                "    {} seq {}",
                k.get("time")?.as_str()?,
                k.get("seq")?.as_u64()?
            );
        }
    }
    // Stretches refused as points: a volume was marking (link down) or resynchronising.
    for n in t
        .get("not_recoverable")
        .and_then(|n| n.as_array())
        .into_iter()
        .flatten()
    {
        let from = match (
            n.get("from_time").and_then(|f| f.as_str()),
            n.get("from_seq"),
        ) {
            (Some(time), _) => time.to_string(),
            (None, Some(seq)) => format!("after seq {seq}"),
            (None, None) => "?".into(),
        };
        let until = match n.get("until_seq").and_then(|u| u.as_u64()) {
            Some(seq) => format!("seq {seq}"),
            None => "now (still going on)".into(),
        };
        let _ = writeln!(
            out,
            "  not recoverable: volume {} {} from {from} until {until}",
            n.get("volume")?.as_str()?,
            n.get("reason")?.as_str()?,
        );
    }
    let bookmarks = t.get("bookmarks")?.as_array()?;
    let _ = writeln!(out, "  bookmarks: {}", bookmarks.len());
    for b in bookmarks {
        let _ = writeln!(
            out,
            "    {} seq {} {} {}",
            b.get("time")?.as_str()?,
            b.get("seq")?.as_u64()?,
            b.get("consistency")?.as_str()?,
            b.get("name")?.as_str()?,
        );
    }
    let _ = writeln!(
        out,
        "  activity per {} s: {:<24} {:>10} {:>10}",
        t.get("bucket_s")?.as_u64()?,
        "START",
        "RECORDS",
        "BYTES"
    );
    for a in t.get("activity")?.as_array()? {
        let _ = writeln!(
            out,
            "    {:<24} {:>10} {:>10}",
            a.get("start")?.as_str()?,
            a.get("records")?.as_u64()?,
            format_bytes(a.get("bytes")?.as_u64()?),
        );
    }
    Some(out)
}
