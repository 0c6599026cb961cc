//! Benchmark of point-in-time images (not a timed test): how long opening an image and
//! reading its first block takes with journals of 10^5 and 10^6 writes, and how fast a
//! virtual image reads compared with the replica itself. Run with
//! `cargo bench -p cdp-appliance --bench image_open [-- WRITES...]`; prints a table.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cdp_appliance::config::GroupConfig;
use cdp_appliance::group::Group;
use cdp_appliance::image::{AccessRequest, ImageInfo, Images};
use cdp_appliance::point::ResolvedPoint;
use cdp_journal::{JournalConfig, RecordIn};
use cdp_nbd::client::Client;
use cdp_nbd::{ExportRegistry, Server, ServerConfig};
use cdp_types::{Endpoint, Seq};

const VOLUME_BYTES: u64 = 1 << 30;
const WRITE_BYTES: usize = 4096;
const APPEND_BATCH: usize = 512;
const READ_CHUNK: usize = 1 << 20;

fn main() {
    let counts: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let counts = if counts.is_empty() {
        vec![100_000, 1_000_000]
    } else {
        counts
    };
    println!("image_open: 1 GiB volume, random {WRITE_BYTES}-byte writes, replica distributed to the end");
    for n in counts {
        bench(n);
    }
}

fn open_group(dir: &Path) -> Arc<Group> {
    // From TOML, so every setting not named here takes its documented default.
    let config: GroupConfig = toml::from_str(&format!(
        "name = \"bench\"\njournal_capacity_bytes = {}\n\
         [[volume]]\nname = \"vol0\"\nsize = {VOLUME_BYTES}\nreplica = {:?}\n",
        64u64 << 30,
        dir.join("vol0.replica")
    ))
    .expect("group config");
    Group::open(
        dir,
        &config,
        JournalConfig::default(),
        Duration::from_millis(200),
        Duration::ZERO,
    )
    .expect("open group")
}

fn bench(writes: u64) {
    let tmp = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let group = open_group(tmp.path());
    let volume = group.volume("vol0").expect("volume");
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let blocks = VOLUME_BYTES / WRITE_BYTES as u64;
    let started = Instant::now();
    let mut batch = Vec::with_capacity(APPEND_BATCH);
    for i in 0..writes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let payload = Bytes::from(vec![(i % 251) as u8 + 1; WRITE_BYTES]);
        batch.push(
            RecordIn::write(volume.id, (x % blocks) * WRITE_BYTES as u64, payload)
                .with_source_seq(i + 1),
        );
        if batch.len() == APPEND_BATCH || i + 1 == writes {
            group.append(&volume, &batch).expect("append");
            batch.clear();
        }
    }
    let appended = started.elapsed();
    let last = group.last_seq();
    while group.distributed_seq() < last {
        group.urge_distribution();
        std::thread::sleep(Duration::from_millis(50));
    }
    let distributed = started.elapsed() - appended;

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let registry = ExportRegistry::new();
    let socket = tmp.path().join("image.sock");
    let listener = {
        let _guard = rt.enter();
        tokio::net::UnixListener::bind(&socket).expect("bind")
    };
    let server = Arc::new(Server::new(registry.clone(), ServerConfig::default()));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let serving = rt.spawn({
        let server = Arc::clone(&server);
        async move {
            let stopped = async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            };
            server.serve_unix(listener, stopped).await
        }
    });
    let endpoint = Endpoint::Unix(socket.clone());
    let images_registry = registry.clone();
    let images = Arc::new(Images::new(
        registry,
        endpoint.to_string(),
        tmp.path().join("scratch"),
    ));

    println!(
        "\n{writes} writes: appended in {:.1} s, distributed (with undo capture) in {:.1} s",
        appended.as_secs_f64(),
        distributed.as_secs_f64()
    );
    println!(
        "  {:<12} {:>14} {:>16} {:>18}",
        "point", "open+read us", "of which open us", "via NBD client us"
    );
    for (label, at) in [
        ("oldest", Seq(1)),
        ("middle", Seq(last.0 / 2)),
        ("latest", last),
    ] {
        // Library level: pin + first block.
        let t = Instant::now();
        let pin = group.pin_point(at).expect("pin");
        let opened = t.elapsed();
        let mut block = vec![0u8; 4096];
        group
            .read_at_point(&volume, at, 0, &mut block)
            .expect("read first block");
        let lib = t.elapsed();
        group.unpin(pin);
        // End to end: image access, NBD handshake, first block.
        let t = Instant::now();
        let info = open_virtual(&images, &group, at);
        let mut client = Client::connect(&endpoint, &info.exports[0].export).expect("connect");
        client.read(0, &mut block).expect("nbd read");
        let nbd = t.elapsed();
        client.disconnect().ok();
        images.release(&info.id).expect("release");
        println!(
            "  {:<12} {:>14.0} {:>16.0} {:>18.0}",
            format!("{label} ({})", at.0),
            lib.as_secs_f64() * 1e6,
            opened.as_secs_f64() * 1e6,
            nbd.as_secs_f64() * 1e6
        );
    }

    // Throughput: the whole volume at the middle point vs the replica file, interleaved.
    let at = Seq(last.0 / 2);
    let pin = group.pin_point(at).expect("pin");
    let mut buf = vec![0u8; READ_CHUNK];
    let mut image_s = Vec::new();
    let mut replica_s = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let mut off = 0;
        while off < VOLUME_BYTES {
            group
                .read_at_point(&volume, at, off, &mut buf)
                .expect("image read");
            off += READ_CHUNK as u64;
        }
        image_s.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut off = 0;
        while off < VOLUME_BYTES {
            group
                .read_replica(&volume, off, &mut buf)
                .expect("replica read");
            off += READ_CHUNK as u64;
        }
        replica_s.push(t.elapsed().as_secs_f64());
    }
    // The same through NBD: the image's export against the replica file served by the
    // same NBD server, as a client sees both.
    let info = open_virtual(&images, &group, at);
    registry_for_replica(&images_registry, tmp.path().join("vol0.replica"));
    let mut image_nbd_s = Vec::new();
    let mut replica_nbd_s = Vec::new();
    for _ in 0..3 {
        for (export, out) in [
            (info.exports[0].export.as_str(), &mut image_nbd_s),
            ("replica", &mut replica_nbd_s),
        ] {
            let mut client = Client::connect(&endpoint, export).expect("connect");
            let t = Instant::now();
            let mut off = 0;
            while off < VOLUME_BYTES {
                client.read(off, &mut buf).expect("nbd read");
                off += READ_CHUNK as u64;
            }
            out.push(t.elapsed().as_secs_f64());
            client.disconnect().ok();
        }
    }
    images.release(&info.id).expect("release");
    group.unpin(pin);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (img, rep) = (median(&mut image_s), median(&mut replica_s));
    let mib = VOLUME_BYTES as f64 / (1 << 20) as f64;
    println!(
        "  read 1 GiB in 1 MiB reads (median of 3): image at seq {} {:.0} MiB/s, replica {:.0} MiB/s, ratio {:.2}",
        at.0,
        mib / img,
        mib / rep,
        rep / img
    );
    let (img, rep) = (median(&mut image_nbd_s), median(&mut replica_nbd_s));
    println!(
        "  same through NBD (one connection): image {:.0} MiB/s, replica {:.0} MiB/s, ratio {:.2}",
        mib / img,
        mib / rep,
        rep / img
    );
    println!("  index: {:?}", group.status().history);
    let _ = stop_tx.send(true);
    let _ = rt.block_on(serving);
    group.stop();
}

