//! Journal append throughput against raw sequential writes with fdatasync on the same disk,
//! in one run: `cargo bench -p cdp-journal --bench append_vs_raw`.
//!
//! For each record size (4 KiB, 64 KiB, 1 MiB) and sync cadence (fdatasync after every
//! 256 KiB, as a host flushing every 64 writes of 4 KiB causes, and after every 8 MiB, as
//! group commit under streaming writes does), three runs write the same incompressible
//! payload, the same number of records, into the same directory, each into new files and
//! each ending with a sync, so the page cache cannot flatter any of them:
//! - *raw*: one `pwrite` per record, back to back into a new, growing file, fdatasync at the
//!   cadence;
//! - *raw batched*: the journal's I/O shape without the journal: per batch of at most 512
//!   records one `pwritev` of a 64-byte zero header before each payload;
//! - *journal*: `Journal::append` of the same batches (at most 512 records, like the
//!   appliance's link server) and `Journal::sync` at the cadence.
//!
//! Runs are interleaved (the order rotates every round) and, after each, the files are
//! deleted and the file system committed (`syncfs`) outside the timing. Printed per case:
//! the median payload MiB/s of each method; the medians over rounds of journal/raw and
//! journal/raw-batched of the runs of the same round (goal: journal/raw ≥ 0.9); and the best
//! run of each method with the best-to-best ratio. On a shared machine, where other I/O and
//! the VM's memory (see `prefault_memory`) make single runs 2-5 times slower, the paired and
//! best figures are the ones to trust; journal/raw-batched isolates the journal's own work
//! (encoding, CRC, locks) from what the kernel charges for the write shape.
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it does a quick smoke run of
//! 8 MiB per run, one round.
//!
//! Knobs (environment): `CDP_BENCH_DIR` (default `/var/tmp`; a temporary directory is made
//! under it), `CDP_BENCH_MIB` (payload per run, default 256), `CDP_BENCH_ROUNDS` (default 9),
//! `CDP_BENCH_SIZES` (comma-separated KiB, default `4,64,1024`), `CDP_BENCH_SYNC_KIB`
//! (comma-separated cadences, default `256,8192`), `CDP_BENCH_COMPRESS=1` (journal with
//! compression on; off by default, as in the appliance), `CDP_BENCH_SOURCE_SHIFT` (bytes by
//! which payloads start past a page boundary of the source buffer; default 0),
//! `CDP_BENCH_PREFAULT=0` (skip touching the run's volume of memory before each run),
//! `CDP_BENCH_VEC_BYTES_MAX` (cap the bytes of one `pwritev` call of *raw batched*).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use cdp_journal::{Journal, JournalConfig, RecordIn};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
/// The appliance's link server appends at most this many changes per call.
const BATCH_RECORDS_MAX: usize = 512;
/// The measured methods, in `secs` order.
const METHODS: [&str; 3] = ["raw", "raw batched", "journal"];
/// Distinct payload bytes the records are sliced from (records reuse it round robin).
const POOL_BYTES: usize = 64 * MIB;
/// A journal record header's size (the journal's on-disk format).
const HEADER_BYTES: usize = 64;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(name) {
        Ok(s) => s
            .split(',')
            .map(|v| v.trim().parse().expect("a comma-separated list of numbers"))
            .collect(),
        Err(_) => default.to_vec(),
    }
}

