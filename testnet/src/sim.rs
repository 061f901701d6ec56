//! `testnet simulate`: rounds of 16 to 1,000 peers on simulated links, for the strategies a
//! run can use, and the model's check against the real all-reduce on this machine.
//!
//! The data movement is the real ring state machine ([`p2p_proto::ring::RingAllReduce`]),
//! driven by a discrete-event simulation: every segment it emits waits for its sender's
//! uplink (bandwidth), travels (latency), waits for its receiver's CPU (the per-byte cost of
//! checking and adding it) and is handed to the receiver's machine, whose answer goes out
//! the same way. Only the sizes are virtual: each machine holds one value per real segment
//! and every segment is charged the bytes of the real one, so a 64 MB model at 1,000 peers
//! costs memory for a few thousand values. The simulated peers are alike, so which peers
//! share a group does not change the figures.
//!
//! Strategies:
//! - **ring**: one ring of all peers, 2(N−1) steps.
//! - **hierarchical**, as the node runs it ([`p2p_proto::hier::HierAllReduce`], its own state
//!   machine here): groups of G reduce-scatter in their rings, member j of every group
//!   all-reduces chunk j + 1 in a ring across the groups, the groups all-gather.
//!   2(G−1) + 2(N/G−1) steps (2 more with the N mod G extras), about twice the vector per peer.
//!   One attempt spans all N peers: a crash anywhere fails it, as in the ring.
//! - **hierarchical, failures contained** (modelled, not built in the node): rings of G
//!   all-reduce; the first member of each joins a ring of the N/G group leaders; each leader
//!   sends the total down its group as a pipelined chain. 2(G−1) + 2(N/G−1) + (G−1) steps. A
//!   crash redoes only its group's ring or the leaders' ring.
//! - **local SGD**: the ring, once every H optimizer steps (the compute of H steps first).
//!
//! Failures: in each attempt every member crashes with probability `fail`, at a uniform time
//! within it. A crash fails the attempt of its ring; the survivors notice (the closed
//! connection reaches the neighbours one latency later, the failure spreads by gossip in
//! ⌊log₆ N⌋ + 1 hops), agree on the next attempt (a membership tick and one more gossip hop)
//! and redo it without the crashed peer. In the hierarchy a crash costs only its group's
//! ring (or the leaders' ring, where another member of the group, holding the same sum,
//! takes the seat); a member lost during the broadcast only misses the result and resyncs.

use p2p_proto::chunk::{SEGMENT_ELEMS, chunk_ranges, segment_count};
use p2p_proto::codec::encode_frame;
use p2p_proto::hash::{chunk_hash, segment_hashes};
use p2p_proto::hier::{HierAllReduce, Layout, Outgoing};
use p2p_proto::message::{Gossip, GradientCommit, RingStep, RoundDone, RunId};
use p2p_proto::ring::{Phase, RingAllReduce, RingParams};
use p2p_proto::round::DONE_CARRIERS;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// A link between two peers.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// One way, seconds.
    pub latency: f64,
    /// Bytes per second of a peer's uplink (infinite: only the CPU limits).
    pub bandwidth: f64,
}

/// What a peer's CPU pays per byte it receives, in seconds of one core.
#[derive(Debug, Clone, Copy)]
pub struct Cpu {
    /// Cores a peer has (a fraction when peers share a machine).
    pub speed: f64,
    /// The transport's cost of moving a byte (the kernel's copies), charged to the receiver.
    pub transport: f64,
    /// Checking, adding and passing on a reduce-scatter byte.
    pub reduce: f64,
    /// Checking and passing on an all-gather byte.
    pub gather: f64,
}

/// A link profile and the CPU behind it.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    pub link: Link,
    pub cpu: Cpu,
}

/// One all-reduce: seconds until the last member holds the sum, and bytes each member sent.
#[derive(Debug, Clone, Copy)]
pub struct RingRun {
    pub secs: f64,
    pub bytes_per_peer: f64,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// A segment reached member `to`'s CPU queue.
    Arrive { to: usize, msg: usize },
    /// Member `to` has checked segment `msg` and hands it to its machine.
    Checked { to: usize, msg: usize },
}

/// Simulates one ring all-reduce of `values` f32 among `n` members through the real state
/// machine.
pub fn ring(n: usize, values: usize, p: Profile) -> RingRun {
    if n < 2 {
        return RingRun { secs: 0.0, bytes_per_peer: 0.0 };
    }
    // One simulated value per real segment of a chunk; each is charged the real bytes.
    let chunk = values.div_ceil(n).max(1);
    let segments = segment_count(chunk, SEGMENT_ELEMS);
    let seg_bytes = 4.0 * chunk as f64 / segments as f64;
    let inputs = vec![vec![1i32; n * segments]; n];
    let mut machines = machines(RunId::from_name("simulation"), &inputs, 1, 0);
    let mut sim = Des { queue: BinaryHeap::new(), seq: 0, msgs: Vec::new(), uplink_free: vec![0.0; n], seg_bytes, p };
    for (pos, m) in machines.iter_mut().enumerate() {
        for step in m.start() {
            sim.send(pos, (pos + 1) % n, 0.0, step);
        }
    }
    let finished = sim.run(&mut |_, to, step| {
        let step = step.verify().expect("the machine's own hash");
        let out = machines[to].on_step(step).expect("a well-formed ring");
        (out.into_iter().map(|s| ((to + 1) % n, s)).collect(), machines[to].is_done())
    });
    assert!(machines.iter().all(RingAllReduce::is_done), "every member holds the sum");
    let sent = machines[0].bytes_sent() as f64 / 4.0 * seg_bytes;
    RingRun { secs: finished, bytes_per_peer: sent }
}

