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
            .arg(model_path),
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

#[test]
fn malformed_odd_requests() {
    // Goal: requests at the protocol's edges (zero lengths, FUA on READ, FLUSH with a range,
    // CACHE) get exactly one reply and change nothing; BLOCK_STATUS without a meta context,
    // unadvertised FAST_ZERO and NO_HOLE on WRITE are refused. Method: raw requests, then a
    // read of the whole export on the same connection.
    malformed_case("odd_requests");
}

#[test]
fn malformed_connection_flood() {
    // Goal: 64 silent connections plus 16 busy ones neither crash the splitter nor lock out a
    // new client. Method: open them all from one script, read on each, probe with a new client.
    malformed_case("connection_flood");
}

/// Sends `bytes` on a fresh connection to `sock` and waits (bounded) for the peer to close it.
fn send_garbage(sock: &std::path::Path, bytes: &[u8]) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .unwrap_or_else(|e| panic!("connect {sock:?}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // The peer may close before it has read everything; a reset is a fine answer.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut sink = Vec::new();
    match s.read_to_end(&mut sink) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{sock:?} neither answered nor closed after garbage: {e}"),
    }
}

#[test]
fn malformed_split_link_and_control_garbage() {
    // Goal: DESIGN rule 5 on the appliance's other inputs: garbage on the split link or the
    // control socket closes that connection only; the appliance keeps journaling the real
    // splitter's writes and answering status. Method: random bytes and a truncated frame-sized
    // blob on each socket, then qemu-io writes, status, and a replica comparison.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    let mut site = Site::start(&[("vol0", SIZE)]);
    let garbage = pattern(0x6761_7262, 256 * 1024);
    send_garbage(&site.link_sock, &garbage);
    send_garbage(&site.link_sock, &garbage[..7]);
    send_garbage(&site.control_sock, &garbage[..4096]);
    send_garbage(&site.control_sock, b"{\"not\": \"a request\"}\n");
    send_garbage(&site.control_sock, &[b'{'; 100_000]);
    site.assert_alive();
    run_ok(
        std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x42 0 1M", "-c", "flush"])
            .arg(site.nbd_uri("vol0")),
        Duration::from_secs(60),
    );
    let mut model = Model::zeroed(SIZE);
    model.fill(0, MIB, 0x42);
    model.check_file("production", &site.volume("vol0").production);
    site.settle();
    site.assert_replica_equals_production("vol0");
    site.assert_alive();
}
