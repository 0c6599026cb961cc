//! `cdp journal inspect DIR`: offline validation of one journal or of every group's journal
//! under an appliance data directory, with every damaged place named by file and byte offset.
//! `cdp journal consolidate [GROUP]`: a consolidation pass on the running appliance now.
//!
//! Inspect's exit status: 0 clean, 1 damaged, 2 usage error (no journal at DIR, or it cannot
//! be read).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Serialize;

use crate::units::format_bytes;

#[derive(Subcommand, Debug)]
pub enum JournalCommand {
    /// Check every record's CRC and the sequence continuity of a journal, offline; print a
    /// summary and each damaged place (file and byte offset). Exit 0 clean, 1 damaged, 2 usage.
    Inspect(InspectArgs),
    /// Consolidate a group's old history now under its `[group.consolidation]` policy
    /// (passes also run every `interval_s`): keeps the policy's points and bookmarks made
    /// with `--keep`, drops the payloads no kept point needs, and says how much it freed.
    Consolidate(ConsolidateArgs),
}

#[derive(Args, Debug)]
pub struct ConsolidateArgs {
    #[command(flatten)]
    control: crate::group::ApplianceControlArgs,
    /// The consistency group (may be left out when the appliance has one).
    #[arg(long)]
    group: Option<String>,
    /// Same as --group (the older positional form, kept so existing scripts still run).
    #[arg(value_name = "GROUP", hide = true, conflicts_with = "group")]
    group_positional: Option<String>,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A journal directory (holding `*.seg`), a group directory (`DATA_DIR/groups/NAME`),
    /// or an appliance data_dir (then every group is inspected).
    dir: PathBuf,
}

/// Exit status for damage found.
const EXIT_DAMAGED: u8 = 1;
/// Exit status for usage errors, like clap's own.
const EXIT_USAGE: u8 = 2;

pub fn run(command: JournalCommand) -> ExitCode {
    match command {
        JournalCommand::Inspect(args) => inspect(&args),
        JournalCommand::Consolidate(args) => match consolidate(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => crate::output::report_error(&e, crate::output::json()),
        },
    }
}

fn consolidate(args: ConsolidateArgs) -> anyhow::Result<()> {
    // A pass rewrites old segments: allow it minutes, not the default seconds.
    let answer: cdp_control::JournalConsolidated = crate::control_client::request_within(
        &args.control.socket(),
        "appliance",
        &cdp_control::Request::JournalConsolidate {
            group: args.group.clone().or(args.group_positional.clone()),
        },
        std::time::Duration::from_secs(600),
    )?;
    if crate::output::json() {
        return crate::output::print_json(&answer);
    }
    crate::out!("{}", consolidate_text(&answer));
    Ok(())
}

fn consolidate_text(answer: &cdp_control::JournalConsolidated) -> String {
    let group = &answer.group;
    let c = &answer.consolidation;
    let through = c.through_seq;
    if let Some(why) = &c.nothing_because {
        return format!("group {group}: nothing to consolidate: {why}");
    }
    format!(
        "group {group}: history through seq {through} consolidated to {} kept points; {} segments rewritten, {} payloads dropped, {} freed ({} -> {}) in {} ms",
        c.kept_points,
        c.segments_rewritten,
        c.payloads_dropped,
        format_bytes(c.bytes_freed),
        format_bytes(c.bytes_before),
        format_bytes(c.bytes_after),
        c.millis,
    )
}

/// One inspected journal, as printed.
#[derive(Debug, Serialize)]
struct JournalOut {
    /// Group name when found under a data_dir or a group directory.
    group: Option<String>,
    path: PathBuf,
    group_id: Option<u64>,
    segments: Vec<SegmentOut>,
    records: u64,
    payloads_dropped: u64,
    first_seq: u64,
    last_seq: u64,
    bytes: u64,
    clean: bool,
    damage: Vec<DamageOut>,
}

#[derive(Debug, Serialize)]
struct SegmentOut {
    path: PathBuf,
    index: u64,
    first_seq: u64,
    records: u64,
    bytes: u64,
}

#[derive(Debug, Serialize)]
struct DamageOut {
    path: PathBuf,
    offset: u64,
    what: String,
}

#[derive(Debug, Serialize)]
struct Output {
    clean: bool,
    journals: Vec<JournalOut>,
}

