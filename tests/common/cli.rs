//! Running the `cdp` command line against a site's appliance control socket.

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
