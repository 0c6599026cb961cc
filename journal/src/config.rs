//! Journal configuration: defaults, minimums and the `sanitize` step that enforces them.

use serde::{Deserialize, Serialize};

use crate::error::JournalError;
use crate::limits::{SEGMENT_BYTES_DEFAULT, SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN};

/// How a journal lays out its files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JournalConfig {
    /// A segment file is closed and a new one started once the next record would make
    /// it larger than this. A segment always holds at least one record, so one record
    /// bigger than this gets a segment of its own.
    /// Default 256 MiB; minimum 1 MiB; maximum 16 GiB (`sanitize` clamps with a warning).
    pub segment_bytes_max: u64,
    /// Store write payloads zstd-compressed when that saves space (a record flag marks
    /// them; readers decompress). Compression runs in the appending thread before the
    /// journal's append lock is taken. Default true.
    pub compress_writes: bool,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            segment_bytes_max: SEGMENT_BYTES_DEFAULT,
            compress_writes: true,
        }
    }
}

impl JournalConfig {
    /// Clamps soft mistakes to the nearest allowed value, logging a warning for each.
    /// Returns an error for contradictions (none exist yet; the signature leaves room).
    pub fn sanitize(&mut self) -> Result<(), JournalError> {
        if self.segment_bytes_max < SEGMENT_BYTES_MIN {
            tracing::warn!(
                requested = self.segment_bytes_max,
                used = SEGMENT_BYTES_MIN,
                "journal segment_bytes_max below minimum; clamped"
            );
            self.segment_bytes_max = SEGMENT_BYTES_MIN;
        }
        if self.segment_bytes_max > SEGMENT_BYTES_MAX {
            tracing::warn!(
                requested = self.segment_bytes_max,
                used = SEGMENT_BYTES_MAX,
                "journal segment_bytes_max above maximum; clamped"
            );
            self.segment_bytes_max = SEGMENT_BYTES_MAX;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sanitize clamps out-of-range segment sizes and leaves good ones alone.
    #[test]
    fn sanitize_clamps() {
        let mut c = JournalConfig {
            segment_bytes_max: 1,
            ..JournalConfig::default()
        };
        c.sanitize().unwrap();
        assert_eq!(c.segment_bytes_max, SEGMENT_BYTES_MIN);
        let mut c = JournalConfig {
            segment_bytes_max: u64::MAX,
            ..JournalConfig::default()
        };
        c.sanitize().unwrap();
        assert_eq!(c.segment_bytes_max, SEGMENT_BYTES_MAX);
        let mut c = JournalConfig::default();
        c.sanitize().unwrap();
        assert_eq!(c, JournalConfig::default());
    }
}
