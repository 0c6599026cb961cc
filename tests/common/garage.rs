//! A real single-node Garage (S3-compatible object store) on loopback for the archive tests,
//! set up as `../shared/tools/garage/README.md` says: layout, one key, one bucket. Killed on
//! drop; `kill` and `start` again simulate the store going down and coming back.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, poll_until, run};

/// The garage binary: `CDP_GARAGE`, else on PATH, else `~/.cargo/bin/garage`. Missing: a
/// SKIP (or, with `CI` set, a failure: `.ci/run` installs it).
pub fn garage_bin() -> Option<PathBuf> {
    let found = std::env::var_os("CDP_GARAGE")
        .map(PathBuf::from)
        .or_else(|| super::find_tool("garage"))
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cargo/bin/garage"))
                .filter(|p| p.is_file())
        });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "garage is not installed (CI must install it: .ci/run)"
        );
        eprintln!("SKIP: no garage binary (set CDP_GARAGE or put garage on PATH)");
    }
    found
}

pub struct Garage {
    bin: PathBuf,
    conf: PathBuf,
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`, the S3 API.
    pub endpoint: String,
    pub key_id: String,
    pub secret_key: String,
    pub bucket: String,
}

impl Garage {
    /// Writes the config under `dir`, starts the server and sets up bucket `archive`.
    pub fn start(bin: PathBuf, dir: &Path) -> Garage {
        std::fs::create_dir_all(dir).unwrap();
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let secret: String = (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        let conf = dir.join("garage.toml");
        std::fs::write(
            &conf,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\nreplication_factor = 1\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let mut g = Garage {
            bin,
            conf,
            child: None,
            endpoint: format!("http://127.0.0.1:{s3}"),
            key_id: String::new(),
            secret_key: String::new(),
            bucket: "archive".into(),
        };
        g.start_server();
        let node = g.garage(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().unwrap().to_string();
        g.garage(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        g.garage(&["layout", "apply", "--version", "1"]);
        let key = g.garage(&["key", "create", "cdp"]);
        let field = |name: &str| {
            key.lines()
                .find(|l| l.trim_start().starts_with(name))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no {name} in {key}"))
        };
        g.key_id = field("Key ID");
        g.secret_key = field("Secret key");
        g.garage(&["bucket", "create", "archive"]);
        g.garage(&[
            "bucket", "allow", "--read", "--write", "--owner", "archive", "--key", "cdp",
        ]);
        g
    }

    /// `garage -c CONF ARGS`, expected to succeed; its stdout.
    pub fn garage(&self, args: &[&str]) -> String {
        let out = run(
            Command::new(&self.bin).arg("-c").arg(&self.conf).args(args),
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "garage {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts the server (again) and waits until it answers `status`.
    pub fn start_server(&mut self) {
        assert!(self.child.is_none(), "garage already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.conf.with_extension("log"))
            .unwrap();
        self.child = Some(
            Command::new(&self.bin)
                .arg("-c")
                .arg(&self.conf)
                .arg("server")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start garage"),
        );
        let ready = poll_until(Duration::from_secs(30), || {
            Command::new(&self.bin)
                .arg("-c")
                .arg(&self.conf)
                .arg("status")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        assert!(ready, "garage did not answer status within 30 s");
    }

    /// SIGKILL: the store is down until `start_server`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `[group.archive]` as an inline TOML table for `url` under this Garage, plus `extra`
    /// keys (`k = v, ...`).
    pub fn archive_table(&self, prefix: &str, extra: &str) -> String {
        format!(
            "archive = {{ url = \"s3://{}/{prefix}\", endpoint = \"{}\", region = \"garage\", access_key_id = \"{}\", secret_access_key = \"{}\"{}{extra} }}\n",
            self.bucket,
            self.endpoint,
            self.key_id,
            self.secret_key,
            if extra.is_empty() { "" } else { ", " }
        )
    }

    /// The AWS_* environment `cdp archive` reads for this Garage.
    pub fn env(&self, cmd: &mut Command) {
        cmd.env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_REGION", "garage")
            .env("AWS_ACCESS_KEY_ID", &self.key_id)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret_key);
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.kill();
    }
}
