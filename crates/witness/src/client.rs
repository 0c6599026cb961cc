//! A blocking witness client: one connection, one request at a time, every request under a
//! deadline (connect, write and read). Used by `LeaseKeeper` and by commands that need one
//! answer (a promote asking for the grant, `query` for status).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::WitnessError;
use crate::limits::LINE_BYTES_MAX;
use crate::protocol::{self, Reply, Request};

pub struct WitnessClient {
    addr: String,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

fn timeout_error(addr: &str, timeout: Duration) -> WitnessError {
    WitnessError::Timeout {
        addr: addr.to_string(),
        timeout_ms: timeout.as_millis() as u64,
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

impl WitnessClient {
    /// Connects to `addr` (`HOST:PORT`) within `timeout`.
    pub fn connect(addr: &str, timeout: Duration) -> Result<WitnessClient, WitnessError> {
        let deadline = Instant::now() + timeout;
        let addrs = addr
            .to_socket_addrs()
            .map_err(|e| WitnessError::io(format!("resolving witness address {addr:?}"), e))?;
        let mut last = None;
        for a in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timeout_error(addr, timeout));
            }
            match TcpStream::connect_timeout(&a, left) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    let writer = s
                        .try_clone()
                        .map_err(|e| WitnessError::io("cloning a socket", e))?;
                    return Ok(WitnessClient {
                        addr: addr.to_string(),
                        reader: BufReader::new(s),
                        writer,
                    });
                }
                Err(e) if is_timeout(&e) => return Err(timeout_error(addr, timeout)),
                Err(e) => last = Some(e),
            }
        }
        Err(WitnessError::io(
            format!("connecting to witness {addr}"),
            last.unwrap_or_else(|| std::io::Error::other("no address")),
        ))
    }

    /// Sends one request and waits for its reply until `timeout`. After an error the
    /// connection is unusable (a late reply could be misread as the next one's).
    pub fn request(&mut self, request: &Request, timeout: Duration) -> Result<Reply, WitnessError> {
        let deadline = Instant::now() + timeout;
        let addr = self.addr.clone();
        let left = |deadline: Instant| {
            let l = deadline.saturating_duration_since(Instant::now());
            if l.is_zero() {
                Err(timeout_error(&addr, timeout))
            } else {
                Ok(l)
            }
        };
        self.writer
            .set_write_timeout(Some(left(deadline)?))
            .map_err(|e| WitnessError::io("setting a write timeout", e))?;
        self.writer
            .write_all(protocol::encode_request(request).as_bytes())
            .map_err(|e| {
                if is_timeout(&e) {
                    timeout_error(&addr, timeout)
                } else {
                    WitnessError::io(format!("sending to witness {addr}"), e)
                }
            })?;
        let mut line = Vec::with_capacity(256);
        loop {
            self.reader
                .get_ref()
                .set_read_timeout(Some(left(deadline)?))
                .map_err(|e| WitnessError::io("setting a read timeout", e))?;
            let room = (LINE_BYTES_MAX + 1).saturating_sub(line.len()) as u64;
            match (&mut self.reader).take(room).read_until(b'\n', &mut line) {
                Ok(0) if line.last() != Some(&b'\n') => {
                    if line.len() > LINE_BYTES_MAX {
                        return Err(WitnessError::Protocol(format!(
                            "witness {addr} sent a reply line over {LINE_BYTES_MAX} bytes"
                        )));
                    }
                    return Err(WitnessError::io(
                        format!("reading from witness {addr}"),
                        std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                    ));
                }
                Ok(_) if line.last() == Some(&b'\n') => break,
                Ok(_) if line.len() > LINE_BYTES_MAX => {
                    return Err(WitnessError::Protocol(format!(
                        "witness {addr} sent a reply line over {LINE_BYTES_MAX} bytes"
                    )))
                }
                Ok(_) => continue,
                Err(e) if is_timeout(&e) => return Err(timeout_error(&addr, timeout)),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(WitnessError::io(format!("reading from witness {addr}"), e)),
            }
        }
        protocol::decode_reply(&line[..line.len() - 1])
    }
}
