//! The web timeline end to end in real headless Chromium: a protected volume with a remote
//! copy, three bookmarks taken between patterned writes, and an image opened at the middle
//! one through the page's own POST endpoint with the bearer token. The DOM Chromium renders
//! must show the three bookmark names in order on the axis, the image listed and marked, the
//! remote copy's position and a lag chart with data points; POSTs without or with a wrong
//! token are refused with 401; the image the page opened holds exactly the model's bytes at
//! the bookmark. A screenshot is taken (and copied to docs/timeline.png with
//! `CDP_UPDATE_DOCS=1`).

mod common;

use common::cli::copy_export;
use common::replication::{wait_shipped, write_random_patterns};
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(120);
const TOKEN: &str = "web-test-token-0123456789";

/// One HTTP/1.0 exchange with `addr`: the status code and the body.
fn http(addr: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(T)).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head from {addr}{path}: {answer}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line from {addr}: {head}"));
    (status, body.to_string())
}

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|t| find_tool(t))
}

/// Headless Chromium on `url` with its own profile in `dir`; extra args say what to output.
fn headless(browser: &Path, dir: &Path, url: &str, extra: &[String]) -> String {
    let mut cmd = Command::new(browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        // Lets the page's fetches and drawing finish before the DOM or pixels are taken.
        "--virtual-time-budget=8000",
        "--window-size=1280,900",
    ])
    .arg(format!("--user-data-dir={}", dir.display()))
    .args(extra)
    .arg(url);
    run_ok(&mut cmd, T)
}

/// The values of `attr` on every element of the DOM text whose tag opens with `open`
/// (for example `<g class="bookmark"`), in document order.
fn attrs_of(dom: &str, open: &str, attr: &str) -> Vec<String> {
    let needle = format!(" {attr}=\"");
    dom.match_indices(open)
        .filter_map(|(at, _)| {
            let tag = &dom[at..at + dom[at..].find('>').unwrap_or(0)];
            let start = tag.find(&needle)? + needle.len();
            Some(tag[start..start + tag[start..].find('"')?].to_string())
        })
        .collect()
}

#[test]
fn timeline_page_in_headless_chromium() {
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is required under CI"
        );
        eprintln!("skipping: chromium not installed");
        return;
    };
    let volumes = [("vol0", 16 * MIB)];
    let remote = RemoteAppliance::start(&volumes);
    let mut site = Site::create(&volumes, SiteOptions::default());
    add_remote_to_site_config(&site, &remote.endpoint, 30);
    let web = format!("127.0.0.1:{}", free_port());
    site.add_appliance_settings(
        &format!("web_listen = \"{web}\"\nweb_admin = true\nweb_token = \"{TOKEN}\"\n"),
        "",
    );
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    site.wait_connected(T);

    // Three bookmarks between patterned writes; the model is kept as it stood at each.
    let mut model = Model::zeroed(16 * MIB);
    let mut rng = SplitMix64(seed("web"));
    let mut at_bookmark = Vec::new();
    for name in ["before-upgrade", "upgraded", "after-batch"] {
        write_random_patterns(&site, &mut model, &mut rng, 24, 8);
        site.flush("vol0");
        site.cdp_json(&["bookmark", "create", name, "--json"]);
        at_bookmark.push(model.clone());
    }
    write_random_patterns(&site, &mut model, &mut rng, 8, 4);
    site.flush("vol0");
    wait_shipped(&site, &remote);

    // Changing requests: refused without the token and with a wrong one, served with it.
    let open = r#"{"at":"upgraded"}"#;
    let (code, body) = http(&web, "POST", "/api/image", None, open);
    assert_eq!(code, 401, "POST without a token: {body}");
    let (code, body) = http(
        &web,
        "POST",
        "/api/image",
        Some("web-test-token-0123456788"),
        open,
    );
    assert_eq!(code, 401, "POST with a wrong token: {body}");
    let (code, body) = http(&web, "POST", "/api/bookmark", None, r#"{"name":"sneaky"}"#);
    assert_eq!(code, 401, "bookmark POST without a token: {body}");
    let (code, body) = http(&web, "POST", "/api/image", Some(TOKEN), "{not json");
    assert_eq!(code, 400, "malformed body: {body}");
    let listed = site.cdp_json(&["bookmark", "list", "--json"]);
    assert_eq!(
        listed["bookmarks"].as_array().map(Vec::len),
        Some(3),
        "a refused POST took a bookmark: {listed}"
    );
    assert_eq!(
        site.cdp_json(&["image", "list", "--json"])
            .as_array()
            .map(Vec::len),
        Some(0),
        "a refused POST opened an image"
    );
    let (code, body) = http(&web, "POST", "/api/image", Some(TOKEN), open);
    assert_eq!(code, 200, "POST with the token: {body}");
    let image: serde_json::Value = serde_json::from_str(&body).unwrap();
    let image = image["image"].clone();
    let image_id = image["id"].as_str().expect("image id").to_string();
    let copied = site.root().join("image-at-upgraded.img");
    copy_export(&site.image_uri(&image, "vol0"), &copied);
    at_bookmark[1].check_file("image the web page opened at `upgraded`", &copied);

    // The charts need a few samples (one a second) with the remote copy known.
    let sampled = poll_until(T, || {
        let (code, body) = http(&web, "GET", "/api/groups", None, "");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        code == 200
            && v["groups"][0]["history"]
                .as_array()
                .is_some_and(|h| h.len() >= 5)
    });
    assert!(sampled, "the page's history never filled");

    let profile = site.root().join("chromium-profile");
    let url = format!("http://{web}/");
    let dom = headless(&browser, &profile, &url, &["--dump-dom".to_string()]);
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the page never loaded its data:\n{dom}"
    );
    // The bookmark names appear on the axis in the order of their seqs and x positions.
    let names = attrs_of(&dom, "<g class=\"bookmark\"", "data-name");
    assert_eq!(
        names,
        ["before-upgrade", "upgraded", "after-batch"],
        "bookmarks on the axis:\n{dom}"
    );
    let xs: Vec<f64> = attrs_of(&dom, "<g class=\"bookmark\"", "data-x")
        .iter()
        .map(|x| x.parse().unwrap())
        .collect();
    assert!(
        xs.windows(2).all(|w| w[0] < w[1]),
        "bookmark x positions not increasing: {xs:?}"
    );
    // The image is listed in the table and marked on the axis, at the bookmark's place.
    assert_eq!(
        attrs_of(&dom, "<tr class=\"image\"", "data-id"),
        std::slice::from_ref(&image_id)
    );
    let image_x: Vec<f64> = attrs_of(&dom, "<g class=\"image-mark\"", "data-x")
        .iter()
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(image_x.len(), 1, "image marks: {image_x:?}");
    assert!(
        (image_x[0] - xs[1]).abs() < 1.0,
        "image mark at x {} but its bookmark at {}",
        image_x[0],
        xs[1]
    );
    // The remote copy: its shipped seq (everything, after wait_shipped) is on the axis.
    let last_seq = site.status()["groups"][0]["last_seq"].as_u64().unwrap();
    let shipped = attrs_of(&dom, "<g class=\"remote-mark\"", "data-shipped-seq");
    assert_eq!(shipped, [last_seq.to_string()], "remote copy mark");
    assert!(
        dom.contains("connected 127.0.0.1"),
        "remote copy state:\n{dom}"
    );
    assert!(dom.contains("RPO"), "RPO shown:\n{dom}");
    // The lag chart (and the others) have data points.
    for class in ["lag-chart", "rate-chart", "fill-chart"] {
        let at = dom
            .find(&format!("class=\"chart {class}\""))
            .unwrap_or_else(|| panic!("no {class}:\n{dom}"));
        let points: usize = attrs_of(&dom[at..], "<polyline", "data-points")[0]
            .parse()
            .unwrap();
        assert!(points >= 5, "{class} has {points} data points");
    }
    assert!(dom.contains("admin (bearer token required)"));

    let shot = site.root().join("timeline.png");
    headless(
        &browser,
        &profile,
        &url,
        &[format!("--screenshot={}", shot.display())],
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "screenshot is not a PNG of a drawn page ({} bytes)",
        png.len()
    );
    if std::env::var_os("CDP_UPDATE_DOCS").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/timeline.png");
        std::fs::write(&docs, &png).unwrap();
        eprintln!("wrote {}", docs.display());
    }

    // Release through the page; the image is gone from the listing.
    let (code, body) = http(
        &web,
        "POST",
        "/api/image/release",
        Some(TOKEN),
        &format!("{{\"id\":\"{image_id}\"}}"),
    );
    assert_eq!(code, 200, "release: {body}");
    let (_, body) = http(&web, "GET", "/api/groups", None, "");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["groups"][0]["images"].as_array().map(Vec::len), Some(0));
    let (code, _) = http(&web, "DELETE", "/api/groups", None, "");
    assert_eq!(code, 405);
    let (code, _) = http(&web, "GET", "/nope", None, "");
    assert_eq!(code, 404);
}

