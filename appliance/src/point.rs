//! Point naming: parsing a point spec (bookmark name, seq, RFC 3339 time, relative time) and
//! resolving it to a journal seq; RFC 3339 formatting and parsing without a date library.

use cdp_journal::Journal;
use cdp_types::Seq;

use cdp_link::control_socket::{ControlError, ErrorCode};

use crate::bookmark::{record_timestamp, Bookmark};
pub use cdp_types::rfc3339::{format_time, parse_time};

const NS_PER_S: u64 = 1_000_000_000;

/// What a user names a point with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PointSpec {
    /// A bookmark of the group.
    Bookmark(String),
    /// `seq:N` or a bare `N`.
    Seq(u64),
    /// An absolute time (ns since the Unix epoch): the last record at or before it.
    Time(u64),
    /// `-5m` etc.: so long before now (ns); the last record at or before that time.
    Ago(u64),
}

/// Parses a point spec. Bookmark names cannot look like the other forms (see
/// `bookmark::validate_name`), so the forms never overlap.
/// A spec that is none of the forms is a bad request (the caller's words, not the journal's).
pub fn parse_point(s: &str) -> Result<PointSpec, ControlError> {
    let bad = |e: String| ControlError::new(ErrorCode::BadRequest, e);
    if let Some(n) = s.strip_prefix("seq:") {
        return parse_seq(n).map(PointSpec::Seq);
    }
    if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) {
        return parse_seq(s).map(PointSpec::Seq);
    }
    if let Some(rel) = s.strip_prefix('-') {
        return parse_ago(rel).map(PointSpec::Ago);
    }
    if s.as_bytes().first().is_some_and(|c| c.is_ascii_digit()) && s.contains(':') {
        return parse_time(s).map(PointSpec::Time).map_err(|e| bad(e.0));
    }
    cdp_control::validate_bookmark_name(s).map_err(|e| bad(format!("{e} (points are a bookmark name, seq:N, N, an RFC 3339 time such as 2026-11-23T00:10:00.123Z, or -30s/-5m/-2h/-1d)")))?;
    Ok(PointSpec::Bookmark(s.to_string()))
}

fn parse_seq(s: &str) -> Result<u64, ControlError> {
    s.parse::<u64>()
        .map_err(|_| ControlError::new(ErrorCode::BadRequest, format!("bad sequence number {s:?}")))
}

/// `30s`, `5m`, `2h`, `1d` → ns.
fn parse_ago(s: &str) -> Result<u64, ControlError> {
    let bad = || {
        ControlError::new(
            ErrorCode::BadRequest,
            format!("bad relative time -{s:?}: expected e.g. -30s, -5m, -2h, -1d"),
        )
    };
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let unit_s = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(unit_s)
        .and_then(|x| x.checked_mul(NS_PER_S))
        .ok_or_else(bad)
}

/// A resolved point: the seq of a record and its timestamp.
pub use cdp_control::ResolvedPoint;

/// Resolves `spec` against the journal's recoverable window `first_seq..=last_seq` and the
/// group's bookmarks. Times resolve to the last record stamped at or before them; a time
/// after the last record but not in the future resolves to the last record (nothing changed
/// since), a future time is refused.
///
/// `oldest` is the group's oldest recoverable point (`Group::oldest_point`); it may lie one
/// below the journal's first record (the state before it, held by the replica and the undo
/// stream), and is then stamped just before that record.
pub fn resolve(
    journal: &Journal,
    bookmarks: &[Bookmark],
    spec: &PointSpec,
    now_ns: u64,
    oldest: u64,
) -> Result<ResolvedPoint, ControlError> {
    let first = journal.first_seq().0;
    let last = journal.last_seq().0;
    if last < first {
        return Err(ControlError::not_found("the journal holds no records yet"));
    }
    let at = |seq: u64| -> Result<ResolvedPoint, ControlError> {
        let ts = if seq < first {
            record_timestamp(journal, Seq(first))?.saturating_sub(1)
        } else {
            record_timestamp(journal, Seq(seq))?
        };
        Ok(ResolvedPoint {
            seq,
            timestamp_ns: ts,
            time: format_time(ts),
            bookmark: None,
        })
    };
    match spec {
        PointSpec::Bookmark(name) => {
            let b = bookmarks
                .iter()
                .find(|b| &b.name == name)
                .ok_or_else(|| ControlError::not_found(format!("no bookmark named {name:?} in this group (released by retention, or never taken)")))?;
            Ok(ResolvedPoint {
                seq: b.seq,
                timestamp_ns: b.timestamp_ns,
                time: b.time.clone(),
                bookmark: Some(b.name.clone()),
            })
        }
        PointSpec::Seq(seq) => {
            let oldest = oldest.clamp(first.saturating_sub(1), last);
            if *seq < oldest {
                return Err(ControlError::not_found(format!(
                    "seq {seq} is before the oldest recoverable point, seq {oldest}"
                )));
            }
            if *seq > last {
                return Err(ControlError::not_found(format!(
                    "seq {seq} is after the last record, seq {last}"
                )));
            }
            at(*seq)
        }
        PointSpec::Time(t) => resolve_time(journal, *t, now_ns, first),
        PointSpec::Ago(d) => {
            let t = now_ns
                .checked_sub(*d)
                .ok_or_else(|| ControlError::not_found("relative time reaches before 1970"))?;
            resolve_time(journal, t, now_ns, first)
        }
    }
}

