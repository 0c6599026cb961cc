//! Replication link security: loads the PEM files of `replication_tls` / `[group.remote] tls` into rustls configs and runs the mutual-TLS handshake, with errors that say why a peer was refused.
//!
//! Both sides authenticate: the receiver (TLS server) requires a client certificate chaining
//! to its `ca`, the shipper (TLS client) requires the receiver's certificate to chain to its
//! `ca` and to be valid for `server_name` (default: the endpoint's host, an IP address
//! matching an IP SAN). Only TLS 1.3 with rustls' `ring` provider: both ends are this program,
//! so no older version is needed. Session resumption is off: links reconnect rarely, and
//! every connection then proves its certificate afresh. Plaintext is a separate, explicit
//! configuration (`replication_plaintext` / `plaintext`); there this module only recognises a
//! TLS peer, to refuse it with that reason.
//!
//! A peer speaking the other dialect is recognised from its first bytes (a replication frame
//! starts with `CDPR`, a ClientHello with 0x16) so the log says "plaintext peer" rather
//! than a decoding error.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

pub use crate::replication::tls_error::describe_tls_error;

use crate::config::{RemoteTlsConfig, TlsFilesConfig};
use crate::error::ApplianceError;
use crate::limits::{REPLICATION_HANDSHAKE_TIMEOUT, REPLICATION_IDLE_TIMEOUT};
use crate::replication::link_stream::{LinkReader, LinkWriter};

/// First byte of a TLS handshake record, which a ClientHello is.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The shipper's side of the link: plaintext (explicitly configured) or mutual TLS.
pub enum ClientSecurity {
    Plaintext,
    Tls(ClientTls),
}

/// A loaded `[group.remote] tls`.
pub struct ClientTls {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

/// The receiver's side: `None` is plaintext (explicitly configured).
pub type ServerSecurity = Option<Arc<ServerConfig>>;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_error(what: String) -> ApplianceError {
    ApplianceError::Config(what)
}

fn read_pem(path: &Path, key: &str) -> Result<Vec<u8>, ApplianceError> {
    std::fs::read(path).map_err(|e| config_error(format!("{key} = {}: {e}", path.display())))
}

/// What is wrong with PEM text that should hold certificates; said after the file or the
/// certificate's name ("the CA certificate holds no ...").
#[derive(Debug, thiserror::Error)]
enum PemError {
    #[error("not PEM: {0}")]
    NotPem(rustls::pki_types::pem::Error),
    #[error("holds no \"BEGIN CERTIFICATE\" block")]
    NoCertificate,
}

/// Every certificate in PEM text (at least one).
fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(PemError::NotPem)?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate);
    }
    Ok(certs)
}

/// Every certificate in a PEM file (at least one).
fn load_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, ApplianceError> {
    parse_certs(&read_pem(path, key)?)
        .map_err(|e| config_error(format!("{key} = {}: {e}", path.display())))
}

fn load_key(path: &Path, key: &str) -> Result<PrivateKeyDer<'static>, ApplianceError> {
    let pem = read_pem(path, key)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        config_error(format!(
            "{key} = {}: no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}",
            path.display()
        ))
    })
}

fn load_roots(path: &Path, key: &str) -> Result<Arc<RootCertStore>, ApplianceError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path, key)? {
        roots.add(cert).map_err(|e| {
            config_error(format!(
                "{key} = {}: not a usable CA certificate: {e}",
                path.display()
            ))
        })?;
    }
    Ok(Arc::new(roots))
}

/// The host part of `HOST:PORT` or `[V6]:PORT`.
fn endpoint_host(endpoint: &str) -> Option<&str> {
    let (host, port) = endpoint.trim().rsplit_once(':')?;
    if port.is_empty() || host.is_empty() {
        return None;
    }
    Some(
        host.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host),
    )
}

