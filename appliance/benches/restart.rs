//! Restart cost against the journal's length (not a timed test): how long `Group::open`
//! takes, from nothing open to a group that accepts appends and image access, with 10^5
//! and 10^6 journaled records (10^7 with `CDP_BENCH_1E7=1`, about 1.3 GB of disk). Run with
//! `cargo bench -p cdp-appliance --bench restart [-- RECORDS...]`; prints a table.
//!
//! The journal is made by a generator at the journal crate's level (64-byte writes at
//! random 4 KiB blocks of a 1 GiB volume, batches of 512, one sync per 16 MiB), and the
//! distribution checkpoint is set to the last record, so the replica counts as holding
//! everything and nothing distributes during or after the measurement. Each reopen is
//! timed three times (the page cache is warm after the first; the figures are min / max).
//! Also printed: `Journal::open` of the journal alone, one whole header pass over the
//! journal, and each start-up rebuild `Group::open` runs, timed alone: the history index
//! (a header pass plus the block index inserts), the bookmark index and the resync spans
//! (a header pass each), and the last source seqs (the last segment read with payloads).
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it does 10^4 records once.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cdp_appliance::bookmark::BookmarkIndex;
use cdp_appliance::config::GroupConfig;
use cdp_appliance::group::Group;
use cdp_appliance::history::{History, RedoRef};
use cdp_appliance::resync_span::ResyncSpans;
use cdp_journal::{Journal, JournalConfig, RecordIn};
use cdp_types::Seq;

const VOLUME_BYTES: u64 = 1 << 30;
const PAYLOAD_BYTES: usize = 64;
const BATCH: u64 = 512;

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let named: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let mut counts = if !named.is_empty() {
        named
    } else if bench {
        vec![100_000, 1_000_000]
    } else {
        vec![10_000]
    };
    if bench && std::env::var("CDP_BENCH_1E7").is_ok_and(|v| v == "1") {
        counts.push(10_000_000);
    }
    let base = std::env::var("CDP_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    println!(
        "{:>10} {:>8} {:>16} {:>15} {:>13} {:>10} {:>10} {:>8} {:>11}",
        "records",
        "gen s",
        "group open ms",
        "journal open ms",
        "header pass ms",
        "history ms",
        "bookmarks",
        "spans",
        "source seqs"
    );
    for n in counts {
        bench_one(n, Path::new(&base), if bench { 3 } else { 1 });
    }
}

fn config(dir: &Path) -> GroupConfig {
    // From TOML, so every setting not named here takes its documented default.
    toml::from_str(&format!(
        "name = \"bench\"\njournal_capacity_bytes = {}\n\
         [[volume]]\nname = \"vol0\"\nsize = {VOLUME_BYTES}\nreplica = {:?}\n",
        64u64 << 30,
        dir.join("vol0.replica")
    ))
    .expect("group config")
}

fn open_group(dir: &Path) -> Arc<Group> {
    Group::open(
        dir,
        &config(dir),
        JournalConfig::default(),
        Duration::from_millis(200),
        Duration::from_secs(3600),
    )
    .expect("open group")
}

fn bench_one(n: u64, base: &Path, rounds: usize) {
    let tmp = tempfile::Builder::new()
        .prefix("cdp-restart-")
        .tempdir_in(base)
        .expect("tempdir");
    let (group_id, volume) = {
        let g = open_group(tmp.path());
        let ids = (g.group_id(), g.volume("vol0").expect("volume").id);
        g.stop();
        ids
    };
    let gdir = tmp.path().join("groups").join("bench");
    let started = Instant::now();
    {
        let (j, _) = Journal::open(&gdir.join("journal"), group_id, JournalConfig::default())
            .expect("journal");
        let payload = Bytes::from(vec![0x5au8; PAYLOAD_BYTES]);
        let blocks = VOLUME_BYTES / 4096;
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut seq = 0;
        let mut since_sync = 0;
        while seq < n {
            let k = BATCH.min(n - seq);
            let batch: Vec<RecordIn> = (0..k)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    RecordIn::write(volume, (x % blocks) * 4096, payload.clone())
                        .with_source_seq(seq + i + 1)
                })
                .collect();
            j.append(&batch).expect("append");
            seq += k;
            since_sync += k * (64 + PAYLOAD_BYTES as u64);
            if since_sync >= 16 << 20 {
                j.sync().expect("sync");
                since_sync = 0;
            }
        }
        j.sync().expect("sync");
    }
    cdp_appliance::distribution_state::store(&gdir.join("distribution.state"), Seq(n))
        .expect("checkpoint");
    let gen = started.elapsed();

    let (mut lo, mut hi) = (Duration::MAX, Duration::ZERO);
    for _ in 0..rounds {
        let t = Instant::now();
        let g = open_group(tmp.path());
        let d = t.elapsed();
        assert_eq!(g.last_seq(), Seq(n));
        g.stop();
        drop(g);
        lo = lo.min(d);
        hi = hi.max(d);
    }

    let t = Instant::now();
    let (j, _) =
        Journal::open(&gdir.join("journal"), group_id, JournalConfig::default()).expect("journal");
    let journal_open = t.elapsed();
    let t = Instant::now();
    let mut count = 0u64;
    for r in j.read_headers_from(j.first_seq()).expect("read") {
        r.expect("record");
        count += 1;
    }
    let pass = t.elapsed();
    assert_eq!(count, n);
    // The start-up rebuilds one by one, as `Group::open` runs them.
    let t = Instant::now();
    let mut history = History::new(j.first_seq().0, 1);
    let mut reader = j.read_headers_from(j.first_seq()).expect("read");
    while let Some(r) = reader.next() {
        let r = r.expect("record");
        let location = reader.last_location().expect("location");
        history.note_redo(
            r.seq.0,
            RedoRef::new(location, r.kind, r.volume, r.offset, r.length),
        );
    }
    let history_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    BookmarkIndex::rebuild(&j).expect("bookmarks");
    let bookmarks_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    ResyncSpans::rebuild(&j).expect("resync spans");
    let spans_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let last_segment = *j.segment_first_seqs().last().expect("segment");
    for r in j.read_from(last_segment).expect("read") {
        r.expect("record");
    }
    let source_seqs_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(history);
    println!(
        "{:>10} {:>8.1} {:>7.0} / {:>6.0} {:>15.1} {:>13.0} {:>10.0} {:>10.0} {:>8.0} {:>11.0}",
        n,
        gen.as_secs_f64(),
        lo.as_secs_f64() * 1e3,
        hi.as_secs_f64() * 1e3,
        journal_open.as_secs_f64() * 1e3,
        pass.as_secs_f64() * 1e3,
        history_ms,
        bookmarks_ms,
        spans_ms,
        source_seqs_ms
    );
}
