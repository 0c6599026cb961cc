//! The blocking NBD client against our own server (byte model) and against scripted broken servers.
//!
//! Method: an in-memory export behind `cdp_nbd::Server` on a tokio runtime; the blocking client
//! runs on the test thread and every read is compared with a `Vec<u8>` model that receives
//! the same writes. Broken servers are plain threads writing chosen bytes.

use std::io::{Read, Write};
use std::net::TcpListener as StdTcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use cdp_nbd::client::{Client, ClientError};
use cdp_nbd::protocol::*;
use cdp_nbd::{Export, ExportError, ExportFeatures, ExportRegistry, Server, ServerConfig};
use cdp_types::Endpoint;
use tokio::net::{TcpListener, UnixListener};

const MIB: usize = 1024 * 1024;

/// A volume in memory; records the largest request it served so tests can see splitting.
struct MemExport {
    data: Mutex<Vec<u8>>,
    features: ExportFeatures,
    largest_request: Mutex<u64>,
    /// When set, every write fails with EPERM although the export is not read-only.
    refuse_writes: bool,
}

impl MemExport {
    fn new(size: usize, read_only: bool) -> Arc<Self> {
        Arc::new(Self::unshared(size, read_only))
    }

    /// Writable by its flags, but every write fails with EPERM.
    fn refusing(size: usize) -> Arc<Self> {
        Arc::new(Self {
            refuse_writes: true,
            ..Self::unshared(size, false)
        })
    }

    fn unshared(size: usize, read_only: bool) -> Self {
        Self {
            data: Mutex::new(vec![0; size]),
            features: ExportFeatures {
                read_only,
                can_flush: true,
                can_fua: true,
                can_trim: true,
                can_write_zeroes: true,
                can_multi_conn: false,
            },
            largest_request: Mutex::new(0),
            refuse_writes: false,
        }
    }

    fn note(&self, length: u64) {
        let mut largest = self.largest_request.lock().unwrap();
        *largest = (*largest).max(length);
    }

    fn zero(&self, offset: u64, length: u32) {
        self.note(u64::from(length));
        let start = offset as usize;
        self.data.lock().unwrap()[start..start + length as usize].fill(0);
    }
}

#[async_trait]
impl Export for MemExport {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn features(&self) -> ExportFeatures {
        self.features
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, ExportError> {
        self.note(u64::from(length));
        let start = offset as usize;
        let data = self.data.lock().unwrap();
        Ok(Bytes::copy_from_slice(
            &data[start..start + length as usize],
        ))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), ExportError> {
        if self.refuse_writes {
            return Err(ExportError::NotPermitted("writes refused".into()));
        }
        self.note(data.len() as u64);
        let start = offset as usize;
        self.data.lock().unwrap()[start..start + data.len()].copy_from_slice(&data);
        Ok(())
    }

    async fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u32, _fua: bool) -> Result<(), ExportError> {
        // Trimmed contents are unspecified; zero is the simplest model.
        self.zero(offset, length);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        _fua: bool,
        _may_trim: bool,
    ) -> Result<(), ExportError> {
        self.zero(offset, length);
        Ok(())
    }
}

/// Deterministic bytes from a seed (xorshift), so each write is distinguishable.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Our server on TCP and a unix socket, running on its own runtime until dropped.
struct TestServer {
    _runtime: tokio::runtime::Runtime,
    tcp: Endpoint,
    unix: Endpoint,
    registry: ExportRegistry,
    dir: tempfile::TempDir,
}

impl TestServer {
    fn start(registry: ExportRegistry) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let (tcp, unix) = runtime.block_on(async {
            (
                TcpListener::bind("127.0.0.1:0").await.unwrap(),
                UnixListener::bind(&path).unwrap(),
            )
        });
        let address = tcp.local_addr().unwrap();
        let server = Arc::new(Server::new(registry.clone(), ServerConfig::default()));
        let on_tcp = Arc::clone(&server);
        runtime.spawn(async move { on_tcp.serve_tcp(tcp, std::future::pending()).await });
        runtime.spawn(async move { server.serve_unix(unix, std::future::pending()).await });
        Self {
            _runtime: runtime,
            tcp: Endpoint::Tcp(address.to_string()),
            unix: Endpoint::Unix(path),
            registry,
            dir,
        }
    }
}

fn registry_with(name: &str, export: Arc<MemExport>) -> ExportRegistry {
    let registry = ExportRegistry::new();
    registry.add(name, "test disk", export).unwrap();
    registry
}

