//! Replication wire efficiency end to end: repeated 4 KiB blocks travel once (dedup), compressible batches shrink (zstd), and the remote copy still holds exactly the local journal's records and production's bytes.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cdp_journal::{Record, RecordKind};
use common::journals::{assert_same_journals, read_journal};
use common::*;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1024;
const BLOCK: usize = 4096;
const T: Duration = Duration::from_secs(120);
const VOLUME_BYTES: u64 = 64 * MIB;

fn requirements() -> bool {
    !reference_mode() && requires("qemu-io")
}

/// A site whose group `default` ships to a fresh remote appliance, with `remote_keys` added
/// to its `[group.remote]`.
fn start_pair(remote_keys: &str) -> (Site, RemoteAppliance) {
    start_pair_sized(VOLUME_BYTES, remote_keys)
}

fn start_pair_sized(volume_bytes: u64, remote_keys: &str) -> (Site, RemoteAppliance) {
    let volumes = [("vol0", volume_bytes)];
    let remote = RemoteAppliance::start(&volumes);
    let mut site = Site::create(&volumes, SiteOptions::default());
    add_remote_to_site_config(&site, &remote.endpoint, 30);
    // `[group.remote]` is the config's last table, so appended keys land in it.
    let mut text = std::fs::read_to_string(&site.appliance_config).unwrap();
    text += remote_keys;
    std::fs::write(&site.appliance_config, text).unwrap();
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    site.wait_connected(T);
    (site, remote)
}

/// Waits until the remote acknowledged every record of the local journal; returns the
/// group's `remote` status then and the last seq.
fn wait_shipped(site: &Site, remote: &RemoteAppliance) -> (serde_json::Value, u64) {
    let mut last = 0;
    let mut shipped = serde_json::Value::Null;
    let ok = poll_until(T, || {
        let g = site.status()["groups"][0].clone();
        last = g["last_seq"].as_u64().unwrap_or(0);
        let done = g["remote"]["shipped_seq"].as_u64() == Some(last) && last > 0;
        shipped = g["remote"].clone();
        done
    });
    assert!(
        ok,
        "remote did not catch up: {}\n{}\n{}",
        site.status(),
        site.logs(),
        remote.logs()
    );
    (shipped, last)
}

/// One qemu-io run through the splitter: `write -s FILE OFFSET LEN` for each (file, offset)
/// and `write -P 0` for each zero-filled offset, recorded in `model`.
struct Workload {
    commands: Vec<String>,
}

impl Workload {
    fn new() -> Workload {
        Workload {
            commands: Vec::new(),
        }
    }

    fn write_file(&mut self, model: &mut Model, file: &Path, data: &[u8], offset: u64) {
        self.commands.push(format!(
            "write -s {} {offset} {}",
            file.display(),
            data.len()
        ));
        model.write(offset, data);
    }

    /// Zero bytes sent as a write's data (not WRITE_ZEROES): dedup's zero-block case.
    fn write_zero_data(&mut self, model: &mut Model, offset: u64, len: u64) {
        self.commands.push(format!("write -P 0 {offset} {len}"));
        model.fill(offset, len, 0);
    }

    fn run(self, site: &Site) {
        for chunk in self.commands.chunks(200) {
            let mut cmd = Command::new("qemu-io");
            cmd.args(["-f", "raw"]);
            for c in chunk {
                cmd.arg("-c").arg(c);
            }
            cmd.arg(site.nbd_uri("vol0"));
            run_ok(&mut cmd, T);
        }
    }
}

/// How the whole volume-aligned 4 KiB blocks of the journal's writes must travel when the
/// window never evicts: (literal, zero, reference) — a block is literal the first time its
/// bytes appear, a reference after that, and all-zero blocks are zero tags.
fn expected_block_counts(records: &[Record]) -> (u64, u64, u64) {
    let mut seen: HashSet<&[u8]> = HashSet::new();
    let (mut literal, mut zero, mut reference) = (0, 0, 0);
    for r in records.iter().filter(|r| r.kind == RecordKind::Write) {
        let head = ((BLOCK as u64 - r.offset % BLOCK as u64) % BLOCK as u64) as usize;
        let head = head.min(r.payload.len());
        for block in r.payload[head..].chunks_exact(BLOCK) {
            if block.iter().all(|&b| b == 0) {
                zero += 1;
            } else if seen.insert(block) {
                literal += 1;
            } else {
                reference += 1;
            }
        }
    }
    (literal, zero, reference)
}

