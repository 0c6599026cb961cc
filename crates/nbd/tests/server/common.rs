//! Test support: an in-memory export that logs its calls, a raw-socket NBD client, and server starters.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use cdp_nbd::protocol::*;
use cdp_nbd::{
    Export, ExportError, ExportFeatures, ExportRegistry, NbdError, Server, ServerConfig,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;

/// One call the server made on the export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Zeroes {
        offset: u64,
        length: u32,
        fua: bool,
        may_trim: bool,
    },
}

/// A volume in a `Vec<u8>`. Trim zero-fills (any content is allowed after a trim; zero is
/// the easiest to model).
pub struct MemExport {
    pub data: Mutex<Vec<u8>>,
    pub features: ExportFeatures,
    pub calls: Mutex<Vec<Call>>,
    /// When set, a read at offset 0 waits until another read has completed, forcing replies
    /// out of order without any timing assumption.
    pub hold_first_block: Option<Semaphore>,
}

pub fn all_features() -> ExportFeatures {
    ExportFeatures {
        read_only: false,
        can_flush: true,
        can_fua: true,
        can_trim: true,
        can_write_zeroes: true,
        can_multi_conn: true,
    }
}

impl MemExport {
    pub fn new(size: usize, features: ExportFeatures) -> Arc<Self> {
        Arc::new(Self::with_contents(pattern(0xC0FFEE, size), features))
    }

    pub fn with_contents(data: Vec<u8>, features: ExportFeatures) -> Self {
        Self {
            data: Mutex::new(data),
            features,
            calls: Mutex::new(Vec::new()),
            hold_first_block: None,
        }
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// Calls that could change the data.
    pub fn mutating_calls(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|call| !matches!(call, Call::Read { .. }))
            .collect()
    }

    fn log(&self, call: Call) {
        self.calls.lock().unwrap().push(call);
    }

    fn range(offset: u64, length: u32) -> std::ops::Range<usize> {
        offset as usize..offset as usize + length as usize
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
        if let Some(gate) = &self.hold_first_block {
            if offset == 0 {
                gate.acquire().await.unwrap().forget();
            }
        }
        self.log(Call::Read { offset, length });
        let bytes = Bytes::copy_from_slice(&self.data.lock().unwrap()[Self::range(offset, length)]);
        if let Some(gate) = &self.hold_first_block {
            if offset != 0 {
                gate.add_permits(1);
            }
        }
        Ok(bytes)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        self.log(Call::Write {
            offset,
            length: data.len() as u32,
            fua,
        });
        self.data.lock().unwrap()[offset as usize..offset as usize + data.len()]
            .copy_from_slice(&data);
        Ok(())
    }

    async fn flush(&self) -> Result<(), ExportError> {
        self.log(Call::Flush);
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), ExportError> {
        self.log(Call::Trim {
            offset,
            length,
            fua,
        });
        self.data.lock().unwrap()[Self::range(offset, length)].fill(0);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
        may_trim: bool,
    ) -> Result<(), ExportError> {
        self.log(Call::Zeroes {
            offset,
            length,
            fua,
            may_trim,
        });
        self.data.lock().unwrap()[Self::range(offset, length)].fill(0);
        Ok(())
    }
}

/// Deterministic bytes from a seed (xorshift), so writes are distinguishable.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.next() as u8).collect()
}

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub registry: ExportRegistry,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<Result<(), NbdError>>>,
}

impl TestServer {
    pub async fn start(registry: ExportRegistry, config: ServerConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = Server::new(registry.clone(), config);
        let task = tokio::spawn(async move {
            server
                .serve_tcp(listener, async move {
                    let _ = stopped.await;
                })
                .await
        });
        Self {
            addr,
            registry,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Starts one server with both a TCP listener and a unix socket in `dir`.
    pub async fn start_with_unix(
        registry: ExportRegistry,
        config: ServerConfig,
        dir: &Path,
    ) -> (Self, PathBuf) {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let path = dir.join("nbd.sock");
        let unix = UnixListener::bind(&path).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = Server::new(registry.clone(), config);
        let task = tokio::spawn(async move {
            let (stop_tcp, stopped_tcp) = oneshot::channel::<()>();
            let unix_side = server.serve_unix(unix, async move {
                let _ = stopped.await;
                let _ = stop_tcp.send(());
            });
            let tcp_side = server.serve_tcp(tcp, async move {
                let _ = stopped_tcp.await;
            });
            let (a, b) = tokio::join!(unix_side, tcp_side);
            a.and(b)
        });
        (
            Self {
                addr,
                registry,
                stop: Some(stop),
                task: Some(task),
            },
            path,
        )
    }

    pub async fn stop(&mut self) -> Result<(), NbdError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.unwrap(),
            None => Ok(()),
        }
    }

    pub async fn client(&self) -> Client {
        Client::tcp(self.addr).await
    }
}

/// A bare NBD client speaking raw bytes, so tests can send anything.
pub struct Client {
    reader: BufReader<Box<dyn AsyncRead + Unpin + Send>>,
    writer: Box<dyn AsyncWrite + Unpin + Send>,
}

/// How long a test waits for the server before calling it hung; never reached when things work.
pub const PATIENCE: Duration = Duration::from_secs(20);

impl Client {
    pub async fn tcp(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (r, w) = stream.into_split();
        Self {
            reader: BufReader::new(Box::new(r)),
            writer: Box::new(w),
        }
    }