/// Simulates one hierarchical all-reduce of `values` f32 among `n` members in groups of `g`
/// through the node's state machine ([`HierAllReduce`]); bytes are the busiest member's.
pub fn hier(n: usize, g: usize, values: usize, p: Profile) -> RingRun {
    let Some(layout) = Layout::of(n, g) else { return ring(n, values, p) };
    // One simulated value per real segment of a chunk across groups (1/(gL) of the vector),
    // each charged the real bytes.
    let across = values.div_ceil(layout.g * layout.groups()).max(1);
    let per = segment_count(across, SEGMENT_ELEMS);
    let len = per * layout.g * layout.groups();
    let seg_bytes = 4.0 * values as f64 / len as f64;
    let run = RunId::from_name("simulation");
    let inputs = vec![1i32; len];
    let segs = segment_hashes(&inputs, &chunk_ranges(len, layout.g), 1);
    let commits = vec![segs.iter().map(chunk_hash).collect::<Vec<_>>(); n];
    let mut machines: Vec<HierAllReduce> = (0..n)
        .map(|pos| {
            let params = RingParams { run, round: 0, attempt: 0, n, pos, segment_elems: 1, max_units: 0 };
            HierAllReduce::new(layout, params, inputs.clone(), segs.clone(), &commits).expect("a valid position")
        })
        .collect();
    let mut sim = Des { queue: BinaryHeap::new(), seq: 0, msgs: Vec::new(), uplink_free: vec![0.0; n], seg_bytes, p };
    for (pos, m) in machines.iter_mut().enumerate() {
        for (to, step) in m.start().expect("a valid start") {
            sim.send(pos, to, 0.0, step);
        }
    }
    let finished = sim.run(&mut |from, to, step| {
        let out = machines[to].on_step(from, step.verify().expect("own hash")).expect("a well-formed hierarchy");
        (out, machines[to].is_done())
    });
    assert!(machines.iter().all(HierAllReduce::is_done), "every member holds the sum");
    let sent = machines.iter().map(HierAllReduce::bytes_sent).max().unwrap_or(0) as f64 / 4.0 * seg_bytes;
    RingRun { secs: finished, bytes_per_peer: sent }
}

/// The event queue of one simulated ring, and the segments in flight.
struct Des {
    queue: BinaryHeap<Reverse<(Nanos, u64, Event)>>,
    seq: u64,
    msgs: Vec<Option<(usize, RingStep)>>,
    uplink_free: Vec<f64>,
    seg_bytes: f64,
    p: Profile,
}

impl Des {
    fn push(&mut self, at: f64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse((Nanos::of(at), self.seq, event)));
    }

    /// `from` sends `step` to `to` at `at`, after what its uplink still holds.
    fn send(&mut self, from: usize, to: usize, at: f64, step: RingStep) {
        let start = at.max(self.uplink_free[from]);
        let done = start + self.seg_bytes / self.p.link.bandwidth;
        self.uplink_free[from] = done;
        self.msgs.push(Some((from, step)));
        let msg = self.msgs.len() - 1;
        self.push(done + self.p.link.latency, Event::Arrive { to, msg });
    }

    /// Runs the events to the end: each arrival waits for its receiver's CPU, then `apply`
    /// hands it to the receiver's machine (with its sender) and returns what to send on and
    /// whether the receiver is done. Returns when the last member finished.
    fn run(&mut self, apply: &mut dyn FnMut(usize, usize, RingStep) -> (Vec<Outgoing>, bool)) -> f64 {
        let mut finished = 0f64;
        let mut cpu_free = vec![0f64; self.uplink_free.len()];
        while let Some(Reverse((at, _, event))) = self.queue.pop() {
            let now = at.secs();
            match event {
                Event::Arrive { to, msg } => {
                    let phase = self.msgs[msg].as_ref().expect("in flight").1.id.phase;
                    let cost = match phase {
                        Phase::ReduceScatter => self.p.cpu.transport + self.p.cpu.reduce,
                        Phase::AllGather => self.p.cpu.transport + self.p.cpu.gather,
                    };
                    let start = now.max(cpu_free[to]);
                    cpu_free[to] = start + self.seg_bytes * cost / self.p.cpu.speed;
                    self.push(cpu_free[to], Event::Checked { to, msg });
                }
                Event::Checked { to, msg } => {
                    let (from, step) = self.msgs[msg].take().expect("checked once");
                    let (out, done) = apply(from, to, step);
                    for (next, s) in out {
                        self.send(to, next, now, s);
                    }
                    if done {
                        finished = finished.max(now);
                    }
                }
            }
        }
        finished
    }
}

/// The ring's machines, one per member of `inputs` (its values), each with its own segment
/// hashes and its left neighbour's commit, as a round sets them up.
fn machines(run: RunId, inputs: &[Vec<i32>], segment_elems: usize, max_units: i32) -> Vec<RingAllReduce> {
    let n = inputs.len();
    let chunks = chunk_ranges(inputs[0].len(), n);
    let hashes: Vec<Vec<Vec<p2p_proto::Hash>>> =
        inputs.iter().map(|d| segment_hashes(d, &chunks, segment_elems)).collect();
    (0..n)
        .map(|pos| {
            let left = (pos + n - 1) % n;
            let params = RingParams { run, round: 0, attempt: 0, n, pos, segment_elems, max_units };
            RingAllReduce::new(params, inputs[pos].clone(), hashes[pos][pos].clone(), chunk_hash(&hashes[left][left]))
                .expect("a valid position")
        })
        .collect()
}

