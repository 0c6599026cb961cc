//! The appliance's TOML configuration.

use std::collections::BTreeSet;
use std::path::PathBuf;

use cdp_types::{validate_name, Endpoint};
use serde::{Deserialize, Serialize};

use crate::error::ApplianceError;
use crate::limits::{JOURNAL_CAPACITY_BYTES_DEFAULT, JOURNAL_CAPACITY_SEGMENTS_MIN};

/// `appliance.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplianceConfig {
    /// Journals and appliance state live under this directory (created if missing).
    pub data_dir: PathBuf,
    /// Where splitters connect: `unix:PATH` or `HOST:PORT`.
    pub link_listen: Endpoint,
    /// Milliseconds a split link may pass no bytes at all from its splitter (heartbeats
    /// included, sent every quarter of this) before the appliance drops the connection; the
    /// volume then counts as possibly marking (bookmarks refused, later points not
    /// recoverable) until its splitter is back. Default 5000, 200..=600000.
    #[serde(default = "link_deadline_ms_default")]
    pub link_deadline_ms: u64,
    /// Milliseconds a replication link (shipper or receiver end) may pass no bytes before it
    /// is dropped and the shipper reconnects; an idle shipper sends a heartbeat every sixth
    /// of this. Status then shows the remote (or the source) as not connected. Set the same
    /// at both sites (the receiver must not time out between two heartbeats). Default 30000,
    /// 200..=600000.
    #[serde(default = "replication_deadline_ms_default")]
    pub replication_deadline_ms: u64,
    /// Log lines as readable `text` (default) or `json`, one object per line.
    #[serde(default)]
    pub log_format: cdp_types::LogFormat,
    /// Unix socket for `cdp status` and other control commands. Default `DATA_DIR/appliance.ctl`.
    #[serde(default)]
    pub control: Option<PathBuf>,
    /// Also let this group (name or gid) use the control socket: it becomes 0660 and
    /// group-owned. Default: owner only (0600).
    #[serde(default)]
    pub control_socket_group: Option<String>,
    /// Where point-in-time images are served over NBD: `unix:PATH` or `HOST:PORT`.
    /// Default `unix:DATA_DIR/image.sock`.
    #[serde(default)]
    pub image_nbd: Option<Endpoint>,
    /// Size at which a journal segment file is closed and a new one started.
    /// Default 256 MiB, minimum 1 MiB.
    #[serde(default)]
    pub journal_segment_bytes: Option<u64>,
    /// Milliseconds between background journal syncs when no host flush asked for one; bounds
    /// how far distribution to the replica can trail the journal. Default 200, minimum 1.
    #[serde(default = "sync_interval_default")]
    pub journal_sync_interval_ms: u64,
    /// Seconds distribution may wait for a pause in host writes before it writes the replica
    /// anyway. Distribution competes with the host for the disk; deferring it keeps bursts at
    /// full speed at the cost of replica lag (shown by `cdp status`). Default 30, minimum 0.
    #[serde(default = "distribution_delay_default")]
    pub distribution_delay_max_s: u64,
    // --- remote replication ---
    /// Where this appliance accepts replication links from other appliances (`HOST:PORT`),
    /// for its groups with `source = "remote"`. Default: none (no group here is a remote copy).
    #[serde(default)]
    pub replication_listen: Option<std::net::SocketAddr>,
    /// Mutual TLS for `replication_listen`: `{ ca = PATH, cert = PATH, key = PATH }` (PEM).
    /// A source must present a certificate signed by `ca`; this appliance proves itself with
    /// `cert`/`key`. Required with `replication_listen` unless `replication_plaintext = true`.
    #[serde(default)]
    pub replication_tls: Option<TlsFilesConfig>,
    /// Accept replication links unencrypted and unauthenticated (trusted networks, tests).
    /// Default false: it must be said explicitly, and excludes `replication_tls`.
    #[serde(default)]
    pub replication_plaintext: bool,
    // --- end remote replication ---
    /// Serve Prometheus metrics at `http://ADDR/metrics`, for example `127.0.0.1:9721`.
    /// Default: none (off; `cdp up` turns it on on loopback). An address off loopback is
    /// served with a warning: the metrics name groups and carry no authentication.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The `site` label of every metric and event. Default: the host's name.
    #[serde(default)]
    pub site: Option<String>,
    /// The event log (`cdp events`): state changes as JSON lines. Default
    /// `DATA_DIR/events.jsonl`.
    #[serde(default)]
    pub events_log: Option<PathBuf>,
    /// Bytes the event log may take before its older half is dropped (it keeps up to about
    /// twice this). Default 4 MiB, minimum 64 KiB.
    #[serde(default = "events_log_bytes_default")]
    pub events_log_bytes_max: u64,
    /// Serve the web timeline (`http://ADDR/`) of every group, for example `127.0.0.1:9722`.
    /// Default: none (off). Only a loopback address is accepted: the page carries no TLS,
    /// so off loopback it refuses to start (reach it through an SSH tunnel or a TLS proxy).
    #[serde(default)]
    pub web_listen: Option<std::net::SocketAddr>,
    /// Let the web page take bookmarks and open and release images. Default false
    /// (read-only). Requires `web_token`; every changing request must carry it as
    /// `Authorization: Bearer TOKEN`.
    #[serde(default)]
    pub web_admin: bool,
    /// The bearer token `web_admin` requests must present. Default none; at least 16
    /// characters.
    #[serde(default)]
    pub web_token: Option<String>,
    #[serde(default)]
    pub group: Vec<GroupConfig>,
    /// Alert targets: each `[[alert]]` names event classes and a command or webhook.
    #[serde(default)]
    pub alert: Vec<cdp_metrics::alert::AlertConfig>,
}

