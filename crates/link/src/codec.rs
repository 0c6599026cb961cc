//! Async reading and writing of link frames over a unix or TCP stream.
//!
//! A link that stops passing bytes without closing (a dead switch port, a paused peer) is
//! only ever noticed by its silence: `FrameReader::set_idle_timeout` turns "nothing received
//! for the deadline" into an error, and both ends send heartbeats more often than that. TCP
//! keepalive is set too, as a backstop for a socket nothing reads any more.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use cdp_types::Endpoint;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::error::LinkError;
use crate::frame::{decode_header, verify_crc, HEADER_LEN};
use crate::limits::{
    SOCKET_BUFFER_BYTES, TCP_KEEPALIVE_COUNT, TCP_KEEPALIVE_IDLE_S, TCP_KEEPALIVE_INTERVAL_S,
};
use crate::message::Message;

pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// A read half that fails with `TimedOut` once it has waited for input longer than its
/// idle timeout. The clock runs only while a read is waiting: time the owner spends not
/// reading (a throttled append) is not silence of the peer.
pub struct IdleRead {
    inner: BoxRead,
    timeout: Option<Duration>,
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AsyncRead for IdleRead {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.waiting = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let Some(timeout) = this.timeout else {
                    return Poll::Pending;
                };
                let sleep = this
                    .waiting
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.waiting = None;
                        Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "nothing received from the peer for {} ms (link deadline)",
                                timeout.as_millis()
                            ),
                        )))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

/// Reads whole, CRC-checked messages; any error means the connection must be dropped.
pub struct FrameReader {
    inner: BufReader<IdleRead>,
}

impl FrameReader {
    pub fn new(read: BoxRead) -> Self {
        FrameReader {
            inner: BufReader::with_capacity(
                SOCKET_BUFFER_BYTES,
                IdleRead {
                    inner: read,
                    timeout: None,
                    waiting: None,
                },
            ),
        }
    }

    /// From now on, waiting longer than `timeout` for the peer's next bytes is an error
    /// (`LinkError::Io` of kind `TimedOut`). The peer must send heartbeats more often.
    pub fn set_idle_timeout(&mut self, timeout: Option<Duration>) {
        let read = self.inner.get_mut();
        read.timeout = timeout;
        read.waiting = None;
    }

    /// Reads the next message. A clean end of stream between frames is `LinkError::Closed`.
    pub async fn read(&mut self) -> Result<Message, LinkError> {
        let mut header_bytes = [0u8; HEADER_LEN];
        let first = self.inner.read(&mut header_bytes[..1]).await?;
        if first == 0 {
            return Err(LinkError::Closed);
        }
        self.inner.read_exact(&mut header_bytes[1..]).await?;
        let header = decode_header(&header_bytes)?;
        // The length was bounded by decode_header, so this allocation is limited.
        let mut body = BytesMut::zeroed(header.body_len as usize);
        self.inner.read_exact(&mut body).await?;
        verify_crc(&header_bytes, &header, &body)?;
        Message::decode(header.kind, body)
    }
}

impl FrameReader {
    /// Reads the next message only if all of it is already buffered; never waits for input.
    pub async fn read_if_buffered(&mut self) -> Result<Option<Message>, LinkError> {
        let buffered = self.inner.buffer();
        if buffered.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut header_bytes = [0u8; HEADER_LEN];
        header_bytes.copy_from_slice(&buffered[..HEADER_LEN]);
        let header = decode_header(&header_bytes)?;
        if buffered.len() < HEADER_LEN + header.body_len as usize {
            return Ok(None);
        }
        self.read().await.map(Some)
    }
}

/// Buffers outgoing messages; small ones are coalesced, large payloads go straight to the socket.
pub struct FrameWriter {
    inner: BufWriter<BoxWrite>,
}

impl FrameWriter {
    pub fn new(write: BoxWrite) -> Self {
        FrameWriter {
            inner: BufWriter::with_capacity(SOCKET_BUFFER_BYTES, write),
        }
    }

    /// Queues a message; call `flush` when no more are immediately ready.
    pub async fn send(&mut self, message: &Message) -> Result<(), LinkError> {
        let frame = message.encode();
        self.inner.write_all(&frame.header).await?;
        self.inner.write_all(&frame.fixed).await?;
        if let Some(data) = &frame.data {
            self.inner.write_all(data).await?;
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), LinkError> {
        self.inner.flush().await?;
        Ok(())
    }

    pub async fn shutdown(&mut self) -> Result<(), LinkError> {
        self.inner.shutdown().await?;
        Ok(())
    }
}

/// A connected link stream, split into a reader and a writer.
pub struct LinkStream {
    pub reader: FrameReader,
    pub writer: FrameWriter,
}

impl LinkStream {
    pub fn from_unix(stream: UnixStream) -> Self {
        let (r, w) = stream.into_split();
        LinkStream {
            reader: FrameReader::new(Box::new(r)),
            writer: FrameWriter::new(Box::new(w)),
        }
    }

