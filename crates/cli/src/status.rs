//! `cdp status`: asks the appliance (and the splitter, when reachable) for their state and
//! prints a table or JSON.

use std::path::PathBuf;

use cdp_control::{
    ApplianceStatus, GroupStatus, ReplicationMode, ResyncMethod, SplitterRequest, SplitterStatus,
};
use clap::Args;
use serde::Serialize;

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

/// What `cdp status --json` prints: the appliance's answer, and the splitter's when it has
/// one; a process that did not answer is named with its error.
#[derive(Serialize)]
struct StatusReport {
    groups: Vec<GroupStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    appliance: Option<ApplianceUnreachable>,
    #[serde(skip_serializing_if = "Option::is_none")]
    splitter: Option<SplitterReport>,
}

#[derive(Serialize)]
struct ApplianceUnreachable {
    reachable: bool,
    error: String,
}

#[derive(Serialize)]
#[serde(untagged)]
enum SplitterReport {
    Answered(SplitterStatus),
    Unreachable { error: String },
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    if let Some(seconds) = args.watch {
        return watch(&args, seconds);
    }
    let (report, failure) = collect(&args);
    if crate::output::json() {
        crate::output::print_json(&report)?;
    } else {
        crate::out_nonl!("{}", table(&report));
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
        let (report, failure) = collect(args);
        if crate::output::json() {
            crate::out!(
                "{}",
                serde_json::to_string(&serde_json::to_value(&report)?)?
            );
        } else {
            let body = table(&report);
            let when = cdp_types::rfc3339::format_time(cdp_types::TimestampNs::now().0);
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
fn collect(args: &StatusArgs) -> (StatusReport, Option<anyhow::Error>) {
    let control = args
        .control
        .clone()
        .unwrap_or_else(|| args.dir.join("appliance.ctl"));
    // Either process may be down; show what the other knows, mark the unreachable one,
    // and exit with its status (5 when unreachable) once everything known is printed.
    let mut failure = None;
    let mut report = match crate::control_client::appliance::<ApplianceStatus>(
        &control,
        &cdp_control::Request::Status,
    ) {
        Ok(status) => StatusReport {
            groups: status.groups,
            appliance: None,
            splitter: None,
        },
        Err(e) => {
            let report = StatusReport {
                groups: Vec::new(),
                appliance: Some(ApplianceUnreachable {
                    reachable: false,
                    error: format!("{e:#}"),
                }),
                splitter: None,
            };
            failure = Some(e);
            report
        }
    };
    let splitter_control = args.splitter_control.clone().or_else(|| {
        let default = args.dir.join("splitter.ctl");
        default.exists().then_some(default)
    });
    if let Some(socket) = splitter_control {
        // The splitter may be down (the appliance still answers); say so instead of failing.
        report.splitter = Some(
            match crate::control_client::splitter(&socket, &SplitterRequest::Status) {
                Ok(answer) => SplitterReport::Answered(answer),
                Err(e) => SplitterReport::Unreachable {
                    error: format!("{e:#}"),
                },
            },
        );
    }
    (report, failure)
}

fn table(report: &StatusReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if let Some(splitter) = &report.splitter {
        out.push_str(&splitter_table(splitter));
    }
    if let Some(unreachable) = &report.appliance {
        let _ = writeln!(out, "APPLIANCE UNREACHABLE: {}", unreachable.error);
        return out;
    }
    let _ = writeln!(
        out,
        "{:<16} {:>10} {:>10} {:>4} {:>10} {:>10} {:>10} {:>12} {:>8}",
        "GROUP", "JOURNAL", "CAPACITY", "SEGS", "FIRST", "LAST", "DURABLE", "DISTRIBUTED", "LAG"
    );
    for g in &report.groups {
        group_lines(&mut out, g);
    }
    out
}

/// One group's lines of the table.
fn group_lines(out: &mut String, g: &GroupStatus) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "{:<16} {:>10} {:>10} {:>4} {:>10} {:>10} {:>10} {:>12} {:>8}",
        g.name,
        format_bytes(g.journal_bytes),
        format_bytes(g.journal_capacity_bytes),
        g.journal_segments,
        g.first_seq,
        g.last_seq,
        g.durable_seq,
        g.distributed_seq,
        g.lag_records,
    );
    if let Some(window) = g.journal_retention_s {
        let oldest = match g.first_timestamp_ns {
            Some(ns) => format!("oldest record {}", cdp_types::rfc3339::format_time(ns)),
            None => "no records".to_string(),
        };
        let _ = writeln!(out, "  retention window {window} s, {oldest}");
    }
    let logical = g.journal_write_logical_bytes;
    if logical > 0 {
        let _ = writeln!(
            out,
            "  writes since start {} stored as {} (compression {:.2}x)",
            format_bytes(logical),
            format_bytes(g.journal_write_stored_bytes),
            g.journal_compression_ratio,
        );
    }
    if g.journal_over_capacity {
        let action = if g.journal_throttling {
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
        g.oldest_point_seq,
        format_bytes(g.undo_bytes),
        match g.replica_held_at {
            Some(seq) => format!(", replica held at seq {seq} by a logged image"),
            None => String::new(),
        }
    );
    if let Some(c) = &g.consolidation {
        let tiers: Vec<String> = c
            .tiers
            .iter()
            .map(|(every, span)| format!("1 per {every} s for {span} s"))
            .collect();
        let _ = writeln!(
            out,
            "  consolidation: every point for {} s, then {}; through seq {}, {} kept points, {} passes freed {}{}",
            c.keep_all_s,
            tiers.join(", then "),
            c.through_seq,
            c.kept_points,
            c.passes,
            format_bytes(c.bytes_freed_total),
            if c.running { " (a pass is running)" } else { "" }
        );
    }
    if let Some(f) = &g.failure {
        let _ = writeln!(out, "  FENCED: {f}");
    }
    if let Some(r) = &g.role {
        let peer = match (r.peer_role, r.peer_generation) {
            (Some(role), Some(generation)) => format!(", peer {role} in generation {generation}"),
            (Some(role), None) => format!(", peer {role}"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "  role {} at site {}, generation {}{peer}, fencing {}{}",
            r.role,
            r.site,
            r.generation,
            r.fencing,
            if r.draining {
                " (DRAINING for a planned failover: host writes wait)"
            } else {
                ""
            }
        );
        if let Some(seq) = r.divergence_seq {
            let _ = writeln!(
                out,
                "  DIVERGED from the primary at seq {seq}: this copy's later writes are not the primary's (run cdp reprotect here)"
            );
        }
        if let Some(f) = &r.last_failover {
            let _ = writeln!(
                out,
                "  last failover: {} to generation {} from seq {} at {}{}",
                f.kind,
                f.generation,
                f.first_seq,
                cdp_types::rfc3339::format_time(f.at_ns),
                f.pause_ms
                    .map(|p| format!(", host writes waited {:.3} s", p as f64 / 1000.0))
                    .unwrap_or_default()
            );
        }
    }
    // --- remote replication ---
    if let Some(r) = &g.remote {
        let _ = writeln!(
            out,
            "  remote {} {} {}{}: shipped seq {}, lag {} records, {} / {:.1} s (last {} s: p99 {:.1} s, max {:.1} s; RPO {} s{}), wire {:.2}x, {:.1} MiB/s{}{}",
            r.endpoint,
            match r.mode {
                ReplicationMode::Dynamic if r.sync_active => "dynamic (now sync)",
                ReplicationMode::Dynamic => "dynamic (now ASYNC)",
                ReplicationMode::Sync => "sync",
                ReplicationMode::Async => "async",
            },
            if r.connected { "connected" } else { "DISCONNECTED" },
            if r.sync_waiting {
                ", HOST WRITES WAITING"
            } else {
                ""
            },
            r.shipped_seq,
            r.lag_records,
            format_bytes(r.lag_bytes),
            r.lag_seconds,
            r.lag_window_s,
            r.lag_p99_ms as f64 / 1000.0,
            r.lag_max_ms as f64 / 1000.0,
            r.rpo_s,
            match (r.rpo_exceeded, r.rpo_throttling) {
                (true, true) => ", EXCEEDED: host writes held",
                (true, false) => ", EXCEEDED",
                (false, _) => "",
            },
            r.wire_compression_ratio,
            r.wire_rate_bytes_per_s as f64 / 1048576.0,
            match r.bandwidth_bytes_per_s {
                Some(b) => format!(" (limit {:.1})", b as f64 / 1048576.0),
                None => String::new(),
            },
            match &r.last_error {
                Some(e) if !r.connected => format!("; last error: {e}"),
                _ => String::new(),
            }
        );
        if let Some(x) = &r.last_region_resync {
            let _ = writeln!(
                out,
                "    resynchronised by regions at seq {} (the remote had seq {}, the journal had released up to {}): {} of {} regions differed, {} sent in {} ms",
                x.through_seq,
                x.remote_had_through_seq,
                x.journal_first_seq.saturating_sub(1),
                x.regions_sent,
                x.regions_compared,
                format_bytes(x.bytes_sent),
                x.millis,
            );
        }
        let _ = writeln!(
            out,
            "    wire bytes: {:.1} MiB of records, {:.1} MiB after dedup ({:.2}x{}; {} blocks referenced, {} zero), {:.1} MiB sent (zstd {:.2}x, level {} now, setting {})",
            r.wire_raw_bytes as f64 / 1048576.0,
            r.wire_dedup_bytes as f64 / 1048576.0,
            r.dedup_ratio,
            if r.dedup { "" } else { ", dedup off" },
            r.dedup_reference_blocks,
            r.dedup_zero_blocks,
            r.wire_bytes as f64 / 1048576.0,
            r.zstd_ratio,
            r.compress_level_now,
            match r.compress_level {
                cdp_control::CompressLevel::Adaptive => "adaptive".to_string(),
                cdp_control::CompressLevel::Fixed(level) => level.to_string(),
            },
        );
    }
    if let Some(r) = &g.replication_source {
        let _ = writeln!(
            out,
            "  secondary copy fed by {} ({}), last received seq {}",
            r.peer.as_deref().unwrap_or("-"),
            if r.connected {
                "connected"
            } else {
                "disconnected"
            },
            r.last_received_seq
        );
    }
    // --- end remote replication ---
    if let Some(a) = &g.archive {
        let _ = writeln!(
            out,
            "  archive {}: archived seq {}{} (generation {}), lag {} records in {} segments, {:.1} s; uploaded {} segments, {} stored{}",
            a.url,
            a.archived_seq,
            if a.archived_known { "" } else { " (not read yet)" },
            a.generation,
            a.lag_records,
            a.lag_segments,
            a.lag_seconds,
            a.uploaded_segments,
            format_bytes(a.uploaded_stored_bytes),
            match &a.last_error {
                Some(e) => format!("; FAILING: {e}"),
                None => String::new(),
            }
        );
    }
    let _ = writeln!(
        out,
        "  {:<14} {:>10} {:<10} REPLICA",
        "VOLUME", "SIZE", "SPLITTER"
    );
    for v in &g.volumes {
        let _ = writeln!(
            out,
            "  {:<14} {:>10} {:<10} {}",
            v.name,
            format_bytes(v.size),
            if v.connected { "connected" } else { "absent" },
            v.replica,
        );
    }
}

/// Per-volume protection state as the splitter reports it.
fn splitter_table(splitter: &SplitterReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let status = match splitter {
        SplitterReport::Answered(status) => status,
        SplitterReport::Unreachable { error } => {
            let _ = writeln!(out, "SPLITTER  unreachable: {error}\n");
            return out;
        }
    };
    let _ = writeln!(
        out,
        "{:<16} {:<13} {:>10} {:>5}  RESYNC",
        "VOLUME", "STATE", "DIRTY", "HOSTS"
    );
    for v in &status.volumes {
        let resync = match &v.resync {
            Some(r) => {
                let left = r.seconds_left.map_or("?".to_string(), |s| format!("{s} s"));
                let mut text = format!(
                    "{:.1}% of {}, {}/s, {} left",
                    r.percent,
                    format_bytes(r.total_bytes),
                    format_bytes(r.rate_bytes_per_s),
                    left
                );
                // A verifying resync: how much was compared with the replica, how much sent.
                if r.method == ResyncMethod::Verify {
                    text += &format!(
                        "; verify: {} compared, {} copied",
                        format_bytes(r.verified_bytes),
                        format_bytes(r.copied_bytes)
                    );
                }
                text
            }
            None => "-".to_string(),
        };
        // Hosts attached over NBD; a splitter that predates the count shows "?".
        let hosts = v.nbd_clients.map_or("?".to_string(), |n| n.to_string());
        let _ = writeln!(
            out,
            "{:<16} {:<13} {:>10} {:>5}  {}",
            v.name,
            v.state,
            format_bytes(v.dirty_bytes),
            hosts,
            resync
        );
    }
    if !status.nbd.is_empty() {
        let _ = writeln!(out, "NBD at {}", status.nbd.join(", "));
    }
    out.push('\n');
    out
}
