//! `cdp image export` and `cdp restore` end to end: a point's bytes leave as sparse files, and
//! production is brought back to a point through the splitter, checked against a byte model.
//!
//! Method: hosts write pseudo-random patterns with qemu-io (`write -s FILE`) through the
//! splitter; a `Model` per volume records what each point must hold; results are read back
//! from the exported files and through NBD (nbdcopy), never trusted from the tool's report.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const MIB: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(120);

fn cdp(site: &Site, args: &[&str]) -> Command {
    let mut c = Command::new(cdp_bin());
    c.args(args).arg("--control").arg(&site.control_sock);
    c
}

fn cdp_ok(site: &Site, args: &[&str]) -> String {
    run_ok(&mut cdp(site, args), TIMEOUT)
}

fn cdp_json(site: &Site, args: &[&str]) -> serde_json::Value {
    let out = cdp_ok(site, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed bad JSON ({e}):\n{out}"))
}

fn cdp_fails(site: &Site, args: &[&str]) -> Output {
    let out = run(&mut cdp(site, args), TIMEOUT);
    assert!(
        !out.status.success(),
        "{args:?} should fail but printed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

/// Writes `data` at `offset` of `vol` through the splitter (qemu-io reads it from a file),
/// then records it in the model.
fn write(site: &Site, model: &mut Model, vol: &str, offset: u64, data: &[u8]) {
    let source = site.root().join("pattern.bin");
    std::fs::write(&source, data).unwrap();
    let out = run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c"])
            .arg(format!(
                "write -s {} {offset} {}",
                source.display(),
                data.len()
            ))
            .arg(site.nbd_uri(vol)),
        TIMEOUT,
    );
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io: {out}"
    );
    model.write(offset, data);
}

/// WRITE_ZEROES through the splitter.
fn zero(site: &Site, model: &mut Model, vol: &str, offset: u64, len: u64) {
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c"])
            .arg(format!("write -z {offset} {len}"))
            .arg(site.nbd_uri(vol)),
        TIMEOUT,
    );
    model.fill(offset, len, 0);
}

