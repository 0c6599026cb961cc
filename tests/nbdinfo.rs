//! nbdinfo against the splitter: export size and transmission flags of each export, and the
//! export list of a multi-volume site.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn nbdinfo_json(args: &[&str]) -> serde_json::Value {
    let out = run_ok(
        Command::new("nbdinfo").arg("--json").args(args),
        Duration::from_secs(60),
    );
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("nbdinfo printed invalid JSON ({e}):\n{out}"))
}

#[test]
fn nbdinfo_shows_size_flags_and_exports() {
    // Goal: each export advertises its configured size and the flags DESIGN promises (flush, FUA,
    // trim, write zeroes, multi-conn, writable), and NBD_OPT_LIST names every volume. Method:
    // parse `nbdinfo --json` per export and `nbdinfo --list --json`.
    if !requires("nbdinfo") {
        return;
    }
    let volumes = [
        ("vol0", 64 * MIB),
        ("vol1", 32 * MIB),
        ("data-2", 4 * MIB + 4096),
    ];
    let site = Site::start(&volumes);
    for &(name, size) in &volumes {
        let info = nbdinfo_json(&[&site.nbd_uri(name)]);
        let exports = info["exports"].as_array().expect("exports array");
        assert_eq!(exports.len(), 1, "{name}: {info:#}");
        let e = &exports[0];
        assert_eq!(e["export-size"].as_u64(), Some(size), "{name} size: {e:#}");
        for (flag, want) in [
            ("can_flush", true),
            ("can_fua", true),
            ("can_trim", true),
            ("can_zero", true),
            ("can_multi_conn", true),
            ("is_read_only", false),
        ] {
            assert_eq!(e[flag].as_bool(), Some(want), "{name} {flag}: {e:#}");
        }
        // The server's block size limit, when advertised, must allow 32 MiB requests.
        if let Some(max) = e["block_size_maximum"].as_u64() {
            assert!(max >= 32 * MIB, "{name}: block_size_maximum {max}");
        }
    }

    let list_uri = format!("nbd+unix:///?socket={}", site.nbd_sock.display());
    let list = nbdinfo_json(&["--list", &list_uri]);
    let mut names: Vec<String> = list["exports"]
        .as_array()
        .expect("exports array")
        .iter()
        .map(|e| e["export-name"].as_str().expect("export-name").to_string())
        .collect();
    names.sort();
    let mut want: Vec<String> = volumes.iter().map(|v| v.0.to_string()).collect();
    want.sort();
    assert_eq!(names, want, "nbdinfo --list: {list:#}");
    for e in list["exports"].as_array().unwrap() {
        let name = e["export-name"].as_str().unwrap();
        let size = volumes.iter().find(|v| v.0 == name).unwrap().1;
        assert_eq!(
            e["export-size"].as_u64(),
            Some(size),
            "--list {name}: {e:#}"
        );
    }

    // An unknown export name is refused instead of serving something else.
    let out = run(
        Command::new("nbdinfo").arg(format!(
            "nbd+unix:///no-such-volume?socket={}",
            site.nbd_sock.display()
        )),
        Duration::from_secs(60),
    );
    assert!(!out.status.success(), "nbdinfo accepted an unknown export");
    let mut site = site;
    site.assert_alive();
}