    pub fn from_tcp(stream: TcpStream) -> Self {
        // Acks are tiny and latency-critical; Nagle would hold them back.
        let _ = stream.set_nodelay(true);
        if let Err(e) = set_keepalive(&stream) {
            tracing::warn!("link: cannot set TCP keepalive: {e}");
        }
        let (r, w) = stream.into_split();
        LinkStream {
            reader: FrameReader::new(Box::new(r)),
            writer: FrameWriter::new(Box::new(w)),
        }
    }
}

/// TCP keepalive on a link socket: a backstop that closes a socket whose peer vanished even
/// if nothing reads it (the heartbeats are what meets the link deadline). Keepalive only
/// probes an idle connection; `TCP_USER_TIMEOUT` is deliberately not set, because Linux
/// applies it to zero-window probes too and would cut a link the appliance is throttling.
fn set_keepalive(stream: &TcpStream) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: fd is a live socket owned by `stream`; the value is a c_int as the option expects.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, TCP_KEEPALIVE_IDLE_S)?;
    set(
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        TCP_KEEPALIVE_INTERVAL_S,
    )?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, TCP_KEEPALIVE_COUNT)
}

/// Connects to an appliance's link endpoint.
pub async fn connect(endpoint: &Endpoint) -> io::Result<LinkStream> {
    match endpoint {
        Endpoint::Unix(path) => Ok(LinkStream::from_unix(UnixStream::connect(path).await?)),
        Endpoint::Tcp(addr) => Ok(LinkStream::from_tcp(TcpStream::connect(addr).await?)),
    }
}

/// Where an appliance accepts split links.
pub enum LinkListener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl LinkListener {
    /// Binds the endpoint; a stale unix socket file left by a dead process is replaced.
    pub async fn bind(endpoint: &Endpoint) -> io::Result<LinkListener> {
        match endpoint {
            Endpoint::Unix(path) => Ok(LinkListener::Unix(bind_unix(path)?)),
            Endpoint::Tcp(addr) => Ok(LinkListener::Tcp(TcpListener::bind(addr).await?)),
        }
    }

    pub async fn accept(&self) -> io::Result<LinkStream> {
        match self {
            LinkListener::Unix(l) => Ok(LinkStream::from_unix(l.accept().await?.0)),
            LinkListener::Tcp(l) => Ok(LinkStream::from_tcp(l.accept().await?.0)),
        }
    }
}

/// Binds a unix socket, removing a leftover socket file only if nothing answers on it.
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by a running process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test]
    async fn messages_cross_a_socket_and_garbage_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut a = LinkStream::from_unix(a);
        let mut b = LinkStream::from_unix(b);
        let sent = vec![
            Message::Write {
                source_seq: 1,
                offset: 4096,
                data: Bytes::from(vec![7u8; 100_000]),
            },
            Message::Flush { source_seq: 1 },
        ];
        for m in &sent {
            a.writer.send(m).await.unwrap();
        }
        a.writer.flush().await.unwrap();
        for m in &sent {
            assert_eq!(&b.reader.read().await.unwrap(), m);
        }
        // A flipped payload byte must be caught by the CRC, not delivered.
        let mut raw = Vec::new();
        let f = Message::Ack { source_seq: 5 }.encode();
        raw.extend_from_slice(&f.header);
        raw.extend_from_slice(&f.fixed);
        raw[HEADER_LEN] ^= 1;
        let (c, d) = UnixStream::pair().unwrap();
        let (_, mut cw) = c.into_split();
        cw.write_all(&raw).await.unwrap();
        let mut d = LinkStream::from_unix(d);
        assert!(matches!(d.reader.read().await, Err(LinkError::Corrupt(_))));
        drop(cw);
        drop(a);
        assert!(matches!(b.reader.read().await, Err(LinkError::Closed)));
    }

    #[tokio::test]
    async fn a_silent_peer_times_out_and_a_talking_one_does_not() {
        // The peer stays connected but sends nothing: only the idle timeout can notice.
        let (a, b) = UnixStream::pair().unwrap();
        let mut a = LinkStream::from_unix(a);
        let mut b = LinkStream::from_unix(b);
        b.reader.set_idle_timeout(Some(Duration::from_millis(300)));
        // Heartbeats every 100 ms keep it alive past several timeouts.
        for _ in 0..8 {
            a.writer.send(&Message::Heartbeat).await.unwrap();
            a.writer.flush().await.unwrap();
            assert_eq!(b.reader.read().await.unwrap(), Message::Heartbeat);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let started = std::time::Instant::now();
        match b.reader.read().await {
            Err(LinkError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::TimedOut),
            other => panic!("expected a timeout, got {other:?}"),
        }
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        assert!(waited < Duration::from_secs(3), "{waited:?}");
        drop(a);
    }
}
