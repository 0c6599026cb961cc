//! Who may connect to a control socket: its owner only (0600), or also one configured group
//! (0660, group-owned), so administrators other than the service account can run `cdp`.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Limits a freshly bound control socket to its owner, or to its owner and `group` (a name
/// from /etc/group or a numeric gid). Connecting to a unix socket needs write permission on
/// it, so 0600 keeps every other local user out whatever the process's umask was.
pub fn restrict_control_socket(path: &Path, group: Option<&str>) -> io::Result<()> {
    match group {
        None => std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)),
        Some(group) => {
            let gid = resolve_group(group, Path::new("/etc/group"))?;
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot give control socket {} to group {group:?} (gid {gid}): {e}",
                        path.display()
                    ),
                )
            })?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        }
    }
}

/// The gid of `group`: a number as it is, a name looked up in the group file.
pub fn resolve_group(group: &str, group_file: &Path) -> io::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let text = std::fs::read_to_string(group_file).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot read {} to find group {group:?}: {e}",
                group_file.display()
            ),
        )
    })?;
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let gid = fields.nth(1)?.parse::<u32>().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "control_socket_group = {group:?} is not a group of this machine (not in {})",
                    group_file.display()
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_resolve_by_name_or_number_and_unknown_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("group");
        std::fs::write(&file, "root:x:0:\nbroken\ncdpadm:x:1234:alice,bob\n").unwrap();
        assert_eq!(resolve_group("cdpadm", &file).unwrap(), 1234);
        assert_eq!(resolve_group("root", &file).unwrap(), 0);
        assert_eq!(resolve_group("77", &file).unwrap(), 77);
        let err = resolve_group("nosuch", &file).unwrap_err();
        assert!(
            err.to_string().contains("\"nosuch\" is not a group"),
            "{err}"
        );
    }
}
