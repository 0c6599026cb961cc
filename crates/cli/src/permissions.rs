//! Warnings for data directories that other local users can read: the protected volumes,
//! replicas, journals and images are as sensitive as the host's own disks.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Warns (log and terminal) when `path` can be read or entered by group or others.
pub fn warn_if_open(path: &Path) {
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            "data directory has mode {mode:o}: other local users can read protected data; \
             run chmod 700 {}",
            path.display()
        );
    }
}
