//! `cdp status`: asks the appliance (and the splitter, when reachable) for their state and
//! prints a table or JSON.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::units::format_bytes;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The appliance's control socket. Default: DIR/appliance.ctl.
    #[arg(long)]
    control: Option<PathBuf>,
    /// The splitter's control socket. Default: DIR/splitter.ctl when it exists.
    #[arg(long)]
    splitter_control: Option<PathBuf>,
    /// Data directory of `cdp up` (or env CDP_DIR).
    #[arg(long, env = "CDP_DIR", default_value = "cdp-data")]
    dir: PathBuf,
    /// Redraw the table in place every SECONDS (default 2) until interrupted, like
    /// `watch`; with `--json`, print one JSON document per line instead.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
    watch: Option<f64>,
}

/// Shortest `--watch` interval: each refresh asks both control sockets.
const WATCH_INTERVAL_MIN_S: f64 = 0.1;

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    if let Some(seconds) = args.watch {
        return watch(&args, seconds);
    }
    let (value, failure) = collect(&args);
    if crate::output::json() {
        crate::out!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        crate::out_nonl!("{}", table(&value).context("unexpected status answer")?);
    }
    match failure {
        Some(e) => Err(e.context("the appliance is unreachable; shown: what the splitter knows")),
        None => Ok(()),
    }
}

/// Redraws until interrupted (SIGINT ends the process). An unreachable process is shown,
/// not fatal: watching is how one sees it come back.
fn watch(args: &StatusArgs, seconds: f64) -> anyhow::Result<()> {
    if !seconds.is_finite() || seconds < WATCH_INTERVAL_MIN_S {
        return Err(crate::output::CliError::new(
            crate::output::ErrorKind::Usage,
            format!("--watch {seconds}: the interval must be at least {WATCH_INTERVAL_MIN_S} s"),
        )
        .into());
    }
    let interval = std::time::Duration::from_secs_f64(seconds);
    loop {
        let (value, failure) = collect(args);
        if crate::output::json() {
            crate::out!("{}", serde_json::to_string(&value)?);
        } else {
            let body = table(&value).unwrap_or_else(|| "unexpected status answer\n".into());
            let when = cdp_appliance::rfc3339::format_time(cdp_types::TimestampNs::now().0);
            let note = failure.map(|e| format!("{e:#}\n")).unwrap_or_default();
            crate::out_nonl!(
                "{}",
                frame(&format!(
                    "Every {seconds}s: cdp status    {when}\n\n{body}{note}"
                ))
            );
        }
        std::thread::sleep(interval);
    }
}

/// `text` drawn over the previous frame: cursor home, each line cleared to its end, then
/// the rest of the screen cleared, so a refresh never flickers or leaves old lines.
fn frame(text: &str) -> String {
    let mut out = String::from("\x1b[H");
    for line in text.lines() {
        out.push_str(line);
        out.push_str("\x1b[K\n");
    }
    out.push_str("\x1b[J");
    out
}

/// Both processes' state, and the appliance's error if it did not answer.
fn collect(args: &StatusArgs) -> (serde_json::Value, Option<anyhow::Error>) {
    let control = args
        .control
        .clone()
        .unwrap_or_else(|| args.dir.join("appliance.ctl"));
    // Either process may be down; show what the other knows, mark the unreachable one,
    // and exit with its status (5 when unreachable) once everything known is printed.
    let mut failure = None;
    let mut value = match crate::control_client::appliance(
        &control,
        &cdp_appliance::control::Request::Status,
    ) {
        Ok(v) => v,
        Err(e) => {
            let v = serde_json::json!({
                "groups": [],
                "appliance": { "reachable": false, "error": format!("{e:#}") },
            });
            failure = Some(e);
            v
        }
    };
    let splitter_control = args.splitter_control.clone().or_else(|| {
        let default = args.dir.join("splitter.ctl");
        default.exists().then_some(default)
    });
    if let Some(socket) = splitter_control {
        // The splitter may be down (the appliance still answers); say so instead of failing.
        value["splitter"] = match crate::control_client::request(
            &socket,
            "splitter",
            &serde_json::json!({"command": "status"}),
        ) {
            Ok(answer) => answer,
            Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
        };
    }
    (value, failure)
}

