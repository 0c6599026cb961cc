//! Structured replies and block status against the splitter with real clients: nbdinfo's
//! extent map and qemu-img's agree with what was written, and a copy of a mostly empty volume
//! reads only its data (the splitter's own read counter) and comes out sparse and identical.

mod common;

use common::cli::release_image;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const VOLUME_BYTES: u64 = 1024 * MIB;
/// The three regions the test writes: (offset, length, pattern byte).
const REGIONS: [(u64, u64, u8); 3] = [
    (0, MIB, 0x5a),
    (300 * MIB, MIB, 0xa5),
    (700 * MIB + 64 * 1024, 2 * MIB, 0x3c),
];

/// Data extents as (start, end) with adjacent ones merged.
fn merged(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, end) in runs {
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out
}

/// After the bookmark: a fourth region is written and the first one zeroed.
const LATER_REGION: (u64, u64, u8) = (900 * MIB, MIB, 0x77);

/// Regions widened to the 4 KiB blocks a file system (or the block index) allocates.
fn blocks_of(regions: &[(u64, u64, u8)]) -> Vec<(u64, u64)> {
    merged(
        regions
            .iter()
            .map(|&(o, l, _)| (o / 4096 * 4096, (o + l).div_ceil(4096) * 4096))
            .collect(),
    )
}

fn expected_data() -> Vec<(u64, u64)> {
    blocks_of(&REGIONS)
}

fn qemu_io(uri: &str, command: &str) {
    run_ok(
        Command::new("qemu-io").args(["-f", "raw", "-c", command, uri]),
        Duration::from_secs(60),
    );
}

/// `base:allocation` data extents from `nbdinfo --map --json` (type bit 0 = hole).
fn nbdinfo_data(uri: &str) -> Vec<(u64, u64)> {
    let out = run_ok(
        Command::new("nbdinfo").args(["--map", "--json", uri]),
        Duration::from_secs(60),
    );
    let map: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo --map JSON ({e}): {out}"));
    let extents = map.as_array().expect("extent array");
    let mut covered = 0;
    let mut data = Vec::new();
    for e in extents {
        let (offset, length, kind) = (
            e["offset"].as_u64().expect("offset"),
            e["length"].as_u64().expect("length"),
            e["type"].as_u64().expect("type"),
        );
        assert_eq!(offset, covered, "extents must be contiguous: {out}");
        covered += length;
        if kind & 1 == 0 {
            data.push((offset, offset + length));
        }
    }
    assert_eq!(
        covered, VOLUME_BYTES,
        "the map must cover the volume: {out}"
    );
    merged(data)
}

/// Data extents from `qemu-img map --output=json`.
fn qemu_img_data(uri: &str) -> Vec<(u64, u64)> {
    let out = run_ok(
        Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", uri]),
        Duration::from_secs(60),
    );
    let map: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img map JSON ({e}): {out}"));
    merged(
        map.as_array()
            .expect("map array")
            .iter()
            .filter(|e| e["data"].as_bool() == Some(true))
            .map(|e| {
                let start = e["start"].as_u64().expect("start");
                (start, start + e["length"].as_u64().expect("length"))
            })
            .collect(),
    )
}