    pub async fn unix(path: &Path) -> Self {
        let stream = UnixStream::connect(path).await.unwrap();
        let (r, w) = stream.into_split();
        Self {
            reader: BufReader::new(Box::new(r)),
            writer: Box::new(w),
        }
    }

    /// Reads the greeting, checks its magic numbers and returns the handshake flags.
    pub async fn greeting(&mut self) -> u16 {
        assert_eq!(self.u64().await, NBD_MAGIC);
        assert_eq!(self.u64().await, IHAVEOPT);
        self.u16().await
    }

    pub async fn send_client_flags(&mut self, flags: u32) {
        self.send(&flags.to_be_bytes()).await;
    }

    /// Greeting plus the usual client flags.
    pub async fn start(&mut self) {
        assert_eq!(
            self.greeting().await,
            NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
        );
        self.send_client_flags(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
            .await;
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut frame = Vec::with_capacity(16 + data.len());
        frame.extend_from_slice(&IHAVEOPT.to_be_bytes());
        frame.extend_from_slice(&option.to_be_bytes());
        frame.extend_from_slice(&(data.len() as u32).to_be_bytes());
        frame.extend_from_slice(data);
        self.send(&frame).await;
    }

    /// Reads one option reply: (option, reply type, data).
    pub async fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64().await, OPTION_REPLY_MAGIC);
        let option = self.u32().await;
        let reply_type = self.u32().await;
        let length = self.u32().await;
        let data = self.bytes(length as usize).await;
        (option, reply_type, data)
    }

    pub fn info_data(name: &str, info_types: &[u16]) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(info_types.len() as u16).to_be_bytes());
        for info in info_types {
            data.extend_from_slice(&info.to_be_bytes());
        }
        data
    }

    /// Sends INFO or GO and collects the NBD_REP_INFO payloads until the final reply.
    pub async fn info(
        &mut self,
        option: u32,
        name: &str,
        info_types: &[u16],
    ) -> (u32, Vec<Vec<u8>>) {
        self.send_option(option, &Self::info_data(name, info_types))
            .await;
        let mut infos = Vec::new();
        loop {
            let (echo, reply_type, data) = self.option_reply().await;
            assert_eq!(echo, option);
            if reply_type == NBD_REP_INFO {
                infos.push(data);
            } else {
                return (reply_type, infos);
            }
        }
    }

    /// Full handshake with GO; returns (size, transmission flags).
    pub async fn go(&mut self, name: &str) -> (u64, u16) {
        self.start().await;
        let (reply, infos) = self.info(NBD_OPT_GO, name, &[]).await;
        assert_eq!(reply, NBD_REP_ACK, "GO {name:?} failed");
        let export = infos
            .iter()
            .find(|info| info[..2] == NBD_INFO_EXPORT.to_be_bytes())
            .expect("no NBD_INFO_EXPORT");
        let size = u64::from_be_bytes(export[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(export[10..12].try_into().unwrap());
        (size, flags)
    }

    pub async fn request(
        &mut self,
        flags: u16,
        command: u16,
        handle: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut frame = Vec::with_capacity(28 + payload.len());
        frame.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        frame.extend_from_slice(&flags.to_be_bytes());
        frame.extend_from_slice(&command.to_be_bytes());
        frame.extend_from_slice(&handle.to_be_bytes());
        frame.extend_from_slice(&offset.to_be_bytes());
        frame.extend_from_slice(&length.to_be_bytes());
        frame.extend_from_slice(payload);
        self.send(&frame).await;
    }

    /// Reads a simple reply header: (error, handle).
    pub async fn reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32().await, SIMPLE_REPLY_MAGIC);
        let error = self.u32().await;
        let handle = self.u64().await;
        (error, handle)
    }

    /// WRITE and wait for its reply; returns the error value.
    pub async fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.request(flags, NBD_CMD_WRITE, 77, offset, data.len() as u32, data)
            .await;
        let (error, handle) = self.reply().await;
        assert_eq!(handle, 77);
        error
    }

    /// READ and wait for its reply.
    pub async fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>, u32> {
        self.request(0, NBD_CMD_READ, 78, offset, length, &[]).await;
        let (error, handle) = self.reply().await;
        assert_eq!(handle, 78);
        if error != 0 {
            return Err(error);
        }
        Ok(self.bytes(length as usize).await)
    }

    /// A payload-less command (FLUSH, TRIM, WRITE_ZEROES, unknown ones); returns the error.
    pub async fn command(&mut self, command: u16, flags: u16, offset: u64, length: u32) -> u32 {
        self.request(flags, command, 79, offset, length, &[]).await;
        let (error, handle) = self.reply().await;
        assert_eq!(handle, 79);
        error
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    /// Whether the server has closed the connection: the next read sees end of stream or a
    /// reset. Panics if the server neither closes nor sends anything within `PATIENCE`.
    pub async fn closed_by_server(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(PATIENCE, self.reader.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) => false,
            Err(_) => panic!("server neither closed the connection nor answered"),
        }
    }

    pub async fn shutdown_write(&mut self) {
        self.writer.shutdown().await.unwrap();
    }

    pub async fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(PATIENCE, self.reader.read_exact(&mut buf))
            .await
            .expect("server hung")
            .unwrap();
        buf
    }

    async fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).await.try_into().unwrap())
    }

    async fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).await.try_into().unwrap())
    }

    async fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).await.try_into().unwrap())
    }
}

/// A registry with one export named "disk".
pub fn single(export: Arc<MemExport>) -> ExportRegistry {
    let registry = ExportRegistry::new();
    registry.add("disk", "test disk", export).unwrap();
    registry
}
