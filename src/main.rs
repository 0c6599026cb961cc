//! The `cdp` binary: parses nothing itself, hands the command line to `cdp_cli`.

fn main() -> std::process::ExitCode {
    cdp_cli::main()
}
