//! The requests: `Request` to the appliance, `SplitterRequest` to the splitter.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How consistent the image at a bookmark is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// Write-order consistent: what a power cut at that instant would have left.
    Crash,
    /// Taken between the application's quiesce and thaw hooks.
    Application,
}

impl std::fmt::Display for Consistency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Consistency::Crash => "crash",
            Consistency::Application => "application",
        })
    }
}

/// `group_create`'s settings; left out, each takes `[[group]]`'s default.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GroupCreate {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_capacity_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_retention_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_compress: Option<bool>,
}

/// A request to the appliance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Take a bookmark (appended after every acknowledged write, then synced).
    BookmarkCreate {
        /// The group; may be left out when the appliance has one group.
        #[serde(default)]
        group: Option<String>,
        name: String,
        consistency: Consistency,
        /// Application-consistent: ms from the start of quiesce to this request.
        #[serde(default)]
        freeze_window_ms: u32,
        /// If set, the bookmark is appended within this many ms of the request's arrival
        /// or not at all (the caller thaws the application after its timeout).
        #[serde(default)]
        deadline_ms: Option<u64>,
        /// Consolidation keeps this point.
        #[serde(default)]
        keep: bool,
        /// While a volume of the group is marking or resynchronising, wait up to this many
        /// ms for it to be protected again and take the bookmark then; without it (or when
        /// the wait runs out) such a bookmark is refused (it would be a false recovery point).
        #[serde(default)]
        wait_recoverable_ms: Option<u64>,
    },
    BookmarkList {
        #[serde(default)]
        group: Option<String>,
    },
    /// Resolve a point spec (a bookmark name, `seq:N`, an RFC 3339 time, `-5m`) to a seq.
    PointResolve {
        #[serde(default)]
        group: Option<String>,
        point: String,
    },
    Timeline {
        #[serde(default)]
        group: Option<String>,
    },
    /// Run a consolidation pass now.
    JournalConsolidate {
        #[serde(default)]
        group: Option<String>,
    },
    /// Open the group at a point as NBD exports.
    ImageAccess {
        #[serde(default)]
        group: Option<String>,
        at: String,
        #[serde(default)]
        writable: bool,
        #[serde(default)]
        logged: bool,
    },
    ImageList {
        #[serde(default)]
        group: Option<String>,
    },
    ImageRelease {
        id: String,
    },
    /// Create a consistency group with an empty journal; kept in DATA_DIR/managed.toml.
    GroupCreate(GroupCreate),
    /// Every group: journal capacity and use, oldest point, volumes.
    GroupList,
    /// Add a volume to a group. The replica defaults to DATA_DIR/replicas/GROUP/NAME.img,
    /// created sparse.
    VolumeAdd {
        group: String,
        name: String,
        size: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replica: Option<PathBuf>,
    },
    /// Remove a volume from its group: refused while its splitter is connected unless
    /// `force`. The journal keeps its records and the replica file is kept.
    VolumeRemove {
        group: String,
        name: String,
        #[serde(default)]
        force: bool,
    },
}

/// A request to the splitter.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum SplitterRequest {
    Status,
    /// Copy every region of a volume into the journal again; with `verify`, only the
    /// regions whose checksum differs from the replica's.
    Resync {
        volume: String,
        #[serde(default)]
        verify: bool,
    },
    /// Serve a new volume (an NBD export and its split link), now and after restarts. The
    /// appliance must know the volume already; answered once it welcomed it.
    VolumeAdd {
        name: String,
        path: PathBuf,
        #[serde(default)]
        read_only: bool,
    },
    /// Stop serving a volume, now and after restarts. Refused while hosts are attached
    /// unless `force`.
    VolumeRemove {
        name: String,
        #[serde(default)]
        force: bool,
    },
}
