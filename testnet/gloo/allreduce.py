#!/usr/bin/env python3
"""Reference benchmark: torch.distributed all_reduce(SUM) on the gloo backend.

Starts --peers local worker processes that form one gloo process group over
loopback TCP. For each size (float32 element count) every rank does --warmup
untimed all_reduce calls, then --rounds timed ones, each after a barrier. A
round's time is that of the slowest rank. Rank 0 prints one JSON line per size
on stdout:

  {"size": N, "peers": P, "median_s": ..., "min_s": ..., "rounds": R,
   "torch": "..."}

Everything else goes to stderr. Exits non-zero if any worker fails, including
when a reduced tensor is wrong.

  python allreduce.py --peers 4 --sizes 1048576,16777216,67108864 --rounds 5
"""

import argparse
import datetime
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

PROG = "allreduce.py"
# Small integer pattern: every sum stays exactly representable in float32.
MODULUS = 251


def log(msg):
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def positive_sizes(text):
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}")
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive: {text!r}")
    return sizes


def parse_args():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--sizes", type=positive_sizes, default=[1 << 20, 1 << 24, 1 << 26],
                   help="comma-separated float32 element counts")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds before a stuck collective fails")
    # Internal: set by the launcher when it re-executes this file as a worker.
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.peers < 1 or a.rounds < 1 or a.warmup < 0 or a.timeout <= 0:
        p.error("need --peers >= 1, --rounds >= 1, --warmup >= 0, --timeout > 0")
    return a


def free_port():
    # Another process may take it before rank 0 binds; unlikely on a test box.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent():
    # A killed launcher must not leave workers blocked in a collective.
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:
        pass


def worker(a):
    die_with_parent()
    if os.getppid() == 1:  # parent already gone before prctl took effect
        sys.exit(1)
    # Keep stdout for the JSON lines only: anything torch or gloo prints from
    # native code goes to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    import warnings
    # torch warns on import when NumPy is absent; this script does not need it.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch
    import torch.distributed as dist

    # The peers share a couple of cores; more threads would only contend.
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)

    rank, peers = a.rank, a.peers
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{a.port}",
        rank=rank,
        world_size=peers,
        timeout=datetime.timedelta(seconds=a.timeout),
    )
    try:
        for n in a.sizes:
            # Rank r holds (i mod M) + r, so the sum at i is P*(i mod M) + P(P-1)/2.
            src = torch.arange(n, dtype=torch.int32).remainder_(MODULUS).to(torch.float32)
            src += rank
            buf = torch.empty_like(src)
            times = []
            for i in range(a.warmup + a.rounds):
                buf.copy_(src)  # all_reduce is in place; restart from the inputs
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                dt = time.perf_counter() - t0
                check(buf, n, peers, rank)
                if i >= a.warmup:
                    times.append(dt)
            slowest = torch.tensor(times, dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            if rank == 0:
                per_round = slowest.tolist()
                line = {
                    "size": n,
                    "peers": peers,
                    "median_s": statistics.median(per_round),
                    "min_s": min(per_round),
                    "rounds": a.rounds,
                    "torch": torch.__version__,
                }
                out.write(json.dumps(line) + "\n")
                out.flush()
            del src, buf
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check(buf, n, peers, rank):
    idx = sorted({0, 1, MODULUS - 1, MODULUS, n // 3, n // 2, n - 2, n - 1} & set(range(n)))
    base = peers * (peers - 1) // 2
    for i in idx:
        want = float(peers * (i % MODULUS) + base)
        got = buf[i].item()
        if got != want:
            log(f"rank {rank}: WRONG all_reduce result, size {n}, index {i}: "
                f"got {got}, expected {want}")
            sys.exit(3)


def launch(a):
    port = free_port()
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if sys.platform.startswith("linux"):
        # Keep traffic on loopback even if the hostname resolves elsewhere.
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    base = [sys.executable, os.path.abspath(__file__),
            "--peers", str(a.peers),
            "--sizes", ",".join(map(str, a.sizes)),
            "--rounds", str(a.rounds),
            "--warmup", str(a.warmup),
            "--timeout", str(a.timeout),
            "--port", str(port)]
    procs = []

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    rc = 0
    try:
        for r in range(a.peers):
            # Only rank 0 may write to our stdout.
            procs.append(subprocess.Popen(base + ["--rank", str(r)], env=env,
                                          stdout=None if r == 0 else sys.stderr))
        running = dict(enumerate(procs))
        while running and rc == 0:
            for r, p in list(running.items()):
                code = p.poll()
                if code is None:
                    continue
                del running[r]
                if code != 0:
                    log(f"rank {r} failed (exit code {code}); stopping the other ranks")
                    rc = 1
            time.sleep(0.05)
    except KeyboardInterrupt:
        rc = 130
    finally:
        stop(procs)
    return rc


def stop(procs):
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.terminate()
    deadline = time.monotonic() + 5
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main():
    a = parse_args()
    if a.rank is None:
        sys.exit(launch(a))
    if a.port is None or not 0 <= a.rank < a.peers:
        sys.exit(f"{PROG}: bad worker arguments")
    worker(a)


if __name__ == "__main__":
    main()