/// The splitter's `cdp_host_read_bytes` for `vol`, scraped from its metrics endpoint.
fn host_read_bytes(metrics: &str, vol: &str) -> u64 {
    let mut stream = TcpStream::connect(metrics).unwrap_or_else(|e| panic!("{metrics}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {metrics}\r\n\r\n").expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("metrics body");
    body.lines()
        .find(|l| l.starts_with("cdp_host_read_bytes") && l.contains(&format!("\"{vol}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no cdp_host_read_bytes for {vol} in:\n{body}"))
}

#[test]
fn block_status_maps_written_regions_and_copies_read_only_data() {
    // Goal: issue 15's production evidence. Structured replies are negotiated; nbdinfo --map on
    // a 1 GiB volume with three written regions lists exactly those as data; qemu-img map
    // agrees; a full copy through NBD (qemu-img convert, which skips what block status calls
    // zero) reads under 2 % of the volume from the splitter and is byte-identical and sparse.
    // Oracle: the regions written and the production file itself (cmp).
    if !(requires("nbdinfo") && requires("qemu-img") && requires("qemu-io")) {
        return;
    }
    let volumes = [("vol0", VOLUME_BYTES)];
    let mut site = Site::create(&volumes, SiteOptions::default());
    let metrics = format!("127.0.0.1:{}", free_port());
    let splitter_toml = std::fs::read_to_string(&site.splitter_config).expect("splitter.toml");
    std::fs::write(
        &site.splitter_config,
        format!("metrics_listen = \"{metrics}\"\n{splitter_toml}"),
    )
    .expect("splitter.toml");
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    site.wait_connected(Duration::from_secs(60));
    let uri = site.nbd_uri("vol0");
    for (offset, length, pattern) in REGIONS {
        qemu_io(&uri, &format!("write -P {pattern:#x} {offset} {length}"));
    }
    site.flush("vol0");

    let info = run_ok(Command::new("nbdinfo").arg(&uri), Duration::from_secs(60));
    assert!(info.contains("using structured packets"), "{info}");
    assert!(info.contains("base:allocation"), "{info}");
    assert!(info.contains("can_df: true"), "{info}");

    let want = expected_data();
    assert_eq!(nbdinfo_data(&uri), want, "nbdinfo --map");
    assert_eq!(qemu_img_data(&uri), want, "qemu-img map");

    let before = host_read_bytes(&metrics, "vol0");
    let copy = site.root().join("copy.img");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri])
            .arg(&copy),
        Duration::from_secs(300),
    );
    let read = host_read_bytes(&metrics, "vol0") - before;
    let data: u64 = want.iter().map(|(s, e)| e - s).sum();
    assert!(
        read >= data && read * 50 < VOLUME_BYTES,
        "the copy read {read} bytes for {data} bytes of data (a full copy reads {VOLUME_BYTES})"
    );
    let production = &site.volume("vol0").production;
    let same = Command::new("cmp")
        .arg(production)
        .arg(&copy)
        .status()
        .expect("cmp");
    assert!(same.success(), "the copy differs from production");
    let allocated = std::fs::metadata(&copy).expect("copy").blocks() * 512;
    assert!(
        allocated <= 16 * MIB,
        "the copy is not sparse: {allocated} bytes allocated for {data} of data"
    );
    eprintln!(
        "qemu-img convert of a {} MiB volume with {} KiB of data read {read} bytes ({:.3} %) \
         and allocated {allocated} bytes",
        VOLUME_BYTES / MIB,
        data / 1024,
        read as f64 * 100.0 / VOLUME_BYTES as f64
    );

    // Images: the map of a point is that point's, from the block index (no data read).
    // b1 holds the three regions; then a fourth is written and the first zeroed, so the
    // image at the latest point holds regions 2, 3 and 4. Once distributed, b1 is served
    // from the undo stream's before-images (the first region's data, the fourth's zeroes).
    site.cdp_json(&["bookmark", "create", "b1", "--json"]);
    let (o, l, p) = LATER_REGION;
    qemu_io(&uri, &format!("write -P {p:#x} {o} {l}"));
    let (o, l, _) = REGIONS[0];
    qemu_io(&uri, &format!("write -z {o} {l}"));
    site.flush("vol0");
    site.cdp_json(&["bookmark", "create", "b2", "--json"]);
    let later = blocks_of(&[REGIONS[1], REGIONS[2], LATER_REGION]);
    for (point, want) in [("b1", expected_data()), ("b2", later.clone())] {
        let image = site.cdp_json(&["image", "access", "--at", point, "--json"]);
        let image_uri = site.image_uri(&image, "vol0");
        assert_eq!(
            nbdinfo_data(&image_uri),
            want,
            "nbdinfo --map of the image at {point}"
        );
        assert_eq!(
            qemu_img_data(&image_uri),
            want,
            "qemu-img map of the image at {point}"
        );
        site.cdp_json(&[
            "image",
            "release",
            image["id"].as_str().expect("id"),
            "--json",
        ]);
    }
    site.settle();
    let image = site.cdp_json(&["image", "access", "--at", "b1", "--json"]);
    let image_uri = site.image_uri(&image, "vol0");
    assert_eq!(
        nbdinfo_data(&image_uri),
        expected_data(),
        "nbdinfo --map of the image at b1 after distribution (from before-images)"
    );
    // And its bytes: a sparse copy of the image equals b1's content.
    let at_b1 = site.root().join("at-b1.img");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &image_uri])
            .arg(&at_b1),
        Duration::from_secs(300),
    );
    let same = Command::new("cmp")
        .arg(&copy)
        .arg(&at_b1)
        .status()
        .expect("cmp");
    assert!(
        same.success(),
        "the image at b1 differs from production as it was at b1"
    );
    site.cdp_json(&[
        "image",
        "release",
        image["id"].as_str().expect("id"),
        "--json",
    ]);
}

