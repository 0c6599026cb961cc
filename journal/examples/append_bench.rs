//! Measures journal append+sync throughput against raw sequential writes with fdatasync
//! on the same file system: `cargo run --release -p cdp-journal --example append_bench --
//! [DIR] [BLOCK_BYTES] [BLOCKS_PER_SYNC] [TOTAL_MIB]`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use cdp_journal::{Journal, JournalConfig, RecordIn};

fn arg(n: usize, default: u64) -> u64 {
    std::env::args()
        .nth(n)
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "/tmp".into()));
    let block = arg(2, 64 * 1024) as usize;
    let per_sync = arg(3, 16) as usize;
    let total = arg(4, 512) * 1024 * 1024;
    let blocks = (total / block as u64) as usize;
    let data = Bytes::from(vec![0xabu8; block]);
    let work = tempfile::tempdir_in(&dir).expect("tempdir");

    let raw_path = work.path().join("raw");
    let mut raw = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&raw_path)
        .expect("open raw");
    let t = Instant::now();
    for i in 0..blocks {
        raw.write_all(&data).expect("write");
        if (i + 1) % per_sync == 0 {
            raw.sync_data().expect("fdatasync");
        }
    }
    raw.sync_data().expect("fdatasync");
    let raw_secs = t.elapsed().as_secs_f64();
    drop(raw);
    let _ = std::fs::remove_file(&raw_path);

    let (j, _) = Journal::open(work.path(), 1, JournalConfig::default()).expect("open journal");
    let batch: Vec<RecordIn> = (0..per_sync)
        .map(|k| RecordIn::write(1, (k * block) as u64, data.clone()))
        .collect();
    let t = Instant::now();
    for _ in 0..blocks / per_sync {
        j.append(&batch).expect("append");
        j.sync().expect("sync");
    }
    let journal_secs = t.elapsed().as_secs_f64();

    let mib = (blocks * block) as f64 / (1024.0 * 1024.0);
    println!(
        "block {block} B, {per_sync} blocks per fdatasync, {mib:.0} MiB: raw {:.1} MiB/s, journal {:.1} MiB/s, ratio {:.2}",
        mib / raw_secs,
        mib / journal_secs,
        raw_secs / journal_secs
    );
}
