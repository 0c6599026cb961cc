//! The process's log output: tracing to stderr, filtered by `CDP_LOG` (default `info`), as
//! readable text or, with `log_format = "json"` in the config of `cdp appliance` or
//! `cdp splitter`, one JSON object per line.

use std::io::IsTerminal;
use std::path::Path;

use cdp_types::LogFormat;

/// The `log_format` of the config at `path`, looked up before the config is loaded, so that
/// what loading logs (warnings about clamped values) is already in the chosen format. A file
/// that cannot be read or parsed gives text; loading it then reports the error itself.
pub fn format_of_config(path: &Path) -> LogFormat {
    let Ok(text) = std::fs::read_to_string(path) else {
        return LogFormat::Text;
    };
    /// The one key read early; every other key is left to the config's own loading.
    #[derive(serde::Deserialize)]
    struct LogFormatOnly {
        log_format: Option<String>,
    }
    let Ok(config) = toml::from_str::<LogFormatOnly>(&text) else {
        return LogFormat::Text;
    };
    match config.log_format.as_deref() {
        Some("json") => LogFormat::Json,
        // Anything else but "text" is refused when the config is loaded.
        _ => LogFormat::Text,
    }
}

/// Installs the global subscriber.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CDP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            // Colour codes only help a terminal; in log files they are noise.
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init(),
        // The span list names the group and volume a line is about when the line itself
        // does not; the current span alone repeats the last entry of that list.
        LogFormat::Json => builder
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .init(),
    }
}