/// `nbdinfo --map=CONTEXT --json` as (start, end) ranges whose type has bit 0 set.
fn nbdinfo_bit0(uri: &str, context: &str) -> Vec<(u64, u64)> {
    let out = run_ok(
        Command::new("nbdinfo").args([&format!("--map={context}"), "--json", uri]),
        Duration::from_secs(60),
    );
    let map: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo --map JSON ({e}): {out}"));
    merged(
        map.as_array()
            .expect("extent array")
            .iter()
            .filter(|e| e["type"].as_u64().expect("type") & 1 != 0)
            .map(|e| {
                let offset = e["offset"].as_u64().expect("offset");
                (offset, offset + e["length"].as_u64().expect("length"))
            })
            .collect(),
    )
}

fn qemu_io_ok(uri: &str, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(uri);
    let out = run_ok(&mut cmd, Duration::from_secs(120));
    assert!(!out.contains("error") && !out.contains("failed"), "{out}");
}

/// The blocks written, zeroed or trimmed between b1 and b2 by `two_bookmarks`.
const CHANGED_B1_B2: [(u64, u64); 4] = [
    (9 * MIB, 9 * MIB + 64 * 1024),
    (100 * MIB, 101 * MIB),
    (500 * MIB, 501 * MIB),
    (600 * MIB, 600 * MIB + 4096),
];

/// Writes vol0, bookmarks b1, writes, zeroes and trims more, bookmarks b2; returns the
/// model of vol0 at b2.
fn two_bookmarks(site: &Site) -> Model {
    let uri = site.nbd_uri("vol0");
    let mut model = Model::zeroed(VOLUME_BYTES);
    qemu_io_ok(&uri, &["write -P 0x11 8M 2M", "write -P 0x22 100M 1M"]);
    model.fill(8 * MIB, 2 * MIB, 0x11);
    model.fill(100 * MIB, MIB, 0x22);
    site.flush("vol0");
    site.cdp_json(&["bookmark", "create", "b1", "--json"]);
    qemu_io_ok(
        &uri,
        &[
            "write -P 0x33 9M 64k",
            "write -P 0x44 500M 1M",
            "write -z -u 100M 1M",
            "write -P 0x55 600M 4k",
        ],
    );
    model.fill(9 * MIB, 64 * 1024, 0x33);
    model.fill(500 * MIB, MIB, 0x44);
    model.fill(100 * MIB, MIB, 0);
    model.fill(600 * MIB, 4096, 0x55);
    site.flush("vol0");
    site.cdp_json(&["bookmark", "create", "b2", "--json"]);

    model
}