fn read_all(client: &mut Client) -> Vec<u8> {
    let mut buf = vec![0u8; client.size() as usize];
    client.read(0, &mut buf).unwrap();
    buf
}

/// Waits until `condition` holds; panics with `what` after 20 s (never reached when it works).
fn wait_for(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn reads_and_writes_match_a_byte_model_over_tcp_and_unix() {
    // Goal: every command changes the export exactly as the model says, on both transports.
    let size = 40 * MIB;
    let export = MemExport::new(size, false);
    let server = TestServer::start(registry_with("disk", Arc::clone(&export)));
    let mut model = vec![0u8; size];
    for (round, endpoint) in [&server.tcp, &server.unix].into_iter().enumerate() {
        let mut client = Client::connect(endpoint, "disk").unwrap();
        assert_eq!(client.size(), size as u64);
        assert!(!client.read_only());
        assert!(client.flags() & NBD_FLAG_HAS_FLAGS != 0);
        let seed = round as u64 * 100;

        let small = pattern(seed + 1, 4096 + 17);
        client.write(12_345, &small, false).unwrap();
        model[12_345..12_345 + small.len()].copy_from_slice(&small);

        // Larger than one request: the client must split it.
        let large = pattern(seed + 2, 33 * MIB + 3);
        client.write(MIB as u64 + 1, &large, true).unwrap();
        model[MIB + 1..MIB + 1 + large.len()].copy_from_slice(&large);

        client.flush().unwrap();

        client.trim(2 * MIB as u64, 4096, false).unwrap();
        model[2 * MIB..2 * MIB + 4096].fill(0);

        // Zeroes over more than 32 MiB, split as well.
        client
            .write_zeroes(3 * MIB as u64 + 7, 34 * MIB as u64, false, true)
            .unwrap();
        model[3 * MIB + 7..37 * MIB + 7].fill(0);
        client.write_zeroes(100, 50, true, false).unwrap();
        model[100..150].fill(0);

        // The last byte, and zero-length calls at the end, are inside the export.
        client.write(size as u64 - 1, &[0xAB], false).unwrap();
        model[size - 1] = 0xAB;
        client.write(size as u64, &[], false).unwrap();
        client.read(size as u64, &mut []).unwrap();

        let mut piece = vec![0u8; 10_000];
        client.read(12_000, &mut piece).unwrap();
        assert_eq!(piece, model[12_000..22_000]);
        assert!(
            read_all(&mut client) == model,
            "export differs from the model"
        );
        client.disconnect().unwrap();
    }
    assert!(*export.largest_request.lock().unwrap() <= 32 * MIB as u64);
    assert!(*export.data.lock().unwrap() == model);
}

#[test]
fn refusals_carry_the_nbd_error_and_keep_the_connection_usable() {
    // Goal: EPERM from a read-only export (refused by the client) and from the export itself
    // (sent, answered by the server) both name EPERM, and the next request still works.
    let read_only = MemExport::new(MIB, true);
    read_only.data.lock().unwrap()[..4].copy_from_slice(b"keep");
    let refusing = MemExport::refusing(MIB);
    let registry = registry_with("ro", Arc::clone(&read_only));
    registry.add("refusing", "", refusing).unwrap();
    let server = TestServer::start(registry);

    let mut client = Client::connect(&server.tcp, "ro").unwrap();
    assert!(client.read_only());
    for err in [
        client.write(0, b"oops", false).unwrap_err(),
        client.trim(0, 4, false).unwrap_err(),
        client.write_zeroes(0, 4, false, true).unwrap_err(),
    ] {
        assert!(matches!(err, ClientError::ReadOnly { .. }), "{err}");
        assert_eq!(err.errno(), Some(NBD_EPERM));
        assert!(err.to_string().contains("EPERM"), "{err}");
    }
    let mut head = [0u8; 4];
    client.read(0, &mut head).unwrap();
    assert_eq!(&head, b"keep");

    let mut client = Client::connect(&server.unix, "refusing").unwrap();
    let err = client.write(10, b"data", false).unwrap_err();
    assert_eq!(err.errno(), Some(NBD_EPERM), "{err}");
    assert!(err.to_string().contains("EPERM"), "{err}");
    assert!(err.to_string().contains("WRITE"), "{err}");
    let mut bytes = [1u8; 4];
    client.read(10, &mut bytes).unwrap();
    assert_eq!(bytes, [0; 4]);

    // Past the end: refused before sending, connection still fine.
    let err = client.read(MIB as u64 - 2, &mut [0u8; 4]).unwrap_err();
    assert!(matches!(err, ClientError::OutOfRange { .. }), "{err}");
    let err = client.read(u64::MAX, &mut [0u8; 4]).unwrap_err();
    assert!(matches!(err, ClientError::OutOfRange { .. }), "{err}");
    client.read(0, &mut bytes).unwrap();
}

#[test]
fn unknown_export_is_refused_with_its_name() {
    // Goal: asking for an export the server lacks gives an error naming it and the reply.
    let server = TestServer::start(registry_with("disk", MemExport::new(4096, false)));
    let err = match Client::connect(&server.tcp, "nosuch") {
        Ok(_) => panic!("connected to a missing export"),
        Err(err) => err,
    };
    let text = err.to_string();
    assert!(matches!(err, ClientError::ExportRefused { .. }), "{text}");
    assert!(text.contains("\"nosuch\""), "{text}");
    assert!(text.contains("NBD_REP_ERR_UNKNOWN"), "{text}");
    // The server is unharmed.
    Client::connect(&server.tcp, "disk").unwrap();

    let nobody = Endpoint::Unix(server.dir.path().join("missing.sock"));
    let err = Client::connect(&nobody, "disk").err().unwrap();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
}

#[test]
fn registry_counts_connections_in_transmission() {
    // Goal: `ExportRegistry::clients` follows connections opening and closing, per export.
    let registry = registry_with("a", MemExport::new(4096, false));
    registry.add("b", "", MemExport::new(4096, false)).unwrap();
    let server = TestServer::start(registry);
    let count = |name: &str| server.registry.clients(name);
    assert_eq!(count("a"), Some(0));
    assert_eq!(count("missing"), None);

    let first = Client::connect(&server.tcp, "a").unwrap();
    let second = Client::connect(&server.unix, "a").unwrap();
    let other = Client::connect(&server.tcp, "b").unwrap();
    wait_for("two clients on a", || count("a") == Some(2));
    wait_for("one client on b", || count("b") == Some(1));

    // A refused handshake is never counted.
    assert!(Client::connect(&server.tcp, "c").is_err());

    first.disconnect().unwrap();
    wait_for("one client on a", || count("a") == Some(1));
    // Dropping without disconnect still ends the session.
    drop(second);
    drop(other);
    wait_for("no clients", || {
        count("a") == Some(0) && count("b") == Some(0)
    });
}

/// A scripted server: accepts one connection and lets `script` write what it likes.
fn broken_server(script: impl FnOnce(&mut std::net::TcpStream) + Send + 'static) -> Endpoint {
    let listener = StdTcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            script(&mut stream);
            // Keep the socket open until the client gives up, so errors come from the bytes.
            let mut sink = [0u8; 4096];
            while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
        }
    });
    Endpoint::Tcp(address.to_string())
}