fn field(status: &serde_json::Value, name: &str) -> u64 {
    status[name]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no {name}: {status}"))
}

/// Stops both sites and checks the remote journal holds the local journal's records, seq by
/// seq and byte for byte; returns the local records.
fn stop_and_compare_journals(
    site: &mut Site,
    remote: &mut RemoteAppliance,
    last: u64,
) -> Vec<Record> {
    site.kill(Role::Splitter);
    site.kill_appliance();
    remote.kill();
    let local_dir = site.root().join("appliance").join("groups").join("default");
    let compared = assert_same_journals(&local_dir, &remote.group_dir());
    assert_eq!(compared as u64, last);
    read_journal(&local_dir).0
}

#[test]
fn repeated_blocks_travel_once_and_the_remote_copy_is_exact() {
    // Goal: with dedup on, every repeated 4 KiB block (and every zero block) of the writes
    // crosses the wire as a reference or a tag, and the remote still holds byte-identical
    // records and replica. Method: a 64 KiB random pattern written at 300 aligned offsets and
    // 30 offsets 512 bytes past a boundary, zero data at 40 offsets, and 512 KiB of unique
    // data written twice, all through the splitter with qemu-io, uncompressed on the wire so
    // the bytes saved are dedup's alone. Oracles: the remote replica and production against
    // the byte model; the remote journal against the local one record by record; status's
    // block counts against the counts computed from the local journal (first sight of a
    // block's bytes is literal, later ones are references), and wire bytes against them.
    if !requirements() {
        return;
    }
    let (mut site, mut remote) = start_pair("compress_level = 0\ndedup = true\n");
    let mut model = Model::zeroed(VOLUME_BYTES);
    let mut rng = SplitMix64(seed("remote_wire_dedup"));
    let pattern_bytes = pattern(rng.next_u64(), 64 * KIB as usize);
    let unique_bytes = pattern(rng.next_u64(), 512 * KIB as usize);
    let pattern_file = site.root().join("pattern.bin");
    let unique_file = site.root().join("unique.bin");
    std::fs::write(&pattern_file, &pattern_bytes).unwrap();
    std::fs::write(&unique_file, &unique_bytes).unwrap();
    let mut work = Workload::new();
    let slots = (VOLUME_BYTES - 64 * KIB) / 4096;
    for i in 0..370 {
        let offset = rng.below(slots) * 4096;
        match i % 37 {
            0..=29 => work.write_file(&mut model, &pattern_file, &pattern_bytes, offset),
            30..=32 => work.write_file(&mut model, &pattern_file, &pattern_bytes, offset + 512),
            _ => work.write_zero_data(&mut model, offset, 64 * KIB),
        }
    }
    for _ in 0..2 {
        let offset = rng.below((VOLUME_BYTES - 512 * KIB) / 4096) * 4096;
        work.write_file(&mut model, &unique_file, &unique_bytes, offset);
    }
    work.run(&site);
    site.flush_all();
    let (status, last) = wait_shipped(&site, &remote);
    remote.wait_distributed(last, T);
    model.check_file("production", &site.volume("vol0").production);
    model.check_file("remote replica", remote.replica("vol0"));
    let human = run_ok(
        Command::new(cdp_bin())
            .args(["status", "--control"])
            .arg(&site.control_sock),
        T,
    );
    assert!(human.contains("after dedup"), "{human}");

    let records = stop_and_compare_journals(&mut site, &mut remote, last);
    let (literal, zero, reference) = expected_block_counts(&records);
    let raw = field(&status, "wire_raw_bytes");
    let deduped = field(&status, "wire_dedup_bytes");
    let wire = field(&status, "wire_bytes");
    let dedup_ratio = status["dedup_ratio"].as_f64().unwrap_or(0.0);
    eprintln!(
        "dedup: {raw} record bytes, {deduped} after dedup ({dedup_ratio:.2}x), {wire} on the wire; \
         blocks literal {literal}, zero {zero}, referenced {reference} (journal: {} records)",
        records.len()
    );
    assert_eq!(
        (
            field(&status, "dedup_literal_blocks"),
            field(&status, "dedup_zero_blocks"),
            field(&status, "dedup_reference_blocks"),
        ),
        (literal, zero, reference),
        "block counts (literal, zero, reference) differ from the journal's: {status}"
    );
    // The pattern has 16 distinct blocks, 15 more per unaligned shift (the shifted blocks
    // straddle two pattern blocks), and the unique data 128: everything else repeats.
    assert!(literal <= 16 + 16 + 128, "{literal} literal blocks");
    assert!(reference > 10 * literal, "{reference} references");
    // Each literal costs its bytes plus a tag, each reference 9 bytes, each zero block 1;
    // what is left is record heads and unaligned ends.
    let block_bytes = literal * (BLOCK as u64 + 1) + reference * 9 + zero;
    let unaligned: u64 = records
        .iter()
        .filter(|r| r.kind == RecordKind::Write)
        .map(|r| {
            r.payload.len() as u64 % BLOCK as u64
                + if r.offset % BLOCK as u64 != 0 {
                    BLOCK as u64
                } else {
                    0
                }
        })
        .sum();
    let heads = 52 * records.len() as u64;
    assert!(
        deduped <= block_bytes + unaligned + heads,
        "dedup stream of {deduped} bytes, expected at most {}",
        block_bytes + unaligned + heads
    );
    assert!(dedup_ratio > 10.0, "dedup ratio {dedup_ratio}: {status}");
    // Uncompressed: the wire holds the stream plus frame headers and fixed fields.
    assert!(
        wire >= deduped && wire < deduped + 64 * (records.len() as u64 + 16),
        "{status}"
    );
    assert_eq!(status["compress_level_now"], 0, "{status}");
}

