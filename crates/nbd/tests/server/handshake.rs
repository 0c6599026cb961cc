//! Handshake tests: each option the server supports, refuses, or must disconnect on.

use std::sync::Arc;

use cdp_nbd::limits::{BLOCK_BYTES_MIN, BLOCK_BYTES_PREFERRED, REQUEST_BYTES_MAX};
use cdp_nbd::protocol::*;
use cdp_nbd::{ExportRegistry, ServerConfig};

use crate::common::*;

fn info_of(infos: &[Vec<u8>], info_type: u16) -> Option<&[u8]> {
    infos
        .iter()
        .find(|info| info[..2] == info_type.to_be_bytes())
        .map(|info| &info[2..])
}

#[tokio::test]
async fn info_then_go_report_export_block_size_name_and_description() {
    // INFO must describe the export fully without leaving the handshake; GO then enters
    // transmission, proven by a write/read round trip.
    let export = MemExport::new(1 << 20, all_features());
    let server = TestServer::start(single(export.clone()), ServerConfig::default()).await;
    let mut client = server.client().await;
    client.start().await;

    let (reply, infos) = client
        .info(
            NBD_OPT_INFO,
            "disk",
            &[NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE],
        )
        .await;
    assert_eq!(reply, NBD_REP_ACK);
    let info = info_of(&infos, NBD_INFO_EXPORT).unwrap();
    assert_eq!(u64::from_be_bytes(info[..8].try_into().unwrap()), 1 << 20);
    let flags = u16::from_be_bytes(info[8..10].try_into().unwrap());
    assert_eq!(
        flags,
        NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_TRIM
            | NBD_FLAG_SEND_WRITE_ZEROES
            | NBD_FLAG_SEND_FAST_ZERO
            | NBD_FLAG_CAN_MULTI_CONN
            | NBD_FLAG_SEND_CACHE
    );
    let block = info_of(&infos, NBD_INFO_BLOCK_SIZE).unwrap();
    let word = |i: usize| u32::from_be_bytes(block[i * 4..i * 4 + 4].try_into().unwrap());
    assert_eq!(
        (word(0), word(1), word(2)),
        (BLOCK_BYTES_MIN, BLOCK_BYTES_PREFERRED, REQUEST_BYTES_MAX)
    );
    assert_eq!((word(0), word(1), word(2)), (1, 4096, 32 * 1024 * 1024));
    assert_eq!(info_of(&infos, NBD_INFO_NAME).unwrap(), b"disk");
    assert_eq!(info_of(&infos, NBD_INFO_DESCRIPTION).unwrap(), b"test disk");

    let (reply, infos) = client.info(NBD_OPT_GO, "disk", &[]).await;
    assert_eq!(reply, NBD_REP_ACK);
    assert!(info_of(&infos, NBD_INFO_EXPORT).is_some());
    let data = pattern(1, 4096);
    assert_eq!(client.write(8192, &data, 0).await, 0);
    assert_eq!(client.read(8192, 4096).await.unwrap(), data);
}

#[tokio::test]
async fn list_names_every_export_and_abort_is_acknowledged() {
    // LIST returns one SERVER reply per export then ACK; LIST with data is invalid; ABORT
    // gets its ACK and the server closes.
    let registry = ExportRegistry::new();
    registry
        .add("b", "second", MemExport::new(4096, all_features()))
        .unwrap();
    registry
        .add("a", "first", MemExport::new(4096, all_features()))
        .unwrap();
    let server = TestServer::start(registry, ServerConfig::default()).await;
    let mut client = server.client().await;
    client.start().await;

    client.send_option(NBD_OPT_LIST, &[]).await;
    let mut names = Vec::new();
    loop {
        let (option, reply, data) = client.option_reply().await;
        assert_eq!(option, NBD_OPT_LIST);
        if reply == NBD_REP_ACK {
            break;
        }
        assert_eq!(reply, NBD_REP_SERVER);
        let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
        names.push((
            String::from_utf8(data[4..4 + len].to_vec()).unwrap(),
            String::from_utf8(data[4 + len..].to_vec()).unwrap(),
        ));
    }
    assert_eq!(
        names,
        vec![("a".into(), "first".into()), ("b".into(), "second".into())]
    );

    client.send_option(NBD_OPT_LIST, b"junk").await;
    assert_eq!(client.option_reply().await.1, NBD_REP_ERR_INVALID);

    client.send_option(NBD_OPT_ABORT, &[]).await;
    assert_eq!(
        client.option_reply().await,
        (NBD_OPT_ABORT, NBD_REP_ACK, vec![])
    );
    assert!(client.closed_by_server().await);
}

