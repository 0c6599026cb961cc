//! NBD_CMD_CACHE and fast zeroes (NBD_FLAG_SEND_FAST_ZERO) with real clients: production
//! zeroes fast where its file system can (and the zero is journaled like any other), a
//! writable image answers ENOTSUP at once.

mod common;

use common::cli::{copy_export, release_image};
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const VOLUME_BYTES: u64 = 256 * MIB;

/// Runs a libnbd script (`sys.argv[1]` is the URI, then `args`) and parses the JSON it
/// prints last.
fn libnbd(uri: &str, script: &str, args: &[&str]) -> serde_json::Value {
    let out = run_ok(
        Command::new(PYTHON)
            .arg("-c")
            .arg(script)
            .arg(uri)
            .args(args),
        Duration::from_secs(120),
    );
    let last = out.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("libnbd script printed {out:?}: {e}"))
}

/// Zero and cache requests; prints what each got ("ok" or the errno name) and how long it took.
/// With "whole" after the URI, also a fast zero of the whole export.
const ZERO_SCRIPT: &str = r#"
import errno, json, sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
out = {"can_fast_zero": h.can_fast_zero(), "can_cache": h.can_cache(), "can_zero": h.can_zero()}
def attempt(name, fn):
    started = time.monotonic()
    try:
        fn()
        out[name] = "ok"
    except nbd.Error as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
    out[name + "_seconds"] = time.monotonic() - started
MIB = 1 << 20
attempt("fast_unmap", lambda: h.zero(2 * MIB, MIB, nbd.CMD_FLAG_FAST_ZERO))
attempt("fast_no_hole", lambda: h.zero(MIB, 4 * MIB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE))
if sys.argv[2:] == ["whole"]:
    attempt("fast_whole", lambda: h.zero(h.get_size(), 0, nbd.CMD_FLAG_FAST_ZERO))
attempt("cache", lambda: h.cache(8 * MIB, 0))
attempt("slow", lambda: h.zero(64 * 1024, 6 * MIB))
h.shutdown()
print(json.dumps(out))
"#;

/// Runs qemu-io commands on `uri`; any failure fails the test.
fn qemu_io(uri: &str, commands: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for command in commands {
        c.arg("-c").arg(command);
    }
    let out = run_ok(c.arg(uri), Duration::from_secs(120));
    assert!(
        !out.contains("failed") && !out.contains("not supported"),
        "qemu-io {commands:?}: {out}"
    );
}

/// Whether `fallocate -z` (FALLOC_FL_ZERO_RANGE, what a NO_HOLE fast zero needs on a file)
/// works in `dir`: tmpfs, for one, punches holes but cannot zero a range.
fn zero_range_works(dir: &std::path::Path) -> bool {
    let probe = dir.join("zero-range.probe");
    std::fs::write(&probe, vec![1u8; 65536]).expect("probe file");
    let ok = Command::new("fallocate")
        .args(["-z", "-o", "0", "-l", "65536"])
        .arg(&probe)
        .status()
        .is_ok_and(|s| s.success());
    let _ = std::fs::remove_file(&probe);
    ok
}

/// Whether a traced NBD request (`.flags = 0x..`) carries NBD_CMD_FLAG_FAST_ZERO.
fn fast_zero_flag(line: &str) -> bool {
    line.split(".flags = 0x")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_hexdigit()).next())
        .and_then(|hex| u16::from_str_radix(hex, 16).ok())
        .is_some_and(|flags| flags & 0x10 != 0)
}

