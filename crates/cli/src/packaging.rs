//! `cdp completions` and `cdp man`: shell completion scripts and man pages, generated from the
//! same clap command the binary parses, so they can never describe flags that do not exist.
//!
//! The Debian package (`packaging/build-deb`) runs both on the freshly built binary and
//! installs the output; `docs/packaging.md` says where.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Command};
use clap_complete::Shell;

/// `cdp completions SHELL`.
#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to write a completion script for (bash, zsh, fish, elvish, powershell).
    shell: Shell,
}

/// `cdp man [--dir DIR]`.
#[derive(Args, Debug)]
pub struct ManArgs {
    /// Write one page per command and subcommand into DIR (`cdp.1`, `cdp-image.1`,
    /// `cdp-image-access.1`, ...; the directory is created if missing) and list them.
    /// Without it, `cdp.1` alone is printed on stdout.
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Prints the completion script for `args.shell` on stdout.
pub fn completions(args: CompletionsArgs, mut cmd: Command) -> anyhow::Result<()> {
    let name = cmd.get_name().to_string();
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, name, &mut out);
    write_stdout(&out)
}

/// Writes the man pages (see `ManArgs`).
pub fn man(args: ManArgs, cmd: Command) -> anyhow::Result<()> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let Some(dir) = args.dir else {
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut out)?;
        return write_stdout(&out);
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    write_pages(&cmd, &dir, &mut written)?;
    let mut listing = String::new();
    for path in &written {
        listing.push_str(&format!("{}\n", path.display()));
    }
    write_stdout(listing.as_bytes())
}

/// One page for `cmd`, then one for each visible subcommand, depth first. clap names a
/// subcommand's page after its display name (`cdp-image-access`), which `build()` set.
fn write_pages(cmd: &Command, dir: &Path, written: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let page = clap_mangen::Man::new(cmd.clone());
    let path = dir.join(page.get_filename());
    let mut text = Vec::new();
    page.render(&mut text)?;
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir, written)?;
    }
    Ok(())
}

/// Writes `bytes` to stdout; a reader that closed the pipe early (`cdp man | head`) is not an
/// error, like every Unix tool.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    //! The example configs the package installs (`packaging/examples/`) are checked against
    //! the config structs: as shipped they load (`from_toml`, sanitize included); with every
    //! `#key = value` / `#[table]` line uncommented they still deserialize (so every key
    //! shown exists and its example value has the right type); and every key the struct
    //! serializes is shown, so a new key without an example line fails here.

    use std::collections::BTreeSet;

    const APPLIANCE: &str = include_str!("../../../packaging/examples/appliance.toml");
    const SPLITTER: &str = include_str!("../../../packaging/examples/splitter.toml");

    /// Every line that is a commented-out setting or table (`#` followed by no space).
    fn uncommented(text: &str) -> String {
        text.lines()
            .map(|line| match line.strip_prefix('#') {
                Some(rest) if !rest.is_empty() && !rest.starts_with([' ', '#']) => rest,
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Dotted paths of every key in `value` (arrays of tables merged under one path).
    fn key_paths(value: &toml::Value, prefix: &str, out: &mut BTreeSet<String>) {
        match value {
            toml::Value::Table(table) => {
                for (key, v) in table {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    out.insert(path.clone());
                    key_paths(v, &path, out);
                }
            }
            toml::Value::Array(items) => {
                for item in items {
                    key_paths(item, prefix, out);
                }
            }
            _ => {}
        }
    }

    /// Asserts that every key `full` serializes back to is shown in the example.
    fn assert_every_key_shown<T: serde::Serialize>(full: &T, example: &str, name: &str) {
        let shown: toml::Value = toml::from_str(&uncommented(example)).unwrap();
        let mut shown_keys = BTreeSet::new();
        key_paths(&shown, "", &mut shown_keys);
        let serialized = toml::Value::try_from(full).unwrap();
        let mut serialized_keys = BTreeSet::new();
        key_paths(&serialized, "", &mut serialized_keys);
        let missing: Vec<_> = serialized_keys.difference(&shown_keys).collect();
        assert!(
            missing.is_empty(),
            "packaging/examples/{name} lacks an example line for {missing:?}"
        );
    }

    #[test]
    fn appliance_example_loads_and_shows_every_key() {
        let config = cdp_appliance::ApplianceConfig::from_toml(APPLIANCE)
            .unwrap_or_else(|e| panic!("appliance.toml as shipped: {e}"));
        assert_eq!(config.group.len(), 1);
        let full: cdp_appliance::ApplianceConfig = toml::from_str(&uncommented(APPLIANCE))
            .unwrap_or_else(|e| panic!("appliance.toml with every key uncommented: {e}"));
        assert!(full.group[0].remote.is_some() && full.group[0].consolidation.is_some());
        assert_every_key_shown(&full, APPLIANCE, "appliance.toml");
    }

    #[test]
    fn splitter_example_loads_and_shows_every_key() {
        let config = cdp_splitter::SplitterConfig::from_toml(SPLITTER)
            .unwrap_or_else(|e| panic!("splitter.toml as shipped: {e}"));
        assert_eq!(config.volume.len(), 1);
        let full: cdp_splitter::SplitterConfig = toml::from_str(&uncommented(SPLITTER))
            .unwrap_or_else(|e| panic!("splitter.toml with every key uncommented: {e}"));
        assert_every_key_shown(&full, SPLITTER, "splitter.toml");
    }
}
