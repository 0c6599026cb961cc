//! A TCP forwarder the test drives to break a link (split link or replication link) the way
//! networks break, without crashing either process.
//!
//! Fault model, per forwarded connection pair (client = the connecting process, server = the
//! target):
//! - `reset`: both sockets closed at once (a cable pulled and the peers told);
//! - `blackhole`: nothing is relayed and nothing is closed, as by a dead switch port: bytes
//!   (and closes) are held, not dropped, because TCP retransmits and never leaves a gap in a
//!   stream; new connections are accepted and then get silence (their bytes are dropped: they
//!   have no server yet). `heal` delivers what was held, in order, so a connection that
//!   outlived the blackhole carries on, and one a peer abandoned meanwhile is closed then;
//! - `half_open`: the client's socket is closed, the server's stays open and silent (the
//!   client's host lost power, or a NAT forgot the flow);
//! - `delay`, `throttle`, `loss`: every chunk is released `delay` after it arrived, at most
//!   `throttle` bytes/s per direction, and a `loss` share of chunks is held one retransmission
//!   timeout (200 ms) longer, which is what loss looks like above TCP (this kernel has no netem).
//!
//! `cut`/`restore` (close everything and refuse new connections) remain for older tests.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// What a lost chunk costs: one TCP retransmission timeout.
const LOSS_PENALTY: Duration = Duration::from_millis(200);

#[derive(Default)]
struct Shaping {
    delay_us: AtomicU64,
    /// Bytes per second per direction; 0: unlimited.
    throttle_bytes_per_s: AtomicU64,
    /// Parts per million of chunks held for `LOSS_PENALTY`.
    loss_ppm: AtomicU64,
    blackhole: AtomicBool,
}

/// One forwarded connection: the client's and the server's socket.
struct Pair {
    client: TcpStream,
    server: Option<TcpStream>,
    /// Set when the test closed it on purpose: relays must not propagate anything more.
    dead: Arc<AtomicBool>,
}

/// One forwarder on 127.0.0.1:`port` towards a target address.
pub struct LinkProxy {
    pub port: u16,
    open: Arc<AtomicBool>,
    shaping: Arc<Shaping>,
    live: Arc<Mutex<Vec<Pair>>>,
    /// Server sockets left open by `half_open`, kept so they are not closed by a drop.
    stale: Mutex<Vec<TcpStream>>,
}