impl ClientTls {
    /// Loads `[group.remote] tls` of `group` shipping to `endpoint`.
    pub fn load(
        group: &str,
        endpoint: &str,
        files: &RemoteTlsConfig,
    ) -> Result<ClientTls, ApplianceError> {
        let key_name = |k: &str| format!("group {group:?} [group.remote] tls.{k}");
        let roots = load_roots(&files.ca, &key_name("ca"))?;
        let certs = load_certs(&files.cert, &key_name("cert"))?;
        let key = load_key(&files.key, &key_name("key"))?;
        let name = match &files.server_name {
            Some(n) => n.trim().to_string(),
            None => endpoint_host(endpoint)
                .ok_or_else(|| {
                    config_error(format!(
                        "group {group:?}: [group.remote] endpoint {endpoint:?} is not HOST:PORT, \
                         so tls.server_name cannot default to its host; set tls.server_name"
                    ))
                })?
                .to_string(),
        };
        let server_name = ServerName::try_from(name.clone()).map_err(|e| {
            config_error(format!(
                "group {group:?}: TLS server name {name:?} is neither a DNS name nor an IP \
                 address ({e}); set [group.remote] tls.server_name"
            ))
        })?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_error(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| {
                config_error(format!(
                    "{} and {}: the certificate and key do not make a usable identity: {e}",
                    key_name("cert"),
                    key_name("key")
                ))
            })?;
        config.resumption = rustls::client::Resumption::disabled();
        Ok(ClientTls {
            config: Arc::new(config),
            server_name,
        })
    }
}

/// Loads `replication_tls`.
pub fn load_server(files: &TlsFilesConfig) -> Result<Arc<ServerConfig>, ApplianceError> {
    let roots = load_roots(&files.ca, "replication_tls.ca")?;
    let certs = load_certs(&files.cert, "replication_tls.cert")?;
    let key = load_key(&files.key, "replication_tls.key")?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| config_error(format!("replication_tls.ca: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| config_error(format!("TLS setup: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| {
            config_error(format!(
                "replication_tls.cert and replication_tls.key: the certificate and key do not \
                 make a usable identity: {e}"
            ))
        })?;
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// Checks that the PEM certificate `cert` passes the check a receiver makes of a source's
/// certificate against the PEM CA `ca` (for `cdp tls issue`, which verifies what it made
/// before writing it). `Refused` says why not: a receiver would refuse the same way.
pub fn check_issued(ca: &[u8], cert: &[u8]) -> Result<(), ApplianceError> {
    let refused = ApplianceError::Refused;
    let mut roots = RootCertStore::empty();
    for c in parse_certs(ca).map_err(|e| refused(format!("the CA certificate {e}")))? {
        roots
            .add(c)
            .map_err(|e| refused(format!("not a usable CA certificate: {e}")))?;
    }
    let chain = parse_certs(cert).map_err(|e| refused(format!("the certificate {e}")))?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| refused(e.to_string()))?;
    verifier
        .verify_client_cert(&chain[0], &chain[1..], rustls::pki_types::UnixTime::now())
        .map_err(|e| refused(describe_tls_error(&e)))?;
    Ok(())
}

/// An I/O error from rustls or the socket, described (`complete_io` wraps rustls errors in
/// `InvalidData`).
fn describe_io_error(e: &std::io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => describe_tls_error(tls),
        None if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) =>
        {
            format!("no TLS handshake within {REPLICATION_HANDSHAKE_TIMEOUT:?}")
        }
        None => e.to_string(),
    }
}

/// The socket during the handshake, remembering the first bytes the peer sent, so a
/// failure can tell a plaintext peer from a TLS error.
struct Recording<'a> {
    socket: &'a TcpStream,
    first: Vec<u8>,
}

impl Read for Recording<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (&*self.socket).read(buf)?;
        let keep = (4 - self.first.len().min(4)).min(n);
        self.first.extend_from_slice(&buf[..keep]);
        Ok(n)
    }
}

impl Write for Recording<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self.socket).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        (&*self.socket).flush()
    }
}

/// Runs the handshake to its end (including the last flight the peer waits for) within
/// `REPLICATION_HANDSHAKE_TIMEOUT`.
fn handshake(conn: &mut rustls::Connection, io: &mut Recording) -> std::io::Result<()> {
    io.socket
        .set_read_timeout(Some(REPLICATION_HANDSHAKE_TIMEOUT))?;
    io.socket
        .set_write_timeout(Some(REPLICATION_HANDSHAKE_TIMEOUT))?;
    while conn.is_handshaking() {
        conn.complete_io(io)?;
    }
    while conn.wants_write() {
        conn.write_tls(io)?;
    }
    io.socket.set_read_timeout(Some(REPLICATION_IDLE_TIMEOUT))?;
    io.socket
        .set_write_timeout(Some(REPLICATION_IDLE_TIMEOUT))?;
    Ok(())
}

