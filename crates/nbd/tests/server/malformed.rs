//! One test per class of malformed request: each gets the spec's error (or a disconnect),
//! never reaches the export, leaves every byte unchanged, and leaves other clients served.

use std::sync::Arc;

use cdp_nbd::protocol::*;
use cdp_nbd::ServerConfig;

use crate::common::*;

const SIZE: u64 = 1 << 20;

async fn setup() -> (TestServer, Arc<MemExport>, Vec<u8>, Client) {
    let export = MemExport::new(SIZE as usize, all_features());
    let before = export.snapshot();
    let server = TestServer::start(single(export.clone()), ServerConfig::default()).await;
    let mut client = server.client().await;
    client.go("disk").await;
    (server, export, before, client)
}

/// The export saw no mutation and still holds `before`; a fresh client is served.
async fn assert_untouched(server: &TestServer, export: &MemExport, before: &[u8]) {
    assert!(
        export.mutating_calls().is_empty(),
        "export was called: {:?}",
        export.mutating_calls()
    );
    assert!(export.snapshot() == before, "export bytes changed");
    let mut other = server.client().await;
    other.go("disk").await;
    assert_eq!(
        other.read(SIZE - 4096, 4096).await.unwrap(),
        before[(SIZE - 4096) as usize..]
    );
}

#[tokio::test]
async fn offset_plus_length_past_the_end() {
    let (server, export, before, mut client) = setup().await;
    assert_eq!(client.read(SIZE - 100, 4096).await, Err(NBD_EINVAL));
    assert_eq!(
        client.write(SIZE - 100, &pattern(1, 4096), 0).await,
        NBD_ENOSPC
    );
    assert_eq!(client.write(SIZE, &pattern(1, 1), 0).await, NBD_ENOSPC);
    assert_eq!(
        client.command(NBD_CMD_TRIM, 0, SIZE - 1, 2).await,
        NBD_EINVAL
    );
    assert_eq!(
        client.command(NBD_CMD_WRITE_ZEROES, 0, SIZE - 1, 2).await,
        NBD_ENOSPC
    );
    assert_eq!(client.read(SIZE + 1, 0).await, Err(NBD_EINVAL));
    // The refused WRITE payloads were consumed: this connection is still in step.
    assert_eq!(client.read(0, 16).await.unwrap(), before[..16]);
    assert_untouched(&server, &export, &before).await;
}

#[tokio::test]
async fn offset_overflow() {
    let (server, export, before, mut client) = setup().await;
    assert_eq!(client.read(u64::MAX - 10, 4096).await, Err(NBD_EINVAL));
    assert_eq!(
        client.write(u64::MAX - 10, &pattern(1, 4096), 0).await,
        NBD_ENOSPC
    );
    assert_eq!(
        client.command(NBD_CMD_TRIM, 0, u64::MAX, 1).await,
        NBD_EINVAL
    );
    assert_eq!(
        client
            .command(NBD_CMD_WRITE_ZEROES, 0, u64::MAX, u32::MAX)
            .await,
        NBD_ENOSPC
    );
    assert_eq!(client.read(0, 16).await.unwrap(), before[..16]);
    assert_untouched(&server, &export, &before).await;
}

#[tokio::test]
async fn unknown_command() {
    // Only WRITE carries a payload, so an unknown command is refused in place.
    let (server, export, before, mut client) = setup().await;
    assert_eq!(client.command(42, 0, 0, 4096).await, NBD_EINVAL);
    assert_eq!(
        client
            .command(
                NBD_CMD_BLOCK_STATUS, /* no context selected */
                0,
                0,
                4096
            )
            .await,
        NBD_EINVAL
    );
    assert_eq!(
        client.command(u16::MAX, 0, u64::MAX, u32::MAX).await,
        NBD_EINVAL
    );
    assert_eq!(client.read(0, 16).await.unwrap(), before[..16]);
    assert_untouched(&server, &export, &before).await;
}

