//! Watching a run: a node started with `--http` serves `/metrics` in the
//! Prometheus text format, whose counters follow the rounds it trains and the
//! records it puts on chain, `/status` as JSON, `/chain` (the contract's
//! records, read through the node), and a dashboard page, which a headless
//! Chromium loads and draws with real data; `node status` prints the same;
//! malformed requests get an error and change nothing.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::time::Duration;
use tests::{Anvil, Node, TempDir, apt_install, deploy, ensure_fashion_mnist, node_command, wait_until};

const CHROMIUM: &str = "/usr/bin/chromium";

/// Debian's Chromium, installed where missing (as root, as on CI).
fn ensure_chromium() -> &'static str {
    if !std::path::Path::new(CHROMIUM).exists() {
        assert!(
            apt_install(&["chromium"]) && std::path::Path::new(CHROMIUM).exists(),
            "Chromium is missing and could not be installed: run `apt-get install chromium` as root"
        );
    }
    CHROMIUM
}

/// Loads `url` in headless Chromium, lets its scripts run for `ms` of virtual time, and returns
/// the page's DOM then; with `screenshot`, saves the rendered page there instead.
fn chromium(url: &str, ms: u32, screenshot: Option<&std::path::Path>) -> String {
    let profile = TempDir::new("chromium-profile");
    let mut args = vec![
        "--headless".to_owned(),
        "--no-sandbox".to_owned(),
        "--disable-gpu".to_owned(),
        "--hide-scrollbars".to_owned(),
        format!("--user-data-dir={}", profile.path().display()),
        format!("--virtual-time-budget={ms}"),
        "--window-size=1280,1900".to_owned(),
    ];
    match screenshot {
        Some(path) => args.push(format!("--screenshot={}", path.display())),
        None => args.push("--dump-dom".to_owned()),
    }
    args.push(url.to_owned());
    let out = std::process::Command::new(ensure_chromium()).args(&args).output().expect("run chromium");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sends `request` to `addr`; returns the status code and the body.
fn http(addr: &str, request: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the node's endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let (head, body) = all.split_once("\r\n\r\n").expect("an HTTP answer");
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status code");
    (code, body.to_owned())
}

fn get(addr: &str, path: &str) -> (u16, String) {
    http(addr, &format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n"))
}

/// Parses the Prometheus text exposition format (0.0.4) strictly: every sample belongs to a
/// family announced by `# HELP` and `# TYPE` lines before it, names and labels are well formed,
/// values are floats. Returns the samples by name with labels.
fn parse_exposition(text: &str) -> Result<BTreeMap<String, f64>, String> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .enumerate()
                .all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()))
    };
    let (mut helped, mut typed) = (HashSet::new(), BTreeMap::new());
    let mut samples = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let at = |why: &str| format!("line {}: {why}: {line}", i + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            if !name_ok(name) || !helped.insert(name.to_owned()) {
                return Err(at("bad or repeated HELP"));
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) || parts.next().is_some() {
                return Err(at("bad TYPE"));
            }
            if typed.insert(name.to_owned(), kind.to_owned()).is_some() {
                return Err(at("repeated TYPE"));
            }
        } else if line.starts_with('#') || line.is_empty() {
            return Err(at("unexpected comment or blank line"));
        } else {
            let (series, value) = line.rsplit_once(' ').ok_or_else(|| at("no value"))?;
            let name = series.split('{').next().unwrap_or_default();
            if !name_ok(name) {
                return Err(at("bad metric name"));
            }
            let Some(kind) = typed.get(name) else { return Err(at("sample before its TYPE")) };
            if !helped.contains(name) {
                return Err(at("sample without HELP"));
            }
            if kind == "counter" && !name.ends_with("_total") {
                return Err(at("a counter's name must end in _total"));
            }
            if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
                let inner =
                    labels.strip_prefix('{').and_then(|l| l.strip_suffix('}')).ok_or_else(|| at("bad labels"))?;
                for pair in inner.split(',') {
                    let (k, v) = pair.split_once('=').ok_or_else(|| at("bad label"))?;
                    if !(name_ok(k) && v.len() >= 2 && v.starts_with('"') && v.ends_with('"')) {
                        return Err(at("bad label"));
                    }
                }
            }
            let v: f64 = match value {
                "NaN" => f64::NAN,
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().map_err(|_| at("value is not a float"))?,
            };
            samples.insert(series.to_owned(), v);
        }
    }
    Ok(samples)
}