#[tokio::test]
async fn export_name_sends_zeroes_unless_no_zeroes_was_negotiated() {
    // The old EXPORT_NAME ending: 124 zero bytes follow unless the client set NO_ZEROES. A
    // request right after proves no stray bytes are left on the stream.
    let export = MemExport::new(1 << 16, all_features());
    let server = TestServer::start(single(export.clone()), ServerConfig::default()).await;
    for no_zeroes in [false, true] {
        let mut client = server.client().await;
        client.greeting().await;
        let flags = NBD_FLAG_C_FIXED_NEWSTYLE | if no_zeroes { NBD_FLAG_C_NO_ZEROES } else { 0 };
        client.send_client_flags(flags).await;
        client.send_option(NBD_OPT_EXPORT_NAME, b"disk").await;
        let reply = client.bytes(10).await;
        assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), 1 << 16);
        if !no_zeroes {
            assert_eq!(client.bytes(124).await, vec![0u8; 124]);
        }
        assert_eq!(client.read(0, 512).await.unwrap(), export.snapshot()[..512]);
    }
}

#[tokio::test]
async fn unknown_starttls_and_extended_headers_options_are_unsupported() {
    // Options we do not implement get ERR_UNSUP and the handshake goes on; a client that
    // did not ask for structured replies gets simple ones.
    let export = MemExport::new(1 << 16, all_features());
    let server = TestServer::start(single(export.clone()), ServerConfig::default()).await;
    let mut client = server.client().await;
    client.start().await;
    for option in [99, NBD_OPT_STARTTLS, NBD_OPT_EXTENDED_HEADERS] {
        client.send_option(option, &[]).await;
        let (echo, reply, _) = client.option_reply().await;
        assert_eq!((echo, reply), (option, NBD_REP_ERR_UNSUP));
    }
    assert_eq!(client.info(NBD_OPT_GO, "disk", &[]).await.0, NBD_REP_ACK);
    // `read` asserts the simple reply magic.
    assert_eq!(
        client.read(100, 10).await.unwrap(),
        export.snapshot()[100..110]
    );
}

#[tokio::test]
async fn unknown_export_is_an_error_reply_for_info_and_go_and_a_disconnect_for_export_name() {
    let server = TestServer::start(
        single(MemExport::new(4096, all_features())),
        ServerConfig::default(),
    )
    .await;
    let mut client = server.client().await;
    client.start().await;
    assert_eq!(
        client.info(NBD_OPT_INFO, "nope", &[]).await,
        (NBD_REP_ERR_UNKNOWN, vec![])
    );
    assert_eq!(
        client.info(NBD_OPT_GO, "nope", &[]).await,
        (NBD_REP_ERR_UNKNOWN, vec![])
    );
    assert_eq!(client.info(NBD_OPT_GO, "disk", &[]).await.0, NBD_REP_ACK);

    let mut client = server.client().await;
    client.start().await;
    client.send_option(NBD_OPT_EXPORT_NAME, b"nope").await;
    assert!(client.closed_by_server().await);
}

#[tokio::test]
async fn empty_name_selects_the_only_export_or_the_configured_default() {
    let registry = ExportRegistry::new();
    registry
        .add("a", "", MemExport::new(4096, all_features()))
        .unwrap();
    let server = TestServer::start(registry.clone(), ServerConfig::default()).await;

    let mut client = server.client().await;
    client.start().await;
    let (reply, infos) = client.info(NBD_OPT_INFO, "", &[NBD_INFO_NAME]).await;
    assert_eq!(reply, NBD_REP_ACK);
    assert_eq!(info_of(&infos, NBD_INFO_NAME).unwrap(), b"a");

    // Two exports and no default: the empty name is ambiguous.
    registry
        .add("b", "", MemExport::new(8192, all_features()))
        .unwrap();
    assert_eq!(
        client.info(NBD_OPT_INFO, "", &[]).await.0,
        NBD_REP_ERR_UNKNOWN
    );

    registry.set_default("b").unwrap();
    let (reply, infos) = client.info(NBD_OPT_GO, "", &[NBD_INFO_NAME]).await;
    assert_eq!(reply, NBD_REP_ACK);
    assert_eq!(info_of(&infos, NBD_INFO_NAME).unwrap(), b"b");
}

