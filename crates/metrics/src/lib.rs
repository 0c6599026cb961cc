//! What the appliance and the splitter tell an operator besides `cdp status`: Prometheus
//! metrics (the `/metrics` listener in `http.rs`, a lock-free latency histogram in
//! `histogram.rs`, the text exposition built from a snapshot in `exposition.rs`, encoded by
//! the `prometheus-client` crate), the durable event log (`event_log.rs`) and the alerts it
//! feeds (`alert.rs`).
//!
//! Neither process instruments its data path with this crate's types beyond the histogram
//! and plain atomics: each keeps a sampler that copies its status into a snapshot about once
//! a second, and a scrape encodes the latest snapshot. A scrape therefore never takes a lock
//! the write path uses, and scraping every 100 ms costs the host nothing more than scraping
//! every minute.

pub mod alert;
pub mod event;
pub mod event_log;
pub mod exposition;
pub mod histogram;
pub mod http;

pub use exposition::{Exposition, Labels};
pub use histogram::{HistogramSnapshot, LatencyHistogram};
pub use http::{serve, Handler, Response};

/// How often each process's sampler refreshes the snapshot scrapes read.
pub const SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The `site` label's value when the config names none: the host's name.
pub fn default_site() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it
    // (the last byte is left 0 in case it truncates without one).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if rc != 0 {
        return "localhost".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if !name.is_empty() => name.to_string(),
        _ => "localhost".to_string(),
    }
}
