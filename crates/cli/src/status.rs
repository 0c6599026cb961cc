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
        "{:<16} {:>10} {:>10} {:>4} {:>10} {:>10} {:>10} {:>12} {:>8}",
        "GROUP", "JOURNAL", "CAPACITY", "SEGS", "FIRST", "LAST", "DURABLE", "DISTRIBUTED", "LAG"
    );
    for g in value.get("groups")?.as_array()? {
        let n = |k: &str| g.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        let _ = writeln!(
            out,
            "{:<16} {:>10} {:>10} {:>4} {:>10} {:>10} {:>10} {:>12} {:>8}",
            g.get("name")?.as_str()?,
            format_bytes(n("journal_bytes")),
            format_bytes(n("journal_capacity_bytes")),
            n("journal_segments"),
            n("first_seq"),
            n("last_seq"),
            n("durable_seq"),
            n("distributed_seq"),
            n("lag_records"),
        );
        if let Some(window) = g.get("journal_retention_s").and_then(|w| w.as_u64()) {
            let oldest = match g.get("first_timestamp_ns").and_then(|t| t.as_u64()) {
                Some(ns) => format!("oldest record {}", format_timestamp(ns)),
                None => "no records".to_string(),
            };
            let _ = writeln!(out, "  retention window {window} s, {oldest}");
        }
        let logical = n("journal_write_logical_bytes");
        if logical > 0 {
            let ratio = g
                .get("journal_compression_ratio")
                .and_then(|r| r.as_f64())
                .unwrap_or(1.0);
            let _ = writeln!(
                out,
                "  writes since start {} stored as {} (compression {ratio:.2}x)",
                format_bytes(logical),
                format_bytes(n("journal_write_stored_bytes")),
            );
        }
        if g.get("journal_over_capacity").and_then(|o| o.as_bool()) == Some(true) {
            let _ = writeln!(
                out,
                "  OVER CAPACITY: distribution is behind; the journal cannot release old segments yet"
            );
        }
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

/// A Unix timestamp in ns as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC), without a date library.
fn format_timestamp(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let millis = (ns / 1_000_000) % 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(format_timestamp(0), "1970-01-01T00:00:00.000Z");
        // 2024-02-29T12:34:56.789Z
        assert_eq!(
            format_timestamp(1_709_210_096_789_000_000),
            "2024-02-29T12:34:56.789Z"
        );
    }
}
