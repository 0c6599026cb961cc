//! `witness.toml`: where the witness listens, where it keeps its grants, and its lease limits.
//! Command-line flags (`--listen`, `--data-dir`) override the file.

use std::path::PathBuf;

use serde::Deserialize;

use crate::error::WitnessError;
use crate::lease_rule::Margin;
use crate::limits::{LEASE_DURATION_MS_MAX, LEASE_DURATION_MS_MIN};

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WitnessConfig {
    /// TCP address to serve, `HOST:PORT` (no default: a witness must be placed on purpose).
    #[serde(default)]
    pub listen: Option<String>,
    /// Directory of `witness.state` and `witness.lock` (no default).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Longest lease granted, in ms (default 60 000; at least 500, at most 600 000). Also
    /// bounds how long a restart holds a group for its previous holder.
    #[serde(default = "default_duration_ms_max")]
    pub lease_duration_ms_max: u64,
    /// Largest clock drift rate assumed, parts per million (default 10 000 = 1 %).
    #[serde(default = "default_drift_ppm")]
    pub drift_ppm: u64,
    /// Fixed margin term in ms (default 100).
    #[serde(default = "default_fixed_ms")]
    pub margin_fixed_ms: u64,
    /// Log format: "text" (default) or "json".
    #[serde(default)]
    pub log_format: Option<String>,
}

fn default_duration_ms_max() -> u64 {
    60_000
}
fn default_drift_ppm() -> u64 {
    Margin::default().drift_ppm
}
fn default_fixed_ms() -> u64 {
    Margin::default().fixed_ms
}

impl Default for WitnessConfig {
    fn default() -> WitnessConfig {
        WitnessConfig {
            listen: None,
            data_dir: None,
            lease_duration_ms_max: default_duration_ms_max(),
            drift_ppm: default_drift_ppm(),
            margin_fixed_ms: default_fixed_ms(),
            log_format: None,
        }
    }
}

impl WitnessConfig {
    pub fn from_toml(text: &str) -> Result<WitnessConfig, WitnessError> {
        toml::from_str(text).map_err(|e| WitnessError::Config(e.to_string()))
    }

    pub fn margin(&self) -> Margin {
        Margin {
            drift_ppm: self.drift_ppm,
            fixed_ms: self.margin_fixed_ms,
        }
    }

    /// Refuses contradictions: everything the witness needs must be present and in range.
    pub fn sanitize(&self) -> Result<(), WitnessError> {
        if self.listen.as_deref().is_none_or(|l| l.trim().is_empty()) {
            return Err(WitnessError::Config(
                "no listen address (--listen or listen = \"HOST:PORT\")".into(),
            ));
        }
        if self.data_dir.is_none() {
            return Err(WitnessError::Config(
                "no data directory (--data-dir or data_dir = \"DIR\")".into(),
            ));
        }
        if !(LEASE_DURATION_MS_MIN..=LEASE_DURATION_MS_MAX).contains(&self.lease_duration_ms_max) {
            return Err(WitnessError::Config(format!(
                "lease_duration_ms_max = {} is outside {LEASE_DURATION_MS_MIN}..={LEASE_DURATION_MS_MAX}",
                self.lease_duration_ms_max
            )));
        }
        self.margin().check()?;
        if let Some(f) = self.log_format.as_deref() {
            if f != "text" && f != "json" {
                return Err(WitnessError::Config(format!(
                    "log_format = {f:?}: \"text\" or \"json\""
                )));
            }
        }
        let d = std::time::Duration::from_millis(self.lease_duration_ms_max);
        if self.margin().holder_validity(d).is_none() {
            return Err(WitnessError::Config(format!(
                "margin_fixed_ms = {} leaves nothing of a {} ms lease",
                self.margin_fixed_ms, self.lease_duration_ms_max
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_defaults_hold() {
        let text = include_str!("../../../packaging/examples/witness.toml");
        let c = WitnessConfig::from_toml(text).unwrap();
        c.sanitize().unwrap();
        let c = WitnessConfig::from_toml("listen = \"127.0.0.1:1\"\ndata_dir = \"/x\"").unwrap();
        assert_eq!(c.margin(), Margin::default());
        assert_eq!(c.lease_duration_ms_max, 60_000);
        assert!(WitnessConfig::from_toml("listen = 1").is_err());
        assert!(WitnessConfig::from_toml("lissten = \"a\"").is_err());
        let mut c = c;
        c.drift_ppm = 200_000;
        assert!(c.sanitize().is_err());
    }
}
