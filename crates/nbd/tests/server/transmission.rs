//! Transmission tests: data checked against a model, pipelining, and what reaches the export.

use std::collections::HashMap;
use std::sync::Arc;

use cdp_nbd::protocol::*;
use cdp_nbd::ServerConfig;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::common::*;

#[tokio::test]
async fn replies_go_out_in_completion_order() {
    // The export holds the read at offset 0 until the read at 4096 has completed, so a
    // server that answered in request order would deadlock; ours must reply 2 before 1.
    let mut export = MemExport::with_contents(pattern(3, 1 << 16), all_features());
    export.hold_first_block = Some(Semaphore::new(0));
    let export = Arc::new(export);
    let server = TestServer::start(single(export.clone()), ServerConfig::default()).await;
    let mut client = server.client().await;
    client.go("disk").await;
    client.request(0, NBD_CMD_READ, 1, 0, 4096, &[]).await;
    client.request(0, NBD_CMD_READ, 2, 4096, 4096, &[]).await;
    let model = export.snapshot();
    assert_eq!(client.reply().await, (0, 2));
    assert_eq!(client.bytes(4096).await, model[4096..8192]);
    assert_eq!(client.reply().await, (0, 1));
    assert_eq!(client.bytes(4096).await, model[..4096]);
}

/// One connection's workload: pipelined batches of non-overlapping writes inside its own
/// region, then pipelined reads checked against the model.
async fn model_workload(
    mut client: Client,
    region: std::ops::Range<u64>,
    seed: u64,
    mut model: Vec<u8>,
) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    const SLOTS: u64 = 16;
    let slot = (region.end - region.start) / SLOTS;
    for round in 0..8u64 {
        // Writes: one per slot, so none overlap and reply order does not matter.
        let mut pending = HashMap::new();
        for i in 0..SLOTS {
            let start = region.start + i * slot + rng.below(slot / 2);
            let length = 1 + rng.below(region.start + (i + 1) * slot - start) as usize;
            let data = pattern(seed ^ round << 8 ^ i, length);
            let handle = round << 32 | i;
            client
                .request(0, NBD_CMD_WRITE, handle, start, length as u32, &data)
                .await;
            model[start as usize..start as usize + length].copy_from_slice(&data);
            pending.insert(handle, ());
        }
        for _ in 0..SLOTS {
            let (error, handle) = client.reply().await;
            assert_eq!(error, 0);
            assert!(
                pending.remove(&handle).is_some(),
                "unexpected handle {handle}"
            );
        }
        // Reads: random ranges anywhere in the region, answered in any order.
        let mut reads = HashMap::new();
        for i in 0..SLOTS {
            let start = region.start + rng.below(region.end - region.start);
            let length = 1 + rng.below((region.end - start).min(200_000)) as u32;
            let handle = 1 << 63 | round << 32 | i;
            client
                .request(0, NBD_CMD_READ, handle, start, length, &[])
                .await;
            reads.insert(handle, (start as usize, length as usize));
        }
        for _ in 0..SLOTS {
            let (error, handle) = client.reply().await;
            assert_eq!(error, 0);
            let (start, length) = reads.remove(&handle).expect("unknown read handle");
            assert_eq!(
                client.bytes(length).await,
                model[start..start + length],
                "read {start}+{length}"
            );
        }
    }
    client.request(0, NBD_CMD_DISC, 0, 0, 0, &[]).await;
    assert!(client.closed_by_server().await);
    model
}

