//! The two halves of a replication link's byte stream, plaintext or TLS, so one thread can read while another writes.
//!
//! The shipper writes batches on one thread and reads acks on another; a rustls connection
//! is one state machine with no blocking split. So a TLS link shares its `rustls::Connection`
//! behind a mutex that is never held across socket I/O:
//! - the read half reads the socket *without* the lock (blocking, woken by data, the idle
//!   timeout or a shutdown), then takes the lock to decrypt what arrived;
//! - the write half takes the lock to encrypt, and sends outside it.
//!
//! Encrypted output must leave in the order rustls made it (both halves make some: the
//! reader, for instance, answers a key update). Whoever drains output takes the socket's
//! write lock *before* releasing the connection lock, so drains are sent in order; nobody
//! takes the connection lock while holding the write lock, so the two cannot deadlock, and
//! a writer blocked on a full socket never stops the reader from decrypting acks. No
//! polling: each half blocks in the kernel only.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::limits::REPLICATION_TLS_READ_BYTES;
use crate::replication::tls_error::describe_tls_error;

/// One TLS session shared by a link's two halves.
struct SharedTls {
    conn: Mutex<rustls::Connection>,
    /// The socket's sending side; see the module doc for the lock order.
    socket_out: Mutex<TcpStream>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SharedTls {
    /// Sends whatever encrypted output the connection holds. Consumes the connection guard
    /// only after taking the socket's write lock, which keeps drains in order.
    fn send_pending(
        &self,
        mut conn: MutexGuard<'_, rustls::Connection>,
        out: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        out.clear();
        while conn.wants_write() {
            conn.write_tls(out)?;
        }
        if out.is_empty() {
            return Ok(());
        }
        let mut socket = lock(&self.socket_out);
        drop(conn);
        socket.write_all(out)
    }
}

/// A rustls error as an I/O error the link's codec reports.
fn tls_io_error(e: &rustls::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, describe_tls_error(e))
}

/// The receiving half of a replication link.
pub enum LinkReader {
    Plain(TcpStream),
    Tls(TlsReader),
}

/// The sending half of a replication link.
pub enum LinkWriter {
    Plain(TcpStream),
    Tls(TlsWriter),
}

pub struct TlsReader {
    shared: Arc<SharedTls>,
    socket: TcpStream,
    /// Socket bytes not yet handed to rustls: `incoming[start..end]`.
    incoming: Vec<u8>,
    start: usize,
    end: usize,
    /// Encrypted output this half makes (alerts, key updates), reused.
    out: Vec<u8>,
}

pub struct TlsWriter {
    shared: Arc<SharedTls>,
    out: Vec<u8>,
}

impl LinkReader {
    /// A plaintext link on `socket`.
    pub fn plain_pair(socket: TcpStream) -> std::io::Result<(LinkReader, LinkWriter)> {
        let writer = socket.try_clone()?;
        Ok((LinkReader::Plain(socket), LinkWriter::Plain(writer)))
    }

    /// A TLS link on `socket` whose handshake `conn` finished.
    pub(crate) fn tls_pair(
        socket: TcpStream,
        conn: rustls::Connection,
    ) -> Result<(LinkReader, LinkWriter), crate::error::ApplianceError> {
        let socket_out = socket.try_clone().map_err(|e| {
            crate::error::ApplianceError::Io(std::io::Error::new(
                e.kind(),
                format!("cloning the socket: {e}"),
            ))
        })?;
        let shared = Arc::new(SharedTls {
            conn: Mutex::new(conn),
            socket_out: Mutex::new(socket_out),
        });
        let reader = TlsReader {
            shared: Arc::clone(&shared),
            socket,
            incoming: vec![0; REPLICATION_TLS_READ_BYTES],
            start: 0,
            end: 0,
            out: Vec::new(),
        };
        let writer = TlsWriter {
            shared,
            out: Vec::new(),
        };
        Ok((LinkReader::Tls(reader), LinkWriter::Tls(writer)))
    }

    /// The link's socket, to shut it down from another thread or clone a handle on it.
    pub fn socket(&self) -> &TcpStream {
        match self {
            LinkReader::Plain(s) => s,
            LinkReader::Tls(t) => &t.socket,
        }
    }
}

