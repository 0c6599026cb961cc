//! fio over the nbd ioengine: verified random writes from several connections, and overlapping
//! concurrent writes and trims whose final bytes must match between production and replica.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// Four jobs (four NBD connections) each write, with crc32c verify headers, its own 8 MiB of the
/// first 32 MiB. `{engine}` is filled in per run so the same layout can be replayed on a file.
const VERIFY_JOB: &str = "\
[global]
rw=randwrite
bs=4k
size=8M
offset_increment=8M
numjobs=4
verify=crc32c
verify_fatal=1
fsync=97

[verified]
";

/// Four connections writing 8 MiB each into one 1 MiB region at random, plus one connection
/// trimming it: the same blocks are overwritten concurrently, so only rule 2 (same order in
/// production and journal) makes the replica converge.
const OVERLAP_JOB: &str = "\
[global]
offset=48M
size=1M
norandommap=1
randrepeat=0
end_fsync=1

[overlap-writes]
rw=randwrite
bsrange=512-64k
blockalign=512
io_size=8M
numjobs=4
iodepth=16

[overlap-trims]
rw=randtrim
bs=64k
io_size=2M
iodepth=4
";

fn fio(dir: &Path, name: &str, job: &str, engine_args: &[String]) -> serde_json::Value {
    let file = dir.join(format!("{name}.fio"));
    std::fs::write(&file, job).unwrap();
    let out = run(
        Command::new("fio")
            // fio writes verify state files into its working directory; keep them in the site.
            .current_dir(dir)
            .arg("--output-format=json")
            .args(engine_args)
            .arg(&file),
        Duration::from_secs(300),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // fio prints non-JSON notes before the JSON document on some errors.
    let json_start = text.find('{').unwrap_or(0);
    let parsed: serde_json::Value = serde_json::from_str(&text[json_start..]).unwrap_or_else(|e| {
        panic!(
            "fio {name}: no JSON output ({e}), exit {}:\n{text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let errors: Vec<String> = parsed["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter(|j| j["error"].as_i64() != Some(0))
        .map(|j| format!("{} error {}", j["jobname"], j["error"]))
        .collect();
    assert!(
        out.status.success() && errors.is_empty(),
        "fio {name} failed (exit {}): {errors:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    parsed
}

/// Bytes moved in direction `dir` ("read" or "write") summed over a fio run's jobs.
fn bytes(result: &serde_json::Value, dir: &str) -> u64 {
    result["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j[dir]["io_bytes"].as_u64().unwrap_or(0))
        .sum()
}

fn nbd_engine(uri: &str, iodepth: u32) -> Vec<String> {
    vec![
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        format!("--iodepth={iodepth}"),
    ]
}

fn file_engine(path: &Path) -> Vec<String> {
    vec![
        "--ioengine=psync".into(),
        format!("--filename={}", path.display()),
    ]
}

#[test]
fn fio_verified_and_overlapping_writes() {
    // Goal: data written by concurrent connections is read back intact through NBD, is in the
    // production file, and the replica converges to production even when connections overwrite
    // and trim the same blocks concurrently. Method: fio crc32c verify over NBD, then the same
    // job replayed with --verify_only directly on the production and replica files; then an
    // overlapping write+trim workload, then qemu-img compare of replica and production.
    if !requires("fio") || !requires("qemu-img") || !requires("qemu-io") {
        return;
    }
    let site = Site::start(&[("vol0", SIZE)]);
    let uri = site.nbd_uri("vol0");
    let dir = site.root().to_path_buf();

    let result = fio(&dir, "verify", VERIFY_JOB, &nbd_engine(&uri, 8));
    let written = bytes(&result, "write");
    assert_eq!(written, 32 * MIB, "fio verify jobs wrote {written} bytes");

    fio(&dir, "overlap", OVERLAP_JOB, &nbd_engine(&uri, 16));

    // Read-back verify on the production file itself: the verified region must be intact (the
    // overlapping region is elsewhere).
    let production = site.volume("vol0").production.clone();
    let mut replay = file_engine(&production);
    replay.push("--verify_only".into());
    let result = fio(&dir, "verify-production", VERIFY_JOB, &replay);
    assert_eq!(
        bytes(&result, "read"),
        32 * MIB,
        "production replay verified too little"
    );

    site.settle();
    site.assert_replica_equals_production("vol0");
    if !reference_mode() {
        let mut replay = file_engine(&site.volume("vol0").replica);
        replay.push("--verify_only".into());
        let result = fio(&dir, "verify-replica", VERIFY_JOB, &replay);
        assert_eq!(
            bytes(&result, "read"),
            32 * MIB,
            "replica replay verified too little"
        );
    }
}

#[test]
fn fio_two_volumes_over_tcp() {
    // Goal: one consistency group of two volumes, split link and one of the hosts over TCP:
    // concurrent verified and overlapping writes on both volumes replicate exactly. Method: one
    // fio run with jobs on vol0 (NBD over TCP) and vol1 (NBD over the unix socket) at once, with
    // crc32c verify on separate regions and overlapping writes on shared ones; then compare each
    // replica with its production file.
    if reference_mode() || !requires("fio") || !requires("qemu-img") || !requires("qemu-io") {
        return;
    }
    let options = SiteOptions {
        link_tcp: true,
        nbd_tcp: true,
    };
    let site = Site::start_with(&[("vol0", 32 * MIB), ("vol1", 16 * MIB)], options);
    let job = format!(
        "\
[global]
ioengine=nbd
iodepth=8

[vol0-verified]
uri={tcp0}
rw=randwrite
bs=16k
size=4M
offset_increment=4M
numjobs=2
verify=crc32c
verify_fatal=1

[vol1-verified]
uri={unix1}
rw=randwrite
bs=4k
size=4M
numjobs=2
offset_increment=4M
verify=crc32c
verify_fatal=1

[vol0-overlap]
uri={tcp0}
rw=randwrite
bsrange=4k-128k
offset=16M
size=2M
io_size=6M
norandommap=1
numjobs=2
end_fsync=1

[vol1-overlap]
uri={unix1}
rw=randwrite
bs=4k
offset=12M
size=1M
io_size=4M
norandommap=1
numjobs=2
end_fsync=1
",
        tcp0 = site.nbd_tcp_uri("vol0"),
        unix1 = site.nbd_uri("vol1"),
    );
    fio(site.root(), "two-volumes", &job, &[]);
    site.settle();
    site.assert_all_replicas_equal_production();
}
