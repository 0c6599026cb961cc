//! `cdp timeline [GROUP]`: the recoverable window, the bookmarks in it, and write activity.

use cdp_control::{Request, Timeline};
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
    let answer: Timeline = crate::control_client::appliance(
        &args.control.socket(),
        &Request::Timeline {
            group: args.group.or(args.group_positional),
        },
    )?;
    if crate::output::json() {
        return crate::output::print_json(&answer);
    }
    crate::out_nonl!("{}", text(&answer));
    Ok(())
}

/// Kept points of consolidated history listed in the text output (all are in `--json`).
const TIMELINE_KEPT_SHOWN: usize = 24;

fn text(t: &Timeline) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "group {}", t.group);
    let (Some(first), Some(last)) = (&t.first, &t.last) else {
        let _ = writeln!(out, "  no records yet");
        return out;
    };
    let _ = writeln!(
        out,
        "  recoverable: seq {} ({}) .. seq {} ({})",
        first.seq, first.time, last.seq, last.time,
    );
    if let Some(c) = &t.consolidated {
        let kept = &c.kept;
        let _ = writeln!(
            out,
            "  consolidated below seq {}: only these {} kept points open there{}",
            c.below_seq,
            kept.len(),
            if kept.len() > TIMELINE_KEPT_SHOWN {
                format!(" (newest {TIMELINE_KEPT_SHOWN} shown)")
            } else {
                String::new()
            }
        );
        for k in kept.iter().rev().take(TIMELINE_KEPT_SHOWN).rev() {
            let _ = writeln!(out, "    {} seq {}", k.time, k.seq);
        }
    }
    // Stretches refused as points: a volume was marking (link down) or resynchronising.
    for n in &t.not_recoverable {
        let from = match (&n.from_time, n.from_seq) {
            (Some(time), _) => time.clone(),
            (None, Some(seq)) => format!("after seq {seq}"),
            (None, None) => "?".into(),
        };
        let until = match n.until_seq {
            Some(seq) => format!("seq {seq}"),
            None => "now (still going on)".into(),
        };
        let _ = writeln!(
            out,
            "  not recoverable: volume {} {} from {from} until {until}",
            n.volume, n.reason,
        );
    }
    let _ = writeln!(out, "  bookmarks: {}", t.bookmarks.len());
    for b in &t.bookmarks {
        let _ = writeln!(
            out,
            "    {} seq {} {} {}",
            b.time,
            b.seq,
            crate::bookmark::consistency_word(b.consistency),
            b.name,
        );
    }
    let _ = writeln!(
        out,
        "  activity per {} s: {:<24} {:>10} {:>10}",
        t.bucket_s, "START", "RECORDS", "BYTES"
    );
    for a in &t.activity {
        let _ = writeln!(
            out,
            "    {:<24} {:>10} {:>10}",
            a.start,
            a.records,
            format_bytes(a.bytes),
        );
    }
    out
}
