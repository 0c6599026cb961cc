//! A TCP forwarder that delays every chunk by a fixed time in each direction: link latency for `benches/replication.sh` where the kernel has no netem.
//!
//! usage: `delay_proxy LISTEN TARGET DELAY_US` (delay per direction in microseconds; the
//! round trip gains twice that). Each accepted connection gets its own connection to TARGET
//! and two pumps, one per direction. A pump's reader stamps each chunk with the instant it
//! is due (arrival + delay) and queues it; its writer sends each chunk when due, in order.
//! So the delay is added once per chunk without stop-and-wait: the throughput is the
//! link's, and only the latency grows (as with netem). EOF is passed on as a half-close
//! once the chunks before it are delivered; an error closes both sides.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes read from a socket at once: one chunk.
const CHUNK_BYTES_MAX: usize = 64 * 1024;
/// Chunks queued per direction (64 MiB): far more than a delay of a few milliseconds holds
/// at loopback speed, so the queue never throttles; a full queue stops the reader, which is
/// TCP's own back-pressure.
const CHUNKS_QUEUED_MAX: usize = 1024;
/// Connections forwarded at once; more are refused (closed at accept).
const CONNECTIONS_MAX: usize = 64;

struct Chunk {
    due: Instant,
    bytes: Vec<u8>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: delay_proxy LISTEN TARGET DELAY_US");
        std::process::exit(2);
    }
    let delay = match args[3].parse::<u64>() {
        Ok(us) => Duration::from_micros(us),
        Err(e) => {
            eprintln!("delay_proxy: DELAY_US {:?}: {e}", args[3]);
            std::process::exit(2);
        }
    };
    let target = match args[2].to_socket_addrs().ok().and_then(|mut a| a.next()) {
        Some(a) => a,
        None => {
            eprintln!("delay_proxy: cannot resolve target {:?}", args[2]);
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind(&args[1]) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("delay_proxy: cannot listen on {}: {e}", args[1]);
            std::process::exit(1);
        }
    };
    eprintln!(
        "delay_proxy: {} -> {target}, {} us each way",
        args[1],
        delay.as_micros()
    );
    let open = Arc::new(AtomicUsize::new(0));
    for client in listener.incoming() {
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                eprintln!("delay_proxy: accept: {e}");
                continue;
            }
        };
        if open.load(Ordering::Relaxed) >= CONNECTIONS_MAX {
            eprintln!("delay_proxy: {CONNECTIONS_MAX} connections open; refusing one");
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let open = Arc::clone(&open);
        std::thread::spawn(move || {
            if let Err(e) = forward(client, target, delay) {
                eprintln!("delay_proxy: connection: {e}");
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Forwards one connection in both directions until both have ended.
fn forward(client: TcpStream, target: SocketAddr, delay: Duration) -> std::io::Result<()> {
    let server = TcpStream::connect(target)?;
    // Nagle would hold small messages (acks) back on top of the delay.
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let up = pump(client.try_clone()?, server.try_clone()?, delay)?;
    let down = pump(server, client, delay)?;
    for half in [up, down] {
        for t in half {
            let _ = t.join();
        }
    }
    Ok(())
}

/// Starts the reader and the writer of one direction.
fn pump(
    from: TcpStream,
    to: TcpStream,
    delay: Duration,
) -> std::io::Result<[std::thread::JoinHandle<()>; 2]> {
    let (tx, rx) = sync_channel::<Chunk>(CHUNKS_QUEUED_MAX);
    let from_for_errors = from.try_clone()?;
    let to_for_errors = to.try_clone()?;
    let reader = std::thread::spawn(move || read_chunks(from, to_for_errors, delay, tx));
    let writer = std::thread::spawn(move || write_when_due(rx, to, from_for_errors));
    Ok([reader, writer])
}

/// Reads chunks as they arrive and queues each with its due time; returns at EOF or error
/// (dropping the sender tells the writer).
fn read_chunks(mut from: TcpStream, to: TcpStream, delay: Duration, tx: SyncSender<Chunk>) {
    loop {
        let mut bytes = vec![0u8; CHUNK_BYTES_MAX];
        match from.read(&mut bytes) {
            Ok(0) => return,
            Ok(n) => {
                bytes.truncate(n);
                let chunk = Chunk {
                    due: Instant::now() + delay,
                    bytes,
                };
                if tx.send(chunk).is_err() {
                    // The writer failed: nothing more can be delivered.
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

/// Sends each queued chunk once it is due, in order; after the last one passes EOF on.
fn write_when_due(rx: Receiver<Chunk>, mut to: TcpStream, from: TcpStream) {
    while let Ok(chunk) = rx.recv() {
        let now = Instant::now();
        if chunk.due > now {
            std::thread::sleep(chunk.due - now);
        }
        if to.write_all(&chunk.bytes).is_err() {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
