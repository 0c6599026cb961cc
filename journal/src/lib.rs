//! The write-order journal of one consistency group: segment files of CRC-protected
//! records, group-committed fsync, crash recovery that cuts torn tails, and readers.
//!
//! Modules, one concern each (after tikv/raft-engine): `format` encodes and decodes,
//! `segment` owns one file, `env` is the file-system seam, `group_commit` shares fsyncs,
//! `recover` opens, `engine` appends and syncs, `reader` reads, `inspect` validates
//! offline, `retention` releases old segments, `consolidate` rewrites them without unneeded payloads, `limits` bounds everything. See README.md for the on-disk format.

mod config;
mod consolidate;
mod engine;
pub mod env;
mod error;
pub mod format;
pub mod group_commit;
mod inspect;
pub mod limits;
mod reader;
mod record;
mod recover;
mod retention;
mod scan;
mod segment;
mod time_index;
pub mod time_marks;

pub use config::JournalConfig;
pub use consolidate::SegmentRewrite;
pub use engine::{Journal, JOURNAL_DIR_NAME};
pub use error::JournalError;
pub use inspect::{inspect, Damage, InspectReport, SegmentReport};
pub use reader::JournalReader;
pub use record::{Record, RecordIn, RecordKind, RecordLocation};
pub use recover::{RecoveryReport, TailCut};
pub use retention::{
    plan as retention_plan, Released, RetentionPlan, RetentionPolicy, SegmentInfo,
};
pub use segment::{parse_segment_name, segment_path};
pub use time_index::{time_marks_path, TIME_MARKS_SUFFIX};

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    /// The journal is shared across threads as `Arc<Journal>`.
    #[test]
    fn journal_is_send_sync() {
        assert_send_sync::<Journal>();
        assert_send_sync::<JournalError>();
        fn assert_send<T: Send>() {}
        assert_send::<JournalReader>();
    }
}