fn link_deadline_ms_default() -> u64 {
    cdp_link::limits::LINK_DEADLINE_MS_DEFAULT
}

fn events_log_bytes_default() -> u64 {
    cdp_metrics::event_log::EVENTS_LOG_BYTES_DEFAULT
}

fn replication_deadline_ms_default() -> u64 {
    crate::limits::REPLICATION_DEADLINE_MS_DEFAULT
}

fn distribution_delay_default() -> u64 {
    30
}

fn journal_compress_default() -> bool {
    // Compression runs on the host's write path; measured, it cost 10-15 % of 4 KiB write
    // rates on fio's barely compressible data, so it is opt-in until it moves off that path.
    false
}

fn journal_capacity_default() -> u64 {
    JOURNAL_CAPACITY_BYTES_DEFAULT
}

fn sync_interval_default() -> u64 {
    200
}

/// A consistency group: volumes whose writes share one order and one journal.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub name: String,
    /// Journal size in bytes above which the oldest whole segments are released (deleted),
    /// once the replica holds every record in them (the replica is the base image; the journal
    /// is the history after it). Released history is no longer recoverable: `first_seq` in
    /// `cdp status` is the oldest point kept. If distribution is so far behind that nothing may
    /// be released, the journal keeps growing and status shows `journal_over_capacity`.
    /// Default 8 GiB; minimum two journal segments (smaller values are raised, with a warning).
    #[serde(default = "journal_capacity_default")]
    pub journal_capacity_bytes: u64,
    /// Also release segments whose records are all older than this many seconds (again only
    /// once distributed). Default: none, only capacity applies; minimum 1.
    #[serde(default)]
    pub journal_retention_s: Option<u64>,
    /// Store write payloads zstd-compressed in the journal when that saves space (level 1,
    /// computed on the appending thread). Default false: it costs host throughput (see
    /// ARCHITECTURE.md); turn it on for compressible data where journal space matters more.
    #[serde(default = "journal_compress_default")]
    pub journal_compress: bool,
    /// What happens when the journal is over capacity because distribution to the replica
    /// is behind (retention may only release distributed history): `release` (default) runs
    /// distribution at once, whatever the host is doing, so the oldest history can be
    /// released; `throttle` also holds new host writes (backpressure through the split link)
    /// until the journal is back within capacity. Either way `cdp status` shows it and a
    /// warning is logged.
    #[serde(default)]
    pub journal_full_policy: JournalFullPolicy,
    /// Consolidation of old history (`[group.consolidation]`): every point younger than
    /// `keep_all_s` stays, older history keeps one point per tier interval plus bookmarks
    /// created with `--keep`, and the payloads no kept point needs are dropped from journal
    /// and undo stream. Default: none (every point stays until retention releases it).
    #[serde(default)]
    pub consolidation: Option<crate::consolidation::ConsolidationConfig>,
    /// Archive the journal to object storage (`[group.archive]`). Default: none.
    #[serde(default)]
    pub archive: Option<crate::archiver::config::ArchiveConfig>,
    // --- remote replication ---
    /// `local` (default): hosts write this group through splitters. `remote`: this group is
    /// the remote copy of a group of the same name at another appliance, fed only by its
    /// replication link; splitters are refused (no two writable copies).
    #[serde(default)]
    pub source: GroupSource,
    /// Ship this group's journal to a remote appliance (`[group.remote]`). On a remote
    /// copy (`source = "remote"`) it names the peer to ship to once this copy is promoted
    /// (`cdp failover`), so replication reverses without a config change.
    #[serde(default)]
    pub remote: Option<RemoteConfig>,
    /// This site's name in the group's generation history (`cdp status` shows who was
    /// primary when). Default: the appliance's `site`, else the group's id in hex.
    #[serde(default)]
    pub site: Option<String>,
    // --- end remote replication ---
    #[serde(default)]
    pub volume: Vec<VolumeConfig>,
}

