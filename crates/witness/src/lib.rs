//! The fencing witness (`cdp witness`) and the client side the appliance uses: a third process,
//! at a third location, that grants each group's primary lease to one site at a time, and
//! `LeaseKeeper`, which holds and renews such a lease in the background.
//!
//! The safety argument (why two sites can never both believe they hold a lease, with clocks
//! that drift) is in `lease_rule.rs` and in ARCHITECTURE.md ("Fencing witness"). In short:
//! durations only, each on its own side's monotonic clock; the holder counts from the instant
//! it *sent* the request and stops at `sent + duration - margin`; the witness grants to
//! another site only after `granted + duration + margin` on its own clock, where
//! `margin = duration × drift + fixed`.
//!
//! Modules: `protocol` (JSON lines on the wire), `grants_file` (the persisted grants),
//! `grants` (the witness's decisions, clock passed in), `server` (the TCP server),
//! `client` (one blocking request at a time), `keeper` (`LeaseKeeper`), `clock`
//! (CLOCK_BOOTTIME stamps), `config`, `limits`, `error`.

pub mod client;
pub mod clock;
pub mod config;
pub mod error;
pub mod grants;
pub mod grants_file;
pub mod keeper;
pub mod lease_rule;
pub mod limits;
pub mod protocol;
pub mod server;

pub use client::WitnessClient;
pub use clock::Stamp;
pub use config::WitnessConfig;
pub use error::WitnessError;
pub use keeper::{KeeperConfig, LeaseGrant, LeaseKeeper, LeaseState};
pub use lease_rule::Margin;
pub use server::{Witness, WitnessHandle};
