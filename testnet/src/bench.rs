//! `testnet bench`: the all-reduce between real node processes, next to the
//! machine's own ceiling measured in the same run.
//!
//! - Ceiling: N processes in a TCP ring on loopback, each sending and receiving
//!   the same volume at once with 1 MiB writes (the all-reduce's traffic
//!   pattern); the per-peer ceiling is what one of them moves per second. Also
//!   a plain one-way copy between two processes.
//! - All-reduce: N `node` processes, bus bandwidth as nccl-tests define it,
//!   `busbw = algbw × 2(N−1)/N`, counted in bytes of the f32 vector.
//! - The reference a user would otherwise pick: torch.distributed's all-reduce on
//!   the gloo backend, N processes, the same sizes (`--gloo`, through
//!   `testnet/gloo/allreduce.py`); for HPC users, Open MPI's `MPI_Allreduce` over
//!   its TCP transport on loopback (`--mpi`, through `testnet/mpi/allreduce.c`).
//! - The single-core cost of the per-value work: fixed-point encoding, blake3,
//!   integer addition.

use crate::process::Node;
use anyhow::{Context, bail};
use p2p_proto::compress::{self, Compression};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WRITE: usize = 1 << 20;

/// One peer of the TCP ceiling measurement (run as a child process): listens,
/// prints its port, reads the port to send to from stdin (0: send nothing),
/// then sends `send` bytes while receiving `recv` bytes, and prints the seconds
/// it took.
/// With `span` above [`WRITE`], writes and reads walk through buffers of that many bytes
/// instead of reusing one megabyte that stays in cache.
pub fn tcp_peer(send: u64, recv: u64, span: usize) -> anyhow::Result<()> {
    let span = span.max(WRITE);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("{}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let port: u16 = line.trim().parse().context("port on stdin")?;
    let out = (port != 0).then(|| TcpStream::connect(("127.0.0.1", port))).transpose()?;
    let inc = (recv > 0).then(|| listener.accept().map(|(s, _)| s)).transpose()?;
    let start = Instant::now();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        if let Some(mut s) = out {
            s.set_nodelay(true)?;
            let buf = vec![0x5au8; span];
            let (mut left, mut at) = (send, 0);
            while left > 0 {
                let n = left.min(WRITE as u64) as usize;
                s.write_all(&buf[at..at + n])?;
                at = (at + WRITE) % (span - WRITE + 1);
                left -= n as u64;
            }
        }
        Ok(())
    });
    if let Some(mut s) = inc {
        let mut buf = vec![0u8; span];
        let (mut left, mut at) = (recv, 0);
        while left > 0 {
            let n = s.read(&mut buf[at..at + WRITE])?;
            at = (at + WRITE) % (span - WRITE + 1);
            if n == 0 {
                bail!("sender closed early");
            }
            left -= n as u64;
        }
    }
    sender.join().expect("sender thread")?;
    println!("{}", start.elapsed().as_secs_f64());
    Ok(())
}

/// Runs `n` tcp-peer processes; `ring` connects i -> i+1 for all, otherwise
/// only 0 -> 1. Returns the slowest peer's seconds.
pub(crate) fn tcp_run(n: usize, bytes: u64, ring: bool) -> anyhow::Result<f64> {
    tcp_run_span(n, bytes, ring, WRITE)
}

