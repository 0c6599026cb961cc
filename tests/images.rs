//! Point-in-time images end to end through `cdp image access|list|release`: ext4 files at
//! bookmarks read back through nbdfuse and a loop device while fio writes another volume of
//! the group; writable images whose writes vanish at release; logged access that rolls the
//! replica back and forward while the host keeps writing.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::cli::{copy_export, release_image};
use common::mount::{check_files, files, FuseLoop};
use common::*;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(120);

fn fs_requirements() -> bool {
    requires("nbdfuse")
        && requires("fusermount3")
        && requires("losetup")
        && requires("mkfs.ext4")
        && requires("e2fsck")
        && requires("fsfreeze")
        && requires("fio")
        && requires_condition(is_root(), "images_ext4 needs root (mount, losetup)")
        && requires_condition(
            Path::new("/dev/fuse").exists(),
            "images_ext4 needs /dev/fuse",
        )
}

/// Takes an application-consistent bookmark of the filesystem mounted at `fs`.
fn frozen_bookmark(site: &Site, name: &str, fs: &Path) -> serde_json::Value {
    let fs = fs.display();
    site.cdp_json(&[
        "bookmark",
        "create",
        name,
        "--quiesce",
        &format!("fsfreeze -f {fs}"),
        "--thaw",
        &format!("fsfreeze -u {fs}"),
        "--json",
    ])
}

fn write_files(root: &Path, files: &BTreeMap<String, Vec<u8>>) {
    for (name, content) in files {
        let path = root.join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, content).expect("write file");
    }
}