// --- remote replication ---
/// Where a group's writes come from (see `GroupConfig::source`), what a full journal does
/// (`GroupConfig::journal_full_policy`), and the remote link's mode and compression
/// (`RemoteConfig`): settings that `cdp status` reports, so the control protocol defines them.
pub use cdp_control::{CompressLevel, GroupSource, JournalFullPolicy, ReplicationMode};

/// See `RemoteConfig::unshipped_history`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnshippedHistory {
    #[default]
    Keep,
    Release,
}

/// `[group.remote]`: replication of the group's journal to another appliance.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// The remote appliance's `replication_listen` address, `HOST:PORT`.
    pub endpoint: String,
    /// Recovery point objective in seconds: `cdp status` flags the group and a warning is
    /// logged (once per episode) when the oldest record not yet durable at the remote is
    /// older than this. Default 30, minimum 1.
    #[serde(default = "rpo_s_default")]
    pub rpo_s: u64,
    /// Also a recovery point objective in bytes: exceeded when more journal bytes than
    /// this are not yet durable at the remote. Default: none (only `rpo_s`).
    #[serde(default)]
    pub rpo_bytes: Option<u64>,
    /// Async (and dynamic while asynchronous): while the RPO is exceeded and the link is up,
    /// hold host writes (backpressure through the split link, never an error) until the
    /// remote copy is back within it, so the host never runs further ahead of the remote
    /// than the RPO. Never while the link is down: an unreachable remote does not stop the
    /// host (the journal keeps the history). Default false.
    #[serde(default)]
    pub throttle_on_rpo: bool,
    /// What retention does with history the remote copy has not acknowledged when the
    /// journal is over capacity: `keep` (default) keeps it (the journal grows past its
    /// capacity while the remote is behind, with a warning); `release` releases it like any
    /// distributed history, and the remote copy is later resynchronised by regions (only
    /// the regions that differ are sent; its own history restarts at that point).
    #[serde(default)]
    pub unshipped_history: UnshippedHistory,
    /// zstd level for batches on the wire: 0 sends them uncompressed, 1..=19, or
    /// `"adaptive"` (default): chosen per batch from what holds the link back (see
    /// `replication/compression.rs`).
    #[serde(default)]
    pub compress_level: CompressLevel,
    /// Send repeated 4 KiB blocks (and all-zero ones) of writes as references to blocks
    /// both ends still hold from this connection (`cdp_link::dedup_window`). Default true.
    #[serde(default = "dedup_default")]
    pub dedup: bool,
    /// Bytes of recently sent blocks each end keeps for dedup references (memory at both
    /// ends, per link). Default 64 MiB; 1 MiB..=256 MiB, rounded down to 4 KiB.
    #[serde(default = "dedup_window_bytes_default")]
    pub dedup_window_bytes: u64,
    /// `async` (default): the host is never held for the remote copy. `sync`: a host write
    /// is acknowledged only once the remote copy made it durable, and a FLUSH means durable
    /// at both sites; while the remote is unreachable host writes wait. `dynamic`: sync,
    /// but once host writes have waited `sync_wait_ms_max` for the remote it runs async
    /// until the remote keeps up again.
    #[serde(default)]
    pub mode: ReplicationMode,
    /// `dynamic` mode: how long host writes may wait for the remote copy before the group
    /// falls back to async. Default 5000, minimum 100.
    #[serde(default = "sync_wait_ms_max_default")]
    pub sync_wait_ms_max: u64,
    /// Limit for replication bytes on the wire (after compression), bytes per second.
    /// Default: none. Minimum `BANDWIDTH_BYTES_PER_S_MIN` (smaller values are raised).
    #[serde(default)]
    pub bandwidth_bytes_per_s: Option<u64>,
    /// Mutual TLS towards the remote: `{ ca = PATH, cert = PATH, key = PATH, server_name = NAME }`
    /// (PEM). The remote must present a certificate signed by `ca` and valid for
    /// `server_name` (default: the endpoint's host; an IP address matches an IP SAN); this
    /// appliance proves itself with `cert`/`key`. Required unless `plaintext = true`.
    #[serde(default)]
    pub tls: Option<RemoteTlsConfig>,
    /// Ship unencrypted and unauthenticated (trusted networks, tests). Default false: it must
    /// be said explicitly, and excludes `tls`.
    #[serde(default)]
    pub plaintext: bool,
}

/// PEM files of one side of a mutually authenticated TLS link.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFilesConfig {
    /// The CA certificate(s) a peer's certificate must chain to.
    pub ca: PathBuf,
    /// This appliance's certificate (chain), leaf first.
    pub cert: PathBuf,
    /// The private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `[group.remote] tls`: `TlsFilesConfig` plus the name the remote's certificate must carry.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteTlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// DNS name or IP address expected in the remote's certificate. Default: the endpoint's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

