//! What a command prints and how it ends: stdout lines that end the process quietly when the
//! reader has gone (`cdp status | head -1`), typed errors with documented exit statuses, and
//! errors as JSON on stderr under `--json`.

use std::io::Write;
use std::process::ExitCode;

/// Prints one line to stdout; when the reader closed the pipe, exits 0 quietly as Unix tools
/// do, instead of panicking.
#[macro_export]
macro_rules! out {
    () => { $crate::output::write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::output::write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Prints to stdout without a newline (see `out!`).
#[macro_export]
macro_rules! out_nonl {
    ($($arg:tt)*) => { $crate::output::write_stdout(format_args!($($arg)*)) };
}

#[doc(hidden)]
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    let result = stdout.write_fmt(args).and_then(|()| stdout.flush());
    if let Err(e) = result {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        let _ = writeln!(std::io::stderr(), "cdp: error: writing to stdout: {e}");
        std::process::exit(ErrorKind::Failed.exit_code().into());
    }
}

static JSON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Whether the command line asked for JSON (`--json`, accepted by every subcommand).
pub fn json() -> bool {
    JSON.get().copied().unwrap_or(false)
}

/// Set once from the parsed command line.
pub fn set_json(on: bool) {
    let _ = JSON.set(on);
}

/// Prints a report: `value` as JSON under `--json`, else `text` (one or more lines).
pub fn report(value: &impl serde::Serialize, text: impl FnOnce() -> String) -> anyhow::Result<()> {
    if json() {
        print_json(value)
    } else {
        write_stdout(format_args!("{}\n", text()));
        Ok(())
    }
}

/// Prints `value` as pretty JSON with its keys sorted, as every `--json` output is.
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    // Through a JSON value, whose maps are sorted: the order of a struct's fields is not
    // part of the output.
    let sorted = serde_json::to_value(value)?;
    write_stdout(format_args!("{}\n", serde_json::to_string_pretty(&sorted)?));
    Ok(())
}

/// What kind of failure a command reports; each has its own exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Exit 1: the request failed.
    Failed,
    /// Exit 2: the command line or a value in it is wrong.
    Usage,
    /// Exit 3: a named group, volume, bookmark, image or point does not exist.
    NotFound,
    /// Exit 4: refused because it would be unsafe (not a recoverable point, volume in use...).
    Refused,
    /// Exit 5: a process did not answer (not running, or no answer within the deadline).
    Unreachable,
}

impl ErrorKind {
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Failed => 1,
            ErrorKind::Usage => 2,
            ErrorKind::NotFound => 3,
            ErrorKind::Refused => 4,
            ErrorKind::Unreachable => 5,
        }
    }

    /// The stable code in `--json` errors.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::Failed => "failed",
            ErrorKind::Usage => "usage",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Refused => "refused",
            ErrorKind::Unreachable => "unreachable",
        }
    }
}

/// The exit statuses, as `--help` and docs/cli.md list them.
pub const EXIT_STATUS_HELP: &str = "Exit status: 0 ok, 1 failure, 2 usage error (bad command \
line or value), 3 not found (group, volume, bookmark, image or point), 4 refused as unsafe \
(e.g. a point that is not recoverable), 5 unreachable (appliance or splitter not running or not \
answering in time). `cdp journal inspect`: 0 clean, 1 damaged, 2 usage.";

/// A failure of a known kind.
#[derive(Debug, Clone)]
pub struct CliError {
    pub kind: ErrorKind,
    pub message: String,
}

impl CliError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> CliError {
        CliError {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// The kind of an error chain: the first `CliError` in it, else `Failed`.
pub fn kind_of(e: &anyhow::Error) -> ErrorKind {
    e.chain()
        .find_map(|c| c.downcast_ref::<CliError>())
        .map_or(ErrorKind::Failed, |c| c.kind)
}

/// Reports a failed command on stderr (as JSON when `json`) and returns its exit status.
pub fn report_error(e: &anyhow::Error, json: bool) -> ExitCode {
    let kind = kind_of(e);
    let mut stderr = std::io::stderr().lock();
    if json {
        let v = serde_json::json!({
            "error": { "code": kind.code(), "exit_status": kind.exit_code(), "message": format!("{e:#}") }
        });
        let _ = writeln!(stderr, "{v}");
    } else {
        let _ = writeln!(stderr, "cdp: error: {e:#}");
    }
    ExitCode::from(kind.exit_code())
}
