//! Real `node` processes on loopback, for the local cluster, the benchmark and
//! the integration tests.
//!
//! [`Node`] spawns the binary with JSON logs, collects every log line from a
//! reader thread, and kills the process when dropped, so nothing outlives the
//! program (or test) that started it. [`wait_until`] polls with a deadline.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Path of the `node` binary beside the running executable, (re)built once per
/// process with the same profile, so the cluster and the tests always run the
/// current code. The integration tests (this crate's `fault-injection` feature) get the
/// binary with its test hooks; the cluster commands never do.
pub fn node_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("own executable path");
        // target/<profile>/testnet, or target/<profile>/deps/it-<hash> for tests.
        let mut profile_dir = exe.parent().expect("target profile dir").to_owned();
        if profile_dir.file_name().is_some_and(|n| n == "deps") {
            profile_dir.pop();
        }
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "node", "--bin", "node"]);
        if cfg!(feature = "fault-injection") {
            cmd.args(["--features", "fault-injection"]);
        }
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for the node binary");
        assert!(status.success(), "building the node binary failed");
        profile_dir.join("node")
    })
}

static LOG_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Keeps every node's log (its JSON lines, as it wrote them) in `dir/<node name>.log`, for
/// the nodes started from now on; the directory is created if missing.
pub fn keep_logs_in(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let _ = LOG_DIR.set(dir.to_owned());
    Ok(())
}

/// The file a node's log is kept in, when logs are kept ([`keep_logs_in`]); appended to, so a
/// node restarted under the same name keeps one log.
fn log_file(name: &str) -> Option<std::fs::File> {
    let path = LOG_DIR.get()?.join(format!("{name}.log"));
    match std::fs::OpenOptions::new().create(true).append(true).open(&path) {
        Ok(f) => Some(f),
        Err(e) => {
            eprintln!("cannot keep {name}'s log in {}: {e}", path.display());
            None
        }
    }
}

/// A fresh, empty directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("dtrain-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A running `node start` process.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    child: Child,
    logs: Arc<Mutex<Vec<Value>>>,
    stdout: Arc<Mutex<Vec<String>>>,
    dir: TempDir,
}

impl Node {
    /// Starts `node start` on an ephemeral loopback port with JSON logs, plus
    /// `extra` flags, in a fresh data directory.
    pub fn start(name: &str, extra: &[&str]) -> Self {
        Self::start_in(name, TempDir::new(name), extra)
    }

