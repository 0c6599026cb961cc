//! `[group.archive]`: where a group's journal is archived on object storage and how uploads
//! are bounded.

use serde::{Deserialize, Serialize};

use crate::error::ApplianceError;

/// Objects a pass may have in flight at once.
pub const ARCHIVE_PARALLELISM_MAX: usize = 16;

/// `[group.archive]`: the appliance uploads each sealed journal segment to `url`, in order,
/// on a thread of its own behind the host (see ARCHITECTURE.md, "Archive").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveConfig {
    /// `s3://bucket/prefix` or `file:///dir` (the embedded default, no server needed).
    pub url: String,
    /// S3 endpoint (`http://127.0.0.1:3900` for a local Garage or MinIO); default
    /// `AWS_ENDPOINT_URL`, else AWS itself.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Default `AWS_REGION`.
    #[serde(default)]
    pub region: Option<String>,
    /// Default `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`.
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// Objects in flight at once. Default 2, 1 to 16.
    #[serde(default = "parallelism_default")]
    pub parallelism: usize,
    /// Stored (compressed) bytes per second over all uploads. Default: unlimited.
    #[serde(default)]
    pub bandwidth_bytes_per_s: Option<u64>,
    /// Attempts per object after the first fails, with doubling backoff from `backoff_ms`
    /// (at most 30 s). A pass that still fails is retried whole after the same backoff, for
    /// as long as it takes: the journal keeps what is not archived. Default 5 and 200.
    #[serde(default = "retries_default")]
    pub retries: u32,
    #[serde(default = "backoff_ms_default")]
    pub backoff_ms: u64,
    /// The active journal segment is sealed (and so archived) once it has held records for
    /// this many seconds, so a quiet group's archive is never more than about this far
    /// behind. Default 60, minimum 1.
    #[serde(default = "seal_after_s_default")]
    pub seal_after_s: u64,
    /// Let local retention release journal history the archive has not confirmed (when the
    /// journal is over capacity or past its window). Default false: the journal keeps it,
    /// growing past its capacity while the store is down, and the host is not held for it.
    /// With true the archive stops at the gap (status shows the error).
    #[serde(default)]
    pub release_unarchived: bool,
}

fn parallelism_default() -> usize {
    2
}
fn retries_default() -> u32 {
    5
}
fn backoff_ms_default() -> u64 {
    200
}
fn seal_after_s_default() -> u64 {
    60
}

impl ArchiveConfig {
    /// Refuses a URL the archive cannot open and bounds out of range.
    pub fn validate(&self, group: &str) -> Result<(), ApplianceError> {
        let bad = |why: String| {
            Err(ApplianceError::Config(format!(
                "group {group:?}: [group.archive]: {why}"
            )))
        };
        match self.url.split_once("://") {
            Some(("file", path)) if path.starts_with('/') => {}
            Some(("s3", rest)) if !rest.is_empty() && !rest.starts_with('/') => {}
            _ => {
                return bad(format!(
                    "url = {:?}: use s3://bucket/prefix or file:///absolute/dir",
                    self.url
                ))
            }
        }
        if !(1..=ARCHIVE_PARALLELISM_MAX).contains(&self.parallelism) {
            return bad(format!(
                "parallelism = {} must be 1 to {ARCHIVE_PARALLELISM_MAX}",
                self.parallelism
            ));
        }
        if self.seal_after_s == 0 {
            return bad("seal_after_s must be at least 1".into());
        }
        if self.bandwidth_bytes_per_s == Some(0) {
            return bad("bandwidth_bytes_per_s must be above 0 (omit it for no limit)".into());
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return bad("access_key_id and secret_access_key go together".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> ArchiveConfig {
        toml::from_str(&format!("url = \"s3://b/p\"\n{extra}")).expect("parses")
    }

    #[test]
    fn defaults_and_refusals() {
        let c = parse("");
        assert_eq!(c.parallelism, 2);
        assert_eq!(c.seal_after_s, 60);
        assert!(!c.release_unarchived);
        c.validate("g").expect("valid");
        for (extra, why) in [
            ("parallelism = 0", "parallelism"),
            ("parallelism = 17", "parallelism"),
            ("seal_after_s = 0", "seal_after_s"),
            ("bandwidth_bytes_per_s = 0", "bandwidth"),
            ("access_key_id = \"k\"", "together"),
        ] {
            let e = parse(extra).validate("g").expect_err(extra).to_string();
            assert!(e.contains(why), "{extra}: {e}");
        }
        for url in ["http://x", "file://relative", "s3:///nobucket", "nothing"] {
            let c = ArchiveConfig {
                url: url.into(),
                ..parse("")
            };
            assert!(c.validate("g").is_err(), "{url}");
        }
        assert!(toml::from_str::<ArchiveConfig>("url = \"s3://b\"\nbogus = 1").is_err());
    }
}