impl Read for LinkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            LinkReader::Plain(s) => s.read(buf),
            LinkReader::Tls(t) => t.read(buf),
        }
    }
}

impl Write for LinkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            LinkWriter::Plain(s) => s.write(buf),
            LinkWriter::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            LinkWriter::Plain(s) => s.flush(),
            // Each write is sent before it returns.
            LinkWriter::Tls(_) => Ok(()),
        }
    }
}

impl TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let mut conn = lock(&self.shared.conn);
            match conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // TCP closed without a TLS close_notify. Replication frames are
                // self-delimiting and checksummed, so a cut inside a frame is still an error
                // for the codec, and a cut between frames is a lost link like any other:
                // report the end of stream.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            // No plaintext yet: decrypt bytes already read, or wait for more. Plaintext is
            // always drained before more is fed, so rustls' plaintext buffer never fills.
            if self.start < self.end {
                let mut pending = &self.incoming[self.start..self.end];
                let fed = conn.read_tls(&mut pending)?;
                self.start += fed;
                if let Err(e) = conn.process_new_packets() {
                    // rustls queued an alert telling the peer why; a last-gasp send.
                    let _ = self.shared.send_pending(conn, &mut self.out);
                    return Err(tls_io_error(&e));
                }
                self.shared.send_pending(conn, &mut self.out)?;
                continue;
            }
            drop(conn);
            let n = self.socket.read(&mut self.incoming)?;
            (self.start, self.end) = (0, n);
            if n == 0 {
                // Tell rustls the stream ended; its reader then reports how (see above).
                let mut conn = lock(&self.shared.conn);
                conn.read_tls(&mut &[][..])?;
            }
        }
    }
}

impl TlsWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut conn = lock(&self.shared.conn);
        // Encrypts up to rustls' send buffer limit (64 KiB by default); `write_all` loops.
        let n = conn.writer().write(buf)?;
        self.shared.send_pending(conn, &mut self.out)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RemoteTlsConfig, TlsFilesConfig};
    use crate::replication::tls;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    use std::path::Path;

    /// A CA and one leaf certificate for 127.0.0.1 (server and client use), as PEM files.
    fn write_pki(dir: &Path) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        leaf.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 13) as u8)
            .collect()
    }

    #[test]
    fn tls_halves_carry_both_directions_at_once() {
        // Goal: the shared-connection halves move bytes intact while one thread writes and
        // another reads, in both directions at once (the shipper's batches and acks).
        // Method: a TLS echo server on loopback (one thread, like the receiver); the client
        // writes 8 MiB on one thread while reading the echo on another; compare bytes.
        let dir = tempfile::tempdir().unwrap();
        write_pki(dir.path());
        let server_config = tls::load_server(&TlsFilesConfig {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        })
        .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = listener.local_addr().unwrap().to_string();
        let client_tls = tls::ClientTls::load(
            "g",
            &endpoint,
            &RemoteTlsConfig {
                ca: dir.path().join("ca.pem"),
                cert: dir.path().join("cert.pem"),
                key: dir.path().join("key.pem"),
                server_name: None,
            },
        )
        .unwrap();
        let server = std::thread::spawn(move || {
            let (socket, _) = listener.accept().unwrap();
            let (mut reader, mut writer) = tls::accept(socket, &server_config).unwrap();
            let mut buf = vec![0u8; 100_000];
            loop {
                let n = reader.read(&mut buf).unwrap();
                if n == 0 {
                    return;
                }
                writer.write_all(&buf[..n]).unwrap();
            }
        });
        let socket = TcpStream::connect(&endpoint).unwrap();
        let (mut reader, mut writer) = tls::connect(socket, &client_tls, &endpoint).unwrap();
        let sent = pattern(8 << 20, 7);
        let expected = sent.clone();
        let shutdown = reader.socket().try_clone().unwrap();
        let echo = std::thread::spawn(move || {
            let mut received = vec![0u8; expected.len()];
            reader.read_exact(&mut received).unwrap();
            assert!(received == expected, "echoed bytes differ");
        });
        for chunk in sent.chunks(300_000) {
            writer.write_all(chunk).unwrap();
        }
        echo.join().unwrap();
        shutdown.shutdown(std::net::Shutdown::Both).unwrap();
        server.join().unwrap();
    }
}
