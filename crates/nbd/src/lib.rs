//! An NBD server (fixed newstyle, simple and structured replies, block status) on tokio, serving pluggable `Export` backends.
//!
//! The crate knows nothing of journals or splitting: callers register exports in an
//! [`ExportRegistry`] and run a [`Server`] on TCP or unix listeners. See README.md for the
//! supported options, commands, limits and error mapping.

pub mod client;
mod error;
pub mod export;
mod handshake;
pub mod limits;
pub mod protocol;
mod registry;
mod server;
mod shutdown;
mod transmission;

pub use error::NbdError;
pub use export::{Export, ExportError, ExportFeatures, Extent, MetaContext};
pub use registry::ExportRegistry;
pub use server::{Server, ServerConfig};