/// Event times in whole nanoseconds, so events order totally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Nanos(u64);

impl Nanos {
    fn of(secs: f64) -> Self {
        Self((secs * 1e9).round() as u64)
    }
    fn secs(self) -> f64 {
        self.0 as f64 / 1e9
    }
}

/// A pipelined chain from a leader through `g - 1` members: the whole vector in segments.
fn chain(g: usize, values: usize, p: Profile) -> RingRun {
    if g < 2 {
        return RingRun { secs: 0.0, bytes_per_peer: 0.0 };
    }
    let segments = segment_count(values, SEGMENT_ELEMS) as f64;
    let seg = 4.0 * values as f64 / segments;
    let hop = (seg / p.link.bandwidth).max(seg * (p.cpu.transport + p.cpu.gather) / p.cpu.speed);
    let secs = (segments + (g - 2) as f64) * hop + (g - 1) as f64 * p.link.latency;
    RingRun { secs, bytes_per_peer: 4.0 * values as f64 * (g - 1) as f64 / g as f64 }
}

/// Gossip hops to reach `n` peers: ⌊log₆ n⌋ + 1 (gossipsub's mesh degree is 6).
fn hops(n: usize) -> f64 {
    (n.max(2) as f64).ln().div_euclid(6f64.ln()) + 1.0
}

/// From a crash to the next attempt: the neighbours see the connection close, the failure
/// spreads, a membership tick (20 ms) and one gossip hop agree on the survivors' ring.
pub fn recovery_secs(n: usize, link: Link) -> f64 {
    link.latency * (1.0 + 2.0 * hops(n)) + 0.02
}

/// What gossipsub adds to each message: its source, sequence number, topic and signature.
const GOSSIP_ENVELOPE: usize = 150;

/// A peer id as the node writes it (base58 of an Ed25519 identity: 52 characters).
fn peer_key(i: usize) -> String {
    format!("12D3KooW{:0>44}", i)
}

/// Bytes of the gossip that brackets one round of `n` members whose commits cover `chunks`
/// chunks (the ring's `n`, a hierarchy's `g`): the real messages, encoded as the node sends
/// them, each in gossipsub's envelope.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControlBytes {
    /// One member's commit.
    pub commit: usize,
    /// The `Done` of a member that does not name the next ring.
    pub done: usize,
    /// The `Done` of a member that names it (the first [`DONE_CARRIERS`] when the ring grows).
    pub done_naming: usize,
}

impl ControlBytes {
    pub fn of(n: usize, chunks: usize) -> Self {
        let run = RunId::from_name("simulation");
        let commit = GradientCommit {
            run,
            peer: peer_key(0),
            round: 1_000_000,
            attempt: 0,
            ring: [7; 32],
            len: 16 << 20,
            chunk_hashes: vec![[7; 32]; chunks],
            samples: 64,
            norm: 1e6,
            param_hash: [7; 32],
            computed_at: 1_000_000,
            joiners: Vec::new(),
            excluded: Vec::new(),
            leaving: false,
            residual: [0; 32],
            residual_next: [0; 32],
            signature: vec![7; 64],
        };
        let done = |next_members: Vec<String>| RoundDone {
            run,
            peer: peer_key(0),
            round: 1_000_000,
            attempt: 0,
            result: [7; 32],
            next_members,
        };
        let size = |g: Gossip| encode_frame(&g).len() + GOSSIP_ENVELOPE;
        Self {
            commit: size(Gossip::Commit(commit)),
            done: size(Gossip::Done(done(Vec::new()))),
            done_naming: size(Gossip::Done(done((0..n).map(peer_key).collect()))),
        }
    }

    /// Bytes every peer receives at least once per round: every member's commit and `Done`
    /// (the ring growing, so that the first members' `Done`s name it).
    pub fn per_round(&self, n: usize) -> f64 {
        let naming = DONE_CARRIERS.min(n);
        (n * self.commit + naming * self.done_naming + (n - naming) * self.done) as f64
    }

    /// The same when every member's `Done` named the next ring (the protocol before version 6).
    pub fn per_round_every_done_naming(&self, n: usize) -> f64 {
        (n * (self.commit + self.done_naming)) as f64
    }
}

/// The gossip of a round besides its all-reduce: the commits spread to every peer before the
/// all-reduce starts, the `Done`s after it. Each spread takes the gossip's hops and every
/// peer's link carries every message at least once (gossipsub forwards on average as much as
/// a peer receives, and more with duplicates, so this is a floor); the sum checks and verdicts
/// of audited rounds and the CPU of checking signatures are left out. Returns (seconds, bytes
/// a peer receives).
pub fn control(n: usize, chunks: usize, link: Link) -> (f64, f64) {
    if n < 2 {
        return (0.0, 0.0);
    }
    let bytes = ControlBytes::of(n, chunks).per_round(n);
    (2.0 * hops(n) * link.latency + bytes / link.bandwidth, bytes)
}

