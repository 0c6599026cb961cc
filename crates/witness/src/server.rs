//! The witness server: a TCP listener, one thread per connection (at most
//! `CONNECTIONS_MAX`), and one mutex around `Grants` so decisions (and the fsync each change
//! of holder costs) happen one at a time. Blocking I/O on purpose: a witness serves a few
//! requests per second per group, and threads keep the deadlines simple.
//!
//! A malformed request gets a `bad_request` reply and closes only its own connection. A
//! failure to persist a grant closes the connection without a grant (the keeper then
//! counts nothing for that request) and is logged.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::WitnessConfig;
use crate::error::WitnessError;
use crate::grants::Grants;
use crate::limits::{CONNECTIONS_MAX, CONNECTION_IDLE_TIMEOUT, LINE_BYTES_MAX};
use crate::protocol::{self, RefuseReason, Reply};

/// Starts witnesses.
pub struct Witness;

/// A running witness: its address. The process ends it (the state on disk is always
/// complete, so a witness needs no clean stop).
pub struct WitnessHandle {
    pub local_addr: SocketAddr,
    _lock: std::fs::File,
}

fn lock_data_dir(dir: &Path) -> Result<std::fs::File, WitnessError> {
    let path = dir.join("witness.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| WitnessError::io(format!("opening {}", path.display()), e))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function owns.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        return Err(WitnessError::Locked {
            path,
            pid: pid.trim().to_string(),
        });
    }
    file.set_len(0)
        .and_then(|_| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
        .map_err(|e| WitnessError::io(format!("writing {}", path.display()), e))?;
    Ok(file)
}

impl Witness {
    /// Locks the data directory, loads the grants (starting a restart hold for every
    /// holder found), binds and serves in background threads.
    pub fn start(config: &WitnessConfig) -> Result<WitnessHandle, WitnessError> {
        config.sanitize()?;
        let data_dir: PathBuf = config.data_dir.clone().expect("sanitized");
        let listen = config.listen.clone().expect("sanitized");
        std::fs::create_dir_all(&data_dir)
            .map_err(|e| WitnessError::io(format!("creating {}", data_dir.display()), e))?;
        let lock = lock_data_dir(&data_dir)?;
        let grants = Grants::open(
            data_dir,
            config.margin(),
            config.lease_duration_ms_max,
            Instant::now(),
        )?;
        let listener = TcpListener::bind(listen.trim())
            .map_err(|e| WitnessError::io(format!("binding {listen}"), e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| WitnessError::io("reading the bound address", e))?;
        tracing::info!(
            "witness listening on {local_addr} (lease at most {} ms, margin {} ppm + {} ms)",
            config.lease_duration_ms_max,
            config.drift_ppm,
            config.margin_fixed_ms
        );
        let grants = Arc::new(Mutex::new(grants));
        let connections = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("witness-accept".into())
            .spawn(move || accept_loop(listener, grants, connections))
            .map_err(|e| WitnessError::io("starting the accept thread", e))?;
        Ok(WitnessHandle {
            local_addr,
            _lock: lock,
        })
    }
}

fn accept_loop(listener: TcpListener, grants: Arc<Mutex<Grants>>, connections: Arc<AtomicUsize>) {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept: {e}");
                // EMFILE and the like: give the system a moment rather than spin.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if connections.fetch_add(1, Ordering::SeqCst) >= CONNECTIONS_MAX {
            connections.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("refusing a connection: {CONNECTIONS_MAX} already served");
            continue;
        }
        let (grants, connections) = (Arc::clone(&grants), Arc::clone(&connections));
        let spawned = std::thread::Builder::new()
            .name("witness-conn".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let peer = stream
                    .peer_addr()
                    .map_or_else(|_| "?".to_string(), |a| a.to_string());
                if let Err(e) = serve(stream, &grants) {
                    tracing::debug!("connection from {peer} ended: {e}");
                }
                connections.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a connection thread: {e}");
        }
    }
}

fn serve(stream: TcpStream, grants: &Mutex<Grants>) -> Result<(), WitnessError> {
    stream
        .set_read_timeout(Some(CONNECTION_IDLE_TIMEOUT))
        .map_err(|e| WitnessError::io("setting the read timeout", e))?;
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| WitnessError::io("setting the write timeout", e))?;
    let _ = stream.set_nodelay(true);
    let mut writer = stream
        .try_clone()
        .map_err(|e| WitnessError::io("cloning the connection", e))?;
    let mut reader = BufReader::new(stream).take(0);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        // Check before parsing: a line may not exceed the limit (+1 for its newline).
        reader.set_limit(LINE_BYTES_MAX as u64 + 1);
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| WitnessError::io("reading a request", e))?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            let why = if n > LINE_BYTES_MAX {
                format!("a request line longer than {LINE_BYTES_MAX} bytes")
            } else {
                "a request cut before its newline".to_string()
            };
            let _ = writer.write_all(protocol::encode_reply(&bad_request(why.clone())).as_bytes());
            return Err(WitnessError::Protocol(why));
        }
        let request = match protocol::decode_request(&line[..line.len() - 1]) {
            Ok(r) => r,
            Err(e) => {
                let why = match &e {
                    WitnessError::Protocol(why) => why.clone(),
                    other => other.to_string(),
                };
                let _ = writer.write_all(protocol::encode_reply(&bad_request(why)).as_bytes());
                return Err(e);
            }
        };
        let reply = {
            let mut g = grants.lock().map_err(|_| WitnessError::Poisoned)?;
            g.decide(&request, Instant::now())
        };
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("cannot persist a grant, refusing it: {e}");
                return Err(e);
            }
        };
        tracing::debug!("{request:?} -> {reply:?}");
        writer
            .write_all(protocol::encode_reply(&reply).as_bytes())
            .map_err(|e| WitnessError::io("writing a reply", e))?;
    }
}

fn bad_request(message: String) -> Reply {
    Reply::Refused {
        reason: RefuseReason::BadRequest,
        holder: None,
        generation: 0,
        retry_after_ms: 0,
        message,
    }
}