impl LinkProxy {
    pub fn start(target: String) -> LinkProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let shaping = Arc::new(Shaping::default());
        let live: Arc<Mutex<Vec<Pair>>> = Arc::new(Mutex::new(Vec::new()));
        let (open2, shaping2, live2) = (Arc::clone(&open), Arc::clone(&shaping), Arc::clone(&live));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !open2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let dead = Arc::new(AtomicBool::new(false));
                if shaping2.blackhole.load(Ordering::SeqCst) {
                    // Accepted, then silence: read and drop what the client sends.
                    let mut sink = client.try_clone().unwrap();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 65536];
                        while matches!(sink.read(&mut buf), Ok(n) if n > 0) {}
                    });
                    live2.lock().unwrap().push(Pair {
                        client,
                        server: None,
                        dead,
                    });
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                for (from, to) in [(&client, &server), (&server, &client)] {
                    relay(
                        from.try_clone().unwrap(),
                        to.try_clone().unwrap(),
                        Arc::clone(&shaping2),
                        Arc::clone(&dead),
                    );
                }
                live2.lock().unwrap().push(Pair {
                    client,
                    server: Some(server),
                    dead,
                });
            }
        });
        LinkProxy {
            port,
            open,
            shaping,
            live,
            stale: Mutex::new(Vec::new()),
        }
    }

    /// Breaks every forwarded connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.reset();
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// Closes both sockets of every forwarded connection; new connections are forwarded.
    pub fn reset(&self) {
        for p in self.live.lock().unwrap().drain(..) {
            p.dead.store(true, Ordering::SeqCst);
            let _ = p.client.shutdown(Shutdown::Both);
            if let Some(s) = p.server {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// Stops relaying without closing anything (a silent partition).
    pub fn blackhole(&self) {
        self.shaping.blackhole.store(true, Ordering::SeqCst);
    }

    /// Relays again after `blackhole`.
    pub fn heal(&self) {
        self.shaping.blackhole.store(false, Ordering::SeqCst);
    }

    /// Closes the client's side of every forwarded connection and leaves the server's side
    /// open and silent, so the target only learns of it by its own deadline.
    pub fn half_open(&self) {
        for p in self.live.lock().unwrap().drain(..) {
            p.dead.store(true, Ordering::SeqCst);
            let _ = p.client.shutdown(Shutdown::Both);
            if let Some(s) = p.server {
                self.stale.lock().unwrap().push(s);
            }
        }
    }

    /// Each chunk is released this long after it arrived (per direction, in order).
    pub fn delay(&self, delay: Duration) {
        self.shaping
            .delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
    }

    /// At most this many bytes per second per direction (0: unlimited).
    pub fn throttle(&self, bytes_per_s: u64) {
        self.shaping
            .throttle_bytes_per_s
            .store(bytes_per_s, Ordering::SeqCst);
    }

    /// This share (0.0..=1.0) of chunks is held one retransmission timeout longer.
    pub fn loss(&self, share: f64) {
        self.shaping
            .loss_ppm
            .store((share.clamp(0.0, 1.0) * 1e6) as u64, Ordering::SeqCst);
    }
}

/// Copies `from` to `to`: a reader thread stamps chunks, a writer thread releases them once
/// their delay (and throttle, and loss penalty) has passed, so delay adds latency without
/// stop-and-wait. In a blackhole, chunks and closes are held until it heals.
fn relay(mut from: TcpStream, mut to: TcpStream, shaping: Arc<Shaping>, dead: Arc<AtomicBool>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let shaping_r = Arc::clone(&shaping);
    let dead_r = Arc::clone(&dead);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (buf.as_ptr() as u64);
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if dead_r.load(Ordering::SeqCst) {
                continue;
            }
            let mut at =
                Instant::now() + Duration::from_micros(shaping_r.delay_us.load(Ordering::SeqCst));
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if rng % 1_000_000 < shaping_r.loss_ppm.load(Ordering::SeqCst) {
                at += LOSS_PENALTY;
            }
            if tx.send((at, buf[..n].to_vec())).is_err() {
                break;
            }
        }
        // A close is relayed (after a blackhole heals) unless the test closed the connection
        // on purpose (a half-open connection must stay open on the other side).
        if !dead_r.load(Ordering::SeqCst) {
            let _ = tx.send((Instant::now(), Vec::new()));
        }
    });
    std::thread::spawn(move || {
        let mut not_before = Instant::now();
        while let Ok((at, chunk)) = rx.recv() {
            // A blackhole holds the chunk (and everything behind it) until it heals.
            while shaping.blackhole.load(Ordering::SeqCst) && !dead.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            if dead.load(Ordering::SeqCst) {
                return;
            }
            if chunk.is_empty() {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
            let at = at.max(not_before);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if dead.load(Ordering::SeqCst) {
                return;
            }
            let rate = shaping.throttle_bytes_per_s.load(Ordering::SeqCst);
            not_before = Instant::now();
            if rate > 0 {
                not_before += Duration::from_secs_f64(chunk.len() as f64 / rate as f64);
            }
            if to.write_all(&chunk).is_err() {
                return;
            }
        }
    });
}

/// A site whose split link runs over TCP through a `LinkProxy`, with `deadline_ms` as
/// `link_deadline_ms` on both ends; started and settled. Restarts of either process keep the
/// proxy in the path (the splitter's config names the proxy, the proxy the appliance's port).
pub fn site_through_proxy(volumes: &[(&str, u64)], deadline_ms: u64) -> (super::Site, LinkProxy) {
    let options = super::SiteOptions {
        link_tcp: true,
        nbd_tcp: false,
    };
    let mut site = super::Site::create(volumes, options);
    site.add_appliance_settings(&format!("link_deadline_ms = {deadline_ms}\n"), "");
    let text = std::fs::read_to_string(&site.splitter_config).unwrap();
    let target = text
        .lines()
        .find_map(|l| l.strip_prefix("appliance = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("appliance address in splitter.toml")
        .to_string();
    let proxy = LinkProxy::start(target.clone());
    let text = text
        .replace(
            &format!("appliance = \"{target}\""),
            &format!("appliance = \"127.0.0.1:{}\"", proxy.port),
        )
        .replace(
            "handshake_timeout_s = 60\n",
            &format!("handshake_timeout_s = 60\nlink_deadline_ms = {deadline_ms}\n"),
        );
    std::fs::write(&site.splitter_config, text).unwrap();
    site.start_role(super::Role::Appliance);
    site.start_role(super::Role::Splitter);
    site.settle();
    (site, proxy)
}