#[test]
fn image_maps_its_point_and_the_blocks_changed_since_a_bookmark() {
    // Goal: an image at bookmark b2 reports base:allocation as its point holds it, and
    // `cdp:changed:b1` reports exactly the blocks written, zeroed or trimmed between b1 and
    // b2, through nbdinfo --map and qemu-img map (x-dirty-bitmap); a copy of the image
    // equals the model at b2. Method: qemu-io writes before b1 and between b1 and b2, a
    // model of the volume at b2, maps compared with the written lists.
    if reference_mode() || !requires("nbdinfo") || !requires("qemu-img") || !requires("qemu-io") {
        return;
    }
    let site = Site::start(&[("vol0", VOLUME_BYTES)]);
    let model = two_bookmarks(&site);

    let image = site.cdp_json(&["image", "access", "--at", "b2", "--json"]);
    let image_uri = site.image_uri(&image, "vol0");
    let info = run_ok(
        Command::new("nbdinfo").arg(&image_uri),
        Duration::from_secs(60),
    );
    assert!(info.contains("using structured packets"), "{info}");

    // base:allocation: what holds data at b2, and nothing else.
    let data = nbdinfo_data(&image_uri);
    let want_data = vec![
        (8 * MIB, 10 * MIB),
        (500 * MIB, 501 * MIB),
        (600 * MIB, 600 * MIB + 4096),
    ];
    eprintln!("image at b2, data: {data:x?}");
    assert_eq!(data, want_data, "base:allocation of the image at b2");
    assert_eq!(
        qemu_img_data(&image_uri),
        data,
        "qemu-img map disagrees with nbdinfo"
    );

    // cdp:changed:b1: every block touched between b1 and b2, zeroed ones included.
    let want_changed = CHANGED_B1_B2.to_vec();
    let changed = nbdinfo_bit0(&image_uri, "cdp:changed:b1");
    assert_eq!(changed, want_changed, "cdp:changed:b1 from nbdinfo");

    // qemu's x-dirty-bitmap reads the context's bit 0 as "not data".
    let nbd = image["nbd"].as_str().expect("nbd endpoint");
    let socket = nbd.strip_prefix("unix:").expect("unix image socket");
    let export = image["exports"][0]["export"].as_str().expect("export");
    let out = run_ok(
        Command::new("qemu-img").args([
            "map",
            "--output=json",
            "--image-opts",
            &format!(
                "driver=nbd,server.type=unix,server.path={socket},export={export},\
                 x-dirty-bitmap=cdp:changed:b1"
            ),
        ]),
        Duration::from_secs(60),
    );
    let map: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map JSON");
    let dirty = merged(
        map.as_array()
            .expect("map")
            .iter()
            .filter(|e| e["data"].as_bool() == Some(false))
            .map(|e| {
                let start = e["start"].as_u64().unwrap();
                (start, start + e["length"].as_u64().unwrap())
            })
            .collect(),
    );
    assert_eq!(
        dirty, want_changed,
        "qemu-img map x-dirty-bitmap=cdp:changed:b1"
    );

    // A context naming no point is not offered; the connection still works.
    let refused = run(
        Command::new("nbdinfo").args(["--map=cdp:changed:no-such-bookmark", &image_uri]),
        Duration::from_secs(60),
    );
    assert!(!refused.status.success(), "an unknown point was offered");

    // The image copied through structured reads equals the model at b2, and stays sparse.
    let copy = site.root().join("b2.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &image_uri])
            .arg(&copy),
        Duration::from_secs(120),
    );
    model.check_file("image at b2", &copy);
    let allocated = std::fs::metadata(&copy).expect("copy").blocks() * 512;
    assert!(allocated <= 8 * MIB, "copy allocates {allocated} bytes");
    release_image(&image, |a| site.cdp_json(a));
    let mut site = site;
    site.assert_alive();
}