/// The shipper's handshake on a connected socket. `Refused` says why, for the log and
/// status (its message is the bare reason): trying again unchanged fails the same way.
pub fn connect(
    socket: TcpStream,
    tls: &ClientTls,
    endpoint: &str,
) -> Result<(LinkReader, LinkWriter), ApplianceError> {
    let conn = ClientConnection::new(Arc::clone(&tls.config), tls.server_name.clone())
        .map_err(|e| ApplianceError::Refused(format!("TLS setup for {endpoint}: {e}")))?;
    let mut conn = rustls::Connection::Client(conn);
    let mut io = Recording {
        socket: &socket,
        first: Vec::new(),
    };
    if let Err(e) = handshake(&mut conn, &mut io) {
        if io.first.starts_with(&cdp_link::replication::MAGIC) {
            return Err(ApplianceError::Refused(format!(
                "{endpoint} answered in plaintext: its replication listener is not configured \
                 for TLS (set replication_tls there, or plaintext = true here)"
            )));
        }
        return Err(ApplianceError::Refused(format!(
            "TLS handshake with {endpoint} failed: {}",
            describe_io_error(&e)
        )));
    }
    LinkReader::tls_pair(socket, conn)
}

/// The receiver's handshake on an accepted socket. `Refused` says why the peer is refused
/// (its message is the bare reason).
pub fn accept(
    socket: TcpStream,
    config: &Arc<ServerConfig>,
) -> Result<(LinkReader, LinkWriter), ApplianceError> {
    let refused = ApplianceError::Refused;
    let _ = socket.set_read_timeout(Some(REPLICATION_HANDSHAKE_TIMEOUT));
    let mut first = [0u8; 1];
    match socket.peek(&mut first) {
        Ok(0) => {
            return Err(refused(
                "the peer closed the connection before the TLS handshake".into(),
            ))
        }
        Ok(_) if first[0] != TLS_HANDSHAKE_RECORD => {
            return Err(refused(format!(
                "not a TLS client (first byte {:#04x}); this listener requires mutual TLS",
                first[0]
            )))
        }
        Ok(_) => {}
        Err(e) => {
            return Err(refused(format!(
                "before the TLS handshake: {}",
                describe_io_error(&e)
            )))
        }
    }
    let conn = ServerConnection::new(Arc::clone(config))
        .map_err(|e| refused(format!("TLS setup: {e}")))?;
    let mut conn = rustls::Connection::Server(conn);
    let mut io = Recording {
        socket: &socket,
        first: Vec::new(),
    };
    handshake(&mut conn, &mut io).map_err(|e| {
        refused(format!(
            "TLS authentication failed: {}",
            describe_io_error(&e)
        ))
    })?;
    LinkReader::tls_pair(socket, conn)
}

/// TLS listener: true if the peer opens with a replication frame (a plaintext source), so
/// it can be refused with that reason rather than a TLS decoding error.
pub fn peer_speaks_plaintext_replication(socket: &TcpStream) -> bool {
    let _ = socket.set_read_timeout(Some(REPLICATION_HANDSHAKE_TIMEOUT));
    let mut first = [0u8; 4];
    matches!(socket.peek(&mut first), Ok(n) if n > 0 && first[..n] == cdp_link::replication::MAGIC[..n])
}

/// Plaintext listener: true if the peer opens with a TLS record (a TLS source talking to a
/// plaintext listener), so it can be refused with that reason rather than a bad frame.
pub fn peer_speaks_tls(socket: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(socket.peek(&mut first), Ok(1) if first[0] == TLS_HANDSHAKE_RECORD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_host_takes_the_host_of_names_and_addresses() {
        assert_eq!(endpoint_host("dr.example:7701"), Some("dr.example"));
        assert_eq!(endpoint_host("10.0.0.2:7701"), Some("10.0.0.2"));
        assert_eq!(endpoint_host("[::1]:7701"), Some("::1"));
        assert_eq!(endpoint_host("dr.example"), None);
        assert_eq!(endpoint_host(":7701"), None);
    }

    #[test]
    fn missing_and_invalid_pem_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFilesConfig {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        };
        let err = load_server(&files).err().unwrap().to_string();
        assert!(
            err.contains("replication_tls.ca") && err.contains("ca.pem"),
            "{err}"
        );
        std::fs::write(&files.ca, "not a certificate\n").unwrap();
        let err = load_server(&files).err().unwrap().to_string();
        assert!(
            err.contains("replication_tls.ca") && err.contains("no \"BEGIN CERTIFICATE\""),
            "{err}"
        );
        std::fs::write(
            &files.ca,
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = load_server(&files).err().unwrap().to_string();
        assert!(err.contains("replication_tls.ca"), "{err}");
        let remote = RemoteTlsConfig {
            ca: files.ca.clone(),
            cert: files.cert.clone(),
            key: files.key.clone(),
            server_name: None,
        };
        let err = ClientTls::load("g", "dr:7701", &remote)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("[group.remote] tls.ca"), "{err}");
    }
}