/// The volume as a host reads it through the splitter.
fn read_through_nbd(site: &Site, vol: &str) -> Vec<u8> {
    let out = site.root().join(format!("{vol}.read"));
    let _ = std::fs::remove_file(&out);
    run_ok(
        Command::new("nbdcopy").arg(site.nbd_uri(vol)).arg(&out),
        TIMEOUT,
    );
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

fn bookmark(site: &Site, name: &str) -> u64 {
    let b = cdp_json(site, &["bookmark", "create", name, "--json"]);
    b["seq"].as_u64().expect("bookmark seq")
}

/// The splitter's `nbd_clients` for `vol`.
fn nbd_clients(site: &Site, vol: &str) -> u64 {
    let status = site.status();
    status["splitter"]["volumes"]
        .as_array()
        .and_then(|vols| vols.iter().find(|v| v["name"] == vol))
        .and_then(|v| v["nbd_clients"].as_u64())
        .unwrap_or_else(|| panic!("no nbd_clients for {vol} in {status}"))
}

/// Images the appliance has open.
fn open_images(site: &Site) -> Vec<serde_json::Value> {
    let answer = control_request(
        &site.control_sock,
        &serde_json::json!({"command": "image_list", "group": null}),
    );
    answer["images"].as_array().cloned().unwrap_or_default()
}

/// Bytes the file really occupies on disk.
fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// A host holding an NBD connection open (python libnbd) until dropped.
struct AttachedHost(Child);

impl AttachedHost {
    fn attach(uri: &str) -> AttachedHost {
        let mut child = Command::new(PYTHON)
            .arg("-c")
            .arg(
                "import nbd, sys\n\
                 h = nbd.NBD()\n\
                 h.connect_uri(sys.argv[1])\n\
                 print('attached', flush=True)\n\
                 sys.stdin.read()\n\
                 h.shutdown()\n",
            )
            .arg(uri)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start python libnbd host");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "attached", "the host did not attach");
        AttachedHost(child)
    }

    fn detach(mut self) {
        // Closing stdin lets the script disconnect cleanly.
        drop(self.0.stdin.take());
        let status = wait_child(&mut self.0, TIMEOUT).expect("host did not exit");
        assert!(status.success(), "host exited with {status}");
    }
}

impl Drop for AttachedHost {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn has_tools() -> bool {
    requires("qemu-io") && requires("nbdcopy") && requires("qemu-img") && !reference_mode()
}

#[test]
fn image_export_writes_the_point_byte_for_byte() {
    // Goal: `cdp image export --at b1` produces files equal to the model at b1 for a group of
    // two volumes (directory mode and --volume), sparse where b1 is zero, refuses to
    // overwrite without --force, always releases its image, and leaves production and the
    // replica untouched. Method: pattern A, b1, pattern B and zeroes over part of A, export.
    if !has_tools() {
        return;
    }
    let seed = seed("image_export");
    let site = Site::start(&[("vol0", 16 * MIB), ("vol1", 8 * MIB)]);
    site.wait_connected(TIMEOUT);
    let mut now0 = Model::zeroed(16 * MIB);
    let mut now1 = Model::zeroed(8 * MIB);

    write(
        &site,
        &mut now0,
        "vol0",
        MIB,
        &pattern(seed, 6 * MIB as usize),
    );
    write(
        &site,
        &mut now0,
        "vol0",
        12 * MIB + 4097,
        &pattern(seed + 1, 70_000),
    );
    write(
        &site,
        &mut now1,
        "vol1",
        0,
        &pattern(seed + 2, 2 * MIB as usize),
    );
    site.flush_all();
    bookmark(&site, "b1");
    let at_b1 = [now0.bytes.clone(), now1.bytes.clone()];

    write(
        &site,
        &mut now0,
        "vol0",
        2 * MIB + 5,
        &pattern(seed + 3, MIB as usize),
    );
    zero(&site, &mut now0, "vol0", 12 * MIB, MIB);
    write(
        &site,
        &mut now0,
        "vol0",
        15 * MIB,
        &pattern(seed + 4, MIB as usize),
    );
    write(
        &site,
        &mut now1,
        "vol1",
        MIB,
        &pattern(seed + 5, 3 * MIB as usize),
    );
    site.flush_all();

    let out_dir = site.root().join("export");
    let out_dir_text = out_dir.to_str().unwrap();
    let summary = cdp_ok(
        &site,
        &["image", "export", "--at", "b1", "--to", out_dir_text],
    );
    assert!(
        summary.contains("vol0") && summary.contains("vol1"),
        "{summary}"
    );
    for (i, vol) in ["vol0", "vol1"].iter().enumerate() {
        let path = out_dir.join(format!("{vol}.img"));
        let mut model = Model::zeroed(at_b1[i].len() as u64);
        model.write(0, &at_b1[i]);
        model.check(
            &format!("exported {vol} at b1"),
            &std::fs::read(&path).unwrap(),
        );
    }
    // vol0 at b1 holds 6 MiB + 70 000 bytes of data in 16 MiB; zero blocks stay holes.
    let vol0_file = out_dir.join("vol0.img");
    assert!(
        allocated_bytes(&vol0_file) < 7 * MIB,
        "export of vol0 is not sparse: {} bytes allocated",
        allocated_bytes(&vol0_file)
    );
    assert!(open_images(&site).is_empty(), "export left an image open");

    // Existing files are refused without --force, replaced with it.
    let refused = cdp_fails(
        &site,
        &["image", "export", "--at", "b1", "--to", out_dir_text],
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--force"), "{stderr}");
    assert!(
        open_images(&site).is_empty(),
        "a refused export left an image open"
    );

    // One volume to a file, at the present (seq of the last write), with --force over junk.
    let single = site.root().join("vol0-now.img");
    std::fs::write(&single, b"junk").unwrap();
    let last = site.status()["groups"][0]["last_seq"].as_u64().unwrap();
    let at_last = format!("seq:{last}");
    let single_text = single.to_str().unwrap();
    let args = [
        "image",
        "export",
        "--at",
        &at_last,
        "--volume",
        "vol0",
        "--to",
        single_text,
    ];
    cdp_fails(&site, &args);
    let mut forced = args.to_vec();
    forced.push("--force");
    cdp_ok(&site, &forced);
    now0.check("exported vol0 now", &std::fs::read(&single).unwrap());

    // Unknown volume: refused, image released.
    let bad = cdp_fails(
        &site,
        &[
            "image", "export", "--at", "b1", "--volume", "nope", "--to", "/tmp/x",
        ],
    );
    assert!(String::from_utf8_lossy(&bad.stderr).contains("nope"));
    assert!(open_images(&site).is_empty());

    // Production and replica are untouched by exports.
    now0.check("vol0 through NBD", &read_through_nbd(&site, "vol0"));
    now1.check("vol1 through NBD", &read_through_nbd(&site, "vol1"));
    site.settle();
    site.assert_all_replicas_equal_production();
}

#[test]
fn restore_brings_production_back_and_bookmarks_it() {
    // Goal: `cdp restore --at b1` refuses while a host is attached (naming the volume and
    // the host count), then with nothing attached rewrites production to the model at b1
    // through the splitter, leaves a restore bookmark whose image equals b1, and a second
    // restore to the same point writes nothing. Method: pattern A, b1, pattern B and zeroes,
    // a python libnbd host holding a connection; production read back with nbdcopy.
    if !has_tools() || !requires_python_libnbd() {
        return;
    }
    let seed = seed("restore");
    let site = Site::start(&[("vol0", 16 * MIB)]);
    site.wait_connected(TIMEOUT);
    let mut model = Model::zeroed(16 * MIB);

    write(
        &site,
        &mut model,
        "vol0",
        0,
        &pattern(seed, 3 * MIB as usize),
    );
    write(
        &site,
        &mut model,
        "vol0",
        9 * MIB + 123,
        &pattern(seed + 1, 2 * MIB as usize),
    );
    site.flush("vol0");
    let b1_seq = bookmark(&site, "b1");
    let mut at_b1 = Model::zeroed(16 * MIB);
    at_b1.write(0, &model.bytes);

    write(
        &site,
        &mut model,
        "vol0",
        MIB,
        &pattern(seed + 2, 64 * 1024),
    );
    zero(&site, &mut model, "vol0", 9 * MIB, MIB);
    write(
        &site,
        &mut model,
        "vol0",
        14 * MIB + 1,
        &pattern(seed + 3, MIB as usize),
    );
    site.flush("vol0");
    model.check(
        "production before restore",
        &read_through_nbd(&site, "vol0"),
    );

    // A host attached: refused, production unchanged.
    let host = AttachedHost::attach(&site.nbd_uri("vol0"));
    assert!(
        poll_until(TIMEOUT, || nbd_clients(&site, "vol0") == 1),
        "status never showed the attached host"
    );
    let human = run_ok(
        Command::new(cdp_bin())
            .arg("status")
            .arg("--control")
            .arg(&site.control_sock)
            .arg("--splitter-control")
            .arg(site.splitter_control()),
        TIMEOUT,
    );
    assert!(
        human.contains("HOSTS"),
        "cdp status lacks the hosts column:\n{human}"
    );
    let refused = cdp_fails(&site, &["restore", "--at", "b1"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("vol0") && stderr.contains("1 host") && stderr.contains("--force"),
        "refusal does not explain itself: {stderr}"
    );
    assert!(
        open_images(&site).is_empty(),
        "a refused restore left an image open"
    );
    host.detach();
    model.check(
        "production after the refused restore",
        &read_through_nbd(&site, "vol0"),
    );
    assert!(
        poll_until(TIMEOUT, || nbd_clients(&site, "vol0") == 0),
        "hosts still counted after they left"
    );

    let restored = cdp_json(&site, &["restore", "--at", "b1", "--json"]);
    let written = restored["written_bytes"].as_u64().expect("written_bytes");
    assert_eq!(restored["compared_bytes"].as_u64(), Some(16 * MIB));
    // Only the blocks B touched differ: at most 1 MiB + 64 KiB block rounding, the zeroed
    // MiB and the 1 MiB at 14 MiB (which b1 held as zeroes).
    assert!(written > 0 && written <= 4 * MIB, "wrote {written} bytes");
    assert_eq!(restored["seq"].as_u64(), Some(b1_seq));
    let restore_name = format!("restore-to-seq-{b1_seq}");
    assert_eq!(restored["bookmark"]["name"], restore_name.as_str());
    assert!(open_images(&site).is_empty(), "restore left an image open");

    at_b1.check("production after restore", &read_through_nbd(&site, "vol0"));

    // The restore bookmark's image is the restored point.
    let file = site.root().join("at-restore.img");
    cdp_ok(
        &site,
        &[
            "image",
            "export",
            "--at",
            &restore_name,
            "--to",
            file.to_str().unwrap(),
        ],
    );
    at_b1.check(
        "image at the restore bookmark",
        &std::fs::read(&file).unwrap(),
    );

    let list = cdp_json(&site, &["bookmark", "list", "--json"]);
    let names: Vec<&str> = list["bookmarks"]
        .as_array()
        .expect("bookmarks")
        .iter()
        .filter_map(|b| b["name"].as_str())
        .collect();
    assert!(names.contains(&restore_name.as_str()), "{list}");
    let timeline = cdp_ok(&site, &["timeline", "--json"]);
    assert!(timeline.contains(&restore_name), "{timeline}");

    // Restoring to the same point again changes nothing and takes a fresh bookmark name.
    let again = cdp_json(&site, &["restore", "--at", "b1", "--json"]);
    assert_eq!(again["written_bytes"].as_u64(), Some(0), "{again}");
    assert_eq!(
        again["bookmark"]["name"],
        format!("{restore_name}-2").as_str()
    );

    at_b1.check(
        "production after the second restore",
        &read_through_nbd(&site, "vol0"),
    );
    site.settle();
    site.assert_all_replicas_equal_production();
}

#[test]
fn interrupted_export_releases_its_image_and_leaves_no_file() {
    // Goal: SIGINT during `cdp image export` stops the copy, releases the image and leaves
    // neither the destination nor its `.partial` file. Method: export a 2 GiB volume (long
    // enough to be caught mid-copy) and send SIGINT once the appliance lists the image; if
    // the copy wins the race anyway, the file must then be complete and correct.
    if !has_tools() {
        return;
    }
    let size = 2048 * MIB;
    let site = Site::start(&[("vol0", size)]);
    site.wait_connected(TIMEOUT);
    let mut model = Model::zeroed(size);
    write(
        &site,
        &mut model,
        "vol0",
        size - MIB,
        &pattern(7, MIB as usize),
    );
    site.flush("vol0");
    bookmark(&site, "b1");

    let file = site.root().join("big.img");
    let mut child = cdp(
        &site,
        &[
            "image",
            "export",
            "--at",
            "b1",
            "--to",
            file.to_str().unwrap(),
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    assert!(
        poll_until(TIMEOUT, || !open_images(&site).is_empty()
            || child.try_wait().unwrap().is_some()),
        "the export neither opened an image nor ended"
    );
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let status = wait_child(&mut child, TIMEOUT).expect("export did not stop");
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();

    eprintln!("export ended with {status}; stderr:\n{stderr}");
    assert!(
        open_images(&site).is_empty(),
        "the image was not released: {stderr}"
    );
    let partial = site.root().join("big.img.partial");
    assert!(!partial.exists(), "{} left behind", partial.display());
    if status.success() {
        eprintln!("the export finished before SIGINT; checking its file instead");
        model.check("export that won the race", &std::fs::read(&file).unwrap());
    } else {
        assert!(
            stderr.contains("interrupted"),
            "unexpected failure: {stderr}"
        );
        assert!(
            !file.exists(),
            "an interrupted export left {}",
            file.display()
        );
    }
}

#[test]
fn forced_restore_of_a_two_volume_group_under_an_attached_host() {
    // Goal: with a host attached over TCP to one volume of a two-volume group, restore is
    // refused naming that volume, and `--force` restores both volumes to the model at b1
    // anyway; the splitter's status lists both NBD endpoints. Method: patterns on both
    // volumes, b1, more patterns, a python libnbd host on vol1 over TCP.
    if !has_tools() || !requires_python_libnbd() {
        return;
    }
    let seed = seed("forced_restore");
    let options = SiteOptions {
        nbd_tcp: true,
        ..SiteOptions::default()
    };
    let site = Site::start_with(&[("vol0", 8 * MIB), ("vol1", 4 * MIB)], options);
    site.wait_connected(TIMEOUT);
    let endpoints = site.status()["splitter"]["nbd"].clone();
    let port = site.nbd_port.unwrap();
    let expected = [
        serde_json::json!(format!("unix:{}", site.nbd_sock.display())),
        serde_json::json!(format!("127.0.0.1:{port}")),
    ];
    for e in &expected {
        assert!(
            endpoints.as_array().unwrap().contains(e),
            "{endpoints} lacks {e}"
        );
    }

    let mut vol0 = Model::zeroed(8 * MIB);
    let mut vol1 = Model::zeroed(4 * MIB);
    write(
        &site,
        &mut vol0,
        "vol0",
        0,
        &pattern(seed, 2 * MIB as usize),
    );
    write(
        &site,
        &mut vol1,
        "vol1",
        100,
        &pattern(seed + 1, MIB as usize),
    );
    site.flush_all();
    bookmark(&site, "b1");
    let b1 = [vol0.bytes.clone(), vol1.bytes.clone()];
    write(
        &site,
        &mut vol0,
        "vol0",
        MIB,
        &pattern(seed + 2, 3 * MIB as usize),
    );
    write(
        &site,
        &mut vol1,
        "vol1",
        0,
        &pattern(seed + 3, 4 * MIB as usize),
    );
    site.flush_all();

    let host = AttachedHost::attach(&site.nbd_tcp_uri("vol1"));
    assert!(poll_until(TIMEOUT, || nbd_clients(&site, "vol1") == 1));
    assert_eq!(nbd_clients(&site, "vol0"), 0);
    let refused = cdp_fails(&site, &["restore", "--at", "b1"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("vol1 (1 host)") && !stderr.contains("vol0 ("),
        "{stderr}"
    );
    vol1.check("vol1 after the refusal", &read_through_nbd(&site, "vol1"));

    let restored = cdp_json(&site, &["restore", "--at", "b1", "--force", "--json"]);
    assert_eq!(restored["compared_bytes"].as_u64(), Some(12 * MIB));
    host.detach();
    for (i, vol) in ["vol0", "vol1"].iter().enumerate() {
        let mut model = Model::zeroed(b1[i].len() as u64);
        model.write(0, &b1[i]);
        model.check(
            &format!("{vol} after the forced restore"),
            &read_through_nbd(&site, vol),
        );
    }
    site.settle();
    site.assert_all_replicas_equal_production();
}