/// A read-only page (the default) refuses changing requests with 403 whatever the token, and
/// an admin page without a token, or one off loopback, refuses to start.
#[test]
fn read_only_by_default_and_refusals_at_start() {
    if reference_mode() {
        return;
    }
    let volumes = [("vol0", 4 * MIB)];
    let mut site = Site::create(&volumes, SiteOptions::default());
    let web = format!("127.0.0.1:{}", free_port());
    site.add_appliance_settings(&format!("web_listen = \"{web}\"\n"), "");
    site.start_role(Role::Appliance);
    let up = poll_until(T, || TcpStream::connect(&web).is_ok());
    assert!(up, "web listener never came up");
    let (code, body) = http(
        &web,
        "POST",
        "/api/bookmark",
        Some(TOKEN),
        r#"{"name":"x"}"#,
    );
    assert_eq!(code, 403, "read-only page: {body}");
    let (code, body) = http(&web, "GET", "/", None, "");
    assert_eq!(code, 200);
    assert!(body.contains("<script src=\"/timeline.js\">"));
    let (code, body) = http(&web, "GET", "/api/groups", None, "");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["admin"], false);
    assert!(site.cdp_json(&["bookmark", "list", "--json"])["bookmarks"]
        .as_array()
        .is_some_and(|l| l.is_empty()));
    site.terminate(Role::Appliance, T);

    for (settings, expect) in [
        (
            "web_listen = \"127.0.0.1:1\"\nweb_admin = true\n",
            "needs web_token",
        ),
        (
            "web_listen = \"127.0.0.1:1\"\nweb_admin = true\nweb_token = \"short\"\n",
            "at least 16",
        ),
        ("web_listen = \"0.0.0.0:1\"\n", "off loopback"),
    ] {
        let config = site.root().join("web-refused.toml");
        let base = std::fs::read_to_string(&site.appliance_config).unwrap();
        let base = base.replace(&format!("web_listen = \"{web}\"\n"), "");
        std::fs::write(&config, format!("{settings}{base}")).unwrap();
        let out = run(
            Command::new(cdp_bin())
                .args(["appliance", "--config"])
                .arg(&config),
            T,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{settings}: started");
        assert!(stderr.contains(expect), "{settings}: {stderr}");
    }
}