#[test]
fn a_small_dedup_window_evicts_and_references_stay_exact() {
    // Goal: references are right across batches when the window is smaller than the data
    // (blocks are evicted and sent again), which a window desynchronised between the ends
    // would turn into wrong bytes. Method: a 1 MiB window (256 blocks); 40 rounds, each
    // writing a fresh 512 KiB of random data (128 blocks, pushing older ones out), then the
    // previous round's data again (still in the window: references), and every fourth
    // round the data of three rounds back (evicted: sent again as literals), each round a
    // separate qemu-io run so batches are cut between rounds. Oracles: the byte model for
    // production and the remote replica, the local journal for the remote's.
    if !requirements() {
        return;
    }
    let (mut site, mut remote) = start_pair("compress_level = 0\ndedup_window_bytes = 1048576\n");
    let mut model = Model::zeroed(VOLUME_BYTES);
    let mut rng = SplitMix64(seed("remote_wire_window"));
    let mut files = Vec::new();
    let slots = (VOLUME_BYTES - 512 * KIB) / 4096;
    for round in 0..40usize {
        let data = pattern(rng.next_u64(), 512 * KIB as usize);
        let file = site.root().join(format!("round{round}.bin"));
        std::fs::write(&file, &data).unwrap();
        files.push((file, data));
        let mut work = Workload::new();
        let mut backs = vec![0];
        if round >= 1 {
            backs.push(1);
        }
        if round >= 3 && round % 4 == 3 {
            backs.push(3);
        }
        for back in backs {
            let (file, data) = &files[round - back];
            work.write_file(&mut model, file, data, rng.below(slots) * 4096);
        }
        work.run(&site);
    }
    site.flush_all();
    let (status, last) = wait_shipped(&site, &remote);
    remote.wait_distributed(last, T);
    model.check_file("production", &site.volume("vol0").production);
    model.check_file("remote replica", remote.replica("vol0"));
    let records = stop_and_compare_journals(&mut site, &mut remote, last);
    let (unique, _, _) = expected_block_counts(&records);
    let literal = field(&status, "dedup_literal_blocks");
    let reference = field(&status, "dedup_reference_blocks");
    eprintln!(
        "window of 256 blocks: {literal} literal blocks ({unique} distinct), {reference} references; {status}"
    );
    // Evicted blocks travel again, so more literals than distinct blocks; recent repeats
    // still become references.
    assert!(literal > unique, "nothing was evicted: {status}");
    assert!(reference > 0, "no reference within the window: {status}");
}

