//! Malformed NBD input against the splitter, one class per test: each gets a clear error or a
//! clean disconnect, never damages production, and leaves the server serving new clients.

mod common;

use common::*;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

/// Runs one malformed.py case against vol0 and requires exit 0.
fn py(site: &Site, case: &str, model_path: &std::path::Path) {
    let out = run(
        python("malformed.py")
            .arg(case)
            .arg(&site.nbd_sock)
            .arg("vol0")
            .arg(model_path)
            .env(
                "NBD_STRUCTURED_OK",
                if reference_mode() { "1" } else { "0" },
            ),
        Duration::from_secs(120),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprint!("{text}");
    assert!(
        out.status.success(),
        "malformed.py {case} ({}):\n{text}{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        site.logs()
    );
}

/// Starts a site, fills vol0 with a seeded pattern through NBD, runs one malformed.py case, then
/// checks that production still equals the pattern, that a new client reads it back, that both
/// processes live, and that the replica equals production.
fn malformed_case(case: &str) {
    if !requires_condition(std::path::Path::new(PYTHON).exists(), "no /usr/bin/python3")
        || !requires("qemu-img")
        || !requires("qemu-io")
    {
        return;
    }
    let mut site = Site::start(&[("vol0", SIZE)]);
    let model_path = site.root().join("model.bin");
    let data = pattern(0x6d61_6c66 ^ case.len() as u64, SIZE as usize);
    std::fs::write(&model_path, &data).unwrap();
    let mut model = Model::zeroed(SIZE);
    model.write(0, &data);

    py(&site, "fill", &model_path);
    model.check_file("production after fill", &site.volume("vol0").production);
    py(&site, case, &model_path);
    site.assert_alive();
    model.check_file(
        &format!("production after {case}"),
        &site.volume("vol0").production,
    );
    py(&site, "probe", &model_path);
    site.settle();
    site.assert_replica_equals_production("vol0");
}

#[test]
fn malformed_out_of_range() {
    // Goal: requests beyond the end of the export (or overflowing 64 bits) get EINVAL/ENOSPC and
    // the connection stays usable. Method: raw requests, then valid reads on the same connection.
    malformed_case("out_of_range");
}

#[test]
fn malformed_unknown_command() {
    // Goal: an unknown command type gets an error reply, not a crash or a hang. Method: send types
    // 0x42 and 0xffff, then a valid read on the same connection.
    malformed_case("unknown_command");
}

#[test]
fn malformed_unknown_flag() {
    // Goal: unknown or unnegotiated command flags are refused with EINVAL and nothing is written.
    // Method: READ and WRITE with undefined flag bits, READ with DF; then a valid read.
    malformed_case("unknown_flag");
}

#[test]
fn malformed_oversize_request() {
    // Goal: requests over the 32 MiB maximum are refused (a read with an error; a write with an
    // error or a disconnect) and never applied. Method: 32 MiB + 4 KiB READ and WRITE.
    malformed_case("oversize");
}

#[test]
fn malformed_garbage_request() {
    // Goal: bytes that are not a request end that connection cleanly. Method: 4 KiB of random
    // bytes after a good handshake; expect EOF without a success reply.
    malformed_case("garbage_request");
}

#[test]
fn malformed_garbage_handshake() {
    // Goal: garbage in the handshake (HTTP instead of client flags, a bad option magic, a huge
    // option length) is refused without allocating or crashing. Method: three raw connections.
    malformed_case("garbage_handshake");
}

#[test]
fn malformed_bad_options() {
    // Goal: unknown options, STRUCTURED_REPLY and unknown exports get error replies and the
    // handshake continues; LIST, GO, ABORT and EXPORT_NAME work. Method: one raw handshake each.
    malformed_case("bad_options");
}

#[test]
fn malformed_truncated_input() {
    // Goal: a connection that closes mid-payload, mid-header or mid-handshake applies nothing.
    // Method: half a 1 MiB WRITE payload, a 10-byte header, half an option; then compare.
    malformed_case("truncated");
}

#[test]
fn malformed_slow_handshake() {
    // Goal: a client that connects and stays silent (as the kernel client in nbd-guest does) is
    // still served. Method: connect, wait 5 s, then handshake and read.
    malformed_case("slow_handshake");
}