fn sync_wait_ms_max_default() -> u64 {
    5000
}

/// The smallest `sync_wait_ms_max`: the shipper looks at the lag a few times a second.
pub const SYNC_WAIT_MS_MAX_MIN: u64 = 100;

/// The smallest bandwidth limit: below it one heartbeat-sized batch would take seconds.
pub const BANDWIDTH_BYTES_PER_S_MIN: u64 = 64 * 1024;

fn rpo_s_default() -> u64 {
    30
}

fn dedup_default() -> bool {
    true
}

fn dedup_window_bytes_default() -> u64 {
    cdp_link::dedup_window::DEDUP_WINDOW_BYTES_DEFAULT as u64
}

/// The smallest dedup window: below it references would rarely reach the previous batch.
pub const DEDUP_WINDOW_BYTES_MIN: u64 = 1024 * 1024;

impl GroupConfig {
    /// Checks the group's replication settings, clamping soft mistakes with a warning.
    fn sanitize_replication(&mut self, replication_listen: bool) -> Result<(), ApplianceError> {
        if self.source == GroupSource::Remote && !replication_listen {
            return Err(ApplianceError::Config(format!(
                "group {:?} is a remote copy but replication_listen is not set",
                self.name
            )));
        }
        if let Some(r) = &mut self.remote {
            if r.endpoint.trim().is_empty() {
                return Err(ApplianceError::Config(format!(
                    "group {:?}: remote.endpoint is empty",
                    self.name
                )));
            }
            check_remote_security(&self.name, r)?;
            if r.rpo_s == 0 {
                tracing::warn!(group = %self.name, "remote.rpo_s = 0; using 1");
                r.rpo_s = 1;
            }
            if let CompressLevel::Fixed(level) = r.compress_level {
                if !(0..=19).contains(&level) {
                    let clamped = level.clamp(0, 19);
                    tracing::warn!(group = %self.name, "remote.compress_level = {level}; using {clamped}");
                    r.compress_level = CompressLevel::Fixed(clamped);
                }
            }
            let window_max = cdp_link::dedup_window::DEDUP_WINDOW_BYTES_MAX as u64;
            let window = r
                .dedup_window_bytes
                .clamp(DEDUP_WINDOW_BYTES_MIN, window_max)
                / cdp_link::dedup_window::DEDUP_BLOCK_BYTES as u64
                * cdp_link::dedup_window::DEDUP_BLOCK_BYTES as u64;
            if window != r.dedup_window_bytes {
                tracing::warn!(group = %self.name, "remote.dedup_window_bytes = {}; using {window}", r.dedup_window_bytes);
                r.dedup_window_bytes = window;
            }
            if r.sync_wait_ms_max < SYNC_WAIT_MS_MAX_MIN {
                tracing::warn!(group = %self.name, "remote.sync_wait_ms_max = {}; using {SYNC_WAIT_MS_MAX_MIN}", r.sync_wait_ms_max);
                r.sync_wait_ms_max = SYNC_WAIT_MS_MAX_MIN;
            }
            if let Some(limit) = r.bandwidth_bytes_per_s {
                if limit < BANDWIDTH_BYTES_PER_S_MIN {
                    tracing::warn!(group = %self.name, "remote.bandwidth_bytes_per_s = {limit}; using {BANDWIDTH_BYTES_PER_S_MIN}");
                    r.bandwidth_bytes_per_s = Some(BANDWIDTH_BYTES_PER_S_MIN);
                }
            }
        }
        Ok(())
    }
}

/// The link to the remote is either mutual TLS or explicitly plaintext: never by omission.
fn check_remote_security(group: &str, r: &RemoteConfig) -> Result<(), ApplianceError> {
    match (&r.tls, r.plaintext) {
        (None, false) => Err(ApplianceError::Config(format!(
            "group {group:?}: [group.remote] needs tls = {{ ca = \"CA.pem\", cert = \"CERT.pem\", \
             key = \"KEY.pem\" }} (mutual TLS; `cdp tls ca` and `cdp tls issue` make the files), \
             or plaintext = true to ship unencrypted and unauthenticated"
        ))),
        (Some(_), true) => Err(ApplianceError::Config(format!(
            "group {group:?}: [group.remote] sets both tls and plaintext = true; keep one"
        ))),
        (Some(tls), false) => match &tls.server_name {
            Some(name) if name.trim().is_empty() => Err(ApplianceError::Config(format!(
                "group {group:?}: [group.remote] tls.server_name is empty (leave it out to use \
                 the endpoint's host)"
            ))),
            _ => Ok(()),
        },
        (None, true) => Ok(()),
    }
}