/// A small deterministic generator (xorshift*), so a seed replays a simulation.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One ring's round under failures: attempts of `secs(m)` with `m` members, each member
/// crashing with probability `fail` at a uniform time in the attempt, the attempt failing at
/// the first crash and redone without the crashed after `recovery`, until one completes.
/// Returns (seconds, members in the completed attempt), or `None` if the ring shrank below 2.
fn with_failures(
    mut m: usize,
    fail: f64,
    rng: &mut Rng,
    recovery: f64,
    replaced: bool,
    secs: &mut dyn FnMut(usize) -> f64,
) -> Option<(f64, usize)> {
    let mut total = 0.0;
    loop {
        let t = secs(m);
        let mut first = f64::INFINITY;
        for _ in 0..m {
            if rng.unit() < fail {
                first = first.min(rng.unit() * t);
            }
        }
        if first.is_infinite() {
            return Some((total + t, m));
        }
        // The attempt ends at the first crash: the peers that would have crashed later did
        // not, and draw again in the next attempt. A replaced seat keeps the ring's size.
        total += first + recovery;
        if !replaced {
            m -= 1;
        }
        if m < 2 {
            return None;
        }
    }
}

/// Attempt times of a ring of any size from two simulated ones: a ring's time is close to
/// linear in its steps, 2(m − 1).
struct RingTimes {
    n: usize,
    full: f64,
    half: f64,
}

impl RingTimes {
    fn new(n: usize, values: usize, p: Profile) -> Self {
        let full = ring(n, values, p).secs;
        let half = if n > 4 { ring(n / 2, values, p).secs } else { full };
        Self { n, full, half }
    }

    fn secs(&self, m: usize) -> f64 {
        if m >= self.n || self.n <= 4 {
            return self.full;
        }
        let (a, b) = ((self.n / 2 - 1) as f64, (self.n - 1) as f64);
        let slope = (self.full - self.half) / (b - a);
        (self.half + slope * ((m - 1) as f64 - a)).max(0.0)
    }
}

/// A strategy's round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Strategy {
    Ring,
    Hierarchical {
        group: usize,
    },
    Contained {
        group: usize,
    },
    LocalSgd {
        steps: u64,
    },
    /// Local SGD whose rounds are hierarchical (`local_steps` with `group_size`).
    LocalSgdHierarchical {
        steps: u64,
        group: usize,
    },
}

impl Strategy {
    /// The group size a hierarchical strategy asks for.
    fn group(&self) -> Option<usize> {
        match *self {
            Strategy::Hierarchical { group }
            | Strategy::Contained { group }
            | Strategy::LocalSgdHierarchical { group, .. } => Some(group),
            Strategy::Ring | Strategy::LocalSgd { .. } => None,
        }
    }

    /// Optimizer steps per round (H of local SGD; 1 otherwise).
    fn local_steps(&self) -> u64 {
        match *self {
            Strategy::LocalSgd { steps } | Strategy::LocalSgdHierarchical { steps, .. } => steps,
            _ => 1,
        }
    }

    pub fn name(&self) -> String {
        match self {
            Strategy::Ring => "ring".into(),
            Strategy::Hierarchical { group } => format!("hierarchical, G = {group}"),
            Strategy::Contained { group } => format!("hierarchical, failures contained (not built), G = {group}"),
            Strategy::LocalSgd { steps } => format!("local SGD, H = {steps}"),
            Strategy::LocalSgdHierarchical { steps, group } => {
                format!("local SGD over hierarchical rounds, H = {steps}, G = {group}")
            }
        }
    }
}

/// What one strategy costs at one size, per optimizer step of every peer.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// Communication of one round (its gossip and its all-reduce), no failures.
    pub comm_secs: f64,
    /// Bytes the busiest peer sends per optimizer step in the all-reduce.
    pub bytes_per_step: f64,
    /// Gossip bytes a peer receives per round (commits and `Done`s, see [`control`]).
    pub control_bytes: f64,
    /// Mean wall time per optimizer step with failures, compute included; `None`: rounds
    /// never complete.
    pub step_secs: Option<f64>,
    /// From a crash to the redone attempt's start.
    pub recovery_secs: f64,
    /// Mean share of the peers whose work a completed round counted (the others crashed in
    /// it and rejoin later).
    pub counted: f64,
}

/// Where a strategy is simulated.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub peers: usize,
    /// f32 values all-reduced per round.
    pub values: usize,
    pub profile: Profile,
    /// Seconds of compute per optimizer step.
    pub compute: f64,
    /// Probability that a member crashes in an attempt.
    pub fail: f64,
    /// Rounds simulated with failures.
    pub rounds: u64,
    pub seed: u64,
}

