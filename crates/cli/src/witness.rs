//! `cdp witness`: runs the fencing witness (`cdp-witness`) from flags and an optional TOML
//! file, until SIGINT or SIGTERM. Its state is complete on disk after every answer, so a stop
//! (or a kill -9) needs no clean-up.

use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args, Debug)]
pub struct WitnessArgs {
    /// TCP address to serve, HOST:PORT (overrides `listen` in the config).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Directory of the persisted grants (overrides `data_dir` in the config).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// witness.toml: lease limits and margin (packaging/examples/witness.toml).
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

pub fn run(args: WitnessArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            cdp_witness::WitnessConfig::from_toml(&text)
                .with_context(|| format!("in {}", path.display()))?
        }
        None => cdp_witness::WitnessConfig::default(),
    };
    if args.listen.is_some() {
        config.listen = args.listen;
    }
    if args.data_dir.is_some() {
        config.data_dir = args.data_dir;
    }
    config.sanitize().map_err(|e| {
        anyhow::Error::new(crate::output::CliError::new(
            crate::output::ErrorKind::Usage,
            e.to_string(),
        ))
    })?;
    let witness = cdp_witness::Witness::start(&config)?;
    eprintln!("witness listening on {}", witness.local_addr);
    crate::service_notify::notify_logged(crate::service_notify::READY);
    crate::runtime()?.block_on(crate::stop_signal_notified());
    Ok(())
}