/// Serves the replica file read-only as export `replica`, the baseline for image reads.
fn registry_for_replica(registry: &ExportRegistry, path: std::path::PathBuf) {
    let file = cdp_types::BlockFile::open(&path, true).expect("open replica");
    registry
        .add("replica", "replica", Arc::new(FileExport(file)))
        .expect("add replica export");
}

struct FileExport(cdp_types::BlockFile);

#[async_trait::async_trait]
impl cdp_nbd::Export for FileExport {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn features(&self) -> cdp_nbd::ExportFeatures {
        cdp_nbd::ExportFeatures {
            read_only: true,
            can_flush: false,
            can_fua: false,
            can_trim: false,
            can_write_zeroes: false,
            can_multi_conn: true,
        }
    }
    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, cdp_nbd::ExportError> {
        Ok(self.0.read_at(offset, length as usize)?)
    }
    async fn write(&self, _: u64, _: Bytes, _: bool) -> Result<(), cdp_nbd::ExportError> {
        Err(cdp_nbd::ExportError::NotPermitted("read-only".into()))
    }
    async fn flush(&self) -> Result<(), cdp_nbd::ExportError> {
        Ok(())
    }
    async fn trim(&self, _: u64, _: u32, _: bool) -> Result<(), cdp_nbd::ExportError> {
        Err(cdp_nbd::ExportError::NotPermitted("read-only".into()))
    }
    async fn write_zeroes(
        &self,
        _: u64,
        _: u32,
        _: bool,
        _: bool,
    ) -> Result<(), cdp_nbd::ExportError> {
        Err(cdp_nbd::ExportError::NotPermitted("read-only".into()))
    }
}

/// A read-only virtual image of `group` at `at`, as `cdp image access --at seq:N` opens it.
fn open_virtual(images: &Arc<Images>, group: &Arc<Group>, at: Seq) -> ImageInfo {
    images
        .access(
            group,
            AccessRequest {
                point: format!("seq:{}", at.0),
                resolved: ResolvedPoint {
                    seq: at.0,
                    timestamp_ns: 0,
                    time: String::new(),
                    bookmark: None,
                },
                writable: false,
                logged: false,
            },
        )
        .expect("image access")
}
