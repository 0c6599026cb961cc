//! Time lookup and open cost against the journal's length: `cargo bench -p cdp-journal
//! --bench time_lookup`.
//!
//! For 10^5 and 10^6 records (and 10^7 with `CDP_BENCH_1E7=1`: about 0.8 GB of disk), a
//! generator appends 16-byte writes with `Journal::append` in batches of 512 (the link
//! server's batch), so stamps come from the clock and segments (256 MiB, the default) carry
//! real creation times. Then, each measured after dropping nothing from the page cache
//! (warm, as an appliance restarting on a busy host mostly is):
//! - *open*: `Journal::open` of the closed journal (recovery scans the last segment, the
//!   time index loads one marks file per sealed segment);
//! - *lookup*: `last_at_or_before` at 200 random times inside the journal, mean, p99, max;
//! - *old scan*: the scan `point::resolve_time` did before the index (from one segment
//!   before the last created at or before T, headers until a later stamp), mean and max over
//!   20 of the same times;
//! - *full scan*: one `read_headers_from(first)` pass over the whole journal, what each of
//!   the appliance's four start-up rebuilds (history index, bookmarks, resync spans, source
//!   seqs) costs.
//!
//! Every lookup's answer is compared with the old scan's (the bench fails on a difference).
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it does 10^4 records only.
//! Knobs: `CDP_BENCH_DIR` (default `/var/tmp`), `CDP_BENCH_1E7=1`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use cdp_journal::{Journal, JournalConfig, RecordIn};
use cdp_types::{Seq, TimestampNs};

const BATCH: u64 = 512;
const PAYLOAD_BYTES: usize = 16;

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let mut sizes: Vec<u64> = if bench {
        vec![100_000, 1_000_000]
    } else {
        vec![10_000]
    };
    if bench && std::env::var("CDP_BENCH_1E7").is_ok_and(|v| v == "1") {
        sizes.push(10_000_000);
    }
    let base = std::env::var("CDP_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    println!(
        "{:>10} {:>9} {:>10} {:>10} {:>13} {:>13} {:>13} {:>12} {:>11}",
        "records",
        "segments",
        "gen s",
        "open ms",
        "lookup ms avg",
        "lookup ms p99",
        "lookup ms max",
        "old scan avg",
        "full scan s"
    );
    for n in sizes {
        let tmp = tempfile::Builder::new()
            .prefix("cdp-time-lookup-")
            .tempdir_in(&base)
            .expect("tempdir");
        let started = Instant::now();
        {
            let (j, _) = Journal::open(tmp.path(), 1, JournalConfig::default()).expect("open");
            let payload = Bytes::from(vec![0xa5u8; PAYLOAD_BYTES]);
            let mut seq = 0;
            while seq < n {
                let k = BATCH.min(n - seq);
                let batch: Vec<RecordIn> = (0..k)
                    .map(|i| {
                        RecordIn::write(1, ((seq + i) % 65536) * 4096, payload.clone())
                            .with_source_seq(seq + i + 1)
                    })
                    .collect();
                j.append(&batch).expect("append");
                seq += k;
            }
            j.sync().expect("sync");
        }
        let gen = started.elapsed();

        let t = Instant::now();
        let (j, _) = Journal::open(tmp.path(), 1, JournalConfig::default()).expect("reopen");
        let open = t.elapsed();

        let first_ts = j.first_record_timestamp().expect("ts").expect("records");
        let last_ts = j
            .last_at_or_before(TimestampNs(u64::MAX))
            .expect("last")
            .expect("records")
            .1
             .0;
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ n;
        let mut times = Vec::new();
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            times.push(first_ts + x % (last_ts - first_ts + 1));
        }
        let mut sum = Duration::ZERO;
        let mut each = Vec::new();
        let mut answers = Vec::new();
        for &t in &times {
            let s = Instant::now();
            let got = j.last_at_or_before(TimestampNs(t)).expect("lookup");
            let d = s.elapsed();
            sum += d;
            each.push(d);
            answers.push(got);
        }
        each.sort_unstable();
        let p99 = each[each.len() * 99 / 100 - 1];
        let max = each[each.len() - 1];
        let (mut old_sum, mut old_n) = (Duration::ZERO, 0u32);
        for (i, &t) in times.iter().enumerate().take(20) {
            let s = Instant::now();
            let want = old_scan(&j, t);
            old_sum += s.elapsed();
            old_n += 1;
            assert_eq!(answers[i], want, "time {t}: index and old scan differ");
        }
        let s = Instant::now();
        let mut count = 0u64;
        for r in j.read_headers_from(j.first_seq()).expect("read") {
            r.expect("record");
            count += 1;
        }
        let full = s.elapsed();
        assert_eq!(count, n);
        println!(
            "{:>10} {:>9} {:>10.2} {:>10.2} {:>13.3} {:>13.3} {:>13.3} {:>12.1} {:>11.2}",
            n,
            j.segment_count(),
            gen.as_secs_f64(),
            open.as_secs_f64() * 1e3,
            sum.as_secs_f64() * 1e3 / times.len() as f64,
            p99.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
            old_sum.as_secs_f64() * 1e3 / f64::from(old_n),
            full.as_secs_f64()
        );
    }
}

/// The lookup `point::resolve_time` did before the time index.
fn old_scan(j: &Journal, t: u64) -> Option<(Seq, TimestampNs)> {
    let segments = j.segment_infos();
    let k = segments
        .iter()
        .rposition(|s| s.created_ns <= t)
        .unwrap_or(0);
    let start = segments
        .get(k.saturating_sub(1))
        .map_or(j.first_seq().0, |s| s.first_seq);
    let mut found = None;
    for r in j.read_headers_from(Seq(start)).expect("read") {
        let r = r.expect("record");
        if r.timestamp.0 > t {
            break;
        }
        found = Some((r.seq, r.timestamp));
    }
    found
}
