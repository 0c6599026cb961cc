//! Appending records another journal numbered and stamped (remote replication): a copy keeps
//! the source's seqs and times across segment rollovers and a reopen, and refuses gaps,
//! duplicates and times going backwards without appending anything.

use bytes::Bytes;
use cdp_journal::{Journal, JournalConfig, RecordIn, RecordKind};
use cdp_types::Seq;

fn config() -> JournalConfig {
    JournalConfig {
        segment_bytes_max: 1024 * 1024,
        compress_writes: false,
    }
}

#[test]
fn copy_keeps_seqs_and_times_and_refuses_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _) = Journal::open(&dir.path().join("source"), 1, config()).unwrap();
    for i in 0..40u64 {
        let payload = Bytes::from(vec![i as u8; 100_000]);
        source
            .append(&[
                RecordIn::write(1, i * 4096, payload).with_source_seq(i + 1),
                RecordIn::range(RecordKind::Zero, 1, 0, 512),
            ])
            .unwrap();
    }
    let records: Vec<_> = source
        .read_from(Seq(1))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    let as_in = |r: &cdp_journal::Record| RecordIn {
        kind: r.kind,
        volume: r.volume,
        source_seq: r.source_seq,
        offset: r.offset,
        length: r.length,
        payload: r.payload.clone(),
    };
    let copy_dir = dir.path().join("copy");
    {
        // Another group id: the copy's records are bound to its own container.
        let (copy, _) = Journal::open(&copy_dir, 2, config()).unwrap();
        let mut locations = Vec::new();
        for chunk in records.chunks(7) {
            let ins: Vec<_> = chunk.iter().map(as_in).collect();
            let stamps: Vec<u64> = chunk.iter().map(|r| r.timestamp.0).collect();
            // A gap and a duplicate are refused, and append nothing.
            let next = copy.last_seq().0 + 1;
            assert!(copy
                .append_replicated_located(&ins, Seq(next + 1), &stamps, &mut locations)
                .is_err());
            if next > 1 {
                assert!(copy
                    .append_replicated_located(&ins, Seq(next - 1), &stamps, &mut locations)
                    .is_err());
            }
            let last = copy
                .append_replicated_located(&ins, chunk[0].seq, &stamps, &mut locations)
                .unwrap();
            assert_eq!(last, chunk[chunk.len() - 1].seq);
            assert_eq!(locations.len(), chunk.len());
        }
        // Times going backwards are refused.
        let old = [as_in(&records[0])];
        assert!(copy
            .append_replicated_located(&old, copy.last_seq().next(), &[1], &mut locations)
            .is_err());
        copy.sync().unwrap();
        assert!(copy.segment_count() > 1, "the copy rolled over segments");
    }
    let (copy, _) = Journal::open(&copy_dir, 2, config()).unwrap();
    let copied: Vec<_> = copy
        .read_from(Seq(1))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(copied.len(), records.len());
    for (a, b) in records.iter().zip(&copied) {
        assert_eq!(a.seq, b.seq);
        assert_eq!(a.timestamp, b.timestamp);
        assert_eq!(as_in(a), as_in(b));
    }
    // Local appends continue after the copy, never before its last time.
    let next = copy
        .append(&[RecordIn::range(RecordKind::Trim, 1, 0, 512)])
        .unwrap();
    assert_eq!(next.0, records.len() as u64 + 1);
}