#[test]
fn fast_zero_and_cache_on_production_and_on_a_writable_image() {
    // Goal: production advertises and honours FAST_ZERO and CACHE; a fast zero that punches
    // a hole (and one with NO_HOLE where the file system can zero a range) succeeds, reads
    // back as zeroes, and is journaled (an image at a later bookmark has it); a writable
    // image, whose zeroes cost as much as writes, answers ENOTSUP at once and changes
    // nothing, while a plain zero works; qemu-io's `write -z -n` agrees. Oracle: a byte
    // model of the volume checked against production, the image and the libnbd replies.
    if reference_mode()
        || !requires("qemu-io")
        || !requires("qemu-img")
        || !requires("fallocate")
        || !requires_python_libnbd()
    {
        return;
    }
    let site = Site::start(&[("vol0", VOLUME_BYTES)]);
    let root = site.root().to_path_buf();
    let no_hole_fast = zero_range_works(site.volume("vol0").production.parent().unwrap());
    let uri = site.nbd_uri("vol0");
    let mut model = Model::zeroed(VOLUME_BYTES);
    qemu_io(&uri, &["write -P 0x11 0 16M"]);
    model.fill(0, 16 * MIB, 0x11);

    let got = libnbd(&uri, ZERO_SCRIPT, &[]);
    assert_eq!(got["can_fast_zero"], true, "{got}");
    assert_eq!(got["can_cache"], true, "{got}");
    assert_eq!(got["fast_unmap"], "ok", "{got}");
    model.fill(MIB, 2 * MIB, 0);
    if no_hole_fast {
        assert_eq!(got["fast_no_hole"], "ok", "{got}");
        model.fill(4 * MIB, MIB, 0);
    } else {
        assert_eq!(got["fast_no_hole"], "ENOTSUP", "{got}");
    }
    assert_eq!(got["cache"], "ok", "{got}");
    assert_eq!(got["slow"], "ok", "{got}");
    model.fill(6 * MIB, 64 * 1024, 0);
    // qemu-io: -n forbids the slow fallback (FAST_ZERO on the wire, as qemu's trace of
    // the request shows), -u allows unmapping.
    let out = run(
        Command::new("qemu-io")
            .args(["--trace", "nbd_send_request", "-f", "raw"])
            .args(["-c", "write -z -n -u 10M 1M", &uri]),
        Duration::from_secs(60),
    );
    let trace = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
        "qemu-io write -z -n -u: {trace}"
    );
    assert!(
        trace
            .lines()
            .any(|l| l.contains(".type = 6") && fast_zero_flag(l)),
        "qemu-io sent no fast zero:\n{trace}"
    );
    model.fill(10 * MIB, MIB, 0);
    model.check_file(
        "production after fast zeroes",
        &site.volume("vol0").production,
    );

    // The fast zeroes were journaled: an image at a bookmark taken now holds them.
    site.flush("vol0");
    site.cdp_json(&["bookmark", "create", "b1", "--json"]);
    let image = site.cdp_json(&["image", "access", "--at", "b1", "--writable", "--json"]);
    let image_uri = site.image_uri(&image, "vol0");
    copy_export(&image_uri, &root.join("b1.img"));
    model.check_file("image at b1", &root.join("b1.img"));

    // A writable image zeroes into its scratch file block by block: never fast.
    let got = libnbd(&image_uri, ZERO_SCRIPT, &["whole"]);
    assert_eq!(got["can_fast_zero"], true, "{got}");
    for refused in ["fast_unmap", "fast_no_hole", "fast_whole"] {
        assert_eq!(got[refused], "ENOTSUP", "{refused}: {got}");
    }
    // Refused at once: zeroing the whole volume in the scratch file would take far longer.
    let whole_seconds = got["fast_whole_seconds"].as_f64().unwrap();
    assert!(whole_seconds < 0.5, "{whole_seconds} s to refuse: {got}");
    assert_eq!(got["cache"], "ok", "{got}");
    assert_eq!(got["slow"], "ok", "{got}");
    let mut image_model = model.clone();
    image_model.fill(6 * MIB, 64 * 1024, 0);
    let started = Instant::now();
    let refused = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -z -n 12M 1M", &image_uri])
        .output()
        .expect("qemu-io");
    let said = String::from_utf8_lossy(&refused.stdout).to_string()
        + &String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("Operation not supported"), "{said}");
    assert!(started.elapsed() < Duration::from_secs(30));
    copy_export(&image_uri, &root.join("image-after.img"));
    image_model.check_file(
        "writable image after refused fast zeroes",
        &root.join("image-after.img"),
    );
    release_image(&image, |a| site.cdp_json(a));
    let mut site = site;
    site.assert_alive();
}
