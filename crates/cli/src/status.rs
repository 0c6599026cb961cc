//! `cdp status`: asks the appliance for its state and prints a table or JSON.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::units::format_bytes;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The appliance's control socket. Default: DIR/appliance.ctl.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Data directory of `cdp up` (or env CDP_DIR).
    #[arg(long, env = "CDP_DIR", default_value = "cdp-data")]
    dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let control = args
        .control
        .unwrap_or_else(|| args.dir.join("appliance.ctl"));
    let value = crate::runtime()?.block_on(cdp_appliance::control::request(
        &control,
        &cdp_appliance::control::Request::Status,
    ))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    print!("{}", table(&value).context("unexpected status answer")?);
    Ok(())
}

fn table(value: &serde_json::Value) -> Option<String> {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:>10} {:>4} {:>10} {:>10} {:>10} {:>12} {:>8}",
        "GROUP", "JOURNAL", "SEGS", "FIRST", "LAST", "DURABLE", "DISTRIBUTED", "LAG"
    );
    for g in value.get("groups")?.as_array()? {
        let n = |k: &str| g.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        let _ = writeln!(
            out,
            "{:<16} {:>10} {:>4} {:>10} {:>10} {:>10} {:>12} {:>8}",
            g.get("name")?.as_str()?,
            format_bytes(n("journal_bytes")),
            n("journal_segments"),
            n("first_seq"),
            n("last_seq"),
            n("durable_seq"),
            n("distributed_seq"),
            n("lag_records"),
        );
        if let Some(f) = g.get("failure").and_then(|f| f.as_str()) {
            let _ = writeln!(out, "  FENCED: {f}");
        }
        let _ = writeln!(
            out,
            "  {:<14} {:>10} {:<10} REPLICA",
            "VOLUME", "SIZE", "SPLITTER"
        );
        for v in g.get("volumes")?.as_array()? {
            let connected = v.get("connected").and_then(|c| c.as_bool()) == Some(true);
            let _ = writeln!(
                out,
                "  {:<14} {:>10} {:<10} {}",
                v.get("name")?.as_str()?,
                format_bytes(v.get("size")?.as_u64()?),
                if connected { "connected" } else { "absent" },
                v.get("replica")?.as_str()?,
            );
        }
    }
    Some(out)
}