fn greeting() -> Vec<u8> {
    let mut out = NBD_MAGIC.to_be_bytes().to_vec();
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    out
}

fn option_reply(reply_type: u32, data: &[u8], length: u32) -> Vec<u8> {
    let mut out = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    out.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Greeting, read client flags and the GO option, answer a 1 MiB writable export.
fn good_handshake(stream: &mut std::net::TcpStream) {
    stream.write_all(&greeting()).unwrap();
    let mut flags = [0u8; 4];
    stream.read_exact(&mut flags).unwrap();
    let mut header = [0u8; 16];
    stream.read_exact(&mut header).unwrap();
    let length = u32::from_be_bytes(header[12..16].try_into().unwrap());
    let mut data = vec![0u8; length as usize];
    stream.read_exact(&mut data).unwrap();
    let info = encode_info_export(1 << 20, NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH);
    stream
        .write_all(&option_reply(NBD_REP_INFO, &info, 12))
        .unwrap();
    stream
        .write_all(&option_reply(NBD_REP_ACK, &[], 0))
        .unwrap();
}

/// Reads one request header and returns its handle.
fn read_request(stream: &mut std::net::TcpStream) -> u64 {
    let mut header = [0u8; REQUEST_HEADER_BYTES];
    stream.read_exact(&mut header).unwrap();
    u64::from_be_bytes(header[8..16].try_into().unwrap())
}

fn simple_reply(magic: u32, error: u32, handle: u64) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out
}

fn expect_protocol_error(result: Result<(), ClientError>, needle: &str) {
    match result {
        Err(err @ ClientError::Protocol { .. }) => {
            assert!(err.to_string().contains(needle), "{err}")
        }
        other => panic!("expected a protocol error about {needle:?}, got {other:?}"),
    }
}