#[test]
fn ext4_bookmarks_open_as_images_while_fio_writes() {
    // Goal: an image at a bookmark is exactly the filesystem of that moment, while the host
    // goes on writing. Method: ext4 on vol0 (nbdfuse + loop); files, frozen bookmark b1;
    // delete, overwrite and add files, bookmark b2; then delete everything. A fio job writes
    // vol1 of the same group throughout. Open b1 and b2 at once as read-only images, fsck and
    // mount each, and compare every file with what was written before its bookmark.
    if reference_mode() || !fs_requirements() {
        return;
    }
    let seed = seed("images_ext4");
    let site = Site::start(&[("vol0", 128 * MIB), ("vol1", 256 * MIB)]);
    let root = site.root().to_path_buf();

    let fio_job = root.join("background.fio");
    std::fs::write(
        &fio_job,
        format!(
            "[background]\nioengine=nbd\nuri={}\nrw=randwrite\nbsrange=4k-128k\niodepth=8\n\
             size=256M\ntime_based=1\nruntime=40\n",
            site.nbd_uri("vol1")
        ),
    )
    .expect("fio job");
    let mut fio = Command::new("fio")
        .arg(&fio_job)
        .current_dir(&root)
        .stdout(Stdio::null())
        .spawn()
        .expect("start fio");

    let fs = root.join("fs");
    let mut production = FuseLoop::attach(&site.nbd_uri("vol0"), &root.join("prod"), false);
    let dev = production.dev.clone();
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &dev]), T);
    production.mount(&fs, "discard");

    let mut state: BTreeMap<String, Vec<u8>> = files(seed).into_iter().collect();
    write_files(&fs, &state);
    let b1 = frozen_bookmark(&site, "b1", &fs);
    let at_b1 = state.clone();

    let mut rng = SplitMix64(seed ^ 0xb2);
    let names: Vec<String> = state.keys().cloned().collect();
    for (i, name) in names.iter().enumerate() {
        match i % 3 {
            0 => {
                std::fs::remove_file(fs.join(name)).expect("delete");
                state.remove(name);
            }
            1 => {
                let content = pattern(rng.next_u64(), rng.below(2 * MIB) as usize);
                state.insert(name.clone(), content);
            }
            _ => {}
        }
    }
    for i in 0..6 {
        let content = pattern(rng.next_u64(), rng.below(MIB) as usize + 1);
        state.insert(format!("new/after-b1-{i}.bin"), content);
    }
    write_files(&fs, &state);
    let b2 = frozen_bookmark(&site, "b2", &fs);
    assert_eq!(b2["consistency"], "application", "{b2}");
    let at_b2 = state.clone();

    // Production moves on: everything deleted and discarded.
    for entry in std::fs::read_dir(&fs).expect("ls") {
        let path = entry.expect("entry").path();
        if path.file_name().is_some_and(|n| n != "lost+found") {
            std::fs::remove_dir_all(&path).expect("rm");
        }
    }
    run_ok(Command::new("fstrim").arg(&fs), T);
    run_ok(Command::new("sync").arg("-f").arg(&fs), T);

    let images: Vec<serde_json::Value> = ["b1", "b2"]
        .iter()
        .map(|b| site.cdp_json(&["image", "access", "--at", b, "--json"]))
        .collect();
    assert_eq!(images[0]["seq"], b1["seq"], "{}", images[0]);
    assert_eq!(images[1]["seq"], b2["seq"], "{}", images[1]);
    let listed = site.cdp_json(&["image", "list", "--json"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");

    for (image, expected) in images.iter().zip([&at_b1, &at_b2]) {
        let id = image["id"].as_str().expect("id");
        let work = root.join(id);
        let mut stack = FuseLoop::attach(&site.image_uri(image, "vol0"), &work, true);
        let out = run(Command::new("e2fsck").args(["-fn", &stack.dev]), T);
        assert!(
            out.status.success(),
            "e2fsck -fn of image {id}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mnt = work.join("mnt");
        stack.mount(&mnt, "ro,noload");
        let expected: Vec<(String, Vec<u8>)> = expected
            .iter()
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect();
        check_files(&mnt, &expected);
        for name in at_b1.keys().chain(at_b2.keys()) {
            let want = expected.iter().any(|(n, _)| n == name);
            assert_eq!(mnt.join(name).exists(), want, "image {id}: {name}");
        }
        stack.detach();
    }
    for image in &images {
        let id = image["id"].as_str().expect("id");
        site.cdp_json(&["image", "release", id, "--json"]);
    }
    let listed = site.cdp_json(&["image", "list", "--json"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");

    production.detach();
    let status = wait_child(&mut fio, Duration::from_secs(120)).expect("fio did not finish");
    assert!(status.success(), "fio exited with {status}");
    site.settle();
    site.assert_all_replicas_equal_production();
}

fn qemu_io(uri: &str, commands: &[String]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for command in commands {
        c.arg("-c").arg(command);
    }
    let out = run_ok(c.arg(uri), T);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed"),
        "qemu-io {commands:?}: {out}"
    );
    out
}

/// Copies a whole export into a file with qemu-img.
#[test]
fn writable_and_logged_images() {
    // Goal: writes to an image stay in its scratch area and vanish at release; logged access
    // physically rolls the replica to the point while the host keeps writing, and release
    // carries it forward to production. Method: a byte model of vol0 at each bookmark; the
    // image read whole with qemu-img, the replica file read directly, production compared.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    const SIZE: u64 = 64 * MIB;
    let site = Site::start(&[("vol0", SIZE)]);
    let root = site.root().to_path_buf();
    let uri = site.nbd_uri("vol0");
    let mut model = Model::zeroed(SIZE);
    qemu_io(
        &uri,
        &["write -P 0x11 0 8M".into(), "write -P 0x22 1M 64k".into()],
    );
    model.fill(0, 8 * MIB, 0x11);
    model.fill(MIB, 64 * 1024, 0x22);
    site.flush("vol0");
    site.cdp_json(&["bookmark", "create", "b1", "--json"]);
    let at_b1 = model.clone();
    qemu_io(
        &uri,
        &[
            "write -P 0x33 0 2M".into(),
            "write -z 4M 1M".into(),
            "write -P 0x44 513 5000".into(),
        ],
    );
    model.fill(0, 2 * MIB, 0x33);
    model.fill(4 * MIB, MIB, 0);
    model.fill(513, 5000, 0x44);
    site.flush("vol0");

    // Writable: the image takes writes, production does not see them.
    let image = site.cdp_json(&["image", "access", "--at", "b1", "--writable", "--json"]);
    assert_eq!(image["writable"], true, "{image}");
    let image_uri = site.image_uri(&image, "vol0");
    qemu_io(
        &image_uri,
        &["write -P 0x55 100 1000".into(), "write -z 6M 64k".into()],
    );
    let mut written = at_b1.clone();
    written.fill(100, 1000, 0x55);
    written.fill(6 * MIB, 64 * 1024, 0);
    copy_export(&image_uri, &root.join("writable.img"));
    written.check_file(
        "writable image after its own writes",
        &root.join("writable.img"),
    );
    model.check_file(
        "production while a writable image is open",
        &site.volume("vol0").production,
    );
    release_image(&image, |a| site.cdp_json(a));
    let again = site.cdp_json(&["image", "access", "--at", "b1", "--json"]);
    copy_export(&site.image_uri(&again, "vol0"), &root.join("again.img"));
    at_b1.check_file(
        "image at b1 after the writable one was released",
        &root.join("again.img"),
    );
    release_image(&again, |a| site.cdp_json(a));

    // Logged: the replica itself goes back to b1; the host keeps writing meanwhile.
    site.settle();
    let logged = site.cdp_json(&["image", "access", "--at", "b1", "--logged", "--json"]);
    assert_eq!(logged["mode"], "logged", "{logged}");
    assert_eq!(logged["state"], "ready", "{logged}");
    let status = site.status();
    assert_eq!(
        status["groups"][0]["replica_held_at"], logged["seq"],
        "status while logged: {status}"
    );
    at_b1.check_file("replica held at b1", &site.volume("vol0").replica);
    qemu_io(&uri, &["write -P 0x66 10M 1M".into()]);
    model.fill(10 * MIB, MIB, 0x66);
    site.flush("vol0");
    copy_export(&site.image_uri(&logged, "vol0"), &root.join("logged.img"));
    at_b1.check_file(
        "logged image while the host writes",
        &root.join("logged.img"),
    );
    at_b1.check_file("replica still held", &site.volume("vol0").replica);
    release_image(&logged, |a| site.cdp_json(a));
    site.settle();
    model.check_file("production", &site.volume("vol0").production);
    site.assert_replica_equals_production("vol0");
}

#[test]
fn images_stay_exact_across_appliance_crashes() {
    // Goal: rule 4 for images: an appliance killed at any instant (while it distributes,
    // captures before-images, or appends) never presents a corrupted image afterwards, and
    // history from before each crash stays exact. Method: rounds of seeded random writes with
    // a bookmark and a model snapshot per round; then more writes while the appliance is
    // SIGKILLed after a seeded delay (the host goes on in marking mode); restart, resync, and
    // read every bookmark so far as an image and compare it with its snapshot.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    const SIZE: u64 = 32 * MIB;
    let seed = seed("images_crash");
    let mut rng = SplitMix64(seed);
    let mut site = Site::create(&[("vol0", SIZE)], SiteOptions::default());
    // Distribution at once, so kills land while it captures and applies.
    let text = std::fs::read_to_string(&site.appliance_config).expect("config");
    std::fs::write(
        &site.appliance_config,
        format!("distribution_delay_max_s = 0\njournal_segment_bytes = 1048576\n{text}"),
    )
    .expect("config");
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    let uri = site.nbd_uri("vol0");
    let mut model = Model::zeroed(SIZE);
    let writes = |model: &mut Model, rng: &mut SplitMix64, n: u32| -> Vec<String> {
        (0..n)
            .map(|_| {
                let len = 4096 * (1 + rng.below(32));
                let offset = rng.below((SIZE - len) / 512) * 512;
                let byte = (1 + rng.below(254)) as u8;
                model.fill(offset, len, byte);
                format!("write -P {byte:#x} {offset} {len}")
            })
            .collect()
    };
    let mut points: Vec<(String, Model)> = Vec::new();
    for round in 0..4 {
        let mut commands = writes(&mut model, &mut rng, 40);
        commands.push("flush".into());
        qemu_io(&uri, &commands);
        let name = format!("r{round}");
        site.cdp_json(&["bookmark", "create", &name, "--json"]);
        points.push((name.clone(), model.clone()));
        // A writable image open at the crash: its scratch file must not outlive it.
        let open = site.cdp_json(&["image", "access", "--at", &name, "--writable", "--json"]);
        qemu_io(
            &site.image_uri(&open, "vol0"),
            &["write -P 0x99 0 64k".into()],
        );

        let mut commands = writes(&mut model, &mut rng, 60);
        commands.push("flush".into());
        let mut writer = Command::new("qemu-io");
        writer.args(["-f", "raw"]);
        for c in &commands {
            writer.arg("-c").arg(c);
        }
        let mut writer = writer
            .arg(&uri)
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-io");
        // The seeded delay is the stimulus (where the kill lands), not a wait for a condition.
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        site.kill_appliance();
        let status = wait_child(&mut writer, T).expect("writer hung");
        assert!(
            status.success(),
            "host writes failed while the appliance was down"
        );
        site.start_role(Role::Appliance);
        site.settle();
        let scratch = site.root().join("appliance/scratch");
        let left: Vec<_> = std::fs::read_dir(&scratch)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "scratch files survived the crash: {left:?}"
        );
        for (name, snapshot) in &points {
            let image = site.cdp_json(&["image", "access", "--at", name, "--json"]);
            let file = site.root().join(format!("{name}-{round}.img"));
            copy_export(&site.image_uri(&image, "vol0"), &file);
            snapshot.check_file(&format!("round {round}: image at {name}"), &file);
            release_image(&image, |a| site.cdp_json(a));
        }
    }
    model.check_file("production", &site.volume("vol0").production);
    site.assert_replica_equals_production("vol0");
}
