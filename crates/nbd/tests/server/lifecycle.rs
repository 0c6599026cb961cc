//! Server lifecycle: shutdown, runtime export changes, and the connection limit.

use std::time::Duration;

use cdp_nbd::protocol::*;
use cdp_nbd::ServerConfig;

use crate::common::*;

#[tokio::test]
async fn shutdown_finishes_connections_and_returns() {
    // After the shutdown future fires, serve_tcp closes open connections (in handshake and
    // in transmission) and returns Ok.
    let export = MemExport::new(1 << 16, all_features());
    let mut server = TestServer::start(single(export.clone()), ServerConfig::default()).await;
    let mut busy = server.client().await;
    busy.go("disk").await;
    assert_eq!(busy.write(0, &pattern(1, 512), 0).await, 0);
    let mut idle = server.client().await;
    idle.greeting().await;
    tokio::time::timeout(PATIENCE, server.stop())
        .await
        .expect("shutdown hung")
        .unwrap();
    assert!(busy.closed_by_server().await);
    assert!(idle.closed_by_server().await);
    assert!(tokio::net::TcpStream::connect(server.addr).await.is_err());
}

#[tokio::test]
async fn exports_can_be_added_and_removed_while_serving() {
    // A removed export disappears for new clients, while a client already using it goes on.
    let first = MemExport::new(1 << 16, all_features());
    let server = TestServer::start(single(first), ServerConfig::default()).await;
    let late = MemExport::new(8192, all_features());
    server
        .registry
        .add("late", "added at run time", late.clone())
        .unwrap();

    let mut user = server.client().await;
    let (size, _) = user.go("late").await;
    assert_eq!(size, 8192);
    assert!(server.registry.remove("late"));

    let mut newcomer = server.client().await;
    newcomer.start().await;
    assert_eq!(
        newcomer.info(NBD_OPT_GO, "late", &[]).await.0,
        NBD_REP_ERR_UNKNOWN
    );

    let data = pattern(8, 100);
    assert_eq!(user.write(10, &data, 0).await, 0);
    assert_eq!(user.read(10, 100).await.unwrap(), data);
    assert_eq!(late.snapshot()[10..110], data[..]);
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_free_slot() {
    // With connections_max = 1 the second client is not greeted until the first leaves.
    let config = ServerConfig {
        connections_max: 1,
        ..ServerConfig::default()
    };
    let server = TestServer::start(single(MemExport::new(4096, all_features())), config).await;
    let mut first = server.client().await;
    first.greeting().await;
    let mut second = server.client().await;
    // Negative check: nothing may arrive while the slot is taken. The bound only limits how
    // long we look; the positive condition below is awaited, not slept on.
    let early = tokio::time::timeout(Duration::from_millis(300), second.bytes(1)).await;
    assert!(
        early.is_err(),
        "second client greeted while the only slot was busy"
    );
    first.send_client_flags(NBD_FLAG_C_FIXED_NEWSTYLE).await;
    first.send_option(NBD_OPT_ABORT, &[]).await;
    assert_eq!(first.option_reply().await.1, NBD_REP_ACK);
    drop(first);
    // The negative check timed out before reading anything, so the greeting is intact.
    assert_eq!(
        second.greeting().await,
        NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
    );
}