#[tokio::test]
async fn oversized_and_malformed_options_are_refused_without_losing_sync() {
    // A 100 KiB option is read and refused with TOO_BIG; a malformed INFO is INVALID; the
    // same connection then completes GO. A multi-megabyte option is cut off.
    let server = TestServer::start(
        single(MemExport::new(4096, all_features())),
        ServerConfig::default(),
    )
    .await;
    let mut client = server.client().await;
    client.start().await;
    client.send_option(99, &vec![7u8; 100 * 1024]).await;
    assert_eq!(client.option_reply().await.1, NBD_REP_ERR_TOO_BIG);
    client
        .send_option(NBD_OPT_INFO, &[0, 0, 0, 200, 1, 2])
        .await;
    assert_eq!(client.option_reply().await.1, NBD_REP_ERR_INVALID);
    let mut count_mismatch = Client::info_data("disk", &[NBD_INFO_NAME]);
    count_mismatch.pop();
    client.send_option(NBD_OPT_GO, &count_mismatch).await;
    assert_eq!(client.option_reply().await.1, NBD_REP_ERR_INVALID);
    assert_eq!(client.info(NBD_OPT_GO, "disk", &[]).await.0, NBD_REP_ACK);

    let mut client = server.client().await;
    client.start().await;
    let mut header = IHAVEOPT.to_be_bytes().to_vec();
    header.extend_from_slice(&99u32.to_be_bytes());
    header.extend_from_slice(&(64u32 << 20).to_be_bytes());
    client.send(&header).await;
    assert!(client.closed_by_server().await);
}

#[tokio::test]
async fn unknown_client_flags_and_bad_option_magic_disconnect() {
    let server = TestServer::start(
        single(MemExport::new(4096, all_features())),
        ServerConfig::default(),
    )
    .await;
    let mut client = server.client().await;
    client.greeting().await;
    client
        .send_client_flags(NBD_FLAG_C_FIXED_NEWSTYLE | 1 << 5)
        .await;
    assert!(client.closed_by_server().await);

    let mut client = server.client().await;
    client.start().await;
    client.send(b"NOTMAGIC\0\0\0\x07\0\0\0\0").await;
    assert!(client.closed_by_server().await);
}

#[tokio::test]
async fn handshake_timeout_closes_a_silent_client() {
    // With a 1 s deadline, a client that waits 2 s before sending its flags is cut off.
    let config = ServerConfig {
        handshake_timeout: std::time::Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let server = TestServer::start(single(MemExport::new(4096, all_features())), config).await;
    let mut client = server.client().await;
    client.greeting().await;
    let started = std::time::Instant::now();
    assert!(client.closed_by_server().await);
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
}

#[tokio::test]
async fn default_handshake_timeout_tolerates_a_slow_guest() {
    // A booting guest may stay silent for seconds; the default deadline is well above that.
    // The 2 s pause is the behaviour under test, not a wait for a condition.
    let config = ServerConfig::default();
    assert!(config.handshake_timeout >= std::time::Duration::from_secs(30));
    let export = MemExport::new(4096, all_features());
    let server = TestServer::start(single(export.clone()), config).await;
    let mut client = server.client().await;
    assert_eq!(
        client.greeting().await,
        NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
    );
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    client
        .send_client_flags(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
        .await;
    assert_eq!(client.info(NBD_OPT_GO, "disk", &[]).await.0, NBD_REP_ACK);
    assert_eq!(client.read(0, 16).await.unwrap(), export.snapshot()[..16]);
}

#[tokio::test]
async fn registry_rejects_duplicates_and_bad_names() {
    let registry = ExportRegistry::new();
    let export: Arc<MemExport> = MemExport::new(512, all_features());
    registry.add("x", "", export.clone()).unwrap();
    assert!(matches!(
        registry.add("x", "", export.clone()),
        Err(cdp_nbd::NbdError::DuplicateExport(_))
    ));
    assert!(registry.add("", "", export.clone()).is_err());
    assert!(registry.add("a\0b", "", export.clone()).is_err());
    assert!(registry.add(&"n".repeat(4097), "", export.clone()).is_err());
    assert!(registry.set_default("y").is_err());
    assert_eq!(registry.names(), vec!["x".to_string()]);
    assert!(registry.remove("x"));
    assert!(!registry.remove("x"));
    assert!(registry.names().is_empty());
}