/// Incompressible bytes from a splitmix64 stream.
fn pool() -> Bytes {
    let mut state = 0x5eed_u64;
    let mut v = Vec::with_capacity(POOL_BYTES);
    while v.len() < POOL_BYTES {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        v.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    Bytes::from(v)
}

/// One measured configuration.
#[derive(Clone, Copy)]
struct Case {
    record_bytes: usize,
    /// Payload bytes between two fdatasyncs (at least one record).
    sync_bytes: usize,
    records: usize,
    /// Where payloads start relative to a page of the source buffer.
    source_shift: usize,
}

impl Case {
    fn records_per_sync(&self) -> usize {
        (self.sync_bytes / self.record_bytes).max(1)
    }

    fn payload(&self, pool: &Bytes, i: usize) -> Bytes {
        let per_pool = (POOL_BYTES - self.source_shift) / self.record_bytes;
        let at = self.source_shift + (i % per_pool) * self.record_bytes;
        pool.slice(at..at + self.record_bytes)
    }

    fn mib(&self) -> f64 {
        (self.records * self.record_bytes) as f64 / MIB as f64
    }
}

/// `pwrite` of every record at the next offset of a new file, fdatasync at the cadence and
/// at the end. Returns seconds.
fn run_raw(dir: &Path, case: Case, pool: &Bytes) -> f64 {
    let path = dir.join("raw.img");
    let file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&path)
        .expect("create raw file");
    let per_sync = case.records_per_sync();
    let started = Instant::now();
    let mut offset = 0u64;
    for i in 0..case.records {
        file.write_all_at(&case.payload(pool, i), offset)
            .expect("pwrite");
        offset += case.record_bytes as u64;
        if (i + 1) % per_sync == 0 {
            file.sync_data().expect("fdatasync");
        }
    }
    file.sync_data().expect("fdatasync");
    let secs = started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path).expect("remove raw file");
    settle(dir);
    secs
}

/// The journal's I/O shape without the journal: per batch of ≤ 512 records one `pwritev` of
/// a 64-byte zero header before each payload, at the next offset of a new file, fdatasync at
/// the cadence. Separates what the kernel charges for this shape from the journal's own work
/// (encoding, CRC, locks). Returns seconds.
fn run_raw_batched(dir: &Path, case: Case, pool: &Bytes) -> f64 {
    let path = dir.join("raw-batched.img");
    let file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&path)
        .expect("create raw file");
    let header = [0u8; HEADER_BYTES];
    let per_sync = case.records_per_sync();
    let mut payloads = Vec::with_capacity(BATCH_RECORDS_MAX);
    let started = Instant::now();
    let mut offset = 0u64;
    let mut i = 0;
    while i < case.records {
        let sync_end = (i + per_sync).min(case.records);
        while i < sync_end {
            let batch_end = (i + BATCH_RECORDS_MAX).min(sync_end);
            payloads.clear();
            payloads.extend((i..batch_end).map(|k| case.payload(pool, k)));
            let mut bufs = Vec::with_capacity(2 * payloads.len());
            for p in &payloads {
                bufs.push(&header[..]);
                bufs.push(&p[..]);
            }
            offset = pwritev_all(&file, &bufs, offset);
            i = batch_end;
        }
        file.sync_data().expect("fdatasync");
    }
    file.sync_data().expect("fdatasync");
    let secs = started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path).expect("remove raw file");
    settle(dir);
    secs
}

/// `CDP_BENCH_VEC_BYTES_MAX`: bytes at most per `pwritev` call of the raw batched method
/// (unset: no cap beyond 1024 iovecs, as the journal).
fn vec_bytes_max() -> Option<usize> {
    static CAP: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| {
        std::env::var("CDP_BENCH_VEC_BYTES_MAX")
            .ok()
            .and_then(|v| v.parse().ok())
    })
}

