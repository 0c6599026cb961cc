//! Running the `cdp` command line against a site's appliance control socket.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::{cdp_bin, run_ok, Site};

impl Site {
    /// `cdp ARGS --control SOCKET`.
    pub fn cdp(&self, args: &[&str]) -> Command {
        let mut c = Command::new(cdp_bin());
        c.args(args).arg("--control").arg(&self.control_sock);
        c
    }

    /// Runs `cdp ARGS --control SOCKET` (ARGS should ask for `--json`), expects success,
    /// and parses what it printed.
    pub fn cdp_json(&self, args: &[&str]) -> serde_json::Value {
        let out = run_ok(&mut self.cdp(args), Duration::from_secs(120));
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("cdp {args:?} printed bad JSON ({e}):\n{out}"))
    }

    /// The NBD URI of one export of an image, from `cdp image access --json` output.
    pub fn image_uri(&self, image: &serde_json::Value, volume: &str) -> String {
        let export = image["exports"]
            .as_array()
            .and_then(|l| l.iter().find(|e| e["volume"] == volume))
            .and_then(|e| e["export"].as_str())
            .unwrap_or_else(|| panic!("image has no export for {volume}: {image}"));
        let nbd = image["nbd"].as_str().expect("image nbd endpoint");
        match nbd.strip_prefix("unix:") {
            Some(path) => format!("nbd+unix:///{export}?socket={path}"),
            None => format!("nbd://{nbd}/{export}"),
        }
    }
}

/// Reads a whole raw source (an NBD URI, such as an image's export, or a file) into `to`.
pub fn copy_export(uri: &str, to: &Path) {
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", uri])
            .arg(to),
        Duration::from_secs(120),
    );
}

/// Releases an image from `cdp image access --json`, through `cdp_json` of the appliance that
/// opened it (a `Site` or a `RemoteAppliance`).
pub fn release_image(image: &serde_json::Value, cdp_json: impl Fn(&[&str]) -> serde_json::Value) {
    let id = image["id"].as_str().expect("image id");
    cdp_json(&["image", "release", id, "--json"]);
}