impl ApplianceConfig {
    /// `replication_listen` accepts either mutual TLS or, explicitly, plaintext.
    fn check_listener_security(&self) -> Result<(), ApplianceError> {
        let bad = |m: String| Err(ApplianceError::Config(m));
        if let Some(listen) = self.web_listen {
            if !listen.ip().is_loopback() {
                return bad(format!(
                    "web_listen = {listen} is off loopback: the web timeline serves no TLS, so it \
                     only listens on loopback (reach it through an SSH tunnel or a TLS proxy)"
                ));
            }
        }
        if self.web_admin {
            match self.web_token.as_deref().map(str::trim) {
                None | Some("") => {
                    return bad("web_admin = true needs web_token: changing requests are \
                                only accepted with a bearer token, never without one"
                        .into())
                }
                Some(t) if t.len() < crate::limits::WEB_TOKEN_CHARS_MIN => {
                    return bad(format!(
                        "web_token has {} characters; at least {} are needed",
                        t.len(),
                        crate::limits::WEB_TOKEN_CHARS_MIN
                    ))
                }
                Some(_) => {}
            }
        }
        match (
            self.replication_listen,
            &self.replication_tls,
            self.replication_plaintext,
        ) {
            (_, Some(_), true) => bad(
                "both replication_tls and replication_plaintext = true are set; keep one".into(),
            ),
            (Some(listen), None, false) => bad(format!(
                "replication_listen = \"{listen}\" needs replication_tls = {{ ca = \"CA.pem\", \
                 cert = \"CERT.pem\", key = \"KEY.pem\" }} (mutual TLS; `cdp tls ca` and \
                 `cdp tls issue` make the files), or replication_plaintext = true to accept \
                 unencrypted, unauthenticated replication links"
            )),
            (None, Some(_), _) | (None, None, true) => {
                tracing::warn!(
                    "replication_tls / replication_plaintext are set but replication_listen is \
                     not; they are unused"
                );
                Ok(())
            }
            _ => Ok(()),
        }
    }
}
// --- end remote replication ---

/// A protected volume as the appliance knows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// Must match the splitter's volume name.
    pub name: String,
    /// Size in bytes; a splitter announcing another size is refused.
    pub size: u64,
    /// The local replica copy: a file (created sparse if missing) or a block device.
    pub replica: PathBuf,
    /// The production volume this site's splitter serves when this copy is promoted
    /// (`cdp failover`): the promotion writes the copy's current bytes there (holes stay
    /// holes) and a clean dirty bitmap beside it, so a splitter started on it resumes
    /// protection without a resync. Default: none (a promoted copy without it must be given
    /// production volumes by hand, and its splitters then copy them in full once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production: Option<PathBuf>,
}

impl ApplianceConfig {
    pub fn from_toml(text: &str) -> Result<ApplianceConfig, ApplianceError> {
        let config: ApplianceConfig =
            toml::from_str(text).map_err(|e| ApplianceError::Config(e.to_string()))?;
        config.sanitize()
    }

    pub fn image_nbd(&self) -> Endpoint {
        self.image_nbd
            .clone()
            .unwrap_or_else(|| Endpoint::Unix(self.data_dir.join("image.sock")))
    }

    pub fn events_log_path(&self) -> PathBuf {
        self.events_log
            .clone()
            .unwrap_or_else(|| self.data_dir.join("events.jsonl"))
    }

    pub fn control_path(&self) -> PathBuf {
        self.control
            .clone()
            .unwrap_or_else(|| self.data_dir.join("appliance.ctl"))
    }

