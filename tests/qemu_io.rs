//! qemu-io through the splitter: patterned, unaligned, FUA, zero and discard writes, checked by
//! read-back, against a model of the production file, and against the replica.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// One qemu-io write-side command and its effect on the model.
enum Op {
    Pattern { byte: u8, offset: u64, len: u64 },
    PatternFua { byte: u8, offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
    ZeroUnmap { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
}

impl Op {
    fn command(&self) -> String {
        match *self {
            Op::Pattern { byte, offset, len } => format!("write -P {byte:#x} {offset} {len}"),
            Op::PatternFua { byte, offset, len } => format!("write -f -P {byte:#x} {offset} {len}"),
            Op::Zero { offset, len } => format!("write -z {offset} {len}"),
            Op::ZeroUnmap { offset, len } => format!("write -z -u {offset} {len}"),
            Op::Discard { offset, len } => format!("discard {offset} {len}"),
        }
    }

    fn apply(&self, model: &mut Model) {
        match *self {
            Op::Pattern { byte, offset, len } | Op::PatternFua { byte, offset, len } => {
                model.fill(offset, len, byte)
            }
            Op::Zero { offset, len } | Op::ZeroUnmap { offset, len } => model.fill(offset, len, 0),
            Op::Discard { offset, len } => model.discard(offset, len),
        }
    }
}

fn qemu_io(uri: &str, commands: &[String]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(uri);
    let out = run_ok(&mut cmd, Duration::from_secs(120));
    // qemu-io reports a failed pattern check or I/O error on stdout, with exit status 0 in some
    // versions, so the text is checked too.
    for bad in ["Pattern verification failed", "error", "failed"] {
        assert!(
            !out.contains(bad),
            "qemu-io reported `{bad}` for {commands:?}:\n{out}"
        );
    }
    out
}

#[test]
fn qemu_io_writes_reads_and_replicates() {
    // Goal: every kind of write qemu-io can send lands byte-exact in production and in the
    // replica. Method: issue writes over one NBD connection, read them back through NBD with
    // pattern checks, compare the production file with a model, then wait for distribution and
    // compare the replica with production.
    if !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    let site = Site::start(&[("vol0", SIZE)]);
    let uri = site.nbd_uri("vol0");

    let ops = [
        Op::Pattern {
            byte: 0x11,
            offset: 0,
            len: 64 * 1024,
        },
        // Unaligned start and length inside one 4 KiB block.
        Op::Pattern {
            byte: 0x22,
            offset: 1000,
            len: 3000,
        },
        // Unaligned, crossing several blocks and overlapping the first write.
        Op::Pattern {
            byte: 0x33,
            offset: 65_535,
            len: 131_073,
        },
        Op::Pattern {
            byte: 0x44,
            offset: MIB,
            len: 4 * MIB,
        },
        // Exactly the 32 MiB maximum request size.
        Op::Pattern {
            byte: 0x55,
            offset: 16 * MIB,
            len: 32 * MIB,
        },
        // Zeroes over data, with and without permission to punch a hole.
        Op::Zero {
            offset: 20 * MIB,
            len: MIB,
        },
        Op::ZeroUnmap {
            offset: 22 * MIB + 512,
            len: MIB + 1024,
        },
        Op::Discard {
            offset: 30 * MIB,
            len: 2 * MIB,
        },
        Op::Discard {
            offset: 34 * MIB + 4096,
            len: 3 * 4096,
        },
        Op::PatternFua {
            byte: 0x66,
            offset: 40 * MIB + 7,
            len: 4096,
        },
        // Overwrite part of a discarded range: that part is defined again.
        Op::Pattern {
            byte: 0x77,
            offset: 31 * MIB,
            len: 8192,
        },
        // The last bytes of the device.
        Op::Pattern {
            byte: 0x88,
            offset: SIZE - 100,
            len: 100,
        },
        Op::Pattern {
            byte: 0x99,
            offset: 60 * MIB + 1,
            len: 1,
        },
    ];
    let mut model = Model::zeroed(SIZE);
    let mut commands: Vec<String> = ops.iter().map(Op::command).collect();
    commands.push("flush".to_string());
    qemu_io(&uri, &commands);
    for op in &ops {
        op.apply(&mut model);
    }

    // Read back through NBD: every defined byte of the model, as runs of equal bytes.
    let mut reads = Vec::new();
    let mut pos = 0u64;
    let bytes = &model.bytes;
    while pos < SIZE {
        let byte = bytes[pos as usize];
        let mut end = pos + 1;
        while end < SIZE && bytes[end as usize] == byte {
            end += 1;
        }
        reads.push((byte, pos, end - pos));
        pos = end;
    }
    // Discarded ranges are excluded: their content is unspecified.
    let discarded = [(30 * MIB, 32 * MIB), (34 * MIB + 4096, 34 * MIB + 4 * 4096)];
    let mut read_commands = Vec::new();
    for (byte, offset, len) in reads {
        let mut pieces = vec![(offset, offset + len)];
        for &(a, b) in &discarded {
            pieces = pieces
                .into_iter()
                .flat_map(|(s, e)| {
                    if e <= a || s >= b {
                        vec![(s, e)]
                    } else {
                        let mut v = Vec::new();
                        if s < a {
                            v.push((s, a));
                        }
                        if e > b {
                            v.push((b, e));
                        }
                        v
                    }
                })
                .collect();
        }
        for (s, e) in pieces {
            // Keep each read within the 32 MiB request limit.
            let mut o = s;
            while o < e {
                let n = (e - o).min(16 * MIB);
                read_commands.push(format!("read -P {byte:#x} {o} {n}"));
                o += n;
            }
        }
    }
    let out = qemu_io(&uri, &read_commands);
    assert_eq!(
        out.matches("read ").count(),
        read_commands.len(),
        "qemu-io did not report every read:\n{out}"
    );

    model.check_file("production vol0", &site.volume("vol0").production);
    site.settle();
    site.assert_replica_equals_production("vol0");
}

#[test]
fn sigterm_stops_both_processes_cleanly() {
    // Goal: SIGTERM stops the splitter and the appliance promptly and with a normal exit, after
    // acknowledged writes. Method: write and flush with qemu-io, send SIGTERM to each process,
    // require exit (not death by signal) within 10 s, then restart both and read the data back.
    if !requires("qemu-io") || reference_mode() {
        return;
    }
    let mut site = Site::start(&[("vol0", 8 * MIB)]);
    let uri = site.nbd_uri("vol0");
    qemu_io(&uri, &["write -P 0xab 4096 65536".into(), "flush".into()]);
    for role in [Role::Splitter, Role::Appliance] {
        let status = site.terminate(role, Duration::from_secs(10));
        assert!(
            status.code().is_some(),
            "{role:?} died by a signal on SIGTERM ({status})\n{}",
            site.logs()
        );
    }
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    qemu_io(&uri, &["read -P 0xab 4096 65536".into()]);
    let mut model = Model::zeroed(8 * MIB);
    model.fill(4096, 65536, 0xab);
    model.check_file("production vol0", &site.volume("vol0").production);
    site.settle();
    site.assert_replica_equals_production("vol0");
}