/// `pwritev` of all of `bufs` at `offset` (1024 iovecs per call, as the journal does);
/// returns the offset after them.
fn pwritev_all(file: &std::fs::File, bufs: &[&[u8]], mut offset: u64) -> u64 {
    use std::os::fd::AsRawFd;
    let mut iov: Vec<libc::iovec> = bufs
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    let mut first = 0;
    while first < iov.len() {
        let mut end = (first + 1024).min(iov.len());
        if let Some(cap) = vec_bytes_max() {
            // Stop the call at the cap (at least one iovec), as an experiment on write shape.
            let mut bytes = 0;
            let mut k = first;
            while k < end && (k == first || bytes + iov[k].iov_len <= cap) {
                bytes += iov[k].iov_len;
                k += 1;
            }
            end = k;
        }
        // SAFETY: every iovec points into a slice of `bufs`, borrowed for the whole call.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov[first..end].as_ptr(),
                (end - first) as libc::c_int,
                offset as libc::off_t,
            )
        };
        assert!(n > 0, "pwritev: {}", std::io::Error::last_os_error());
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 && first < iov.len() {
            if n >= iov[first].iov_len {
                n -= iov[first].iov_len;
                first += 1;
            } else {
                // SAFETY: advancing within the same buffer, by less than its length.
                iov[first].iov_base = unsafe { (iov[first].iov_base as *mut u8).add(n) }.cast();
                iov[first].iov_len -= n;
                n = 0;
            }
        }
    }
    offset
}

/// The same records through `Journal::append` (batches of ≤ 512) and `Journal::sync` at the
/// same cadence, into a new journal. Returns seconds.
fn run_journal(dir: &Path, case: Case, pool: &Bytes, compress: bool) -> f64 {
    let jdir = dir.join("journal");
    std::fs::create_dir(&jdir).expect("journal dir");
    let config = JournalConfig {
        compress_writes: compress,
        ..JournalConfig::default()
    };
    let (journal, _) = Journal::open(&jdir, 1, config).expect("open journal");
    let per_sync = case.records_per_sync();
    let mut batch = Vec::with_capacity(per_sync.min(BATCH_RECORDS_MAX));
    let started = Instant::now();
    let mut i = 0;
    while i < case.records {
        let sync_end = (i + per_sync).min(case.records);
        while i < sync_end {
            let batch_end = (i + BATCH_RECORDS_MAX).min(sync_end);
            batch.clear();
            batch.extend((i..batch_end).map(|k| {
                RecordIn::write(1, (k * case.record_bytes) as u64, case.payload(pool, k))
            }));
            journal.append(&batch).expect("append");
            i = batch_end;
        }
        journal.sync().expect("sync");
    }
    journal.sync().expect("sync");
    let secs = started.elapsed().as_secs_f64();
    drop(journal);
    std::fs::remove_dir_all(&jdir).expect("remove journal");
    settle(dir);
    secs
}

/// Touches and frees `bytes` of anonymous memory just before a timed run. In a VM with free
/// page reporting (this development machine: Firecracker, `page_reporting_order=11`), memory
/// the guest freed (the previous run's page cache) is handed back to the host, and the next
/// run's page-cache fill pays a host fault per page inside its copy: the profile then shows
/// most of a run in `copy_folio_from_iter_atomic`, landing on whichever method drew such
/// memory. Touching the memory first lets the timed run reuse backed pages.
fn prefault_memory(bytes: usize) {
    let v = vec![1u8; bytes];
    std::hint::black_box(&v);
}