    /// Rejects contradictions; clamps soft mistakes with a warning.
    pub fn sanitize(mut self) -> Result<ApplianceConfig, ApplianceError> {
        let bad = |m: String| Err(ApplianceError::Config(m));
        self.alert = std::mem::take(&mut self.alert)
            .into_iter()
            .map(|a| {
                a.sanitize()
                    .map_err(|e| ApplianceError::Config(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        let deadline = self.link_deadline_ms.clamp(
            cdp_link::limits::LINK_DEADLINE_MS_MIN,
            cdp_link::limits::LINK_DEADLINE_MS_MAX,
        );
        if deadline != self.link_deadline_ms {
            tracing::warn!(
                "link_deadline_ms = {} is outside {}..={}; using {deadline}",
                self.link_deadline_ms,
                cdp_link::limits::LINK_DEADLINE_MS_MIN,
                cdp_link::limits::LINK_DEADLINE_MS_MAX
            );
            self.link_deadline_ms = deadline;
        }
        let deadline = self.replication_deadline_ms.clamp(
            cdp_link::limits::LINK_DEADLINE_MS_MIN,
            cdp_link::limits::LINK_DEADLINE_MS_MAX,
        );
        if deadline != self.replication_deadline_ms {
            tracing::warn!(
                "replication_deadline_ms = {} is outside {}..={}; using {deadline}",
                self.replication_deadline_ms,
                cdp_link::limits::LINK_DEADLINE_MS_MIN,
                cdp_link::limits::LINK_DEADLINE_MS_MAX
            );
            self.replication_deadline_ms = deadline;
        }
        if self.group.is_empty() {
            return bad("no [[group]] configured".into());
        }
        let mut groups = BTreeSet::new();
        let mut volumes = BTreeSet::new();
        let mut replicas = BTreeSet::new();
        for g in &self.group {
            validate_name(&g.name).map_err(|e| ApplianceError::Config(e.to_string()))?;
            if !groups.insert(g.name.clone()) {
                return bad(format!("group {:?} is configured twice", g.name));
            }
            for v in &g.volume {
                validate_name(&v.name).map_err(|e| ApplianceError::Config(e.to_string()))?;
                if !volumes.insert(v.name.clone()) {
                    return bad(format!(
                        "volume {:?} is configured twice (a volume belongs to one group)",
                        v.name
                    ));
                }
                if !replicas.insert(v.replica.clone()) {
                    return bad(format!(
                        "replica {} is used by two volumes",
                        v.replica.display()
                    ));
                }
                if v.size == 0 {
                    return bad(format!("volume {:?} has size 0", v.name));
                }
            }
        }
        if let Some(bytes) = self.journal_segment_bytes {
            if bytes < 1024 * 1024 {
                tracing::warn!("journal_segment_bytes = {bytes} is below 1 MiB; using 1 MiB");
                self.journal_segment_bytes = Some(1024 * 1024);
            }
        }
        let segment_bytes = self
            .journal_segment_bytes
            .unwrap_or(cdp_journal::limits::SEGMENT_BYTES_DEFAULT);
        let capacity_min = segment_bytes.saturating_mul(JOURNAL_CAPACITY_SEGMENTS_MIN);
        for g in &mut self.group {
            // Retention never releases the active segment, so a capacity below two segments
            // could never be met.
            if g.journal_capacity_bytes < capacity_min {
                tracing::warn!(
                    group = %g.name,
                    "journal_capacity_bytes = {} is below two journal segments; using {capacity_min}",
                    g.journal_capacity_bytes
                );
                g.journal_capacity_bytes = capacity_min;
            }
            g.sanitize_replication(self.replication_listen.is_some())?;
            if let Some(c) = &g.consolidation {
                c.validate(&g.name)?;
            }
            if let Some(a) = &g.archive {
                a.validate(&g.name)?;
            }
            if g.journal_retention_s == Some(0) {
                tracing::warn!(group = %g.name, "journal_retention_s = 0; using 1");
                g.journal_retention_s = Some(1);
            }
        }
        if self.journal_sync_interval_ms == 0 {
            tracing::warn!("journal_sync_interval_ms = 0; using 1");
            self.journal_sync_interval_ms = 1;
        }
        self.check_listener_security()?;
        Ok(self)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal valid appliance.toml: one group, one volume (also the base of
    /// `managed_groups`' tests).
    pub(crate) const GOOD: &str = r#"
data_dir = "/d"
link_listen = "unix:/d/link.sock"
[[group]]
name = "default"
[[group.volume]]
name = "vol0"
size = 1048576
replica = "/d/r0.img"
"#;

    #[test]
    fn parses_defaults_and_rejects_contradictions() {
        let c = ApplianceConfig::from_toml(GOOD).unwrap();
        assert_eq!(c.control_path(), PathBuf::from("/d/appliance.ctl"));
        assert_eq!(c.journal_sync_interval_ms, 200);
        assert_eq!(
            c.group[0].journal_capacity_bytes,
            JOURNAL_CAPACITY_BYTES_DEFAULT
        );
        assert_eq!(c.group[0].journal_retention_s, None);
        assert!(!c.group[0].journal_compress);
        let small = GOOD.replace(
            "name = \"default\"\n",
            "name = \"default\"\njournal_capacity_bytes = 1\njournal_retention_s = 0\n",
        );
        let small = format!("journal_segment_bytes = 2097152\n{small}");
        let c = ApplianceConfig::from_toml(&small).unwrap();
        assert_eq!(c.group[0].journal_capacity_bytes, 2 * 2097152);
        assert_eq!(c.group[0].journal_retention_s, Some(1));
        let twice = format!("{GOOD}\n[[group]]\nname = \"default\"\n");
        assert!(ApplianceConfig::from_toml(&twice).is_err());
        let shared_replica = format!(
            "{GOOD}\n[[group.volume]]\nname = \"vol1\"\nsize = 1048576\nreplica = \"/d/r0.img\"\n"
        );
        assert!(ApplianceConfig::from_toml(&shared_replica).is_err());
        assert!(ApplianceConfig::from_toml("data_dir = \"/d\"\nlink_listen = \"x\"\n").is_err());
    }

    // --- remote replication ---
    #[test]
    fn remote_replication_keys() {
        let c = ApplianceConfig::from_toml(GOOD).unwrap();
        assert_eq!(c.group[0].source, GroupSource::Local);
        assert!(c.group[0].remote.is_none());
        assert!(c.replication_listen.is_none());
        let local = format!(
            "{GOOD}\n[group.remote]\nendpoint = \"dr:7701\"\nplaintext = true\nrpo_s = 0\ncompress_level = 40\n"
        );
        let c = ApplianceConfig::from_toml(&local).unwrap();
        let r = c.group[0].remote.as_ref().unwrap();
        assert_eq!(
            (r.endpoint.as_str(), r.rpo_s, r.compress_level),
            ("dr:7701", 1, CompressLevel::Fixed(19))
        );
        let defaults =
            format!("{GOOD}\n[group.remote]\nendpoint = \"dr:7701\"\nplaintext = true\n");
        let c = ApplianceConfig::from_toml(&defaults).unwrap();
        let r = c.group[0].remote.as_ref().unwrap();
        assert_eq!((r.rpo_s, r.compress_level), (30, CompressLevel::Adaptive));
        assert!(r.dedup);
        assert_eq!(r.dedup_window_bytes, 64 << 20);
        let remote = GOOD.replace(
            "name = \"default\"\n",
            "name = \"default\"\nsource = \"remote\"\n",
        );
        // A remote copy needs somewhere to accept its replication link.
        assert!(ApplianceConfig::from_toml(&remote).is_err());
        let remote = format!(
            "replication_listen = \"127.0.0.1:7701\"\nreplication_plaintext = true\n{remote}"
        );
        let c = ApplianceConfig::from_toml(&remote).unwrap();
        assert_eq!(c.group[0].source, GroupSource::Remote);
        // A remote copy does not ship onwards yet.
        let chained = format!("{remote}\n[group.remote]\nendpoint = \"x:1\"\n");
        assert!(ApplianceConfig::from_toml(&chained).is_err());
        let typo =
            format!("{GOOD}\n[group.remote]\nendpoint = \"x:1\"\nplaintext = true\nrpo = 3\n");
        assert!(ApplianceConfig::from_toml(&typo).is_err());
    }

    #[test]
    fn replication_deadline_defaults_and_clamps() {
        let c = ApplianceConfig::from_toml(GOOD).unwrap();
        assert_eq!(c.replication_deadline_ms, 30_000);
        for (given, used) in [(1, 200), (1500, 1500), (10_000_000, 600_000)] {
            let c =
                ApplianceConfig::from_toml(&format!("replication_deadline_ms = {given}\n{GOOD}"));
            assert_eq!(c.unwrap().replication_deadline_ms, used, "{given}");
        }
    }

    #[test]
    fn remote_link_security_keys() {
        let err = |text: &str| ApplianceConfig::from_toml(text).err().unwrap().to_string();
        // Neither TLS nor plaintext: refused, naming both keys.
        let bare = format!("{GOOD}\n[group.remote]\nendpoint = \"dr:7701\"\n");
        let e = err(&bare);
        assert!(
            e.contains("[group.remote] needs tls = {") && e.contains("plaintext = true"),
            "{e}"
        );
        let tls = format!(
            "{GOOD}\n[group.remote]\nendpoint = \"dr:7701\"\n\
             tls = {{ ca = \"/c/ca.pem\", cert = \"/c/cert.pem\", key = \"/c/key.pem\" }}\n"
        );
        let c = ApplianceConfig::from_toml(&tls).unwrap();
        let r = c.group[0].remote.as_ref().unwrap();
        let files = r.tls.as_ref().unwrap();
        assert_eq!(files.cert, PathBuf::from("/c/cert.pem"));
        assert_eq!(files.server_name, None);
        assert!(!r.plaintext);
        let both = format!("{tls}plaintext = true\n");
        assert!(
            err(&both).contains("both tls and plaintext"),
            "{}",
            err(&both)
        );
        let empty_name = tls.replace("key.pem\" }", "key.pem\", server_name = \" \" }");
        assert!(err(&empty_name).contains("server_name is empty"));
        let missing_key = tls.replace(", key = \"/c/key.pem\"", "");
        assert!(err(&missing_key).contains("key"), "{}", err(&missing_key));
        let typo = tls.replace("ca = ", "cafile = ");
        assert!(err(&typo).contains("cafile"), "{}", err(&typo));

        // The listener: the same choice, made explicitly.
        let remote = GOOD.replace(
            "name = \"default\"\n",
            "name = \"default\"\nsource = \"remote\"\n",
        );
        let bare = format!("replication_listen = \"127.0.0.1:7701\"\n{remote}");
        let e = err(&bare);
        assert!(
            e.contains("needs replication_tls = {") && e.contains("replication_plaintext = true"),
            "{e}"
        );
        let tls = format!(
            "replication_listen = \"127.0.0.1:7701\"\nreplication_tls = {{ ca = \"/c/ca.pem\", \
             cert = \"/c/cert.pem\", key = \"/c/key.pem\" }}\n{remote}"
        );
        let c = ApplianceConfig::from_toml(&tls).unwrap();
        assert_eq!(
            c.replication_tls.as_ref().unwrap().ca,
            PathBuf::from("/c/ca.pem")
        );
        let both = format!("replication_plaintext = true\n{tls}");
        assert!(err(&both).contains("keep one"), "{}", err(&both));
        // A local-only appliance needs neither.
        assert!(ApplianceConfig::from_toml(GOOD).is_ok());
    }

    #[test]
    fn remote_mode_and_bandwidth_keys() {
        let defaults =
            format!("{GOOD}\n[group.remote]\nendpoint = \"dr:7701\"\nplaintext = true\n");
        let c = ApplianceConfig::from_toml(&defaults).unwrap();
        let r = c.group[0].remote.as_ref().unwrap();
        assert_eq!(r.mode, ReplicationMode::Async);
        assert_eq!(r.bandwidth_bytes_per_s, None);
        assert_eq!(r.sync_wait_ms_max, 5000);
        let set = format!(
            "{GOOD}\n[group.remote]\nendpoint = \"dr:7701\"\nplaintext = true\nmode = \"dynamic\"\n\
             sync_wait_ms_max = 1\nbandwidth_bytes_per_s = 10\n"
        );
        let c = ApplianceConfig::from_toml(&set).unwrap();
        let r = c.group[0].remote.as_ref().unwrap();
        assert_eq!(r.mode, ReplicationMode::Dynamic);
        // Soft mistakes are clamped to the minimums.
        assert_eq!(r.sync_wait_ms_max, SYNC_WAIT_MS_MAX_MIN);
        assert_eq!(r.bandwidth_bytes_per_s, Some(BANDWIDTH_BYTES_PER_S_MIN));
        let sync = format!(
            "{GOOD}\n[group.remote]\nendpoint = \"dr:7701\"\nplaintext = true\nmode = \"sync\"\n"
        );
        let c = ApplianceConfig::from_toml(&sync).unwrap();
        assert_eq!(
            c.group[0].remote.as_ref().unwrap().mode,
            ReplicationMode::Sync
        );
        let bad = format!(
            "{GOOD}\n[group.remote]\nendpoint = \"dr:7701\"\nplaintext = true\nmode = \"semi\"\n"
        );
        assert!(ApplianceConfig::from_toml(&bad).is_err());
    }

    #[test]
    fn remote_dedup_and_compression_keys() {
        let remote = |keys: &str| {
            format!("{GOOD}\n[group.remote]\nendpoint = \"dr:7701\"\nplaintext = true\n{keys}")
        };
        let c = ApplianceConfig::from_toml(&remote(
            "compress_level = \"adaptive\"\ndedup = false\ndedup_window_bytes = 5000000\n",
        ))
        .unwrap();
        let r = c.group[0].remote.as_ref().unwrap();
        assert_eq!(r.compress_level, CompressLevel::Adaptive);
        assert!(!r.dedup);
        // Rounded down to whole 4 KiB blocks.
        assert_eq!(r.dedup_window_bytes, 5000000 / 4096 * 4096);
        let c = ApplianceConfig::from_toml(&remote("compress_level = 0\ndedup_window_bytes = 1\n"))
            .unwrap();
        let r = c.group[0].remote.as_ref().unwrap();
        assert_eq!(r.compress_level, CompressLevel::Fixed(0));
        assert_eq!(r.dedup_window_bytes, DEDUP_WINDOW_BYTES_MIN);
        let c = ApplianceConfig::from_toml(&remote(
            "compress_level = -5\ndedup_window_bytes = 99999999999\n",
        ))
        .unwrap();
        let r = c.group[0].remote.as_ref().unwrap();
        assert_eq!(r.compress_level, CompressLevel::Fixed(0));
        assert_eq!(
            r.dedup_window_bytes,
            cdp_link::dedup_window::DEDUP_WINDOW_BYTES_MAX as u64
        );
        assert!(ApplianceConfig::from_toml(&remote("compress_level = \"fast\"\n")).is_err());
        assert_eq!(
            serde_json::to_string(&[CompressLevel::Adaptive, CompressLevel::Fixed(3)]).unwrap(),
            "[\"adaptive\",3]"
        );
    }
}
