"""CPU per claim of each process of the bridge on Mosquitto (jwt mode), measured from /proc.

    python -m bench.cpu_split [--claims 8000] [--runs 3] [--mode closed|herd|open] [--rate R]
                              [--bridge-env PROVBRIDGE_X=Y]... [--pyspy PATH --pyspy-role worker0|edge]

Starts Mosquitto from `provbridge mosquitto-config` and `provbridge serve` (external mode) on a fresh
data dir, as `bench.run`'s Mosquitto target does, then runs closed-loop phases of the load generator
(32 lanes x 32 in flight) and reads the CPU time of every process around each phase's timed window
(/proc/<pid>/task/*/schedstat, in nanoseconds): the bridge's network process (`edge`) and its claim worker
(`worker0`), or with `serve --processes N` each process of the tree in turn (`procN`), Mosquitto, and the
load generator's own figure. CPU per claim per process depends far less than claims/s on what else the
machine runs, so it is what to compare between two versions of the claim path; to compare two source trees,
run this from each at the same time (`cd TREE && PYTHONPATH=TREE python -m bench.cpu_split`), so that both
see the same load. `--mode herd` publishes each phase's claims within one second instead (`make bench`'s
herd) and reports when the last was answered; `--mode open --rate R` offers R claims a second (as `make
bench`'s open-loop phases: latency at a fixed load, and what a claim costs when groups are small). With
`--pyspy` every measured phase is also sampled by py-spy (`--pyspy-role`), raw stacks written to
/tmp/pyspy-LABEL-ROLE-N.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, Processes, install_signal_exit, log, process_tree
from bench.loadgen import KEY_ENV
from bench.run import Runner, make_data_dir
from bench.targets import MosquittoTarget, System


def _cpu_ns(pid: int) -> int:
    """Nanoseconds on a CPU of every thread of `pid` (schedstat: finer than utime+stime's 10 ms ticks)."""
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                total += int((task / "schedstat").read_text().split()[0])
    return total


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _roles(system: System) -> dict[str, int]:
    bridge = system.pids["bridge"]
    roles = {"broker": system.pids["broker"]}
    tree = process_tree(bridge)
    children = sorted(p for p in tree if p != bridge)
    for pid in children:  # `serve`'s admin API process (issue 12): counted, but apart from the claim path
        if b"bridge.api.server" in _cmdline(pid):
            roles["api"] = pid
    children = [p for p in children if p != roles.get("api")]
    if len(children) <= 1:  # serve: the network process, its claim worker
        roles["edge"] = bridge
        for n, child in enumerate(children):
            roles[f"worker{n}"] = child
    else:  # serve --processes N: a supervisor, N edges, each with its worker
        for n, pid in enumerate(children):
            roles[f"proc{n}"] = pid
    return roles


def _timeline(roles: dict[str, int], done: threading.Event, step: float = 0.5) -> None:
    """Log each process's share of a core over every `step` seconds until `done`: where a phase idles."""
    last = {role: _cpu_ns(pid) for role, pid in roles.items()}
    start = time.monotonic()
    while not done.wait(step):
        now = {role: _cpu_ns(pid) for role, pid in roles.items()}
        shares = {role: (now[role] - last[role]) / 1e9 / step for role in roles}
        last = now
        log(
            f"    t={time.monotonic() - start:4.1f}s cores: "
            + " ".join(f"{k} {v:.2f}" for k, v in shares.items())
            + f" = {sum(shares.values()):.2f}"
        )


def phase(
    runner: Runner,
    system: System,
    devices: int,
    pyspy: tuple[str, int, Path] | None,
    mode: str = "closed",
    timeline: bool = False,
    rate: float | None = None,
) -> dict[str, Any]:
    tag = f"{runner.run_tag}-{runner.counter:02d}"
    runner.counter += 1
    out = runner.logs / f"loadgen-{tag}.json"
    argv = [sys.executable, "-m", "bench.loadgen", "--port", str(system.port), "--mode", mode]
    argv += ["--devices", str(devices), "--tag", tag, "--lanes", "32", "--inflight", "32", "--sync"]
    if mode == "herd":  # as bench.run's herd: everything within a second, rate_limited answers retried
        argv += ["--herd-seconds", "1.0", "--max-attempts", "30"]
    if mode == "open":  # as bench.run's open-loop phases: `rate` claims a second, latency from the intended send
        argv += ["--rate", str(rate)]
    argv += ["--cloud-key", str(system.data_dir.cloud_key), "--out", str(out), "--max-seconds", "600"]
    env = {**os.environ, KEY_ENV: system.data_dir.provision_key}
    roles = _roles(system)
    spy: subprocess.Popen[bytes] | None = None
    with (runner.logs / f"loadgen-{tag}.log").open("ab") as err:
        lg = subprocess.Popen(
            argv, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
        )
        runner._expect_line(lg, "READY", 180)
        if pyspy is not None:
            binary, pid, path = pyspy
            spy = subprocess.Popen(
                [binary, "record", "-r", "250", "-p", str(pid), "-f", "raw", "-o", str(path), "--nonblocking"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
        before = {role: _cpu_ns(pid) for role, pid in roles.items()}
        t0 = time.monotonic()
        assert lg.stdin is not None
        lg.stdin.write("GO\n")
        lg.stdin.flush()
        sampling = threading.Event()
        sampler = threading.Thread(target=_timeline, args=({**roles, "loadgen": lg.pid}, sampling), daemon=True)
        if timeline:
            sampler.start()
        runner._expect_line(lg, "DONE", 900)
        sampling.set()
        if timeline:
            sampler.join()
        wall = time.monotonic() - t0
        after = {role: _cpu_ns(pid) for role, pid in roles.items()}
        if spy is not None:
            spy.send_signal(2)
            spy.wait(60)
        if lg.wait(600) != 0:
            raise RuntimeError(f"load generator exited {lg.returncode}")
    result = json.loads(out.read_text())
    answered = max(1, result["ok"])
    if result["lost"] or result["ok"] != devices:
        raise RuntimeError(f"{result['ok']}/{devices} ok, {result['lost']} lost: {result['errors']}")
    ms = {role: (after[role] - before[role]) / 1e6 / answered for role in roles}
    ms["loadgen"] = result["loadgen_cpu_s"] * 1000 / answered
    record = {
        "claims_per_s": result["throughput_mid80"] or result["throughput"],
        "span_s": result["span_s"],
        "wall_s": wall,
        "ms": ms,
    }
    bridge = sum(v for k, v in ms.items() if k not in ("broker", "loadgen"))
    log(
        f"  {devices} claims, {record['claims_per_s']:.0f}/s, the last answered after {record['span_s']:.2f} s;"
        " ms CPU/claim: " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()) + f"; bridge {bridge:.3f}"
    )
    lat = result["latency"]
    log(
        f"    latency p50 {lat['p50_ms']:.0f} p99 {lat['p99_ms']:.0f} max {lat['max_ms']:.0f} ms;"
        f" retried answers {result['retried_answers'] or 'none'}"
    )
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_split", description=__doc__.split("\n\n")[0])
    p.add_argument("--claims", type=int, default=8000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--bridge-env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--pyspy", default=None, help="py-spy binary: profile --pyspy-role during each phase")
    p.add_argument("--pyspy-role", default="worker0")
    p.add_argument("--label", default="")
    p.add_argument(
        "--mode",
        choices=["closed", "herd", "open"],
        default="closed",
        help="herd: each phase within 1 s; open: --rate claims a second (latency at a fixed load)",
    )
    p.add_argument("--rate", type=float, default=800.0, help="open: offered claims per second")
    p.add_argument("--timeline", action="store_true", help="log each process's CPU share every 0.5 s of a phase")
    args = p.parse_args(argv)
    install_signal_exit()
    bridge_env = dict(item.split("=", 1) for item in args.bridge_env)
    target = MosquittoTarget()
    reason = target.unavailable()
    if reason:
        log(f"cannot run: {reason}")
        return 1
    with tempfile.TemporaryDirectory(prefix="provbench-cpu-") as tmp, Processes() as processes:
        work = Path(tmp)
        logs = work / "logs"
        runner = Runner.__new__(Runner)
        runner.logs, runner.run_tag, runner.counter, runner.failures = logs, f"{os.getpid() % 65536:04x}", 0, []
        data = make_data_dir(work, "mosquitto")
        system = target.start_provbridge(processes, data, logs, "INFO", bridge_env)
        phase(runner, system, 500, None)  # warm-up
        records = []
        roles = list(_roles(system).items())
        for n in range(args.runs):
            spy = None
            if args.pyspy:
                role, pid = args.pyspy_role, dict(roles)[args.pyspy_role]
                path = Path(f"/tmp/pyspy-{args.label or 'run'}-{role}-{n}.txt")
                spy = (args.pyspy, pid, path)
                log(f"  profiling {role} (pid {pid}) into {path}")
            records.append(phase(runner, system, args.claims, spy, args.mode, args.timeline, args.rate))
        medians = {k: statistics.median(r["ms"][k] for r in records) for k in records[0]["ms"]}
        bridge = statistics.median(
            sum(v for k, v in r["ms"].items() if k not in ("broker", "loadgen")) for r in records
        )
        rate = statistics.median(r["claims_per_s"] for r in records)
        span = statistics.median(r["span_s"] for r in records)
        summary = {
            "label": args.label,
            "medians_ms": medians,
            "bridge_ms": bridge,
            "claims_per_s": rate,
            "span_s": span,
        }
        print(json.dumps(summary))
        log(
            f"MEDIAN {args.label}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in medians.items())
            + f"; bridge {bridge:.3f} ms; {rate:.0f}/s; last answer after {span:.2f} s"
        )
        processes.stop(system.processes["bridge"])
        in_traceback = False
        for line in (logs / "serve.log").read_text(errors="replace").splitlines():
            in_traceback = "Traceback" in line or (in_traceback and not line[:4].isdigit())
            if " ERROR " in line or in_traceback:
                log(f"  serve.log: {line[:300]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