#[tokio::test]
async fn unknown_or_misplaced_flag() {
    let (server, export, before, mut client) = setup().await;
    assert_eq!(client.write(0, &pattern(1, 4096), 1 << 9).await, NBD_EINVAL);
    assert_eq!(
        client
            .write(0, &pattern(1, 512), NBD_CMD_FLAG_NO_HOLE)
            .await,
        NBD_EINVAL
    );
    assert_eq!(
        client
            .command(NBD_CMD_READ, NBD_CMD_FLAG_NO_HOLE, 0, 512)
            .await,
        NBD_EINVAL
    );
    assert_eq!(
        client.command(NBD_CMD_TRIM, 1 << 2 /* DF */, 0, 512).await,
        NBD_EINVAL
    );
    // FAST_ZERO is advertised with WRITE_ZEROES; this export cannot zero fast, so it
    // refuses at once and writes nothing. On any other command the flag is invalid.
    assert_eq!(
        client
            .command(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 512)
            .await,
        NBD_ENOTSUP
    );
    assert_eq!(
        client
            .command(NBD_CMD_TRIM, NBD_CMD_FLAG_FAST_ZERO, 0, 512)
            .await,
        NBD_EINVAL
    );
    assert_eq!(client.read(0, 16).await.unwrap(), before[..16]);
    assert_untouched(&server, &export, &before).await;
}

#[tokio::test]
async fn commands_and_flags_not_advertised() {
    // An export without flush/trim/zeroes/FUA: using them is refused.
    let features = cdp_nbd::ExportFeatures {
        read_only: false,
        can_flush: false,
        can_fua: false,
        can_trim: false,
        can_write_zeroes: false,
        can_multi_conn: false,
    };
    let export = MemExport::new(SIZE as usize, features);
    let before = export.snapshot();
    let server = TestServer::start(single(export.clone()), ServerConfig::default()).await;
    let mut client = server.client().await;
    let (_, flags) = client.go("disk").await;
    assert_eq!(flags, NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_CACHE);
    assert_eq!(client.command(NBD_CMD_FLUSH, 0, 0, 0).await, NBD_EINVAL);
    assert_eq!(client.command(NBD_CMD_TRIM, 0, 0, 512).await, NBD_EINVAL);
    assert_eq!(
        client.command(NBD_CMD_WRITE_ZEROES, 0, 0, 512).await,
        NBD_EINVAL
    );
    assert_eq!(
        client.write(0, &pattern(1, 512), NBD_CMD_FLAG_FUA).await,
        NBD_EINVAL
    );
    assert_untouched(&server, &export, &before).await;
}

#[tokio::test]
async fn length_over_the_maximum() {
    // A READ over 32 MiB is refused in place; a WRITE that large cannot be skipped safely,
    // so the connection is dropped before any payload is taken.
    const BIG: u64 = 40 << 20;
    let export = MemExport::new(BIG as usize, all_features());
    let before = export.snapshot();
    let server = TestServer::start(single(export.clone()), ServerConfig::default()).await;
    let mut client = server.client().await;
    client.go("disk").await;
    assert_eq!(client.read(0, (32 << 20) + 1).await, Err(NBD_EINVAL));
    assert_eq!(client.read(0, 16).await.unwrap(), before[..16]);
    client
        .request(0, NBD_CMD_WRITE, 1, 0, (32 << 20) + 1, &[])
        .await;
    assert!(client.closed_by_server().await);
    assert!(export.mutating_calls().is_empty());
    assert!(export.snapshot() == before);
    let mut other = server.client().await;
    other.go("disk").await;
    assert_eq!(
        other.read(BIG - 16, 16).await.unwrap(),
        before[(BIG - 16) as usize..]
    );
}

#[tokio::test]
async fn garbage_magic_disconnects_only_that_client() {
    let (server, export, before, mut client) = setup().await;
    let mut bystander = server.client().await;
    bystander.go("disk").await;
    client.send(&[0xAB; 28]).await;
    assert!(client.closed_by_server().await);
    assert_eq!(bystander.read(0, 64).await.unwrap(), before[..64]);
    assert_untouched(&server, &export, &before).await;
}

#[tokio::test]
async fn truncated_requests_then_close() {
    // A WRITE whose payload stops short, and a header cut in half: the server drops those
    // connections and applies nothing.
    let (server, export, before, mut client) = setup().await;
    let mut header = REQUEST_MAGIC.to_be_bytes().to_vec();
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&NBD_CMD_WRITE.to_be_bytes());
    header.extend_from_slice(&1u64.to_be_bytes());
    header.extend_from_slice(&0u64.to_be_bytes());
    header.extend_from_slice(&4096u32.to_be_bytes());
    client.send(&header).await;
    client.send(&pattern(2, 100)).await;
    client.shutdown_write().await;
    assert!(client.closed_by_server().await);

    let mut client = server.client().await;
    client.go("disk").await;
    client.send(&header[..10]).await;
    client.shutdown_write().await;
    assert!(client.closed_by_server().await);
    assert_untouched(&server, &export, &before).await;
}
