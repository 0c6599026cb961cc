//! The set of named exports a server offers; shared, and changeable while the server runs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::NbdError;
use crate::export::Export;
use crate::limits::STRING_BYTES_MAX;

/// Named exports. Cloning is cheap and every clone sees the same set, so exports can be
/// added (for instance a point-in-time image) or removed while clients are connected.
/// Removing an export only stops new handshakes from finding it; open connections keep
/// their `Arc` and go on serving it.
#[derive(Clone, Default)]
pub struct ExportRegistry {
    inner: Arc<RwLock<Inner>>,
}

#[derive(Default)]
struct Inner {
    exports: BTreeMap<String, Entry>,
    default_name: Option<String>,
}

#[derive(Clone)]
struct Entry {
    description: String,
    export: Arc<dyn Export>,
    /// Connections in the transmission phase on this export.
    clients: Arc<AtomicUsize>,
}

/// An export as found by a handshake.
#[derive(Clone)]
pub(crate) struct Found {
    pub name: String,
    pub description: String,
    pub export: Arc<dyn Export>,
    pub clients: Arc<AtomicUsize>,
}

/// Counts one connection in the transmission phase of an export for as long as it lives.
pub(crate) struct ClientCount(Arc<AtomicUsize>);

impl ClientCount {
    pub(crate) fn enter(clients: Arc<AtomicUsize>) -> Self {
        clients.fetch_add(1, Ordering::Relaxed);
        Self(clients)
    }
}

impl Drop for ClientCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ExportRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an export. Names must be non-empty (the empty name means "the default export"),
    /// free of NUL and at most 4096 bytes, as the protocol requires of strings.
    pub fn add(
        &self,
        name: &str,
        description: &str,
        export: Arc<dyn Export>,
    ) -> Result<(), NbdError> {
        let invalid = |why| {
            Err(NbdError::InvalidExportName(
                name.chars().take(64).collect(),
                why,
            ))
        };
        if name.is_empty() {
            return invalid("empty; the empty name selects the default export");
        }
        if name.len() > STRING_BYTES_MAX || description.len() > STRING_BYTES_MAX {
            return invalid("name or description longer than 4096 bytes");
        }
        if name.contains('\0') || description.contains('\0') {
            return invalid("name or description contains NUL");
        }
        let mut inner = self.write();
        if inner.exports.contains_key(name) {
            return Err(NbdError::DuplicateExport(name.to_owned()));
        }
        let entry = Entry {
            description: description.to_owned(),
            export,
            clients: Arc::default(),
        };
        inner.exports.insert(name.to_owned(), entry);
        Ok(())
    }

    /// Removes an export; returns whether it existed. If it was the default, there is no
    /// configured default any more.
    pub fn remove(&self, name: &str) -> bool {
        let mut inner = self.write();
        if inner.default_name.as_deref() == Some(name) {
            inner.default_name = None;
        }
        inner.exports.remove(name).is_some()
    }

    /// Export names in sorted order.
    pub fn names(&self) -> Vec<String> {
        self.read().exports.keys().cloned().collect()
    }

    /// Connections now in the transmission phase on export `name` (None: no such export).
    /// Handshakes still haggling over options are not counted. A connection that outlives
    /// the export's removal is no longer counted here.
    pub fn clients(&self, name: &str) -> Option<usize> {
        let inner = self.read();
        let entry = inner.exports.get(name)?;
        Some(entry.clients.load(Ordering::Relaxed))
    }

    /// Makes `name` the export chosen by an empty export name. Without a configured
    /// default, the empty name selects the only export when there is exactly one.
    pub fn set_default(&self, name: &str) -> Result<(), NbdError> {
        let mut inner = self.write();
        if !inner.exports.contains_key(name) {
            return Err(NbdError::UnknownExport(name.to_owned()));
        }
        inner.default_name = Some(name.to_owned());
        Ok(())
    }

    /// Resolves a client-supplied name (raw bytes: the client may send anything).
    pub(crate) fn find(&self, name: &[u8]) -> Option<Found> {
        let inner = self.read();
        let (name, entry) = if name.is_empty() {
            match &inner.default_name {
                Some(default) => inner.exports.get_key_value(default.as_str())?,
                None if inner.exports.len() == 1 => inner.exports.iter().next()?,
                None => return None,
            }
        } else {
            let name = std::str::from_utf8(name).ok()?;
            inner.exports.get_key_value(name)?
        };
        Some(Found {
            name: name.clone(),
            description: entry.description.clone(),
            export: entry.export.clone(),
            clients: entry.clients.clone(),
        })
    }

    /// Names and descriptions for `NBD_OPT_LIST`.
    pub(crate) fn list(&self) -> Vec<(String, String)> {
        self.read()
            .exports
            .iter()
            .map(|(name, entry)| (name.clone(), entry.description.clone()))
            .collect()
    }

    // A panic elsewhere while holding the lock cannot leave `Inner` half-updated (every
    // mutation is a single map call), so a poisoned lock is still safe to use.
    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
