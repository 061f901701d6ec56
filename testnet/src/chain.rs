//! A local chain for the cluster and the tests: the pinned Foundry tools
//! (installed from npm into `contracts/node_modules` when missing), an Anvil
//! process that is stopped on drop, its funded dev accounts, and the ledger
//! contract deployed with `node deploy`.

use crate::process::{TempDir, apt_install, node_bin, wait_until};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The repository root (this crate lives in `testnet/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repository root").to_owned()
}

/// The Foundry project.
pub fn contracts_dir() -> PathBuf {
    repo_root().join("contracts")
}

/// Paths of the pinned tools.
#[derive(Debug, Clone)]
pub struct Tools {
    pub anvil: PathBuf,
    pub forge: PathBuf,
    pub cast: PathBuf,
}

/// Installs the pinned toolchain (`contracts/package.json` and its lock file: anvil, forge,
/// cast 1.7.1 and solc 0.8.30) with `npm ci` when it is missing, and npm itself from Debian's
/// packages when that is missing. Idempotent, and safe when several processes ask at once (a
/// file lock serializes the install).
pub fn ensure_tools() -> &'static Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let dir = contracts_dir();
        let bin = dir.join("node_modules").join(".bin");
        let tools = Tools { anvil: bin.join("anvil"), forge: bin.join("forge"), cast: bin.join("cast") };
        let complete = |t: &Tools| t.anvil.exists() && t.forge.exists() && t.cast.exists();
        if complete(&tools) {
            return tools;
        }
        let lock_path = std::env::temp_dir().join("dtrain-contract-tools.lock");
        let lock = std::fs::File::create(&lock_path).expect("create the tool install lock file");
        lock.lock().expect("lock the tool install");
        if !complete(&tools) {
            let has_npm = || Command::new("npm").arg("--version").output().is_ok_and(|o| o.status.success());
            if !has_npm() {
                eprintln!("npm is missing: installing Debian's nodejs and npm");
                assert!(
                    apt_install(&["nodejs", "npm"]) && has_npm(),
                    "npm is missing and could not be installed: run `apt-get install nodejs npm` as root"
                );
            }
            eprintln!("installing the pinned contract toolchain (npm ci in {})", dir.display());
            let status = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(&dir)
                .status()
                .expect("run npm");
            assert!(status.success(), "npm ci in {} failed", dir.display());
        }
        assert!(complete(&tools), "npm ci did not install anvil, forge and cast under {}", bin.display());
        tools
    })
}

/// A dev account of Anvil's default mnemonic: funded with 10,000 ETH.
#[derive(Debug, Clone)]
pub struct Account {
    pub address: String,
    pub key: String,
}

/// A running Anvil, stopped when dropped.
#[derive(Debug)]
pub struct Anvil {
    child: Option<Child>,
    pub port: u16,
    pub url: String,
    pub accounts: Vec<Account>,
    state: Option<PathBuf>,
    dir: TempDir,
    log: Arc<Mutex<Vec<String>>>,
}

impl Anvil {
    /// Starts Anvil on an ephemeral loopback port with a fresh chain.
    pub fn start() -> Self {
        Self::spawn(None, 0, TempDir::new("anvil"))
    }

    /// Starts Anvil whose state is loaded from and dumped to `state` (the file is written on
    /// a clean stop and every second), on a free port below the ephemeral range, so that while
    /// the chain is down for a restart no outgoing connection, not even a client's retry
    /// connecting to itself, can take the port.
    pub fn start_with_state(state: &Path) -> Self {
        let mut last = Vec::new();
        for _ in 0..20 {
            match Self::try_spawn(Some(state.to_owned()), restartable_port(), TempDir::new("anvil")) {
                Ok(anvil) => return anvil,
                Err((log, _)) => last = log,
            }
        }
        panic!("anvil found no free port below the ephemeral range: {last:?}")
    }

    fn spawn(state: Option<PathBuf>, port: u16, dir: TempDir) -> Self {
        Self::try_spawn(state, port, dir).unwrap_or_else(|(log, _)| panic!("anvil did not start listening: {log:?}"))
    }

    /// Starts Anvil, or returns what it printed when it exited or never listened (and `dir`).
    fn try_spawn(state: Option<PathBuf>, port: u16, dir: TempDir) -> Result<Self, (Vec<String>, TempDir)> {
        let tools = ensure_tools();
        let config = dir.path().join("anvil.json");
        let mut cmd = Command::new(&tools.anvil);
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string(), "--config-out"]).arg(&config);
        if let Some(s) = &state {
            cmd.arg("--state").arg(s).args(["--state-interval", "1"]);
        }
        let mut child =
            cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn anvil");
        let log = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let l = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    l.lock().unwrap().push(line);
                }
            });
        }
        let listening = wait_until(Duration::from_secs(30), || {
            let port = log
                .lock()
                .unwrap()
                .iter()
                .find_map(|l| l.strip_prefix("Listening on 127.0.0.1:").and_then(|p| p.trim().parse::<u16>().ok()));
            match port {
                Some(p) => Some(Some(p)),
                // Exited (a port in use, a bad state file): give the pipes a moment to drain.
                None if child.try_wait().ok().flatten().is_some() => {
                    std::thread::sleep(Duration::from_millis(100));
                    Some(None)
                }
                None => None,
            }
        })
        .flatten();
        let Some(port) = listening else {
            let _ = child.kill();
            let _ = child.wait();
            return Err((log.lock().unwrap().clone(), dir));
        };
        let accounts = read_accounts(&config);
        Ok(Self { child: Some(child), port, url: format!("http://127.0.0.1:{port}"), accounts, state, dir, log })
    }

    /// Writes dev account `i`'s key to a file (mode 0600) and returns its path.
    pub fn key_file(&self, i: usize) -> PathBuf {
        self.write_key(&format!("key-{i}"), &self.accounts[i])
    }

    /// The flags that make a node record on this chain with `contract`, signing as dev account
    /// `i`.
    pub fn peer_flags(&self, contract: &str, i: usize) -> Vec<String> {
        let key = self.key_file(i).to_string_lossy().into_owned();
        ["--rpc-url", &self.url, "--contract", contract, "--eth-key-file", &key].map(String::from).to_vec()
    }

    /// Creates `n` fresh peer accounts (new random keys) and funds each with 100 ETH from dev
    /// account 0, so any number of peers can record on chain.
    pub fn fund_peers(&self, n: usize) -> Vec<Account> {
        let cast = &ensure_tools().cast;
        let out = Command::new(cast)
            .args(["wallet", "new", "--json", "--number", &n.to_string()])
            .output()
            .expect("run cast wallet new");
        assert!(out.status.success(), "cast wallet new failed: {}", String::from_utf8_lossy(&out.stderr));
        let wallets: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cast wallet JSON");
        let accounts: Vec<Account> = wallets
            .as_array()
            .expect("a list of wallets")
            .iter()
            .map(|w| Account {
                address: w["address"].as_str().expect("address").to_owned(),
                key: w["private_key"].as_str().expect("private_key").to_owned(),
            })
            .collect();
        assert_eq!(accounts.len(), n, "cast made {} wallets, not {n}", accounts.len());
        for a in &accounts {
            let out = Command::new(cast)
                .args(["send", &a.address, "--value", "100ether", "--rpc-url", &self.url, "--private-key"])
                .arg(&self.accounts[0].key)
                .output()
                .expect("run cast send");
            assert!(out.status.success(), "funding {} failed: {}", a.address, String::from_utf8_lossy(&out.stderr));
        }
        accounts
    }

    /// Writes `account`'s key to a file (mode 0600) named `name` in the chain's directory.
    pub fn write_key(&self, name: &str, account: &Account) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, &account.key).expect("write key file");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod key file");
        }
        path
    }

    /// Stops Anvil cleanly (SIGTERM, so it dumps its state) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            if wait_until(Duration::from_secs(10), || child.try_wait().ok().flatten()).is_none() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }

    /// Stops Anvil and starts it again on the same port from its dumped state.
    pub fn restart(&mut self) {
        let state = self.state.clone().expect("restart needs a chain started with a state file");
        self.stop();
        let mut dir = std::mem::replace(&mut self.dir, TempDir::new("anvil-old"));
        // The port is normally free at once; whatever holds it briefly (a socket closing) gets
        // a minute to let go.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            match Self::try_spawn(Some(state.clone()), self.port, dir) {
                Ok(again) => {
                    *self = again;
                    return;
                }
                Err((log, back))
                    if std::time::Instant::now() < deadline && log.iter().any(|l| l.contains("in use")) =>
                {
                    dir = back;
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err((log, _)) => panic!("anvil did not restart on port {}: {log:?}", self.port),
            }
        }
    }

    /// Everything Anvil printed.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A port that is free now and lies below the kernel's ephemeral range (where no outgoing
/// connection takes its local port from).
fn restartable_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()))
        .unwrap_or(32768)
        .clamp(12000, 65535);
    let span = (low - 10000).min(12000);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let mut x = (seed as u64) ^ (u64::from(std::process::id()) << 32);
    for _ in 0..1000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = (low - span + (x % u64::from(span)) as u32) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {}..{low}", low - span)
}

fn read_accounts(config: &Path) -> Vec<Account> {
    let text = wait_until(Duration::from_secs(10), || std::fs::read_to_string(config).ok())
        .unwrap_or_else(|| panic!("anvil wrote no {}", config.display()));
    let v: serde_json::Value = serde_json::from_str(&text).expect("anvil config JSON");
    let addrs = v["available_accounts"].as_array().expect("available_accounts");
    let keys = v["private_keys"].as_array().expect("private_keys");
    addrs
        .iter()
        .zip(keys)
        .map(|(a, k)| Account { address: a.as_str().unwrap().to_owned(), key: k.as_str().unwrap().to_owned() })
        .collect()
}

/// Runs the `node` binary with `args` to completion.
pub fn node_command(args: &[&str]) -> Output {
    Command::new(node_bin()).args(args).env("RUST_LOG", "warn").output().expect("run node")
}

/// Deploys the ledger with `node deploy` from dev account 0; returns the contract address.
pub fn deploy(anvil: &Anvil) -> String {
    let key = anvil.key_file(0);
    let out = node_command(&["deploy", "--rpc-url", &anvil.url, "--eth-key-file", key.to_str().unwrap()]);
    assert!(out.status.success(), "node deploy failed: {}", String::from_utf8_lossy(&out.stderr));
    let address = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(address.starts_with("0x") && address.len() == 42, "node deploy printed `{address}`");
    address
}

/// Reads a ledger query (`contributions`/`checkpoints` with `--json`) as JSON.
pub fn ledger_json(anvil: &Anvil, contract: &str, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["--rpc-url", &anvil.url, "--contract", contract, "--json"]);
    let out = node_command(&all);
    assert!(out.status.success(), "node {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("ledger JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain that restarts gets a port no outgoing connection can be given meanwhile.
    #[test]
    fn a_restartable_port_is_free_and_below_the_ephemeral_range() {
        let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .map(|s| s.split_whitespace().next().unwrap().parse().unwrap())
            .unwrap_or(32768);
        for _ in 0..20 {
            let port = restartable_port();
            assert!((10000..low.max(12000)).contains(&port), "{port} is below {low}");
            std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
        }
    }
}