#[test]
fn the_exposition_parser_refuses_what_prometheus_would() {
    let good = "# HELP a_total x\n# TYPE a_total counter\na_total 3\n# HELP g y\n# TYPE g gauge\ng{s=\"p\"} NaN\n";
    assert_eq!(parse_exposition(good).unwrap().len(), 2);
    for bad in [
        "a_total 3\n",
        "# HELP a x\n# TYPE a counter\na 1\n",
        "# HELP g y\n# TYPE g gauge\ng one\n",
        "# HELP g y\n# TYPE g gauge\ng{s=p} 1\n",
        "# HELP g y\n# TYPE g wrong\ng 1\n",
    ] {
        assert!(parse_exposition(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_node_serves_metrics_status_and_a_dashboard_that_follow_its_run() {
    let anvil = Anvil::start();
    let contract = deploy(&anvil);
    let dir = TempDir::new("observe");
    let cfg = dir.path().join("observe.toml");
    // Enough rounds that the run still goes when the checks end on a loaded machine (three
    // Chromium page loads take most of a minute); the peers are stopped long before.
    std::fs::write(
        &cfg,
        "name = \"it-observe\"\nmodel = \"mlp\"\nbatch = 16\nrounds = 3000\nepoch_rounds = 4\nmin_peers = 3\n\
         eval_every = 5\naudit_every = 1\n",
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let data = ensure_fashion_mnist().to_str().unwrap().to_owned();
    let start = |name: &str, i: usize, boot: Option<&str>| {
        let mut args: Vec<String> =
            ["--config", cfg, "--dataset", &data, "--http", "127.0.0.1:0"].map(String::from).to_vec();
        args.extend(anvil.peer_flags(&contract, i));
        if let Some(b) = boot {
            args.extend(["--bootstrap".to_owned(), b.to_owned()]);
        }
        Node::start(name, &args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let a = start("observe-a", 1, None);
    let boot = a.address();
    let mut nodes = vec![a, start("observe-b", 2, Some(&boot)), start("observe-c", 3, Some(&boot))];
    let addr = wait_until(Duration::from_secs(30), || {
        nodes[0]
            .events("http endpoint listening: /metrics, /status, / (dashboard)")
            .first()
            .map(|e| e["addr"].as_str().unwrap().to_owned())
    })
    .expect("the node logs its http address");

    // Counters move with the rounds: two scrapes, some rounds apart.
    let scrape = || {
        let (code, body) = get(&addr, "/metrics");
        assert_eq!(code, 200);
        parse_exposition(&body).unwrap_or_else(|e| panic!("{e}\n{body}"))
    };
    let first = wait_until(Duration::from_secs(120), || {
        let m = scrape();
        (m["dtrain_rounds_completed_total"] >= 3.0).then_some(m)
    })
    .expect("rounds completed");
    let second = wait_until(Duration::from_secs(120), || {
        let m = scrape();
        (m["dtrain_rounds_completed_total"] >= first["dtrain_rounds_completed_total"] + 10.0
            && m["dtrain_outbox_records{status=\"done\"}"] > 0.0
            && m["dtrain_accuracy"].is_finite())
        .then_some(m)
    });
    let Some(second) = second else {
        nodes.iter().for_each(|n| n.dump());
        panic!("the counters did not move: {first:?}");
    };
    for counter in [
        "dtrain_bytes_sent_total",
        "dtrain_bytes_received_total",
        "dtrain_samples_trained_total",
        "dtrain_audits_total",
    ] {
        assert!(second[counter] > first[counter], "{counter} moved: {} -> {}", first[counter], second[counter]);
    }
    assert_eq!(second["dtrain_ring_size"], 3.0);
    assert_eq!(second["dtrain_peers"], 2.0, "it hears the two other peers");
    assert!(second["dtrain_loss"].is_finite() && second["dtrain_loss"] > 0.0);
    assert!((0.05..=1.0).contains(&second["dtrain_accuracy"]), "accuracy {}", second["dtrain_accuracy"]);
    assert_eq!(second["dtrain_faults_total"], 0.0);
    assert_eq!(second["dtrain_frames_refused_total"], 0.0);

    // /status: the ring, the peers, the curves.
    let (code, body) = get(&addr, "/status");
    assert_eq!(code, 200);
    let s: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(s["peer"], nodes[0].peer_id().as_str());
    let ring: Vec<&str> = s["ring"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    for n in &nodes {
        assert!(ring.contains(&n.peer_id().as_str()), "the ring holds {}", n.name);
    }
    let peers = s["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2);
    assert!(peers.iter().all(|p| ["training", "forming"].contains(&p["state"].as_str().unwrap())), "{peers:?}");
    let history = s["history"].as_array().unwrap();
    // Rounds show once applied (a round or two after they completed).
    assert!(history.len() as f64 >= second["dtrain_rounds_completed_total"] - 3.0);
    assert!(history.iter().all(|p| p["loss"].as_f64().is_some_and(|l| l > 0.0)));
    assert!(history.iter().any(|p| p["accuracy"].as_f64().is_some()), "evaluations show in the history");

    // The dashboard page is served by the node itself, with nothing from elsewhere.
    let (code, page) = get(&addr, "/");
    assert_eq!(code, 200);
    assert!(page.contains("fetch(\"/status\"") && !page.contains("http://") && !page.contains("https://"));

    // /chain: the contract's records, read through the node.
    let chain = wait_until(Duration::from_secs(60), || {
        let (code, body) = get(&addr, "/chain");
        assert_eq!(code, 200, "{body}");
        let c: serde_json::Value = serde_json::from_str(&body).unwrap();
        let peers = c["contributions"]["peers"].as_array().unwrap().clone();
        (peers.len() == 3 && peers.iter().all(|p| p["rounds"].as_u64().unwrap() >= 4)).then_some(c)
    })
    .expect("every peer's first epoch is on chain");
    assert!(chain["contributions"]["run"]["finalized"].as_u64().unwrap() >= 1, "{chain}");

    // The dashboard in a browser: the charts and the contribution table show real data.
    let dom = chromium(&format!("http://{addr}/"), 12_000, None);
    // What the page shows (its script's text left out).
    let dom = dom.split("<script>").next().unwrap().to_owned();
    assert!(dom.contains("<div id=\"error\"></div>"), "the page shows an error:\n{dom}");
    assert_eq!(dom.matches("</polyline>").count(), 3, "loss, accuracy and speed are drawn:\n{dom}");
    for n in &nodes {
        let id = n.peer_id();
        let short = format!("{}…{}", &id[..8], &id[id.len() - 6..]);
        assert!(dom.contains(&short), "the contribution table lists {}:\n{dom}", n.name);
    }
    assert!(!dom.contains("waiting for rounds") && !dom.contains("cannot read"), "{dom}");
    let shot = std::env::var_os("DTRAIN_DASHBOARD_SCREENSHOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| dir.path().join("dashboard.png"));
    chromium(&format!("http://{addr}/"), 12_000, Some(&shot));
    let png = std::fs::read(&shot).expect("the screenshot was saved");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "a real screenshot ({} bytes)", png.len());

    // `node status` prints the same, as a table.
    let out = node_command(&["status", "--http", &addr]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("rounds completed") && table.contains(&nodes[1].peer_id()), "{table}");
    let out = node_command(&["status", "--http", "127.0.0.1:1"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--http"), "a clear error");

    // Malformed requests get an error naming it; the endpoint and the run go on.
    assert_eq!(http(&addr, "POST /metrics HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(get(&addr, "/nowhere").0, 404);
    assert_eq!(http(&addr, &format!("GET /{} HTTP/1.1\r\n\r\n", "x".repeat(20_000))).0, 431);
    let went_on = wait_until(Duration::from_secs(60), || {
        (scrape()["dtrain_rounds_completed_total"] > second["dtrain_rounds_completed_total"]).then_some(())
    });
    assert!(went_on.is_some(), "the run went on after the malformed requests");
    for n in nodes.iter_mut() {
        n.terminate();
    }
    for n in nodes.iter_mut() {
        assert_eq!(n.wait_exit(Duration::from_secs(120)), Some(0), "{} left cleanly", n.name);
    }
}
