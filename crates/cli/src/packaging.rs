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

/// The commented example configs the package installs (every key, its default, one line on
/// what it does), written for an instance under `/var/lib/cdp/site1`.
pub const APPLIANCE_EXAMPLE: &str = include_str!("../../../packaging/examples/appliance.toml");
pub const SPLITTER_EXAMPLE: &str = include_str!("../../../packaging/examples/splitter.toml");

/// The example configs for one directory laid out like `/var/lib/cdp/NAME` (what `cdp up`
/// writes): the examples with their paths under `dir`, and the volume, size and NBD address.
pub struct ExampleInstance<'a> {
    pub dir: &'a Path,
    pub volume: &'a str,
    pub size: u64,
    pub nbd_tcp: &'a str,
    /// Turns the metrics listeners on at these addresses (appliance, splitter).
    pub metrics_listen: Option<(&'a str, &'a str)>,
}

impl ExampleInstance<'_> {
    pub fn appliance_toml(&self) -> String {
        self.render(APPLIANCE_EXAMPLE)
    }

    pub fn splitter_toml(&self) -> String {
        self.render(SPLITTER_EXAMPLE)
    }

    fn render(&self, example: &str) -> String {
        // The first paragraph tells how to install the example; the rest is the config.
        let body = example.split_once("\n\n").map_or(example, |(_, body)| body);
        // Placeholders first, so a directory containing "vol0" or a volume named "site1"
        // is never rewritten by the other replacement.
        let body = body
            .replace("/var/lib/cdp/site1", "\0DIR\0")
            .replace("/etc/cdp/site1", "\0DIR\0")
            .replace("vol0", "\0VOLUME\0")
            .replace("size = 1073741824", &format!("size = {}", self.size))
            .replace(
                "nbd_tcp = \"127.0.0.1:10809\"",
                &format!("nbd_tcp = \"{}\"", toml_escaped(self.nbd_tcp)),
            );
        let body = match self.metrics_listen {
            Some((appliance, splitter)) => body
                .replace(
                    "#metrics_listen = \"127.0.0.1:9721\"",
                    &format!("metrics_listen = \"{}\"", toml_escaped(appliance)),
                )
                .replace(
                    "#metrics_listen = \"127.0.0.1:9722\"",
                    &format!("metrics_listen = \"{}\"", toml_escaped(splitter)),
                ),
            None => body,
        };
        let body = body
            .replace("\0DIR\0", &toml_escaped(&self.dir.display().to_string()))
            .replace("\0VOLUME\0", &toml_escaped(self.volume));
        format!(
            "# Written by `cdp up`; edit freely, it is reused on the next run. Keys shown as\n\
             # `#key = value` are optional and show their default; remove the `#` to change one.\n\n{body}"
        )
    }
}

/// `text` escaped for the inside of a TOML basic string (`"..."`).
fn toml_escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out
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

    use super::{ExampleInstance, APPLIANCE_EXAMPLE as APPLIANCE, SPLITTER_EXAMPLE as SPLITTER};
    use std::path::Path;

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

    /// `cdp up`'s configs: the examples with one directory's paths, loading to exactly the
    /// paths, volume, size and address asked for, also for a directory that needs escaping
    /// and contains the example's own volume name.
    #[test]
    fn example_instance_renders_loadable_configs() {
        let dir = Path::new("/tmp/odd \"dir\" \\ vol0");
        let instance = ExampleInstance {
            dir,
            volume: "db01",
            size: 40960,
            nbd_tcp: "127.0.0.1:0",
            metrics_listen: Some(("127.0.0.1:1234", "127.0.0.1:1235")),
        };
        let appliance = cdp_appliance::ApplianceConfig::from_toml(&instance.appliance_toml())
            .unwrap_or_else(|e| panic!("{e}:\n{}", instance.appliance_toml()));
        assert_eq!(appliance.data_dir, dir.join("appliance"));
        assert_eq!(appliance.control_path(), dir.join("appliance.ctl"));
        assert_eq!(
            appliance.link_listen.to_string(),
            format!("unix:{}", dir.join("link.sock").display())
        );
        let volume = &appliance.group[0].volume[0];
        assert_eq!((volume.name.as_str(), volume.size), ("db01", 40960));
        assert_eq!(volume.replica, dir.join("replica/db01.img"));
        let splitter = cdp_splitter::SplitterConfig::from_toml(&instance.splitter_toml())
            .unwrap_or_else(|e| panic!("{e}:\n{}", instance.splitter_toml()));
        assert_eq!(
            splitter.nbd_unix.as_deref(),
            Some(dir.join("nbd.sock").as_path())
        );
        assert_eq!(splitter.nbd_tcp.as_deref(), Some("127.0.0.1:0"));
        assert_eq!(
            splitter.control.as_deref(),
            Some(dir.join("splitter.ctl").as_path())
        );
        assert_eq!(splitter.volume[0].name, "db01");
        assert_eq!(
            appliance.metrics_listen,
            Some("127.0.0.1:1234".parse().unwrap())
        );
        assert_eq!(
            splitter.metrics_listen,
            Some("127.0.0.1:1235".parse().unwrap())
        );
        assert_eq!(splitter.volume[0].path, dir.join("production/db01.img"));
        assert!(instance
            .appliance_toml()
            .starts_with("# Written by `cdp up`"));
        assert!(instance
            .appliance_toml()
            .contains("#journal_capacity_bytes = 8589934592"));
    }
}