/// Simulates `s.rounds` rounds of `strategy`, with failures.
pub fn simulate(strategy: Strategy, s: &Scenario) -> Outcome {
    let Scenario { peers: n, values, profile: p, compute, fail, rounds, seed } = *s;
    let mut rng = Rng::new(seed ^ n as u64);
    let recovery = recovery_secs(n, p.link);
    let g = strategy.group().map_or(n, |group| group.clamp(2, n.max(2)));
    let groups = n.div_ceil(g);
    let down = chain(g, values, p);
    // A commit covers a chunk per member of its ring: its group's in a hierarchy.
    let chunks = if strategy.group().is_some() && Layout::of(n, g).is_some() { g } else { n };
    let (ctrl, control_bytes) = control(n, chunks, p.link);
    let steps = strategy.local_steps() as f64;
    let (comm, bytes, inner, outer) = match strategy {
        Strategy::Ring | Strategy::LocalSgd { .. } => {
            let r = ring(n, values, p);
            (r.secs, r.bytes_per_peer / steps, RingTimes::new(n, values, p), None)
        }
        Strategy::Hierarchical { .. } | Strategy::LocalSgdHierarchical { .. } => {
            // One attempt of all N members, as the ring's (its time barely moves with a few
            // members fewer).
            let h = hier(n, g, values, p);
            let times = RingTimes { n, full: h.secs, half: h.secs };
            (h.secs, h.bytes_per_peer / steps, times, None)
        }
        Strategy::Contained { .. } => {
            let (inner, outer) = (ring(g, values, p), ring(groups, values, p));
            // A leader sends in its group's ring, the leaders' ring and the broadcast's first hop.
            let bytes = inner.bytes_per_peer + outer.bytes_per_peer + 4.0 * values as f64;
            let times = (RingTimes::new(g, values, p), Some(RingTimes::new(groups, values, p)));
            (inner.secs + outer.secs + down.secs, bytes, times.0, times.1)
        }
    };
    let comm = comm + ctrl;
    let (mut total, mut counted) = (0.0, 0.0);
    for _ in 0..rounds {
        // Each optimizer step's compute comes before the round's ring; a crash during it
        // fails the ring's attempt too.
        let work = compute * steps;
        let round = match &outer {
            None => with_failures(n, fail, &mut rng, recovery, false, &mut |m| work + ctrl + inner.secs(m))
                .map(|(t, m)| (t, m as f64 / n as f64)),
            Some(outer) => {
                let mut slowest: f64 = 0.0;
                let mut kept = 0usize;
                let mut done = true;
                for _ in 0..groups {
                    match with_failures(g, fail, &mut rng, recovery, false, &mut |m| work + inner.secs(m)) {
                        Some((t, m)) => {
                            slowest = slowest.max(t);
                            kept += m;
                        }
                        None => done = false,
                    }
                }
                // A crashed leader's seat goes to another member of its group, which holds the same sum.
                let leaders = with_failures(groups, fail, &mut rng, recovery, true, &mut |m| outer.secs(m));
                match (done, leaders) {
                    (true, Some((t, _))) => Some((slowest + t + down.secs + ctrl, kept as f64 / (groups * g) as f64)),
                    _ => None,
                }
            }
        };
        let Some((t, share)) = round else {
            return Outcome {
                comm_secs: comm,
                bytes_per_step: bytes,
                control_bytes,
                step_secs: None,
                recovery_secs: recovery,
                counted: 0.0,
            };
        };
        total += t;
        counted += share;
    }
    Outcome {
        comm_secs: comm,
        bytes_per_step: bytes,
        control_bytes,
        step_secs: Some(total / rounds as f64 / steps),
        recovery_secs: recovery,
        counted: counted / rounds as f64,
    }
}

/// Per-byte CPU cost of the ring's code path on one core, measured now: a ring of 4 in one
/// thread, every segment signed, its fields and signature through the wire codec as the node
/// frames them (the payload written and read in place), its signature and hash checked, and
/// through the state machine.
/// Returns seconds per received byte in reduce-scatter and in all-gather.
pub fn measure_costs(values: usize) -> (f64, f64) {
    let n = 4;
    let inputs: Vec<Vec<i32>> = (0..n).map(|i| vec![i as i32 + 1; values]).collect();
    let mut machines = machines(RunId::from_name("calibration"), &inputs, SEGMENT_ELEMS, 1 << 24);
    let mut links: Vec<std::collections::VecDeque<RingStep>> = vec![Default::default(); n];
    for (pos, m) in machines.iter_mut().enumerate() {
        links[(pos + 1) % n].extend(m.start());
    }
    let (mut rs, mut ag) = ((0.0, 0usize), (0.0, 0usize));
    let (mut head, mut tail, mut start) = (Vec::new(), Vec::new(), Vec::new());
    let key = libp2p::identity::Keypair::generate_ed25519();
    let public = key.public();
    while let Some(to) = (0..n).find(|&i| !links[i].is_empty()) {
        let mut msg = links[to].pop_front().expect("non-empty");
        let t = Instant::now();
        let phase = msg.id.phase;
        let bytes = msg.payload.len();
        let signed = RingStep::signing_bytes(msg.run, msg.round, msg.attempt, &msg.id, &msg.hash);
        msg.signature = key.sign(&signed).expect("ed25519 signs");
        // As the node's writer and reader do: the fields and the signature are encoded around
        // the payload, which is written and read in place (the transport's copies are charged
        // apart), and the fields are decoded from the body's start.
        p2p_proto::codec::encode_step_frame_parts(&msg, &mut head, &mut tail);
        let header = p2p_proto::codec::HEADER_BYTES;
        let body_len = head.len() - header + msg.payload.len() + tail.len();
        start.clear();
        start.extend_from_slice(&head[header..]);
        let from_payload = (p2p_proto::codec::STEP_HEAD_MAX - start.len()).min(msg.payload.len());
        start.extend_from_slice(&msg.payload[..from_payload]);
        let (fields, used) = p2p_proto::codec::decode_step_head(&start, body_len).expect("own frame");
        assert_eq!(used, head.len() - header, "the head ends where the payload starts");
        let msg = fields.into_step(msg.payload, &tail).expect("own frame");
        assert!(public.verify(&signed, &msg.signature), "own signature");
        let out = machines[to].on_step(msg.verify().expect("own hash")).expect("a valid ring");
        let spent = t.elapsed().as_secs_f64();
        let acc = if phase == Phase::ReduceScatter { &mut rs } else { &mut ag };
        acc.0 += spent;
        acc.1 += bytes;
        if let Some(out) = out {
            links[(to + 1) % n].push_back(out);
        }
    }
    (rs.0 / rs.1 as f64, ag.0 / ag.1 as f64)
}