fn inspect(args: &InspectArgs) -> ExitCode {
    let found = match find_journals(&args.dir) {
        Ok(found) if !found.is_empty() => found,
        Ok(_) => {
            eprintln!(
                "cdp: error: no journal at {} (give a journal directory, a group directory or an appliance data_dir)",
                args.dir.display()
            );
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            eprintln!("cdp: error: {}: {e}", args.dir.display());
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut journals = Vec::new();
    for (group, path) in found {
        let report = match cdp_journal::inspect(&path) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("cdp: error: inspecting {}: {e}", path.display());
                return ExitCode::from(EXIT_USAGE);
            }
        };
        journals.push(JournalOut {
            group,
            group_id: report.group_id,
            records: report.records,
            payloads_dropped: report.payloads_dropped,
            first_seq: report.first_seq.0,
            last_seq: report.last_seq.0,
            bytes: report.segments.iter().map(|s| s.bytes).sum(),
            clean: report.is_clean(),
            segments: report
                .segments
                .iter()
                .map(|s| SegmentOut {
                    path: s.path.clone(),
                    index: s.index,
                    first_seq: s.first_seq.0,
                    records: s.records,
                    bytes: s.bytes,
                })
                .collect(),
            damage: report
                .damage
                .iter()
                .map(|d| DamageOut {
                    path: d.path.clone(),
                    offset: d.offset,
                    what: d.what.clone(),
                })
                .collect(),
            path,
        });
    }
    let out = Output {
        clean: journals.iter().all(|j| j.clean),
        journals,
    };
    if crate::output::json() {
        match serde_json::to_string_pretty(&out) {
            Ok(text) => crate::out!("{text}"),
            Err(e) => {
                eprintln!("cdp: error: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        }
    } else {
        crate::out_nonl!("{}", text(&out));
    }
    if out.clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DAMAGED)
    }
}

fn text(out: &Output) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for j in &out.journals {
        let name = j
            .group
            .as_deref()
            .map(|g| format!("group {g}, "))
            .unwrap_or_default();
        let id = j
            .group_id
            .map(|g| format!("group id {g}"))
            .unwrap_or_else(|| "group id unknown".into());
        let _ = writeln!(s, "journal {} ({name}{id})", j.path.display());
        let _ = writeln!(
            s,
            "  {} segments, {} records, seq {}..={}, {} ({} bytes)",
            j.segments.len(),
            j.records,
            j.first_seq,
            j.last_seq,
            format_bytes(j.bytes),
            j.bytes
        );
        if j.payloads_dropped > 0 {
            let _ = writeln!(
                s,
                "  {} write payloads dropped by consolidation (headers kept)",
                j.payloads_dropped
            );
        }
        for seg in &j.segments {
            let _ = writeln!(
                s,
                "  segment {:>6} first seq {:>10} records {:>8} bytes {:>12}  {}",
                seg.index,
                seg.first_seq,
                seg.records,
                seg.bytes,
                seg.path.display()
            );
        }
        for d in &j.damage {
            let _ = writeln!(
                s,
                "  DAMAGE {} at byte {}: {}",
                d.path.display(),
                d.offset,
                d.what
            );
        }
        let _ = writeln!(
            s,
            "  {}",
            if j.clean {
                "clean".to_string()
            } else {
                format!("DAMAGED: {} place(s)", j.damage.len())
            }
        );
    }
    s
}

/// The journal directories `dir` names, each with its group name when known. A journal
/// directory holds segment files or the journal's LOCK; a group directory holds `journal/`
/// (the appliance opens the journal at `GROUP/journal`, which keeps its files in
/// `GROUP/journal/journal`); a data_dir holds `groups/`.
fn find_journals(dir: &Path) -> std::io::Result<Vec<(Option<String>, PathBuf)>> {
    if !dir.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "not a directory",
        ));
    }
    if is_journal_dir(dir)? {
        return Ok(vec![(None, dir.to_path_buf())]);
    }
    let groups = dir.join("groups");
    if groups.is_dir() {
        let mut names: Vec<(String, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(&groups)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                names.push((
                    entry.file_name().to_string_lossy().into_owned(),
                    entry.path(),
                ));
            }
        }
        names.sort();
        let mut out = Vec::new();
        for (name, path) in names {
            for (_, j) in find_journals(&path)? {
                out.push((Some(name.clone()), j));
            }
        }
        return Ok(out);
    }
    let nested = dir.join(cdp_journal::JOURNAL_DIR_NAME);
    if nested.is_dir() {
        // `group.state`, or `group.json` in a directory no appliance has opened since the
        // state files changed format.
        let group = ["group.state", "group.json"]
            .iter()
            .any(|f| dir.join(f).is_file())
            .then(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
            .flatten();
        return Ok(find_journals(&nested)?
            .into_iter()
            .map(|(g, p)| (g.or_else(|| group.clone()), p))
            .collect());
    }
    Ok(Vec::new())
}

fn is_journal_dir(dir: &Path) -> std::io::Result<bool> {
    if dir.join("LOCK").is_file() {
        return Ok(true);
    }
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        if name
            .to_str()
            .and_then(cdp_journal::parse_segment_name)
            .is_some()
        {
            return Ok(true);
        }
    }
    Ok(false)
}