    /// As [`Node::start`], with the given data directory (kept by the node
    /// until it is dropped; take it back with [`Node::into_dir`]).
    pub fn start_in(name: &str, dir: TempDir, extra: &[&str]) -> Self {
        let mut child = Command::new(node_bin())
            .args(["--log-format", "json", "start", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
            .arg(dir.path())
            .args(extra)
            .env("RUST_LOG", "info,libp2p=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn node");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let (l, out) = (logs.clone(), stdout.clone());
        let err = child.stderr.take().expect("stderr");
        let tag = name.to_owned();
        let mut kept = log_file(name);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(f) = kept.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => l.lock().unwrap().push(v),
                    Err(_) => eprintln!("[{tag}] {line}"),
                }
            }
        });
        let so = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(so).lines().map_while(Result::ok) {
                out.lock().unwrap().push(line);
            }
        });
        Self { name: name.to_owned(), child, logs, stdout, dir }
    }

    /// The full multiaddr the node printed (waits up to 20 s).
    pub fn address(&self) -> String {
        wait_until(Duration::from_secs(20), || self.stdout.lock().unwrap().first().cloned())
            .unwrap_or_else(|| panic!("{} printed no listen address", self.name))
    }

    /// The node's peer id, from its first log line.
    pub fn peer_id(&self) -> String {
        wait_until(Duration::from_secs(20), || {
            self.events("starting").first().and_then(|e| e["peer_id"].as_str().map(String::from))
        })
        .unwrap_or_else(|| panic!("{} logged no peer id", self.name))
    }

    /// Every log event whose message is `message`.
    pub fn events(&self, message: &str) -> Vec<Value> {
        self.logs.lock().unwrap().iter().filter(|v| v["message"] == message).cloned().collect()
    }

    /// Every log event whose message contains `text`.
    pub fn events_containing(&self, text: &str) -> Vec<Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["message"].as_str().is_some_and(|m| m.contains(text)))
            .cloned()
            .collect()
    }

    /// Completed rounds, as logged.
    pub fn rounds(&self) -> Vec<Round> {
        self.events("round complete").iter().map(Round::from_event).collect()
    }

    /// Peers discovered through Kademlia.
    pub fn discovered(&self) -> Vec<String> {
        self.events("peer discovered").iter().filter_map(|e| e["peer"].as_str().map(String::from)).collect()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        wait_until(timeout, || self.child.try_wait().expect("try_wait")).map(|s| s.code().unwrap_or(-1))
    }

    /// SIGTERM: asks the node to finish its round, leave, flush its ledger outbox and exit.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the node and returns its data directory, to restart from it.
    pub fn into_dir(mut self) -> TempDir {
        self.take_dir()
    }

    /// Kills the node (if still running) and takes its data directory, keeping its logs.
    pub fn take_dir(&mut self) -> TempDir {
        self.kill();
        std::mem::replace(&mut self.dir, TempDir(PathBuf::new()))
    }

    /// Writes the node's log events to `path`, one JSON object per line.
    pub fn save_log(&self, path: &Path) -> std::io::Result<()> {
        let text: String = self.logs.lock().unwrap().iter().map(|v| format!("{v}\n")).collect();
        std::fs::write(path, text)
    }

    /// Dumps the node's logs to stderr (for failing tests).
    pub fn dump(&self) {
        for v in self.logs.lock().unwrap().iter() {
            eprintln!("[{}] {v}", self.name);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether any of `nodes` is still running.
pub fn any_running(nodes: &mut [Node]) -> bool {
    nodes.iter_mut().any(|n| n.is_running())
}

/// When a log event was written, in seconds since 1970 (from its RFC 3339 UTC `timestamp`).
pub fn event_time(e: &Value) -> Option<f64> {
    let ts = e["timestamp"].as_str()?;
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (hh, mm, ss) = (t.next()?.parse::<f64>().ok()?, t.next()?.parse::<f64>().ok()?, t.next()?.parse::<f64>().ok()?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + hh * 3600.0 + mm * 60.0 + ss)
}

/// One completed round as a node logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    pub round: u64,
    pub attempt: u64,
    pub members: Vec<String>,
    pub len: usize,
    pub result_hash: String,
    pub bytes_sent: u64,
    pub reduce_us: u64,
    pub round_us: u64,
}

impl Round {
    fn from_event(e: &Value) -> Self {
        Self {
            round: e["round"].as_u64().expect("round"),
            attempt: e["attempt"].as_u64().expect("attempt"),
            members: e["members"].as_str().expect("members").split(',').map(String::from).collect(),
            len: e["len"].as_u64().expect("len") as usize,
            result_hash: e["result_hash"].as_str().expect("result_hash").to_owned(),
            bytes_sent: e["bytes_sent"].as_u64().expect("bytes_sent"),
            reduce_us: e["reduce_us"].as_u64().expect("reduce_us"),
            round_us: e["round_us"].as_u64().expect("round_us"),
        }
    }
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether Ctrl-C or SIGTERM arrived (after [`stop_on_signals`]).
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// On Ctrl-C or SIGTERM, sets [`interrupted`]: waits end early, the caller returns, and the
/// drops of its [`Node`]s and chain stop every process it started.
pub fn stop_on_signals() {
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async {
            #[cfg(unix)]
            {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
                else {
                    return;
                };
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            #[cfg(not(unix))]
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("\ninterrupted: stopping every process this command started");
            INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    });
}

/// Polls `f` every 50 ms until it returns `Some`, `timeout` passes, or the program is
/// interrupted.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end || interrupted() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a one-shot `node` command (such as `train`) with JSON logs to its end;
/// returns its exit code and its log events.
pub fn run_node(args: &[&str]) -> (Option<i32>, Vec<Value>) {
    let out = Command::new(node_bin())
        .args(["--log-format", "json"])
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("run node");
    let events =
        String::from_utf8_lossy(&out.stderr).lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect();
    (out.status.code(), events)
}

/// Where Debian's `dataset-fashion-mnist` package keeps the real Fashion-MNIST.
pub const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// Installs Debian packages (needs root, as on CI); tries once more after refreshing the
/// package lists. Returns whether it worked.
pub fn apt_install(packages: &[&str]) -> bool {
    let apt = |args: &[&str]| {
        Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive").status().is_ok_and(|s| s.success())
    };
    let install = |pkgs: &[&str]| {
        let mut args = vec!["install", "-y", "-qq"];
        args.extend_from_slice(pkgs);
        apt(&args)
    };
    install(packages) || (apt(&["update", "-qq"]) && install(packages))
}

/// Installs Debian's `dataset-fashion-mnist` package if its files are missing
/// (idempotent), and returns their directory.
pub fn ensure_fashion_mnist() -> &'static Path {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let dir = Path::new(FASHION_MNIST);
        if dir.join("train-images-idx3-ubyte.gz").exists() {
            return;
        }
        let ok = apt_install(&["dataset-fashion-mnist"]);
        assert!(
            ok && dir.join("train-images-idx3-ubyte.gz").exists(),
            "Fashion-MNIST is missing and could not be installed: run `apt-get install dataset-fashion-mnist` as root"
        );
    });
    Path::new(FASHION_MNIST)
}