#[test]
fn compressible_batches_shrink_on_the_wire() {
    // Goal: with the default adaptive compression, compressible data (text-like lines, every
    // block different, so dedup cannot help) crosses the wire compressed, status reports the
    // ratio and level, and the remote copy is exact. Method: 8 MiB of numbered log lines
    // written in 256 KiB pieces through the splitter; oracles as above.
    if !requirements() {
        return;
    }
    let (mut site, mut remote) = start_pair("");
    let mut model = Model::zeroed(VOLUME_BYTES);
    let mut text = Vec::new();
    let mut line = 0u64;
    while text.len() < 8 * MIB as usize {
        text.extend_from_slice(
            format!("{line:012} 2026-11-23T04:00:00Z INFO replication batch shipped to dr-site, records={}\n", line % 977).as_bytes(),
        );
        line += 1;
    }
    text.truncate(8 * MIB as usize);
    let mut work = Workload::new();
    for (i, piece) in text.chunks(256 * KIB as usize).enumerate() {
        let file = site.root().join(format!("text{i}.bin"));
        std::fs::write(&file, piece).unwrap();
        work.write_file(&mut model, &file, piece, 4 * MIB + i as u64 * 256 * KIB);
    }
    work.run(&site);
    site.flush_all();
    let (status, last) = wait_shipped(&site, &remote);
    remote.wait_distributed(last, T);
    model.check_file("production", &site.volume("vol0").production);
    model.check_file("remote replica", remote.replica("vol0"));
    let zstd_ratio = status["zstd_ratio"].as_f64().unwrap_or(0.0);
    let level = status["compress_level_now"].as_i64().unwrap_or(-1);
    eprintln!(
        "compression: {} bytes after dedup, {} on the wire: zstd {zstd_ratio:.2}x at level {level} ({}); dedup {:.3}x",
        status["wire_dedup_bytes"], status["wire_bytes"], status["compress_level"], status["dedup_ratio"]
    );
    assert_eq!(status["compress_level"], "adaptive", "{status}");
    assert!(
        (1..=15).contains(&level),
        "adaptive level {level}: {status}"
    );
    // Numbered lines compress several-fold; far more would mean bytes were lost.
    assert!(zstd_ratio > 3.0 && zstd_ratio < 200.0, "{status}");
    stop_and_compare_journals(&mut site, &mut remote, last);
}

#[test]
fn incompressible_shipping_rate_with_dedup_and_adaptive_against_plain_level_3() {
    // Goal: dedup and adaptive compression (the defaults) must not cost throughput on data
    // they cannot shrink. Method: 128 MiB of random bytes (qemu-img convert) shipped with
    // the defaults and with `dedup = false, compress_level = 3` (the previous defaults),
    // alternately, twice each; the time from the first write to the remote's last ack is
    // printed (the machine is shared, so it is reported, not asserted), and each remote
    // replica must equal the written bytes.
    if !requirements() || !requires("qemu-img") {
        return;
    }
    const BYTES: u64 = 128 * MIB;
    let mut rng = SplitMix64(seed("remote_wire_rate"));
    let data: Vec<u8> = (0..BYTES / 8)
        .flat_map(|_| rng.next_u64().to_le_bytes())
        .collect();
    let mut rates: Vec<(&str, f64)> = Vec::new();
    for round in 0..4 {
        // The first round also warms the machine's caches; the order alternates.
        let (name, keys) = if round % 2 == 1 {
            ("dedup + adaptive", "")
        } else {
            ("plain, level 3", "dedup = false\ncompress_level = 3\n")
        };
        let (site, remote) = start_pair_sized(BYTES, keys);
        let source = site.root().join("random.img");
        std::fs::write(&source, &data).unwrap();
        let started = std::time::Instant::now();
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-n", "-f", "raw", "-O", "raw"])
                .arg(&source)
                .arg(site.nbd_uri("vol0")),
            T,
        );
        site.flush_all();
        let (status, last) = wait_shipped(&site, &remote);
        let shipped = started.elapsed();
        let rate = BYTES as f64 / MIB as f64 / shipped.as_secs_f64();
        eprintln!(
            "{name}: 128 MiB acknowledged by the remote after {shipped:?} ({rate:.0} MiB/s); \
             wire {} of {} raw bytes, level now {}",
            status["wire_bytes"], status["wire_raw_bytes"], status["compress_level_now"]
        );
        rates.push((name, rate));
        assert!(field(&status, "wire_bytes") >= BYTES, "{status}");
        remote.wait_distributed(last, T);
        let replica = std::fs::read(remote.replica("vol0")).unwrap();
        assert!(
            replica == data,
            "{name}: remote replica differs from the written bytes"
        );
    }
    eprintln!("rates (MiB/s): {rates:?}");
}
