//! `cdp group create|list`: consistency groups on the running appliance.

use std::path::PathBuf;

use cdp_control::{GroupCreate, GroupCreated, GroupListed, Request};
use clap::{Args, Subcommand};

use crate::units::{format_bytes, parse_size};

/// Where the appliance's control socket is.
#[derive(Args, Debug, Clone)]
pub struct ApplianceControlArgs {
    /// The appliance's control socket. Default: DIR/appliance.ctl.
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Data directory of `cdp up` (or env CDP_DIR).
    #[arg(long, env = "CDP_DIR", default_value = "cdp-data")]
    pub dir: PathBuf,
}

impl ApplianceControlArgs {
    pub fn socket(&self) -> PathBuf {
        self.control
            .clone()
            .unwrap_or_else(|| self.dir.join("appliance.ctl"))
    }
}

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Create a consistency group: volumes added to it share one write order and one
    /// journal. Kept across restarts (in the appliance's DATA_DIR/managed.toml).
    Create {
        /// The group name.
        group: String,
        /// Journal capacity; the oldest distributed history is released above it
        /// (default 8G, at least two journal segments).
        #[arg(long, value_parser = parse_size)]
        capacity: Option<u64>,
        /// Also release history older than this (for example 24h, 90m, 7d, 3600).
        #[arg(long, value_parser = parse_duration_s)]
        retention: Option<u64>,
        /// Store write payloads zstd-compressed in the journal (costs host throughput).
        #[arg(long)]
        compress: bool,
        #[command(flatten)]
        control: ApplianceControlArgs,
    },
    /// List the groups with their volumes, journal capacity and use, and oldest point.
    List {
        #[command(flatten)]
        control: ApplianceControlArgs,
    },
}

pub fn run(command: GroupCommand) -> anyhow::Result<()> {
    match command {
        GroupCommand::Create {
            group,
            capacity,
            retention,
            compress,
            control,
        } => {
            let request = Request::GroupCreate(GroupCreate {
                name: group.clone(),
                journal_capacity_bytes: capacity,
                journal_retention_s: retention,
                // Left out unless asked for, so the group takes `[[group]]`'s default.
                journal_compress: compress.then_some(true),
            });
            let answer: GroupCreated =
                crate::control_client::appliance(&control.socket(), &request)?;
            let capacity = answer.status.journal_capacity_bytes;
            crate::output::report(&answer, || {
                format!(
                    "group {group} created (journal capacity {}); add volumes with \
                     `cdp volume add {group} VOLUME --path PATH`",
                    format_bytes(capacity)
                )
            })?;
        }
        GroupCommand::List { control } => {
            let answer: GroupListed =
                crate::control_client::appliance(&control.socket(), &Request::GroupList)?;
            if crate::output::json() {
                crate::output::print_json(&answer)?;
            } else {
                crate::out_nonl!("{}", table(&answer));
            }
        }
    }
    Ok(())
}

/// Why a duration given on the command line is unusable (clap prints it under the flag).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?}: unknown unit (use s, m, h or d, e.g. 24h)")]
    UnknownUnit(String),
    #[error("{0:?} is not a duration (examples: 24h, 90m, 7d, 3600)")]
    NotADuration(String),
    #[error("{0:?} is zero or too long")]
    OutOfRange(String),
}

/// Parses a duration in seconds with an optional unit: s, m, h, d (`24h`, `90m`, `3600`).
pub fn parse_duration_s(text: &str) -> Result<u64, DurationError> {
    let t = text.trim();
    let (digits, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c.to_ascii_lowercase()),
        _ => (t, 's'),
    };
    let factor = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        _ => return Err(DurationError::UnknownUnit(text.to_string())),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| DurationError::NotADuration(text.to_string()))?;
    n.checked_mul(factor)
        .filter(|&s| s > 0)
        .ok_or_else(|| DurationError::OutOfRange(text.to_string()))
}

/// The human table: one block per group, one line per volume.
fn table(answer: &GroupListed) -> String {
    let mut out = String::new();
    if answer.groups.is_empty() {
        out.push_str("no groups\n");
    }
    for g in &answer.groups {
        let oldest = match g.oldest_timestamp_ns {
            Some(ns) => format!("seq {} ({} ago)", g.oldest_point_seq, format_age(ns)),
            None => format!("seq {}", g.oldest_point_seq),
        };
        let retention = match g.journal_retention_s {
            Some(s) => format!(", retention {s} s"),
            None => String::new(),
        };
        out.push_str(&format!(
            "group {} ({}): journal {} of {}{retention}, last seq {}, oldest point {oldest}\n",
            g.name,
            g.origin.as_str(),
            format_bytes(g.journal_bytes),
            format_bytes(g.journal_capacity_bytes),
            g.last_seq,
        ));
        if g.volumes.is_empty() {
            out.push_str("  (no volumes)\n");
        }
        for v in &g.volumes {
            out.push_str(&format!(
                "  {:<16} {:>10}  {}  replica {}\n",
                v.name,
                format_bytes(v.size),
                if v.connected {
                    "connected   "
                } else {
                    "disconnected"
                },
                v.replica,
            ));
        }
    }
    out
}

fn format_age(timestamp_ns: u64) -> String {
    let now = cdp_types::TimestampNs::now().0;
    let s = now.saturating_sub(timestamp_ns) / 1_000_000_000;
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_s("24h"), Ok(86400));
        assert_eq!(parse_duration_s("90m"), Ok(5400));
        assert_eq!(parse_duration_s("3600"), Ok(3600));
        assert_eq!(parse_duration_s("7D"), Ok(7 * 86400));
        assert!(parse_duration_s("0").is_err());
        assert!(parse_duration_s("5w").is_err());
        assert!(parse_duration_s("h").is_err());
    }
}