/// Commits the file system (`syncfs`) after a run's files are deleted, so that freeing and
/// discarding their blocks (the root file system is mounted with `discard`) is not charged to
/// the next run.
fn settle(dir: &Path) {
    let d = std::fs::File::open(dir).expect("open bench dir");
    // SAFETY: syncfs on a descriptor we own for the duration of the call.
    let rc = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&d)) };
    assert_eq!(rc, 0, "syncfs: {}", std::io::Error::last_os_error());
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let base = std::env::var("CDP_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without
    // it, and then a smoke run checks that every method works without taking minutes.
    let measuring = std::env::args().any(|a| a == "--bench");
    let (mib_default, rounds_default) = if measuring { (256, 9) } else { (8, 1) };
    let total_bytes = env_u64("CDP_BENCH_MIB", mib_default) as usize * MIB;
    let rounds = env_u64("CDP_BENCH_ROUNDS", rounds_default).max(1) as usize;
    let sizes = env_list("CDP_BENCH_SIZES", &[4, 64, 1024]);
    let cadences = env_list("CDP_BENCH_SYNC_KIB", &[256, 8192]);
    let compress = env_u64("CDP_BENCH_COMPRESS", 0) != 0;
    let source_shift = env_u64("CDP_BENCH_SOURCE_SHIFT", 0) as usize % 4096;
    let prefault = env_u64("CDP_BENCH_PREFAULT", 1) != 0;
    let work = tempfile::Builder::new()
        .prefix("cdp-append-bench-")
        .tempdir_in(&base)
        .expect("tempdir under CDP_BENCH_DIR");
    let pool = pool();
    settle(work.path());

    let mut cases = Vec::new();
    for &sync_kib in &cadences {
        for &size_kib in &sizes {
            let record_bytes = size_kib * KIB;
            assert!(
                record_bytes > 0 && record_bytes + source_shift <= POOL_BYTES,
                "record size {size_kib} KiB out of range"
            );
            cases.push(Case {
                record_bytes,
                sync_bytes: (sync_kib * KIB).max(record_bytes),
                records: (total_bytes / record_bytes).max(1),
                source_shift,
            });
        }
    }
    println!(
        "append_vs_raw: {} MiB per run, {rounds} rounds, dir {}, journal compression {}",
        total_bytes / MIB,
        work.path().display(),
        if compress { "on" } else { "off" }
    );
    // secs[c][m]: the run times of case c by method m.
    let mut secs = vec![[Vec::new(), Vec::new(), Vec::new()]; cases.len()];
    for round in 0..rounds {
        for (c, case) in cases.iter().enumerate() {
            // Rotate which goes first, so slow drift of the disk hits all alike.
            for k in 0..METHODS.len() {
                let m = (round + k) % METHODS.len();
                if prefault {
                    prefault_memory(case.records * case.record_bytes);
                }
                let t = match m {
                    0 => run_raw(work.path(), *case, &pool),
                    1 => run_raw_batched(work.path(), *case, &pool),
                    _ => run_journal(work.path(), *case, &pool, compress),
                };
                secs[c][m].push(t);
            }
            eprintln!(
                "round {round} record {} KiB sync every {} KiB: raw {:.1}, raw batched {:.1}, journal {:.1} MiB/s",
                case.record_bytes / KIB,
                case.sync_bytes / KIB,
                case.mib() / secs[c][0].last().unwrap(),
                case.mib() / secs[c][1].last().unwrap(),
                case.mib() / secs[c][2].last().unwrap()
            );
        }
    }
    println!(
        "{:>8} {:>8} | median MiB/s: {:>7} {:>7} {:>7} | paired: {:>7} {:>7} | best MiB/s: {:>7} {:>7} {:>7} | {:>7}",
        "record",
        "sync",
        "raw",
        "batched",
        "journal",
        "j/raw",
        "j/batch",
        "raw",
        "batched",
        "journal",
        "j/raw"
    );
    for (c, case) in cases.iter().enumerate() {
        let paired = |of: usize, to: usize| {
            let mut r: Vec<f64> = secs[c][to]
                .iter()
                .zip(&secs[c][of])
                .map(|(to, of)| to / of)
                .collect();
            median(&mut r)
        };
        let median_rate = |m: usize| case.mib() / median(&mut secs[c][m].clone());
        let best_rate = |m: usize| case.mib() / secs[c][m].iter().cloned().fold(f64::MAX, f64::min);
        println!(
            "{:>4} KiB {:>4} KiB | median MiB/s: {:>7.1} {:>7.1} {:>7.1} | paired: {:>7.2} {:>7.2} | best MiB/s: {:>7.1} {:>7.1} {:>7.1} | {:>7.2}",
            case.record_bytes / KIB,
            case.sync_bytes / KIB,
            median_rate(0),
            median_rate(1),
            median_rate(2),
            paired(2, 0),
            paired(2, 1),
            best_rate(0),
            best_rate(1),
            best_rate(2),
            best_rate(2) / best_rate(0)
        );
    }
}