/// A line chart of `series` (name, points) with log axes, as SVG.
pub fn svg(title: &str, x_label: &str, y_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let (w, h, m) = (640.0, 380.0, 60.0);
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|s| s.1.iter().copied()).collect();
    let lx = |v: f64| v.max(1e-9).log10();
    let (x0, x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(lx(p.0)), b.max(lx(p.0))));
    let (y0, y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(lx(p.1)), b.max(lx(p.1))));
    let (y0, y1) = (y0.floor(), y1.ceil().max(y0.floor() + 1.0));
    let sx = |v: f64| m + (lx(v) - x0) / (x1 - x0).max(1e-9) * (w - 2.0 * m);
    let sy = |v: f64| h - m - (lx(v) - y0) / (y1 - y0) * (h - 2.0 * m);
    let colors = ["#1f6feb", "#d73a49", "#28a745", "#6f42c1", "#e36209"];
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/><text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">{title}</text>\
         <line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x_label}</text>\
         <text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">{y_label}</text>",
        w / 2.0,
        h - m,
        w - m,
        h - m,
        h - m,
        w / 2.0,
        h - 15.0,
        h / 2.0,
        h / 2.0
    );
    for d in (y0 as i32)..=(y1 as i32) {
        let v = 10f64.powi(d);
        out += &format!(
            "<line x1=\"{m}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#ddd\"/><text x=\"{2}\" y=\"{0}\" text-anchor=\"end\">{v}</text>",
            sy(v),
            w - m,
            m - 4.0
        );
    }
    for &(x, _) in &series.first().map(|s| s.1.clone()).unwrap_or_default() {
        out += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x}</text>", sx(x), h - m + 16.0);
    }
    for (i, (name, points)) in series.iter().enumerate() {
        let c = colors[i % colors.len()];
        let line: Vec<String> = points.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        out += &format!("<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>", line.join(" "));
        out += &format!("<text x=\"{}\" y=\"{}\" fill=\"{c}\">{name}</text>", m + 10.0, m + 16.0 * (i as f64 + 1.0));
    }
    out + "</svg>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lan() -> Profile {
        Profile {
            link: Link { latency: 1e-3, bandwidth: 1e8 },
            cpu: Cpu { speed: 1.0, transport: 0.0, reduce: 0.0, gather: 0.0 },
        }
    }

    #[test]
    fn a_bandwidth_bound_ring_takes_what_the_formula_says() {
        // 2(N-1)/N of the vector through each uplink, plus 2(N-1) latencies at most.
        let (n, values) = (8, 8 << 20);
        let r = ring(n, values, lan());
        let bytes = 4.0 * values as f64 * 2.0 * (n - 1) as f64 / n as f64;
        assert!((r.bytes_per_peer - bytes).abs() / bytes < 1e-9, "{} vs {bytes}", r.bytes_per_peer);
        let floor = bytes / 1e8;
        assert!(r.secs >= floor && r.secs <= floor * 1.2 + 2.0 * (n - 1) as f64 * 1e-3, "{} vs {floor}", r.secs);
    }

    #[test]
    fn latency_makes_a_big_ring_slow_and_the_hierarchy_fixes_it() {
        let p = Profile { link: Link { latency: 0.025, bandwidth: 12.5e6 }, ..lan() };
        // A small vector: latency dominates.
        let values = 1 << 16;
        let s = Scenario { peers: 256, values, profile: p, compute: 0.0, fail: 0.0, rounds: 1, seed: 1 };
        let flat = simulate(Strategy::Ring, &s);
        let tiered = simulate(Strategy::Hierarchical { group: 16 }, &s);
        // 510 latency-bound steps against 30 + 30 in the node's hierarchy (and 30 + 30 + 15
        // with a leaders' ring and a broadcast), for about the same bytes a peer.
        assert!(flat.comm_secs > 510.0 * 0.025, "{}", flat.comm_secs);
        assert!(tiered.comm_secs < flat.comm_secs / 5.0, "{} vs {}", tiered.comm_secs, flat.comm_secs);
        assert!(
            tiered.bytes_per_step < flat.bytes_per_step * 1.05,
            "{} vs {}",
            tiered.bytes_per_step,
            flat.bytes_per_step
        );
        let leaders = simulate(Strategy::Contained { group: 16 }, &s);
        assert!(leaders.comm_secs < flat.comm_secs / 3.0 && leaders.comm_secs > tiered.comm_secs);
        // Local SGD over the hierarchy: its round is the hierarchy's, once every H steps.
        let local = simulate(Strategy::LocalSgdHierarchical { steps: 8, group: 16 }, &s);
        assert_eq!(local.comm_secs, tiered.comm_secs);
        assert!((tiered.bytes_per_step / local.bytes_per_step - 8.0).abs() < 1e-9);
        let flat_local = simulate(Strategy::LocalSgd { steps: 8 }, &s);
        assert!(local.step_secs.unwrap() < flat_local.step_secs.unwrap() / 5.0);
        // Extras (260 = 16 × 16 + 4) cost two steps, not a flat ring.
        let extras = simulate(Strategy::Hierarchical { group: 16 }, &Scenario { peers: 260, ..s });
        assert!(extras.comm_secs < tiered.comm_secs * 1.3, "{} vs {}", extras.comm_secs, tiered.comm_secs);
    }

    /// The gossip around a round is the real messages: a commit grows with the chunks it
    /// covers, a `Done` stays small unless it names the next ring, and only the first members'
    /// do, so a round's gossip at 1,000 peers is a small fraction of what it was when every
    /// `Done` named the ring.
    #[test]
    fn a_rounds_gossip_is_the_real_messages_and_dones_stay_small() {
        let (small, big) = (ControlBytes::of(16, 16), ControlBytes::of(1000, 1000));
        assert_eq!(big.commit - small.commit, (1000 - 16) * 32 + 1, "32 bytes a chunk (and a longer length)");
        assert_eq!(small.done, big.done, "a Done that names no ring does not grow with it");
        assert!(big.done < 400 && big.done_naming > 1000 * 52, "{big:?}");
        let (now, before) = (big.per_round(1000), big.per_round_every_done_naming(1000));
        assert!(now < before * 0.45, "{now} vs {before}");
        // Spread by gossip: its hops, and every byte through the link at least once.
        let link = Link { latency: 0.025, bandwidth: 12.5e6 };
        let (secs, bytes) = control(1000, 1000, link);
        assert_eq!(bytes, now);
        assert!((secs - (2.0 * 4.0 * 0.025 + now / 12.5e6)).abs() < 1e-9, "{secs}");
        // A hierarchy's commits cover its group's chunks only.
        assert!(control(1000, 32, link).1 < now / 10.0);
    }

    #[test]
    fn failures_cost_time_and_a_ring_too_large_never_completes() {
        let p = Profile { link: Link { latency: 0.025, bandwidth: 12.5e6 }, ..lan() };
        let calm = Scenario { peers: 32, values: 1 << 20, profile: p, compute: 0.01, fail: 0.0, rounds: 20, seed: 7 };
        let rough = Scenario { fail: 0.05, ..calm };
        let (calm_run, rough_run) = (simulate(Strategy::Ring, &calm), simulate(Strategy::Ring, &rough));
        assert!(rough_run.step_secs.unwrap() > calm_run.step_secs.unwrap());
        // Local SGD sends H times fewer bytes per step.
        let local = simulate(Strategy::LocalSgd { steps: 8 }, &calm);
        assert!((calm_run.bytes_per_step / local.bytes_per_step - 8.0).abs() < 1e-9);
        // Everyone crashing every attempt: no round completes.
        assert!(simulate(Strategy::Ring, &Scenario { peers: 16, fail: 1.0, ..calm }).step_secs.is_none());
        // The same seed replays the same result.
        let again = simulate(Strategy::Ring, &rough);
        let rough = rough_run;
        assert_eq!(rough.step_secs, again.step_secs);
    }
}

