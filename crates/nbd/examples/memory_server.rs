//! A RAM-backed NBD server for manual checks with real clients (nbdinfo, qemu-io, qemu-img bench).
//!
//! Usage: `cargo run --release -p cdp-nbd --example memory_server -- (unix PATH | tcp ADDR) [SIZE_MIB]`

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use cdp_nbd::{Export, ExportError, ExportFeatures, ExportRegistry, Server, ServerConfig};

/// A volume in memory, split into independently locked 1 MiB stripes so parallel requests
/// do not serialise on one lock.
struct Memory {
    stripes: Vec<Mutex<Vec<u8>>>,
    size: u64,
}

const STRIPE: u64 = 1 << 20;

impl Memory {
    fn new(size: u64) -> Self {
        let count = size.div_ceil(STRIPE);
        let stripes = (0..count)
            .map(|_| Mutex::new(vec![0u8; STRIPE as usize]))
            .collect();
        Self { stripes, size }
    }

    /// Calls `f(stripe, offset in stripe, offset in request, length)` for each piece.
    fn each(&self, offset: u64, length: u64, mut f: impl FnMut(&mut [u8], usize, usize, usize)) {
        let mut done = 0;
        while done < length {
            let at = offset + done;
            let in_stripe = (at % STRIPE) as usize;
            let n = (STRIPE - at % STRIPE).min(length - done) as usize;
            let mut stripe = self.stripes[(at / STRIPE) as usize].lock().unwrap();
            f(&mut stripe, in_stripe, done as usize, n);
            done += n as u64;
        }
    }
}

#[async_trait]
impl Export for Memory {
    fn size(&self) -> u64 {
        self.size
    }

    fn features(&self) -> ExportFeatures {
        ExportFeatures {
            read_only: false,
            can_flush: true,
            can_fua: true,
            can_trim: true,
            can_write_zeroes: true,
            can_multi_conn: true,
        }
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, ExportError> {
        let mut out = vec![0u8; length as usize];
        self.each(offset, length.into(), |stripe, at, done, n| {
            out[done..done + n].copy_from_slice(&stripe[at..at + n])
        });
        Ok(out.into())
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), ExportError> {
        self.each(offset, data.len() as u64, |stripe, at, done, n| {
            stripe[at..at + n].copy_from_slice(&data[done..done + n])
        });
        Ok(())
    }

    async fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), ExportError> {
        self.write_zeroes(offset, length, fua, true).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        _fua: bool,
        _may_trim: bool,
    ) -> Result<(), ExportError> {
        self.each(offset, length.into(), |stripe, at, _, n| {
            stripe[at..at + n].fill(0)
        });
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: memory_server (unix PATH | tcp ADDR) [SIZE_MIB]";
    let (kind, place) = match (args.first(), args.get(1)) {
        (Some(kind), Some(place)) => (kind.clone(), place.clone()),
        _ => return Err(usage.into()),
    };
    let size_mib: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let registry = ExportRegistry::new();
    registry.add(
        "memory",
        "RAM-backed test volume",
        Arc::new(Memory::new(size_mib << 20)),
    )?;
    let server = Server::new(registry, ServerConfig::default());
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match kind.as_str() {
        "unix" => {
            server
                .serve_unix(tokio::net::UnixListener::bind(&place)?, ctrl_c)
                .await?
        }
        "tcp" => {
            server
                .serve_tcp(tokio::net::TcpListener::bind(&place).await?, ctrl_c)
                .await?
        }
        _ => return Err(usage.into()),
    }
    Ok(())
}