#[test]
fn broken_handshakes_are_errors_not_panics() {
    // Goal: each malformed handshake byte sequence yields a protocol error naming it.
    let bad_magic = broken_server(|s| {
        let mut g = greeting();
        g[0] = b'X';
        s.write_all(&g).unwrap();
    });
    expect_protocol_error(Client::connect(&bad_magic, "disk").map(drop), "NBDMAGIC");

    let oldstyle = broken_server(|s| {
        let mut g = NBD_MAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
        g.extend_from_slice(&[0, 0]);
        s.write_all(&g).unwrap();
    });
    expect_protocol_error(Client::connect(&oldstyle, "disk").map(drop), "oldstyle");

    let huge_reply = broken_server(|s| {
        s.write_all(&greeting()).unwrap();
        s.write_all(&option_reply(NBD_REP_INFO, &[], u32::MAX))
            .unwrap();
    });
    expect_protocol_error(
        Client::connect(&huge_reply, "disk").map(drop),
        "option reply of",
    );

    let short_info = broken_server(|s| {
        s.write_all(&greeting()).unwrap();
        s.write_all(&option_reply(NBD_REP_INFO, &[0, 0, 1], 3))
            .unwrap();
    });
    expect_protocol_error(
        Client::connect(&short_info, "disk").map(drop),
        "expected 12",
    );

    let ack_without_info = broken_server(|s| {
        s.write_all(&greeting()).unwrap();
        s.write_all(&option_reply(NBD_REP_ACK, &[], 0)).unwrap();
    });
    expect_protocol_error(
        Client::connect(&ack_without_info, "disk").map(drop),
        "without NBD_INFO_EXPORT",
    );

    let closes = broken_server(|s| {
        s.write_all(&greeting()[..5]).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Both);
    });
    let err = Client::connect(&closes, "disk").err().unwrap();
    assert!(matches!(err, ClientError::Io { .. }), "{err}");
}

#[test]
fn broken_replies_poison_the_connection() {
    // Goal: a reply with a wrong handle, wrong magic or a structured reply is a protocol
    // error, and the connection refuses further requests instead of reading garbage.
    type ReplyFor = fn(u64) -> Vec<u8>;
    let cases: [(&str, ReplyFor); 3] = [
        ("handle", |h| simple_reply(SIMPLE_REPLY_MAGIC, 0, h + 1)),
        ("reply magic", |h| simple_reply(0xdead_beef, 0, h)),
        ("structured", |h| simple_reply(0x668e_33ef, 0, h)),
    ];
    for (needle, reply) in cases {
        let endpoint = broken_server(move |s| {
            good_handshake(s);
            let handle = read_request(s);
            s.write_all(&reply(handle)).unwrap();
        });
        let mut client = Client::connect(&endpoint, "disk").unwrap();
        assert_eq!(client.size(), 1 << 20);
        expect_protocol_error(client.read(0, &mut [0u8; 512]), needle);
        let err = client.flush().unwrap_err();
        assert!(matches!(err, ClientError::Poisoned { .. }), "{err}");
    }

    // An error reply with an unknown value still names it and keeps the stream in step.
    let endpoint = broken_server(|s| {
        good_handshake(s);
        let handle = read_request(s);
        s.write_all(&simple_reply(SIMPLE_REPLY_MAGIC, 9999, handle))
            .unwrap();
        let handle = read_request(s);
        s.write_all(&simple_reply(SIMPLE_REPLY_MAGIC, NBD_EIO, handle))
            .unwrap();
    });
    let mut client = Client::connect(&endpoint, "disk").unwrap();
    let err = client.flush().unwrap_err();
    assert_eq!(err.errno(), Some(9999));
    let err = client.flush().unwrap_err();
    assert!(err.to_string().contains("EIO"), "{err}");
    // The export offers no TRIM: refused locally.
    let err = client.trim(0, 1, false).unwrap_err();
    assert!(matches!(err, ClientError::Unsupported { .. }), "{err}");
}

#[test]
fn endpoint_strings_reach_the_server() {
    // Goal: the `unix:PATH` and `HOST:PORT` forms parse to endpoints the client can use.
    let server = TestServer::start(registry_with("disk", MemExport::new(4096, false)));
    for text in [server.tcp.to_string(), server.unix.to_string()] {
        let endpoint: Endpoint = text.parse().unwrap();
        let mut client = Client::connect(&endpoint, "disk").unwrap();
        client.write(1, b"x", false).unwrap();
        let mut byte = [0u8; 1];
        client.read(1, &mut byte).unwrap();
        assert_eq!(&byte, b"x");
    }
}