/// The last record stamped at or before `t`, through the journal's time index (a binary
/// search and a scan of at most a few hundred headers, whatever the journal's length).
fn resolve_time(
    journal: &Journal,
    t: u64,
    now_ns: u64,
    first: u64,
) -> Result<ResolvedPoint, ControlError> {
    if t > now_ns {
        return Err(ControlError::not_found(format!(
            "{} is in the future",
            format_time(t)
        )));
    }
    let found = journal
        .last_at_or_before(cdp_types::TimestampNs(t))
        .map_err(|e| ControlError::from(format!("reading the journal: {e}")))?;
    match found {
        Some((seq, ts)) => Ok(ResolvedPoint {
            seq: seq.0,
            timestamp_ns: ts.0,
            time: format_time(ts.0),
            bookmark: None,
        }),
        None => {
            let oldest = record_timestamp(journal, Seq(first))
                .map(format_time)
                .unwrap_or_else(|e| format!("unknown: {e}"));
            Err(ControlError::not_found(format!(
                "{} is before the oldest recoverable point (seq {first} at {oldest})",
                format_time(t)
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bookmark::{BookmarkIndex, BookmarkPayload, Consistency};
    use cdp_journal::{JournalConfig, RecordIn};

    /// Goal: every point form parses to what it means, and malformed ones are refused.
    /// Method: a table of specs and expected results computed by hand.
    #[test]
    fn formats_epoch_and_a_leap_day() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_time(1_709_210_096_789_000_000),
            "2024-02-29T12:34:56.789Z"
        );
    }

    /// `parse_point`'s spec, if it parsed.
    fn parse_point_ok(s: &str) -> Option<PointSpec> {
        parse_point(s).ok()
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(parse_point_ok("seq:1234"), Some(PointSpec::Seq(1234)));
        assert_eq!(parse_point_ok("42"), Some(PointSpec::Seq(42)));
        assert_eq!(parse_point_ok("-30s"), Some(PointSpec::Ago(30 * NS_PER_S)));
        assert_eq!(parse_point_ok("-5m"), Some(PointSpec::Ago(300 * NS_PER_S)));
        assert_eq!(parse_point_ok("-2h"), Some(PointSpec::Ago(7200 * NS_PER_S)));
        assert_eq!(
            parse_point_ok("-1d"),
            Some(PointSpec::Ago(86_400 * NS_PER_S))
        );
        assert_eq!(
            parse_point_ok("b1"),
            Some(PointSpec::Bookmark("b1".to_string()))
        );
        // 2024-02-29T12:34:56.789Z = 1709210096.789 s (date -d ... +%s).
        assert_eq!(
            parse_point_ok("2024-02-29T12:34:56.789Z"),
            Some(PointSpec::Time(1_709_210_096_789_000_000))
        );
        assert_eq!(
            parse_point_ok("2024-02-29T14:34:56.789+02:00"),
            Some(PointSpec::Time(1_709_210_096_789_000_000))
        );
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_time("1970-01-01T00:00:00.000000001Z"), Ok(1));
        for bad in [
            "seq:",
            "seq:x",
            "seq:-1",
            "-5",
            "-5w",
            "-m",
            "99999999999999999999999",
            "2024-02-30T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-02-29T12:34:56",
            "2024-02-29T12:34:56.Z",
            "2024-02-29T25:00:00Z",
            "2024-02-29T12:34:56+0200",
            "",
            "a:b",
        ] {
            assert!(
                parse_point(bad).is_err(),
                "{bad:?} accepted: {:?}",
                parse_point(bad)
            );
        }
        for ns in [0, 1_709_210_096_789_000_000, 4_102_444_799_999_000_000] {
            assert_eq!(parse_time(&format_time(ns)), Ok(ns), "round trip of {ns}");
        }
    }

    /// Goal: resolution finds the right record for each form and refuses points outside the
    /// recoverable window. Method: a journal in a tempdir with writes appended in three
    /// separate calls (so three distinct timestamps) and a bookmark, small segments so time
    /// lookups cross segments; the oracle is the seq/timestamp list read back in full.
    #[test]
    fn resolves_against_a_journal() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = JournalConfig {
            segment_bytes_max: 1024 * 1024,
            compress_writes: false,
        };
        let (journal, _) = Journal::open(tmp.path(), 7, config).expect("open");
        let block = bytes::Bytes::from(vec![0x5a; 300 * 1024]);
        for round in 0..3 {
            let batch: Vec<RecordIn> = (0..4)
                .map(|i| RecordIn::write(1, i * 4096, block.clone()))
                .collect();
            journal.append(&batch).expect("append");
            if round == 1 {
                let index = BookmarkIndex::rebuild(&journal).expect("index");
                index
                    .create(
                        &journal,
                        BookmarkPayload {
                            name: "mid".into(),
                            consistency: Consistency::Crash,
                            freeze_window_ms: 0,
                            keep: false,
                        },
                        None,
                        |_| {},
                    )
                    .expect("bookmark");
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(journal.segment_count() > 2);
        let all: Vec<(u64, u64)> = journal
            .read_headers_from(Seq(1))
            .expect("read")
            .map(|r| r.map(|r| (r.seq.0, r.timestamp.0)).expect("record"))
            .collect();
        assert_eq!(all.len(), 13);
        let index = BookmarkIndex::rebuild(&journal).expect("rebuild");
        let bookmarks = index.list(&journal);
        assert_eq!(bookmarks.len(), 1);
        assert_eq!(bookmarks[0].seq, 9, "after the 8 writes of two rounds");
        let now = all[12].1 + 10 * NS_PER_S;
        let r = |spec: &str| {
            resolve(
                &journal,
                &bookmarks,
                &parse_point(spec).expect(spec),
                now,
                1,
            )
        };

        assert_eq!(r("mid").expect("mid").seq, 9);
        assert_eq!(r("seq:5").expect("seq").seq, 5);
        assert_eq!(r("5").expect("seq").timestamp_ns, all[4].1);
        // A time between two appends resolves to the last record of the earlier one.
        for k in [3usize, 8, 12] {
            let t = all[k].1;
            assert_eq!(r(&format_time_ns(t)).expect("time").seq, all[k].0);
        }
        // Exactly at the first record's time: the last record of that append (seq 4).
        assert_eq!(r(&format_time_ns(all[0].1)).expect("first").seq, 4);
        assert_eq!(
            r("-1s").expect("relative").seq,
            13,
            "now-1s is after the last"
        );
        assert!(r("nope")
            .expect_err("unknown")
            .message
            .contains("no bookmark"));
        assert!(r("seq:14")
            .expect_err("after")
            .message
            .contains("after the last"));
        assert!(r("seq:0")
            .expect_err("before")
            .message
            .contains("before the oldest recoverable point, seq 1"));
        // With the state before the first record recoverable, seq 0 is a point, stamped
        // just before that record.
        let before_first =
            resolve(&journal, &bookmarks, &PointSpec::Seq(0), now, 0).expect("seq 0 with oldest 0");
        assert_eq!(before_first.timestamp_ns, all[0].1 - 1);
        assert!(r(&format_time_ns(all[0].1 - 1))
            .expect_err("before")
            .message
            .contains("before the oldest"));
        assert!(r(&format_time_ns(now + NS_PER_S))
            .expect_err("future")
            .message
            .contains("future"));
        assert!(r("-100000d").is_err());
    }

    /// The lookup `resolve_time` did before the journal had a time index: from one segment
    /// before the last one created at or before `t`, headers until a later stamp. Kept as
    /// the oracle the index must agree with.
    fn old_scan(journal: &Journal, t: u64) -> Option<(u64, u64)> {
        let segments = journal.segment_infos();
        let k = segments
            .iter()
            .rposition(|s| s.created_ns <= t)
            .unwrap_or(0);
        let start = segments
            .get(k.saturating_sub(1))
            .map_or(journal.first_seq().0, |s| s.first_seq);
        let mut found = None;
        for record in journal.read_headers_from(Seq(start)).expect("read") {
            let record = record.expect("record");
            if record.timestamp.0 > t {
                break;
            }
            found = Some((record.seq.0, record.timestamp.0));
        }
        found
    }

    /// Goal: `resolve` by time gives exactly the seq and stamp the old scan gave, for every
    /// time around every record. Method: 60 appends of 1-5 records over 1 MiB segments
    /// (several segments), probes at each stamp and one ns either side.
    #[test]
    fn time_resolution_equals_the_old_scan() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = JournalConfig {
            segment_bytes_max: 1024 * 1024,
            compress_writes: false,
        };
        let (journal, _) = Journal::open(tmp.path(), 7, config).expect("open");
        for i in 0..60u64 {
            let batch: Vec<RecordIn> = (0..i % 5 + 1)
                .map(|k| {
                    RecordIn::write(1, (i * 8 + k) * 4096, bytes::Bytes::from(vec![1; 20_000]))
                })
                .collect();
            journal.append(&batch).expect("append");
        }
        assert!(journal.segment_count() > 3);
        let stamps: Vec<u64> = journal
            .read_headers_from(Seq(1))
            .expect("read")
            .map(|r| r.expect("record").timestamp.0)
            .collect();
        let now = stamps[stamps.len() - 1] + NS_PER_S;
        for &ts in &stamps {
            for t in [ts - 1, ts, ts + 1] {
                let got = resolve(&journal, &[], &PointSpec::Time(t), now, 1)
                    .ok()
                    .map(|p| (p.seq, p.timestamp_ns));
                assert_eq!(got, old_scan(&journal, t), "time {t}");
            }
        }
    }

    /// RFC 3339 with all nine fraction digits, for exact timestamps in tests.
    fn format_time_ns(ns: u64) -> String {
        let ms = format_time(ns);
        format!("{}{:09}Z", &ms[..20], ns % NS_PER_S)
    }
}
