//! Bookmark names: the rules the appliance enforces and the CLI checks before it freezes an
//! application for a bookmark that would be refused.

use crate::limits::BOOKMARK_NAME_BYTES_MAX;

/// A bookmark name that breaks a rule; the message names the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad bookmark name {name:?}: {why}")]
pub struct BadBookmarkName {
    pub name: String,
    pub why: String,
}

/// Bookmark names: 1..=128 bytes of printable ASCII (space to `~`), without `:`, not
/// starting with `-` or a space, and not all digits, so that a name never reads as another
/// kind of point (`seq:N`, a bare seq, an RFC 3339 time, `-5m`).
pub fn validate_bookmark_name(name: &str) -> Result<(), BadBookmarkName> {
    let bad = |why: &str| {
        Err(BadBookmarkName {
            name: name.to_string(),
            why: why.to_string(),
        })
    };
    if name.is_empty() || name.len() > BOOKMARK_NAME_BYTES_MAX {
        return bad(&format!("must be 1 to {BOOKMARK_NAME_BYTES_MAX} bytes"));
    }
    if !name.bytes().all(|c| (b' '..=b'~').contains(&c)) {
        return bad("only printable ASCII characters are allowed");
    }
    if name.contains(':') {
        return bad("`:` is not allowed (it would read as a time or `seq:N`)");
    }
    if name.starts_with('-') || name.starts_with(' ') {
        return bad("must not start with `-` (a relative time) or a space");
    }
    if name.bytes().all(|c| c.is_ascii_digit()) {
        return bad("must not be all digits (it would read as a sequence number)");
    }
    Ok(())
}

/// The rules for a bookmark being created: `validate_bookmark_name`, and no spaces, so that
/// a name is one word in a shell, a script and `cdp bookmark list`'s columns. Names with
/// spaces taken by earlier versions still decode and resolve (`validate_bookmark_name`).
pub fn validate_new_bookmark_name(name: &str) -> Result<(), BadBookmarkName> {
    validate_bookmark_name(name)?;
    if name.contains(' ') {
        return Err(BadBookmarkName {
            name: name.to_string(),
            why: format!(
                "spaces are not allowed (use '-' or '_', e.g. {:?})",
                name.replace(' ', "-")
            ),
        });
    }
    Ok(())
}