fn table(value: &serde_json::Value) -> Option<String> {
    use std::fmt::Write;
    let mut out = String::new();
    if let Some(splitter) = value.get("splitter") {
        out.push_str(&splitter_table(splitter));
    }
    if let Some(error) = value
        .get("appliance")
        .and_then(|a| a.get("error"))
        .and_then(|e| e.as_str())
    {
        let _ = writeln!(out, "APPLIANCE UNREACHABLE: {error}");
        return Some(out);
    }
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
                Some(ns) => format!("oldest record {}", cdp_appliance::point::format_time(ns)),
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
            let action = if g.get("journal_throttling").and_then(|t| t.as_bool()) == Some(true) {
                "host writes are held until it fits (policy throttle)"
            } else {
                "distribution runs now (policy release)"
            };
            let _ = writeln!(
                out,
                "  JOURNAL FULL: distribution is behind and old history cannot be released yet; {action}"
            );
        }
        let _ = writeln!(
            out,
            "  oldest recoverable point seq {}, undo stream {}{}",
            n("oldest_point_seq"),
            format_bytes(n("undo_bytes")),
            match g.get("replica_held_at").and_then(|h| h.as_u64()) {
                Some(seq) => format!(", replica held at seq {seq} by a logged image"),
                None => String::new(),
            }
        );
        if let Some(c) = g.get("consolidation").filter(|c| c.is_object()) {
            let cn = |k: &str| c.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            let tiers: Vec<String> = c
                .get("tiers")
                .and_then(|t| t.as_array())
                .map(|t| {
                    t.iter()
                        .filter_map(|pair| {
                            let every = pair.get(0)?.as_u64()?;
                            let span = pair.get(1)?.as_u64()?;
                            Some(format!("1 per {every} s for {span} s"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  consolidation: every point for {} s, then {}; through seq {}, {} kept points, {} passes freed {}{}",
                cn("keep_all_s"),
                tiers.join(", then "),
                cn("through_seq"),
                cn("kept_points"),
                cn("passes"),
                format_bytes(cn("bytes_freed_total")),
                if c.get("running").and_then(|r| r.as_bool()) == Some(true) {
                    " (a pass is running)"
                } else {
                    ""
                }
            );
        }
        if let Some(f) = g.get("failure").and_then(|f| f.as_str()) {
            let _ = writeln!(out, "  FENCED: {f}");
        }
        // --- remote replication ---
        if let Some(r) = g.get("remote").filter(|r| r.is_object()) {
            let rn = |k: &str| r.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            let connected = r.get("connected").and_then(|c| c.as_bool()) == Some(true);
            let exceeded = r.get("rpo_exceeded").and_then(|c| c.as_bool()) == Some(true);
            let _ = writeln!(
                out,
                "  remote {} {} {}{}: shipped seq {}, lag {} records, {} / {:.1} s (last {} s: p99 {:.1} s, max {:.1} s; RPO {} s{}), wire {:.2}x, {:.1} MiB/s{}{}",
                r.get("endpoint").and_then(|e| e.as_str()).unwrap_or("?"),
                match r.get("mode").and_then(|m| m.as_str()).unwrap_or("async") {
                    "dynamic" if r.get("sync_active").and_then(|a| a.as_bool()) == Some(true) => {
                        "dynamic (now sync)"
                    }
                    "dynamic" => "dynamic (now ASYNC)",
                    other => other,
                },
                if connected { "connected" } else { "DISCONNECTED" },
                if r.get("sync_waiting").and_then(|w| w.as_bool()) == Some(true) {
                    ", HOST WRITES WAITING"
                } else {
                    ""
                },
                rn("shipped_seq"),
                rn("lag_records"),
                format_bytes(rn("lag_bytes")),
                r.get("lag_seconds").and_then(|l| l.as_f64()).unwrap_or(0.0),
                rn("lag_window_s"),
                rn("lag_p99_ms") as f64 / 1000.0,
                rn("lag_max_ms") as f64 / 1000.0,
                rn("rpo_s"),
                if exceeded {
                    if r.get("rpo_throttling").and_then(|t| t.as_bool()) == Some(true) {
                        ", EXCEEDED: host writes held"
                    } else {
                        ", EXCEEDED"
                    }
                } else {
                    ""
                },
                r.get("wire_compression_ratio").and_then(|w| w.as_f64()).unwrap_or(1.0),
                rn("wire_rate_bytes_per_s") as f64 / 1048576.0,
                match r.get("bandwidth_bytes_per_s").and_then(|b| b.as_u64()) {
                    Some(b) => format!(" (limit {:.1})", b as f64 / 1048576.0),
                    None => String::new(),
                },
                match r.get("last_error").and_then(|e| e.as_str()) {
                    Some(e) if !connected => format!("; last error: {e}"),
                    _ => String::new(),
                }
            );
            if let Some(x) = r.get("last_region_resync").filter(|x| x.is_object()) {
                let xn = |k: &str| x.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
                let _ = writeln!(
                    out,
                    "    resynchronised by regions at seq {} (the remote had seq {}, the journal had released up to {}): {} of {} regions differed, {} sent in {} ms",
                    xn("through_seq"),
                    xn("remote_had_through_seq"),
                    xn("journal_first_seq").saturating_sub(1),
                    xn("regions_sent"),
                    xn("regions_compared"),
                    format_bytes(xn("bytes_sent")),
                    xn("millis"),
                );
            }
            let rf = |k: &str| r.get(k).and_then(|v| v.as_f64()).unwrap_or(1.0);
            let _ = writeln!(
                out,
                "    wire bytes: {:.1} MiB of records, {:.1} MiB after dedup ({:.2}x{}; {} blocks referenced, {} zero), {:.1} MiB sent (zstd {:.2}x, level {} now, setting {})",
                rn("wire_raw_bytes") as f64 / 1048576.0,
                rn("wire_dedup_bytes") as f64 / 1048576.0,
                rf("dedup_ratio"),
                if r.get("dedup").and_then(|d| d.as_bool()) == Some(false) {
                    ", dedup off"
                } else {
                    ""
                },
                rn("dedup_reference_blocks"),
                rn("dedup_zero_blocks"),
                rn("wire_bytes") as f64 / 1048576.0,
                rf("zstd_ratio"),
                r.get("compress_level_now").and_then(|l| l.as_i64()).unwrap_or(0),
                r.get("compress_level").map_or_else(|| "?".to_string(), |l| match l.as_str() {
                    Some(word) => word.to_string(),
                    None => l.to_string(),
                }),
            );
        }
        if let Some(r) = g.get("replication_source").filter(|r| r.is_object()) {
            let connected = r.get("connected").and_then(|c| c.as_bool()) == Some(true);
            let _ = writeln!(
                out,
                "  remote copy (source = remote) fed by {} ({}), last received seq {}",
                r.get("peer").and_then(|p| p.as_str()).unwrap_or("-"),
                if connected {
                    "connected"
                } else {
                    "disconnected"
                },
                r.get("last_received_seq")
                    .and_then(|s| s.as_u64())
                    .unwrap_or(0)
            );
        }
        // --- end remote replication ---
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

/// Per-volume protection state as the splitter reports it.
fn splitter_table(splitter: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if let Some(error) = splitter.get("error").and_then(|e| e.as_str()) {
        let _ = writeln!(out, "SPLITTER  unreachable: {error}\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<16} {:<13} {:>10} {:>5}  RESYNC",
        "VOLUME", "STATE", "DIRTY", "HOSTS"
    );
    for v in splitter
        .get("volumes")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
    {
        let resync = match v.get("resync") {
            Some(r) if !r.is_null() => {
                let n = |k: &str| r.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
                let left = r
                    .get("seconds_left")
                    .and_then(|x| x.as_u64())
                    .map_or("?".to_string(), |s| format!("{s} s"));
                let mut text = format!(
                    "{:.1}% of {}, {}/s, {} left",
                    r.get("percent").and_then(|x| x.as_f64()).unwrap_or(0.0),
                    format_bytes(n("total_bytes")),
                    format_bytes(n("rate_bytes_per_s")),
                    left
                );
                // A verifying resync: how much was compared with the replica, how much sent.
                if r.get("method").and_then(|m| m.as_str()) == Some("verify") {
                    text += &format!(
                        "; verify: {} compared, {} copied",
                        format_bytes(n("verified_bytes")),
                        format_bytes(n("copied_bytes"))
                    );
                }
                text
            }
            _ => "-".to_string(),
        };
        // Hosts attached over NBD; a splitter that predates the count shows "?".
        let hosts = v
            .get("nbd_clients")
            .and_then(|x| x.as_u64())
            .map_or("?".to_string(), |n| n.to_string());
        let _ = writeln!(
            out,
            "{:<16} {:<13} {:>10} {:>5}  {}",
            v.get("name").and_then(|x| x.as_str()).unwrap_or("?"),
            v.get("state").and_then(|x| x.as_str()).unwrap_or("?"),
            format_bytes(v.get("dirty_bytes").and_then(|x| x.as_u64()).unwrap_or(0)),
            hosts,
            resync
        );
    }
    if let Some(endpoints) = splitter.get("nbd").and_then(|n| n.as_array()) {
        let endpoints: Vec<&str> = endpoints.iter().filter_map(|e| e.as_str()).collect();
        if !endpoints.is_empty() {
            let _ = writeln!(out, "NBD at {}", endpoints.join(", "));
        }
    }
    out.push('\n');
    out
}