/// [`tcp_run`] with each peer's writes and reads walking through `span` bytes of buffers.
pub(crate) fn tcp_run_span(n: usize, bytes: u64, ring: bool, span: usize) -> anyhow::Result<f64> {
    let exe = std::env::current_exe()?;
    let mut kids = Vec::new();
    for i in 0..n {
        let (send, recv) = if ring {
            (bytes, bytes)
        } else if i == 0 {
            (bytes, 0)
        } else {
            (0, bytes)
        };
        let mut c = Command::new(&exe)
            .args(["tcp-peer", "--send", &send.to_string(), "--recv", &recv.to_string(), "--span", &span.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut out = BufReader::new(c.stdout.take().expect("stdout"));
        let mut port = String::new();
        out.read_line(&mut port)?;
        kids.push((c, out, port.trim().parse::<u16>()?));
    }
    let ports: Vec<u16> = kids.iter().map(|k| k.2).collect();
    for (i, (c, _, _)) in kids.iter_mut().enumerate() {
        let to = if ring || i == 0 { ports[(i + 1) % n] } else { 0 };
        writeln!(c.stdin.as_mut().expect("stdin"), "{to}")?;
    }
    let mut worst: f64 = 0.0;
    for (mut c, mut out, _) in kids {
        let mut secs = String::new();
        out.read_line(&mut secs)?;
        worst = worst.max(secs.trim().parse().context("tcp peer result")?);
        c.wait()?;
    }
    Ok(worst)
}

/// Options of the benchmark.
#[derive(Debug, Clone)]
pub struct BenchOpts {
    pub peers: usize,
    pub sizes: Vec<usize>,
    pub rounds: u64,
    /// A Python interpreter with torch, to run the gloo reference.
    pub gloo: Option<std::path::PathBuf>,
    /// The MPI reference's binary (`testnet/mpi/setup`), run with `mpirun`.
    pub mpi: Option<std::path::PathBuf>,
    /// `--ring-transport` of the node processes.
    pub ring_transport: String,
    /// Compressions to measure besides the uncompressed ring (int8, topk).
    pub compression: Vec<String>,
}

fn gbps(bytes: f64, secs: f64) -> f64 {
    bytes / secs / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs everything and prints Markdown tables.
pub fn run(o: &BenchOpts) -> anyhow::Result<()> {
    let n = o.peers;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    println!("machine: {} cores, {cpu}\n", std::thread::available_parallelism().map_or(0, |p| p.get()));

    // The ceiling, measured now, on the same machine state as the all-reduce.
    let vol: u64 = 2 << 30;
    let one_way = gbps(vol as f64, tcp_run(2, vol, false)?);
    let ring_secs = tcp_run(n, vol / n as u64, true)?;
    let per_peer = gbps((vol / n as u64) as f64, ring_secs);
    println!("| ceiling | GB/s |");
    println!("|---|---:|");
    println!("| plain TCP copy, 2 processes, one way | {one_way:.2} |");
    println!("| TCP ring of {n} processes, aggregate | {:.2} |", per_peer * n as f64);
    println!("| TCP ring of {n} processes, per peer (the ceiling) | {per_peer:.2} |\n");

    let mut ours = Vec::new();
    for &len in &o.sizes {
        ours.push(allreduce(n, len, o.rounds, &o.ring_transport, "none")?);
    }
    let mut references: Vec<(&str, Vec<f64>)> = Vec::new();
    if let Some(python) = &o.gloo {
        references.push(("gloo", gloo(python, n, &o.sizes, o.rounds)?));
    }
    if let Some(binary) = &o.mpi {
        references.push(("MPI", mpi(binary, n, &o.sizes, o.rounds)?));
    }
    let busbw = |secs: f64, len: usize| gbps(4.0 * len as f64, secs) * 2.0 * (n as f64 - 1.0) / n as f64;
    let headers: String = references
        .iter()
        .map(|(name, _)| format!(" {name} ms (median) | {name} busbw / ceiling | {name} ms / ours |"))
        .collect();
    println!(
        "| values (f32) | peers | reduce ms (median) | round ms (median) | algbw GB/s | busbw GB/s | busbw / per-peer ceiling | hashing / round |{headers}"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|{}", "---:|---:|---:|".repeat(references.len()));
    for (i, (&len, &(reduce, round))) in o.sizes.iter().zip(&ours).enumerate() {
        let bus = busbw(reduce, len);
        let hashing = hashing_secs(len, n);
        let theirs: String = references
            .iter()
            .map(|(_, secs)| {
                let t = secs[i];
                format!(" {:.1} | {:.0}% | {:.2} |", t * 1e3, 100.0 * busbw(t, len) / per_peer, t / reduce)
            })
            .collect();
        println!(
            "| {} | {n} | {:.1} | {:.1} | {:.3} | {bus:.3} | {:.0}% | {:.1}% |{theirs}",
            human(len),
            reduce * 1e3,
            round * 1e3,
            gbps(4.0 * len as f64, reduce),
            100.0 * bus / per_peer,
            100.0 * hashing / round,
        );
    }
    println!();
    if !o.compression.is_empty() {
        compressed(o, per_peer, &ours)?;
    }
    per_value_costs();
    Ok(())
}

/// The same all-reduce with compressed contributions: bytes each peer sends, and the
/// effective bandwidth (the f32 vector's bytes over the time, as for the ring).
fn compressed(o: &BenchOpts, per_peer: f64, ring: &[(f64, f64)]) -> anyhow::Result<()> {
    let n = o.peers;
    println!(
        "| values (f32) | compression | reduce ms (median) | round ms (median) | MB sent per peer | effective busbw GB/s | effective busbw / per-peer ceiling | ring reduce ms / this |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for c in &o.compression {
        let comp = match c.as_str() {
            "int8" => Compression::Int8 { block: 256 },
            _ => Compression::TopK { per_million: 10_000 },
        };
        for (&len, &(ring_reduce, _)) in o.sizes.iter().zip(ring) {
            let (reduce, round) = allreduce(n, len, o.rounds, &o.ring_transport, c)?;
            let sent = 4.0 * comp.payload_words(len) as f64 * (n as f64 - 1.0);
            let bus = gbps(4.0 * len as f64, reduce) * 2.0 * (n as f64 - 1.0) / n as f64;
            println!(
                "| {} | {c} | {:.1} | {:.1} | {:.1} | {bus:.3} | {:.0}% | {:.2} |",
                human(len),
                reduce * 1e3,
                round * 1e3,
                sent / 1e6,
                100.0 * bus / per_peer,
                ring_reduce / reduce,
            );
        }
    }
    println!();
    Ok(())
}

fn human(len: usize) -> String {
    if len.is_multiple_of(1 << 20) { format!("{}M", len >> 20) } else { len.to_string() }
}

/// Seconds one core spends on the blake3 work of one peer's round, measured now: its commit
/// (the whole vector), checking every segment it receives (2(n-1)/n of it) and hashing the
/// partial sums it sends in reduce-scatter and its reduced chunk ((n-1)/n of it). Its `Done`
/// hashes the sum's segment hashes, not the vector ([`p2p_proto::hash::sum_hash`]).
fn hashing_secs(len: usize, n: usize) -> f64 {
    let bytes = vec![0x5au8; 4 * len];
    let t = Instant::now();
    std::hint::black_box(blake3::hash(&bytes));
    let whole = t.elapsed().as_secs_f64();
    whole * (1.0 + 3.0 * (n as f64 - 1.0) / n as f64)
}

/// Median seconds of Open MPI's `MPI_Allreduce` per size, slowest rank per round: `binary`
/// (`testnet/mpi/allreduce.c`) under `mpirun`, one rank a peer, over Open MPI's TCP transport
/// on loopback (the network path, as the ring's; its shared-memory transport works only
/// within one machine).
fn mpi(binary: &std::path::Path, n: usize, sizes: &[usize], rounds: u64) -> anyhow::Result<Vec<f64>> {
    let list = sizes.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let out = Command::new("mpirun")
        .args([
            "--oversubscribe",
            "-np",
            &n.to_string(),
            "--mca",
            "btl",
            "tcp,self",
            "--mca",
            "btl_tcp_if_include",
            "lo",
        ])
        .arg(binary)
        .args(["--sizes", &list, "--rounds", &rounds.to_string()])
        // mpirun refuses to start as root without both.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| {
            format!("cannot run mpirun {}: install Open MPI and build it with testnet/mpi/setup", binary.display())
        })?;
    if !out.status.success() {
        bail!("the MPI all-reduce failed ({}); its messages are above", out.status);
    }
    reference_medians("MPI", &out.stdout, sizes.len(), "mpi")
}

/// The median seconds per size from a reference's JSON lines (`median_s`; `version` names the
/// field holding its version).
fn reference_medians(name: &str, stdout: &[u8], sizes: usize, version: &str) -> anyhow::Result<Vec<f64>> {
    let mut secs = Vec::new();
    for line in String::from_utf8_lossy(stdout).lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{name} output line {line:?}"))?;
        let median = v["median_s"].as_f64().with_context(|| format!("{name} output without median_s"))?;
        eprintln!("{name} ({}), {} values: median {:.1} ms", v[version], v["size"], median * 1e3);
        secs.push(median);
    }
    if secs.len() != sizes {
        bail!("the {name} all-reduce reported {} sizes of {sizes}", secs.len());
    }
    Ok(secs)
}

/// Median seconds of torch.distributed's all-reduce (gloo) per size, slowest rank per round.
fn gloo(python: &std::path::Path, n: usize, sizes: &[usize], rounds: u64) -> anyhow::Result<Vec<f64>> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/gloo/allreduce.py");
    let list = sizes.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let out = Command::new(python)
        .args([script, "--peers", &n.to_string(), "--sizes", &list, "--rounds", &rounds.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}: make one with testnet/gloo/setup", python.display()))?;
    if !out.status.success() {
        bail!("the gloo all-reduce failed ({}); its messages are above", out.status);
    }
    reference_medians("gloo", &out.stdout, sizes.len(), "torch")
}

/// Median over rounds of the slowest peer's reduce and round time, in seconds.
pub(crate) fn allreduce(
    n: usize,
    len: usize,
    rounds: u64,
    transport: &str,
    compression: &str,
) -> anyhow::Result<(f64, f64)> {
    let (min, r, l) = (n.to_string(), rounds.to_string(), len.to_string());
    let run = format!("bench-{len}-{compression}");
    let flags = [
        "--demo-compression",
        compression,
        "--ring-transport",
        transport,
        "--run",
        run.as_str(),
        "--min-peers",
        &min,
        "--rounds",
        &r,
        "--demo-vector-len",
        &l,
        "--step-timeout-ms",
        "60000",
        "--commit-timeout-ms",
        "60000",
        "--done-timeout-ms",
        "60000",
    ];
    let first = Node::start("bench-0", &flags);
    let boot = first.address();
    let mut nodes = vec![first];
    for i in 1..n {
        let mut f = flags.to_vec();
        f.extend(["--bootstrap", boot.as_str()]);
        nodes.push(Node::start(&format!("bench-{i}"), &f));
    }
    for node in &mut nodes {
        if node.wait_exit(Duration::from_secs(600)) != Some(0) {
            nodes.iter().for_each(Node::dump);
            bail!("a node failed during the all-reduce of {len} values");
        }
    }
    let (mut reduce, mut round) = (Vec::new(), Vec::new());
    for k in 0..rounds {
        let got: Vec<_> = nodes.iter().filter_map(|nd| nd.rounds().into_iter().find(|x| x.round == k)).collect();
        if got.len() != n || got.iter().any(|g| g.members.len() != n || g.result_hash != got[0].result_hash) {
            bail!("round {k} of {len} values was not completed identically by all {n} peers");
        }
        reduce.push(got.iter().map(|g| g.reduce_us).max().unwrap_or(0) as f64 / 1e6);
        round.push(got.iter().map(|g| g.round_us).max().unwrap_or(0) as f64 / 1e6);
    }
    Ok((median(reduce), median(round)))
}

/// Single-core throughput of the per-value work, in GB/s of f32 input.
fn per_value_costs() {
    let len = 16 << 20;
    let run = p2p_proto::RunId::from_name("bench");
    let xs = p2p_proto::demo::demo_vector(run, 0, "p", len);
    let fp = p2p_proto::FixedPoint::default();
    let time = |f: &mut dyn FnMut()| -> f64 {
        median(
            (0..5)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .collect(),
        )
    };
    // Into a reused buffer, as a trainer does every round.
    let mut enc = Vec::with_capacity(len);
    let t_enc = time(&mut || {
        enc.clear();
        fp.encode_into(&xs, &mut enc).expect("finite");
    });
    let mut h = [0u8; 32];
    let t_hash = time(&mut || h = p2p_proto::hash::hash_i32s(&enc));
    let bytes = p2p_proto::hash::le_bytes(&enc);
    let t_hash_bytes = time(&mut || h = *blake3::hash(&bytes).as_bytes());
    let mut acc = enc.clone();
    let t_add = time(&mut || p2p_proto::fixed::add_assign_le_bytes(&mut acc, &bytes));
    let int8 = Compression::Int8 { block: 256 };
    let max = fp.max_units();
    let mut packed = Vec::new();
    let t_int8 = time(&mut || packed = compress::encode(int8, &enc, None, max, 0.0).payload);
    let t_int8_in = time(&mut || {
        compress::check(int8, &packed, len, max).expect("a payload the encoder made");
        compress::add_into(int8, &packed, &mut acc);
    });
    let topk = Compression::TopK { per_million: 10_000 };
    let t_topk = time(&mut || packed = compress::encode(topk, &enc, Some(&acc), max, 0.0).payload);
    std::hint::black_box((&h, &acc, &packed));
    let b = 4.0 * len as f64;
    println!("| single core, 16M values | GB/s |");
    println!("|---|---:|");
    println!("| fixed-point encode (clip, scale, round) | {:.2} |", gbps(b, t_enc));
    println!("| blake3 of i32 values (with LE conversion) | {:.2} |", gbps(b, t_hash));
    println!("| blake3 of wire bytes | {:.2} |", gbps(b, t_hash_bytes));
    println!("| add wire bytes into the sum | {:.2} |", gbps(b, t_add));
    println!("| encode + blake3 + add, combined | {:.2} |", gbps(b, t_enc + t_hash_bytes + t_add));
    println!("| int8 compress (a scale per 256 values) | {:.2} |", gbps(b, t_int8));
    println!("| int8 check + decode-add into the sum | {:.2} |", gbps(b, t_int8_in));
    println!("| top-k 1% compress, with a residual | {:.2} |", gbps(b, t_topk));
}
