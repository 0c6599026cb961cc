//! One write order across the volumes of a group: a write acknowledged on one volume before
//! a write is sent on another precedes it in the group's journal, and every image of the
//! group shows exactly the writes journaled up to its point (DESIGN rules 2 and 3).

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;

#[test]
fn causal_writes_across_three_volumes_keep_their_order_in_the_journal() {
    // Goal: as a database writes its log and then its data, a write issued only after another
    // volume's write was acknowledged must follow it in the group's single journal, so no
    // image of the group can show the later write without the earlier one. Method: three
    // volumes in one group; three threads each run a causal chain (write on volume k, wait for
    // the acknowledgement, then write on volume k+1, ...), interleaving freely with each other;
    // open images of the group at 25 points over the journal; stop the processes and read the
    // journal back with the journal crate: every chain's seqs must increase, every write must
    // be there exactly once with its bytes, and every image must show exactly the writes
    // journaled up to its point.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    let mut site = Site::start(&[("vol0", 16 * MIB), ("vol1", 16 * MIB), ("vol2", 16 * MIB)]);
    site.settle();
    // Points before this lie in the volumes' first-time initialization.
    let base = site.status()["groups"][0]["last_seq"]
        .as_u64()
        .expect("last_seq");
    const CHAINS: u64 = 3;
    const STEPS: u64 = 12;
    let uris: Vec<String> = (0..3).map(|v| site.nbd_uri(&format!("vol{v}"))).collect();
    std::thread::scope(|scope| {
        for chain in 0..CHAINS {
            let uris = uris.clone();
            scope.spawn(move || {
                for step in 0..STEPS {
                    let vol = ((chain + step) % 3) as usize;
                    let offset = (chain * STEPS + step) * 65536;
                    let byte = (1 + chain * STEPS + step) as u8;
                    // One qemu-io process per write: it exits only once the write is acked.
                    run_ok(
                        Command::new("qemu-io")
                            .args(["-f", "raw", "-c", &format!("write -P {byte} {offset} 64k")])
                            .arg(&uris[vol]),
                        Duration::from_secs(60),
                    );
                }
            });
        }
    });
    site.settle();
    site.assert_all_replicas_equal_production();
    // Images of the group at points spread over the whole journal, read while the processes
    // run; checked below against the journal's own order.
    let last = site.status()["groups"][0]["last_seq"]
        .as_u64()
        .expect("last_seq");
    let points: Vec<u64> = (0..=24).map(|i| base + (last - base) * i / 24).collect();
    for &at in &points {
        let image = site.cdp_json(&["image", "access", "--at", &format!("seq:{at}"), "--json"]);
        for v in 0..3 {
            run_ok(
                Command::new("qemu-img")
                    .args(["convert", "-f", "raw", "-O", "raw"])
                    .arg(site.image_uri(&image, &format!("vol{v}")))
                    .arg(site.root().join(format!("image-{at}-vol{v}.img"))),
                Duration::from_secs(60),
            );
        }
        site.cdp_json(&[
            "image",
            "release",
            image["id"].as_str().expect("id"),
            "--json",
        ]);
    }
    let status = site.terminate(Role::Splitter, Duration::from_secs(30));
    assert!(status.success());
    let status = site.terminate(Role::Appliance, Duration::from_secs(60));
    assert!(status.success());

    let group_dir = site.root().join("appliance/groups/default");
    let (group_id, ids) = common::journals::volume_ids(&group_dir);
    let volume_id = |name: &str| ids[name];
    let (journal, _) = cdp_journal::Journal::open(
        &group_dir.join("journal"),
        group_id,
        cdp_journal::JournalConfig::default(),
    )
    .unwrap();
    // (volume id, offset) -> (seq, first payload byte) of every 64 KiB host write.
    let mut found = std::collections::BTreeMap::new();
    for record in journal.read_from(cdp_types::Seq(1)).unwrap() {
        let record = record.unwrap();
        if record.kind == cdp_journal::RecordKind::Write && record.length == 65536 {
            let old = found.insert(
                (record.volume, record.offset),
                (record.seq.0, record.payload[0]),
            );
            assert!(old.is_none(), "write at {} journaled twice", record.offset);
        }
    }
    for chain in 0..CHAINS {
        let mut last_seq = 0;
        for step in 0..STEPS {
            let vol = volume_id(&format!("vol{}", (chain + step) % 3));
            let offset = (chain * STEPS + step) * 65536;
            let (seq, byte) = *found
                .get(&(vol, offset))
                .unwrap_or_else(|| panic!("chain {chain} step {step} missing from the journal"));
            assert_eq!(byte, (1 + chain * STEPS + step) as u8);
            assert!(
                seq > last_seq,
                "chain {chain}: step {step} (seq {seq}) precedes the step acknowledged before it (seq {last_seq})"
            );
            last_seq = seq;
        }
    }
    // Every image shows exactly the writes journaled up to its point (rule 3), so none shows
    // a chain's later write without the earlier ones.
    for &at in &points {
        let images: Vec<Vec<u8>> = (0..3)
            .map(|v| std::fs::read(site.root().join(format!("image-{at}-vol{v}.img"))).unwrap())
            .collect();
        for chain in 0..CHAINS {
            for step in 0..STEPS {
                let v = (chain + step) % 3;
                let offset = (chain * STEPS + step) * 65536;
                let (seq, byte) = found[&(volume_id(&format!("vol{v}")), offset)];
                let region = &images[v as usize][offset as usize..offset as usize + 65536];
                let want = if seq <= at { byte } else { 0 };
                assert!(
                    region.iter().all(|&b| b == want),
                    "image at seq {at}: chain {chain} step {step} (seq {seq}) should read {want:#x}"
                );
            }
        }
    }
}