/// Options of `testnet simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimOpts {
    #[arg(long, value_delimiter = ',', default_values_t = [16usize, 64, 256, 1000])]
    pub peers: Vec<usize>,
    /// f32 values all-reduced per round.
    #[arg(long, default_value_t = 16 << 20)]
    pub values: usize,
    #[arg(long, default_value_t = 50.0)]
    pub rtt_ms: f64,
    /// Bandwidth of each peer's link.
    #[arg(long, default_value_t = 100.0)]
    pub mbit: f64,
    /// Probability that a peer crashes during an attempt.
    #[arg(long, default_value_t = 0.01)]
    pub fail: f64,
    /// Compute per optimizer step.
    #[arg(long, default_value_t = 100.0)]
    pub compute_ms: f64,
    #[arg(long, default_value_t = 8)]
    pub local_steps: u64,
    /// Rounds simulated with failures, per strategy and size.
    #[arg(long, default_value_t = 20)]
    pub rounds: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also run the real 4-peer all-reduce and compare it with the prediction.
    #[arg(long)]
    pub measure: bool,
    /// Write the plot (SVG) here.
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,
}

fn mb(bytes: f64) -> String {
    format!("{:.1}", bytes / 1e6)
}

/// Calibrates on this machine, checks the model against the real all-reduce, then simulates
/// every strategy at every size under the WAN profile; prints Markdown tables.
pub fn run(o: &SimOpts) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |p| p.get()) as f64;
    let n = 4usize;
    let vol: u64 = 1 << 30;
    // The transport's cost with the buffers the node's path sends from and reads into: a
    // node's payload buffers cycle through a pool of at most 16 segments of 1 MiB (one reused
    // megabyte stays in cache and costs less; buffers as large as the vector cost more).
    const POOL_SPAN: usize = 16 << 20;
    let per_peer = vol as f64 / n as f64 / crate::bench::tcp_run_span(n, vol / n as u64, true, POOL_SPAN)?;
    let one_way = vol as f64 / crate::bench::tcp_run(2, vol, false)?;
    let (reduce, gather) = measure_costs(16 << 20);
    println!("## Calibration, measured now ({cores} cores)\n");
    println!("| input | value |\n|---|---:|");
    println!(
        "| TCP ring of {n} processes, per peer, buffers walking through {} MiB | {:.2} GB/s |",
        POOL_SPAN >> 20,
        per_peer / 1e9
    );
    println!("| TCP copy, one way | {:.2} GB/s |", one_way / 1e9);
    println!(
        "| ring code path, reduce-scatter byte (sign, frame, verify, check, add, hash), one core | {:.3} ns |",
        reduce * 1e9
    );
    println!("| ring code path, all-gather byte (sign, frame, verify, check), one core | {:.3} ns |\n", gather * 1e9);

    // Loopback: N processes share the cores; the kernel's copies cost CPU like the rest.
    let loopback = Profile {
        link: Link { latency: 30e-6, bandwidth: f64::INFINITY },
        cpu: Cpu {
            speed: (cores / n as f64).min(1.0),
            // The TCP ring kept min(cores, N) cores busy moving N × per_peer bytes a second.
            transport: cores.min(n as f64) / (n as f64 * per_peer),
            reduce,
            gather,
        },
    };
    println!("## The model against the real all-reduce ({n} node processes on this machine)\n");
    println!("| values (f32) | predicted reduce ms | measured reduce ms (median of 5) | predicted / measured |");
    println!("|---:|---:|---:|---:|");
    for len in [16usize << 20, 64 << 20] {
        let predicted = ring(n, len, loopback).secs;
        let measured = if o.measure { Some(crate::bench::allreduce(n, len, 5, "direct", "none")?.0) } else { None };
        println!(
            "| {}M | {:.1} | {} | {} |",
            len >> 20,
            predicted * 1e3,
            measured.map_or("-".into(), |m| format!("{:.1}", m * 1e3)),
            measured.map_or("-".into(), |m| format!("{:.2}", predicted / m)),
        );
    }

    let wan = Profile {
        link: Link { latency: o.rtt_ms / 2e3, bandwidth: o.mbit * 1e6 / 8.0 },
        cpu: Cpu { speed: 1.0, transport: 1.0 / one_way, reduce, gather },
    };
    println!(
        "\n## WAN: {} ms RTT, {} Mbit/s per peer, {} M values ({} MB), {} ms compute per step, {}% of peers \
         crashing per attempt, {} rounds\n",
        o.rtt_ms,
        o.mbit,
        o.values as f64 / 1e6,
        mb(4.0 * o.values as f64),
        o.compute_ms,
        o.fail * 100.0,
        o.rounds
    );
    println!(
        "| peers | strategy | comm s / round (no failures) | MB sent per peer per step | gossip MB received per peer per round | s per step (failures, compute included) | recovery s | work counted | vs ring |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for &peers in &o.peers {
        let s = Scenario {
            peers,
            values: o.values,
            profile: wan,
            compute: o.compute_ms / 1e3,
            fail: o.fail,
            rounds: o.rounds,
            seed: o.seed,
        };
        let group = ((peers as f64).sqrt().round() as usize).max(2);
        let strategies = [
            Strategy::Ring,
            Strategy::Hierarchical { group },
            Strategy::Contained { group },
            Strategy::LocalSgd { steps: o.local_steps },
            Strategy::LocalSgdHierarchical { steps: o.local_steps, group },
        ];
        let mut ring_step = None;
        for (i, strategy) in strategies.iter().enumerate() {
            let started = Instant::now();
            let out = simulate(*strategy, &s);
            if i == 0 {
                ring_step = out.step_secs;
            }
            let vs = match (ring_step, out.step_secs) {
                (Some(r), Some(t)) => format!("{:.1}x", r / t),
                _ => "-".into(),
            };
            println!(
                "| {peers} | {} | {:.2} | {} | {:.2} | {} | {:.2} | {:.0}% | {vs} |",
                strategy.name(),
                out.comm_secs,
                mb(out.bytes_per_step),
                out.control_bytes / 1e6,
                out.step_secs.map_or("never completes".into(), |t| format!("{t:.2}")),
                out.recovery_secs,
                out.counted * 100.0,
            );
            eprintln!("simulated {} at {peers} peers in {:.1} s", strategy.name(), started.elapsed().as_secs_f64());
            let name = match strategy {
                Strategy::Hierarchical { .. } => "hierarchical, G = √N".to_owned(),
                Strategy::Contained { .. } => "hierarchical, failures contained (not built), G = √N".to_owned(),
                Strategy::LocalSgdHierarchical { steps, .. } => {
                    format!("local SGD over hierarchical rounds, H = {steps}, G = √N")
                }
                other => other.name(),
            };
            if series.len() <= i {
                series.push((name, Vec::new()));
            }
            if let Some(t) = out.step_secs {
                series[i].1.push((peers as f64, t));
            }
        }
    }
    println!("\n## The gossip of a round (commits and Dones), what every peer receives at least once\n");
    println!(
        "| peers | commits cover | commit bytes | Done bytes (naming the next ring) | MB per peer per round | \
         MB when every Done named the next ring (protocol 5) |"
    );
    println!("|---:|---|---:|---:|---:|---:|");
    for &peers in &o.peers {
        let group = ((peers as f64).sqrt().round() as usize).max(2);
        for (what, chunks) in [("the ring's N chunks", peers), ("a group's G chunks", group)] {
            let c = ControlBytes::of(peers, chunks);
            println!(
                "| {peers} | {what} | {} | {} ({}) | {:.2} | {:.2} |",
                c.commit,
                c.done,
                c.done_naming,
                c.per_round(peers) / 1e6,
                c.per_round_every_done_naming(peers) / 1e6
            );
        }
    }
    if let Some(path) = &o.plot {
        let title =
            format!("seconds per optimizer step, {} ms RTT, {} Mbit/s, {}% crashing", o.rtt_ms, o.mbit, o.fail * 100.0);
        std::fs::write(path, svg(&title, "peers", "s per step", &series))?;
        println!("\nplot: {}", path.display());
    }
    Ok(())
}
