//! Vocabulary shared by every cdp crate: names, sequence numbers, timestamps and endpoints.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub mod block_file;
pub use block_file::BlockFile;
pub mod log_format;
pub mod rfc3339;
pub use log_format::LogFormat;

/// Errors from parsing user-supplied vocabulary (names, endpoints).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TypesError {
    #[error("invalid name {name:?}: {why}")]
    InvalidName { name: String, why: &'static str },
    #[error("invalid endpoint {endpoint:?}: expected unix:PATH or HOST:PORT")]
    InvalidEndpoint { endpoint: String },
}

/// Longest volume or group name; it appears in NBD export names and file names.
pub const NAME_LEN_MAX: usize = 64;

/// Checks a volume or group name: 1..=64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn validate_name(name: &str) -> Result<(), TypesError> {
    let bad = |why| {
        Err(TypesError::InvalidName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > NAME_LEN_MAX {
        return bad("longer than 64 bytes");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("must not start with '.' or '-'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return bad("only letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// A position in a group's journal. Sequence numbers start at 1; 0 means "before any write".
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Seq(pub u64);

impl Seq {
    pub const ZERO: Seq = Seq(0);
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Wall-clock time in nanoseconds since the Unix epoch, as stamped on journal records.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct TimestampNs(pub u64);

impl TimestampNs {
    pub fn now() -> TimestampNs {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        TimestampNs(since.as_nanos() as u64)
    }
}

/// Where a process listens or connects: a unix socket path or a TCP address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl FromStr for Endpoint {
    type Err = TypesError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(TypesError::InvalidEndpoint {
                    endpoint: s.to_string(),
                });
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        let tcp = s.strip_prefix("tcp:").unwrap_or(s);
        match tcp.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Endpoint::Tcp(tcp.to_string()))
            }
            _ => Err(TypesError::InvalidEndpoint {
                endpoint: s.to_string(),
            }),
        }
    }
}

impl TryFrom<String> for Endpoint {
    type Error = TypesError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Endpoint> for String {
    fn from(e: Endpoint) -> String {
        e.to_string()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// What a journal record or link frame changes on a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeKind {
    /// Bytes written; the payload follows.
    Write,
    /// Range discarded; reads afterwards return zeroes on our volumes.
    Trim,
    /// Range set to zeroes.
    Zero,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(validate_name("vol-1.a_b").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name(".hidden").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name(&"x".repeat(65)).is_err());
    }

    #[test]
    fn endpoints_parse_and_print() {
        let u: Endpoint = "unix:/tmp/a.sock".parse().unwrap();
        assert_eq!(u, Endpoint::Unix("/tmp/a.sock".into()));
        assert_eq!(u.to_string(), "unix:/tmp/a.sock");
        let t: Endpoint = "127.0.0.1:10809".parse().unwrap();
        assert_eq!(t.to_string(), "127.0.0.1:10809");
        let t2: Endpoint = "tcp:[::1]:1".parse().unwrap();
        assert_eq!(t2, Endpoint::Tcp("[::1]:1".into()));
        assert!("nonsense".parse::<Endpoint>().is_err());
        assert!("unix:".parse::<Endpoint>().is_err());
        assert!("host:99999".parse::<Endpoint>().is_err());
    }
}