#[tokio::test]
async fn pipelined_writes_and_reads_match_the_model_on_tcp_and_unix_connections() {
    // Four connections (two TCP, two unix) share one export, each owning a quarter; the
    // final export image must equal the merged model byte for byte.
    const SIZE: usize = 4 << 20;
    let export = MemExport::new(SIZE, all_features());
    let dir = tempfile::tempdir().unwrap();
    let (mut server, path) =
        TestServer::start_with_unix(single(export.clone()), ServerConfig::default(), dir.path())
            .await;
    let initial = export.snapshot();
    let mut tasks = JoinSet::new();
    let quarter = (SIZE / 4) as u64;
    for i in 0..4u64 {
        let mut client = if i % 2 == 0 {
            Client::tcp(server.addr).await
        } else {
            Client::unix(&path).await
        };
        let (size, _) = client.go("disk").await;
        assert_eq!(size, SIZE as u64);
        let region = i * quarter..(i + 1) * quarter;
        let model = initial.clone();
        tasks.spawn(async move {
            (
                region.clone(),
                model_workload(client, region, 100 + i, model).await,
            )
        });
    }
    let mut merged = initial.clone();
    while let Some(result) = tasks.join_next().await {
        let (region, model) = result.unwrap();
        let range = region.start as usize..region.end as usize;
        merged[range.clone()].copy_from_slice(&model[range]);
    }
    assert!(export.snapshot() == merged, "export differs from the model");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn large_requests_up_to_the_maximum_round_trip() {
    // A 32 MiB write and read (the advertised maximum) survive intact.
    const SIZE: usize = 40 << 20;
    let export = MemExport::new(SIZE, all_features());
    let server = TestServer::start(single(export.clone()), ServerConfig::default()).await;
    let mut client = server.client().await;
    client.go("disk").await;
    let data = pattern(9, 32 << 20);
    assert_eq!(client.write(4 << 20, &data, 0).await, 0);
    assert!(client.read(4 << 20, 32 << 20).await.unwrap() == data);
    let mut model = pattern(0xC0FFEE, SIZE);
    model[4 << 20..36 << 20].copy_from_slice(&data);
    assert!(export.snapshot() == model);
}

#[tokio::test]
async fn fua_flush_trim_and_zeroes_reach_the_export() {
    // Each flag must arrive at the export exactly as sent; zeroes read back as zero.
    let export = MemExport::new(1 << 16, all_features());
    let server = TestServer::start(single(export.clone()), ServerConfig::default()).await;
    let mut client = server.client().await;
    let (_, flags) = client.go("disk").await;
    assert_ne!(flags & NBD_FLAG_SEND_FUA, 0);
    let mut model = export.snapshot();

    let data = pattern(5, 1000);
    assert_eq!(client.write(100, &data, NBD_CMD_FLAG_FUA).await, 0);
    model[100..1100].copy_from_slice(&data);
    assert_eq!(client.write(2000, &data, 0).await, 0);
    model[2000..3000].copy_from_slice(&data);
    assert_eq!(client.command(NBD_CMD_FLUSH, 0, 0, 0).await, 0);
    assert_eq!(
        client
            .command(NBD_CMD_TRIM, NBD_CMD_FLAG_FUA, 4096, 4096)
            .await,
        0
    );
    model[4096..8192].fill(0);
    assert_eq!(
        client
            .command(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 10000, 300)
            .await,
        0
    );
    model[10000..10300].fill(0);
    assert_eq!(
        client
            .command(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FUA, 20000, 500)
            .await,
        0
    );
    model[20000..20500].fill(0);
    // FUA on a read is allowed once SEND_FUA is advertised, and means nothing.
    assert_eq!(
        client.command(NBD_CMD_READ, NBD_CMD_FLAG_FUA, 0, 0).await,
        0
    );
    // Zero-length requests succeed without reaching the export.
    assert_eq!(client.write(500, &[], 0).await, 0);
    assert_eq!(client.command(NBD_CMD_TRIM, 0, 500, 0).await, 0);

    assert_eq!(
        export.mutating_calls(),
        vec![
            Call::Write {
                offset: 100,
                length: 1000,
                fua: true
            },
            Call::Write {
                offset: 2000,
                length: 1000,
                fua: false
            },
            Call::Flush,
            Call::Trim {
                offset: 4096,
                length: 4096,
                fua: true
            },
            Call::Zeroes {
                offset: 10000,
                length: 300,
                fua: false,
                may_trim: false
            },
            Call::Zeroes {
                offset: 20000,
                length: 500,
                fua: true,
                may_trim: true
            },
        ]
    );
    assert_eq!(client.read(0, 1 << 16).await.unwrap(), model);
    assert!(export.snapshot() == model);
}

#[tokio::test]
async fn read_only_export_refuses_writes_with_eperm_and_stays_in_sync() {
    // Every write kind gets EPERM, the refused WRITE payload is consumed (the next request
    // parses), and no byte changes.
    let features = cdp_nbd::ExportFeatures {
        read_only: true,
        ..all_features()
    };
    let export = MemExport::new(1 << 16, features);
    let before = export.snapshot();
    let server = TestServer::start(single(export.clone()), ServerConfig::default()).await;
    let mut client = server.client().await;
    let (_, flags) = client.go("disk").await;
    assert_ne!(flags & NBD_FLAG_READ_ONLY, 0);
    assert_eq!(client.write(0, &pattern(1, 4096), 0).await, NBD_EPERM);
    assert_eq!(
        client.write(100, &pattern(2, 10), NBD_CMD_FLAG_FUA).await,
        NBD_EPERM
    );
    assert_eq!(client.command(NBD_CMD_TRIM, 0, 0, 4096).await, NBD_EPERM);
    assert_eq!(
        client.command(NBD_CMD_WRITE_ZEROES, 0, 0, 4096).await,
        NBD_EPERM
    );
    assert_eq!(client.read(0, 4096).await.unwrap(), before[..4096]);
    assert!(export.mutating_calls().is_empty());
    assert!(export.snapshot() == before);
}

#[tokio::test]
async fn disc_waits_for_requests_in_flight() {
    // Writes pipelined right before DISC must all be answered and applied before the close.
    let export = MemExport::new(1 << 16, all_features());
    let server = TestServer::start(single(export.clone()), ServerConfig::default()).await;
    let mut client = server.client().await;
    client.go("disk").await;
    let mut model = export.snapshot();
    for i in 0..8u64 {
        let data = pattern(40 + i, 4096);
        client
            .request(0, NBD_CMD_WRITE, i, i * 4096, 4096, &data)
            .await;
        model[i as usize * 4096..(i as usize + 1) * 4096].copy_from_slice(&data);
    }
    client.request(0, NBD_CMD_DISC, 99, 0, 0, &[]).await;
    let mut handles: Vec<u64> = Vec::new();
    for _ in 0..8 {
        let (error, handle) = client.reply().await;
        assert_eq!(error, 0);
        handles.push(handle);
    }
    handles.sort();
    assert_eq!(handles, (0..8).collect::<Vec<_>>());
    assert!(client.closed_by_server().await);
    assert!(export.snapshot() == model);
}