/// Data extents of a raw file, as `qemu-img map` finds them (SEEK_DATA).
fn file_data(path: &std::path::Path) -> Vec<(u64, u64)> {
    let out = run_ok(
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "raw"])
            .arg(path),
        Duration::from_secs(60),
    );
    let map: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map JSON");
    merged(
        map.as_array()
            .expect("map")
            .iter()
            .filter(|e| e["data"].as_bool() == Some(true))
            .map(|e| {
                let start = e["start"].as_u64().unwrap();
                (start, start + e["length"].as_u64().unwrap())
            })
            .collect(),
    )
}

#[test]
fn incremental_export_between_bookmarks_patches_a_full_export_into_the_later_one() {
    // Goal: `cdp image export --at b2 --changed-since b1` writes exactly the blocks changed
    // between the bookmarks (zeroed ones included), and a full export at b1 patched with
    // them equals a full export at b2. Method: the two_bookmarks workload; the incremental
    // file's allocated extents (qemu-img map) compared with the written list, copied onto
    // the b1 export, then `qemu-img compare` with the b2 export and the model.
    if reference_mode() || !requires("qemu-img") || !requires("qemu-io") {
        return;
    }
    let site = Site::start(&[("vol0", VOLUME_BYTES)]);
    let model = two_bookmarks(&site);
    let root = site.root().to_path_buf();
    let (full_b1, full_b2, incremental) = (
        root.join("b1.img"),
        root.join("b2.img"),
        root.join("b1-b2.img"),
    );
    for (at, to) in [("b1", &full_b1), ("b2", &full_b2)] {
        site.cdp_json(&[
            "image",
            "export",
            "--at",
            at,
            "--to",
            to.to_str().unwrap(),
            "--json",
        ]);
    }
    let report = site.cdp_json(&[
        "image",
        "export",
        "--at",
        "b2",
        "--changed-since",
        "b1",
        "--to",
        incremental.to_str().unwrap(),
        "--json",
    ]);
    let want_bytes: u64 = CHANGED_B1_B2.iter().map(|(s, e)| e - s).sum();
    assert_eq!(
        report["exported"][0]["data_bytes"].as_u64(),
        Some(want_bytes),
        "{report:#}"
    );
    assert_eq!(
        file_data(&incremental),
        CHANGED_B1_B2.to_vec(),
        "incremental extents"
    );

    // Raw patching: the incremental's allocated extents over the b1 export.
    let source = std::fs::File::open(&incremental).expect("incremental");
    let target = std::fs::OpenOptions::new()
        .write(true)
        .open(&full_b1)
        .expect("b1 export");
    for (start, end) in file_data(&incremental) {
        let mut buf = vec![0u8; (end - start) as usize];
        source
            .read_exact_at(&mut buf, start)
            .expect("read incremental");
        target.write_all_at(&buf, start).expect("patch b1");
    }
    drop(target);
    model.check_file("b1 export patched with b1..b2", &full_b1);

    // --patch does the same in place: a second b1 export becomes the b2 one.
    let patched = root.join("b1-patched.img");
    site.cdp_json(&[
        "image",
        "export",
        "--at",
        "b1",
        "--to",
        patched.to_str().unwrap(),
        "--json",
    ]);
    let report = site.cdp_json(&[
        "image",
        "export",
        "--at",
        "b2",
        "--changed-since",
        "b1",
        "--patch",
        "--to",
        patched.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(
        report["exported"][0]["data_bytes"].as_u64(),
        Some(want_bytes),
        "{report:#}"
    );
    model.check_file("b1 export patched by --patch", &patched);
    // A patch needs an existing export of the volume's size.
    let missing = root.join("missing.img");
    let out = site
        .cdp(&[
            "image",
            "export",
            "--at",
            "b2",
            "--changed-since",
            "b1",
            "--patch",
            "--to",
            missing.to_str().unwrap(),
        ])
        .output()
        .expect("cdp");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--patch needs an existing export"),
        "{stderr}"
    );
    assert!(!missing.exists());
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&full_b1)
            .arg(&full_b2),
        Duration::from_secs(120),
    );
    let mut site = site;
    site.assert_alive();
}
