"""The benchmark harness: every broker target, provbridge against its echo floor, then the report.

    python -m bench.run --quick          what `make bench-quick` runs (small K, < 2 minutes)
    python -m bench.run                  what `make bench` runs (K = 10,000, herd, growth to 1M devices)

For each target broker it starts provbridge (fresh data dir, an unlimited provisioning key) and runs:
warm-up; closed loop over K devices (saturation); open loop at 25/50/75 % of that rate; the thundering
herd. Then it starts the echo floor (same broker, bench/echo.py in the bridge's place) and runs the
same closed loop and the same offered rates. Around each phase's timed window (the load generator
says READY and DONE) it reads utime+stime and VmHWM of the measured processes from /proc, and after
each provbridge phase it counts the phase's devices in SQLite (read-only) against the answers.
Then the growth runs (claims into a pre-seeded fleet) and the claim-path micro-suite. Results go to
bench/results/*.json; the tables and the plot into docs/BENCHMARKS.md. Nothing asserts on times: the
exit status is non-zero only when a claim was lost, a device row is missing, or a part failed to run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import report
from bench.apipoll import ApiPoller
from bench.common import (
    REPO,
    Processes,
    RssSampler,
    cpu_seconds,
    git_commit,
    install_signal_exit,
    loadavg,
    log,
    machine_info,
    package_versions,
    process_tree,
    reset_peak_rss,
    tree_kb,
)
from bench.loadgen import KEY_ENV
from bench.seed import seed_devices
from bench.targets import TARGETS, DataDir, System, Target

RESULTS = REPO / "bench" / "results"
DOC = REPO / "docs" / "BENCHMARKS.md"
PLOT = REPO / "docs" / "benchmarks-latency.png"
DEFAULT_REPLY_BYTES = 1448  # the bridge's answer size with the default settings; measured each run


@dataclass
class Plan:
    mode: str
    devices: int
    warmup: int
    lanes: int
    inflight: int
    procs: int
    open_seconds: float
    fractions: tuple[float, ...]
    echo_own_rates: bool
    herd: int
    herd_seconds: float
    growth: tuple[int, ...]
    growth_claims: int
    drain: float
    targets: tuple[str, ...]
    log_level: str
    micro: bool
    micro_args: tuple[str, ...] = field(default_factory=tuple)
    target_devices: dict[str, int] = field(default_factory=dict)  # K per broker, where it differs
    herd_targets: tuple[str, ...] = ("amqtt", "mosquitto")
    growth_targets: tuple[str, ...] = ("amqtt", "mosquitto")
    min_closed_seconds: float = 3.0  # the echo floor's closed loop is made at least this long
    procs_check: bool = True  # re-run the floor with two load generator processes
    bridge_env: dict[str, str] = field(default_factory=dict)  # extra PROVBRIDGE_* settings for `serve`
    api_poll: bool = True  # page through the admin API during each bridge phase (bench/apipoll.py)

    def devices_for(self, target: str) -> int:
        return self.target_devices.get(target, self.devices)


PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "devices": 10_000,
        "warmup": 500,
        "open_seconds": 20.0,
        "echo_own_rates": True,
        "herd": 10_000,
        "growth": (1_000, 100_000, 1_000_000),
        "growth_claims": 100_000,
        "drain": 60.0,
        "micro_args": (),
        # Every broker at the same K: Mosquitto's default (the provbridge_jwt plugin) costs the same per
        # claim whatever the fleet (the dynsec opt-in does not: python -m bench.dynsec_cost).
        "target_devices": {},
        "min_closed_seconds": 5.0,
        "procs_check": True,
    },
    "quick": {
        "devices": 1_000,
        "warmup": 100,
        "open_seconds": 2.0,
        "echo_own_rates": False,
        "herd": 2_000,
        "growth": (10_000,),
        "growth_claims": 1_000,
        "drain": 20.0,
        "target_devices": {},
        "min_closed_seconds": 2.0,
        "procs_check": False,  # `make bench` does it; here it would cost a tenth of the 2 minutes
        # Enough rounds for a per-step figure, short enough for the 2-minute budget.
        "micro_args": ("--benchmark-max-time=0.25", "--benchmark-min-rounds=20", "--benchmark-warmup=off"),
    },
}


# --- data dirs -----------------------------------------------------------------------------------


def make_data_dir(root: Path, name: str, credential: str = "token") -> DataDir:
    """Initialise a data dir and create an unlimited key through bridge.ops.admin (the CLI's own code)."""
    from bridge.config import load_settings
    from bridge.ops import admin, admin_tokens

    path = root / name / "data"
    settings = load_settings(None).model_copy(update={"data_dir": path})
    admin.init_data_dir(settings)
    store = admin.open_store(settings)
    try:
        spec = admin.KeySpec(tenant="default", name="bench", credential_type=credential)
        _, raw = admin.create_key(store, settings, spec, int(time.time()))
        poller = admin_tokens.create_admin_token(store, "bench-poller", ["read"], None, int(time.time())).raw
    finally:
        store.close()
    return DataDir(path, raw, credential, admin_token=poller)


def count_devices(db: Path, tag: str) -> int:
    """Devices of one phase, read-only: the bridge keeps running and must not be disturbed."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        row = conn.execute("SELECT COUNT(*) FROM devices WHERE hardware_id LIKE ?", (tag + "-%",)).fetchone()
        return int(row[0])
    finally:
        conn.close()


# --- one phase -----------------------------------------------------------------------------------


class Runner:
    def __init__(self, plan: Plan, processes: Processes, logs: Path) -> None:
        self.plan = plan
        self.processes = processes
        self.logs = logs
        self.run_tag = f"{random.getrandbits(16):04x}"
        self.counter = 0
        self.failures: list[str] = []

    def phase(
        self,
        system: System,
        name: str,
        mode: str,
        devices: int,
        *,
        rate: float | None = None,
        procs: int | None = None,
        max_attempts: int = 5,
        check_db: bool = True,
    ) -> dict[str, Any]:
        plan = self.plan
        self.counter += 1
        tag = f"{self.run_tag}-{self.counter:02d}"
        out = self.logs / f"loadgen-{tag}.json"
        expect = "provbridge" if system.kind == "provbridge" else "echo"
        argv = [sys.executable, "-m", "bench.loadgen", "--port", str(system.port), "--mode", mode]
        argv += ["--devices", str(devices), "--tag", tag, "--lanes", str(plan.lanes), "--inflight", str(plan.inflight)]
        argv += ["--procs", str(procs or plan.procs), "--expect", expect, "--drain-timeout", str(plan.drain)]
        argv += ["--max-attempts", str(max_attempts), "--out", str(out), "--sync"]
        if system.data_dir.credential == "certificate":
            argv.append("--certificate")
        if mode == "open":
            assert rate is not None
            argv += ["--rate", f"{rate:.3f}"]
            max_seconds = devices / rate + plan.drain + 60
        elif mode == "herd":
            argv += ["--herd-seconds", str(plan.herd_seconds)]
            max_seconds = devices / 20 + plan.drain + 60
        else:
            max_seconds = devices / 20 + plan.drain + 60  # below 20 claims/s something is broken
        argv += ["--max-seconds", str(round(max_seconds))]
        if expect == "provbridge":
            argv += ["--cloud-key", str(system.data_dir.cloud_key)]
        if system.claim_username:
            argv += ["--claim-username", system.claim_username]
        env = {**os.environ, KEY_ENV: system.data_dir.provision_key}
        what = f"{system.kind} {name}: {mode}, {devices} devices" + (f", {rate:.0f}/s offered" if rate else "")
        log(what)
        system.check_alive()
        with (self.logs / f"loadgen-{tag}.log").open("ab") as err:
            lg = subprocess.Popen(
                argv, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
            )
            try:
                self._expect_line(lg, "READY", 180)
                pids = system.pids
                tree = {role: len(process_tree(pid)) for role, pid in pids.items()}
                hwm_reset = {role: reset_peak_rss(pid) for role, pid in pids.items()}
                cpu0 = {role: cpu_seconds(pid) for role, pid in pids.items()}
                t0 = time.monotonic()
                with RssSampler(pids) as sampler, ApiPoller(system, self.plan.api_poll) as api_poll:
                    assert lg.stdin is not None
                    lg.stdin.write("GO\n")
                    lg.stdin.flush()
                    self._expect_line(lg, "DONE", max_seconds + 60)
                wall = time.monotonic() - t0
                cpu1 = {role: cpu_seconds(pid) for role, pid in pids.items()}
                hwm = {role: tree_kb(pid, "VmHWM") for role, pid in pids.items()}
                if lg.wait(600) != 0:
                    raise RuntimeError(f"load generator exited {lg.returncode}")
            finally:
                if lg.poll() is None:
                    lg.kill()
                    lg.wait(10)
        result = json.loads(out.read_text())
        answered = max(1, result["answered_devices"])
        record: dict[str, Any] = {
            "name": name,
            "mode": mode,
            "devices": devices,
            "offered_rate": rate if mode == "open" else result.get("offered_rate"),
            "window_s": round(wall, 3),
            "loadgen": result,
            "processes": {
                role: {
                    "pid": pids[role],
                    "processes": tree[role],  # the process and its children, measured together
                    "cpu_s": round(cpu1[role] - cpu0[role], 3),
                    "cpu_s_per_claim": round((cpu1[role] - cpu0[role]) / answered, 6),
                    "cpu_util": round((cpu1[role] - cpu0[role]) / wall, 3) if wall > 0 else None,
                    "vmhwm_kib": hwm[role],
                    "vmhwm_is_phase_peak": hwm_reset[role],
                    "rss_kib": _rss_summary(sampler.samples[role]),
                }
                for role in pids
            },
            "rss_samples": {role: _downsample(s, 200) for role, s in sampler.samples.items()},
            "api_poll": api_poll.summary(),
        }
        problems = []
        if result["lost"]:
            problems.append(f"{result['lost']} claims lost")
        if result["duplicates"]:
            problems.append(f"{result['duplicates']} duplicate answers")
        hard_errors = {k: v for k, v in result["errors"].items() if k != "error:rate_limited"}
        if hard_errors:
            problems.append(f"errors {hard_errors}")
        if check_db and system.kind == "provbridge":
            found = count_devices(system.data_dir.database, tag)
            record["db"] = {"tag": tag, "devices_expected": result["ok"], "devices_found": found}
            if found != result["ok"]:
                problems.append(f"devices table has {found} rows for this phase, {result['ok']} devices were told ok")
        record["problems"] = problems
        for problem in problems:
            self.failures.append(f"{system.kind} {name}: {problem}")
        lat = result["latency"]
        log(
            f"  -> {result['ok']}/{devices} ok, lost {result['lost']}, {result['throughput']} claims/s,"
            f" p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms"
            + "".join(
                f"; {role} {p['cpu_s_per_claim'] * 1000:.2f} ms CPU/claim" for role, p in record["processes"].items()
            )
            + (f"  PROBLEMS: {problems}" if problems else "")
        )
        return record

    @staticmethod
    def _expect_line(proc: subprocess.Popen[str], word: str, timeout: float) -> None:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([proc.stdout], [], [], min(1.0, max(0.0, deadline - time.monotonic())))
            if readable:
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"load generator exited ({proc.wait(10)}) before {word}")
                if line.strip() == word:
                    return
            elif proc.poll() is not None:
                raise RuntimeError(f"load generator exited ({proc.returncode}) before {word}")
        raise RuntimeError(f"load generator did not say {word} within {timeout:.0f}s")


def _rss_summary(samples: list[tuple[float, int]]) -> dict[str, int | None]:
    values = [kb for _, kb in samples]
    return {
        "start": values[0] if values else None,
        "end": values[-1] if values else None,
        "max": max(values) if values else None,
    }


def _downsample(samples: list[tuple[float, int]], points: int) -> list[tuple[float, int]]:
    if len(samples) <= points:
        return samples
    step = len(samples) / points
    return [samples[int(i * step)] for i in range(points)] + [samples[-1]]


def saturation_rate(phase: dict[str, Any]) -> float:
    lg = phase["loadgen"]
    return float(lg["throughput_mid80"] or lg["throughput"] or 0.0)


# --- one target ----------------------------------------------------------------------------------


def run_target(runner: Runner, target: Target, work: Path) -> dict[str, Any]:
    plan = runner.plan
    record: dict[str, Any] = {"broker": target.name, "description": target.description, "systems": {}}
    reason = target.unavailable()
    if reason is not None:
        log(f"target {target.name}: SKIPPED: {reason}")
        record.update(status="skipped", reason=reason)
        return record
    logs = runner.logs / target.name
    try:
        # provbridge first: its saturation rate sets the offered loads for both systems.
        data = make_data_dir(work, f"{target.name}-provbridge", target.credential)
        system = target.start_provbridge(runner.processes, data, logs / "provbridge", plan.log_level, plan.bridge_env)
        phases = []
        try:
            k = plan.devices_for(target.name)
            # Warm-up devices stay in the fleet (and, on Mosquitto, in dynamic security): keep them few.
            warmup = min(plan.warmup, max(50, k // 10))
            runner.phase(system, "warmup", "closed", warmup)
            closed = runner.phase(system, "closed", "closed", k)
            phases.append(closed)
            saturation = saturation_rate(closed)
            rates = [round(saturation * f, 1) for f in plan.fractions if saturation * f >= 1]
            for fraction, rate in zip(plan.fractions, rates, strict=False):
                n = max(40, round(rate * plan.open_seconds))
                ph = runner.phase(system, f"open{round(fraction * 100)}", "open", n, rate=rate)
                ph["fraction"] = fraction
                phases.append(ph)
            if plan.herd and target.name in plan.herd_targets:
                herd = runner.phase(system, "herd", "herd", plan.herd, max_attempts=30)
                phases.append(herd)
        finally:
            stopped = {role: runner.processes.stop(proc) for role, proc in system.processes.items()}
        record["systems"]["provbridge"] = {
            "roles": system.roles_note,
            "phases": phases,
            "exit_codes": stopped,
        }
        reply_bytes = round(closed["loadgen"]["answer_bytes_mean"] or DEFAULT_REPLY_BYTES)

        data_echo = make_data_dir(work, f"{target.name}-echo", target.credential)
        echo = target.start_echo(runner.processes, data_echo, logs / "echo", reply_bytes)
        echo_phases = []
        try:
            runner.phase(echo, "warmup", "closed", warmup)
            echo_closed = runner.phase(echo, "closed", "closed", k)
            if echo_closed["window_s"] < plan.min_closed_seconds:
                # Too fast to time at K (CPU is counted in 10 ms ticks): the same loop, long enough.
                k_echo = min(100_000, round(saturation_rate(echo_closed) * plan.min_closed_seconds * 1.2))
                echo_closed = runner.phase(echo, "closed", "closed", max(k, k_echo))
            echo_phases.append(echo_closed)
            if plan.procs_check:
                # Can one load generator process saturate the floor? Two should then not be faster.
                k_echo = echo_closed["devices"]
                two = runner.phase(echo, "closed-2procs", "closed", k_echo, procs=max(2, plan.procs * 2))
                two["loadgen_scaling_check"] = True
                echo_phases.append(two)
            echo_rates: list[tuple[str, float, float | None]] = [(f"open@{rate:.0f}", rate, None) for rate in rates]
            if plan.echo_own_rates:
                own = saturation_rate(echo_closed)
                echo_rates += [(f"open{round(f * 100)}", round(own * f, 1), f) for f in plan.fractions]
            for name, echo_rate, echo_fraction in echo_rates:
                n = max(40, round(echo_rate * plan.open_seconds))
                ph = runner.phase(echo, name, "open", n, rate=echo_rate)
                ph["fraction"] = echo_fraction
                echo_phases.append(ph)
        finally:
            stopped = {role: runner.processes.stop(proc) for role, proc in echo.processes.items()}
        record["systems"]["echo"] = {
            "roles": echo.roles_note,
            "reply_bytes": reply_bytes,
            "phases": echo_phases,
            "exit_codes": stopped,
        }
        record["status"] = "ran"
    except Exception as exc:
        log(f"target {target.name} FAILED: {exc}")
        traceback.print_exc()
        runner.failures.append(f"{target.name}: {_one_line(exc)}")
        record.update(status="failed", reason=_one_line(exc), detail=f"{type(exc).__name__}: {exc}")
    return record


def _one_line(exc: BaseException) -> str:
    """A reason fit for a table cell; the full text (process logs included) stays in the JSON."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:200]}"


# --- growth: claims into a pre-seeded fleet ------------------------------------------------------


def run_growth(runner: Runner, target: Target, work: Path) -> list[dict[str, Any]]:
    plan = runner.plan
    out = []
    for seeded in plan.growth:
        data = make_data_dir(work, f"growth-{seeded}")
        log(f"growth: seeding {seeded} devices")
        seed = seed_devices(data.path, seeded)
        try:
            logs = runner.logs / f"growth-{seeded}"
            system = target.start_provbridge(runner.processes, data, logs, plan.log_level, plan.bridge_env)
            try:
                runner.phase(system, f"growth{seeded}-warmup", "closed", plan.warmup)
                phase = runner.phase(system, f"growth{seeded}", "closed", plan.growth_claims)
            finally:
                for proc in system.processes.values():
                    runner.processes.stop(proc)
            out.append(
                {
                    "broker": target.name,
                    "seeded": seeded,
                    "seed": seed,
                    "db_bytes_after": data.database.stat().st_size,
                    "phase": phase,
                }
            )
        except Exception as exc:
            log(f"growth {seeded} FAILED: {exc}")
            runner.failures.append(f"growth {seeded}: {_one_line(exc)}")
            out.append(
                {
                    "broker": target.name,
                    "seeded": seeded,
                    "status": "failed",
                    "reason": _one_line(exc),
                    "detail": f"{type(exc).__name__}: {exc}",
                }
            )
    return out


# --- the claim-path micro-suite ------------------------------------------------------------------


def run_micro(runner: Runner, out: Path) -> dict[str, Any] | None:
    log("micro-suite: bench/test_claim_path.py")
    argv = [sys.executable, "-m", "pytest", "bench/test_claim_path.py", "-q", "-p", "no:cacheprovider"]
    argv += ["--benchmark-only", f"--benchmark-json={out}", "--benchmark-sort=name"]
    argv += list(runner.plan.micro_args)
    with (runner.logs / "micro.log").open("w") as f:
        code = subprocess.run(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=900, check=False).returncode
    if code != 0 or not out.exists():
        runner.failures.append(f"micro-suite exited {code} (see {runner.logs / 'micro.log'})")
        return None
    data = json.loads(out.read_text())
    return {
        "machine_info": data.get("machine_info", {}).get("cpu", {}),
        "benchmarks": [
            {
                "name": b["name"],
                "group": b.get("group"),
                "min_us": round(b["stats"]["min"] * 1e6, 2),
                "median_us": round(b["stats"]["median"] * 1e6, 2),
                "mean_us": round(b["stats"]["mean"] * 1e6, 2),
                "stddev_us": round(b["stats"]["stddev"] * 1e6, 2),
                "rounds": b["stats"]["rounds"],
                "ops": round(b["stats"]["ops"], 1),
            }
            for b in data["benchmarks"]
        ],
    }


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Plan]:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small K, short phases: < 2 minutes (make bench-quick)")
    p.add_argument("--devices", type=int, help="K: devices in the closed-loop run (full 10000, quick 1000)")
    p.add_argument("--lanes", type=int, default=32, help="MQTT connections the claims are multiplexed over")
    p.add_argument("--inflight", type=int, default=32, help="closed loop: claims outstanding at once")
    p.add_argument("--procs", type=int, default=1, help="load generator processes")
    p.add_argument("--open-seconds", type=float, help="length of each open-loop phase")
    p.add_argument("--fractions", default="0.25,0.5,0.75", help="open-loop rates, as fractions of saturation")
    p.add_argument("--herd", type=int, help="devices in the thundering herd (0: skip)")
    p.add_argument("--herd-seconds", type=float, default=1.0, help="the herd publishes all its claims within this")
    p.add_argument("--growth", help="comma-separated pre-seeded fleet sizes ('' or 0: skip)")
    p.add_argument("--growth-claims", type=int, help="claims into each pre-seeded fleet")
    p.add_argument(
        "--growth-targets", default="amqtt,mosquitto", help="brokers that get the growth runs (default: both)"
    )
    p.add_argument(
        "--targets",
        default="amqtt,mosquitto,mosquitto-cert",
        help=f"brokers, of: {', '.join(TARGETS)} (mosquitto-cert: certificate credentials)",
    )
    p.add_argument(
        "--target-devices",
        default=None,
        help="K per broker where it differs from --devices, e.g. mosquitto=2000 (default: the same K for all)",
    )
    p.add_argument("--herd-targets", default="amqtt,mosquitto", help="brokers that get the herd run (default: both)")
    p.add_argument(
        "--bridge-env",
        action="append",
        default=[],
        metavar="PROVBRIDGE_X=V",
        help="a setting for `provbridge serve`, e.g. PROVBRIDGE_CLAIMS__WORKERS=8 (repeatable)",
    )
    p.add_argument(
        "--no-api-poll",
        action="store_true",
        help="leave the admin API idle (with --bridge-env PROVBRIDGE_API__ENABLED=false: not started), to measure"
        " what polling it costs the claims",
    )
    p.add_argument("--log-level", default="INFO", help="the bridge's log level (INFO: the default, one line a claim)")
    p.add_argument("--no-micro", action="store_true", help="skip the claim-path micro-suite")
    p.add_argument(
        "--note",
        default=os.environ.get("PROVBENCH_NOTE", ""),
        help="a remark printed above the figures, e.g. a busy machine (default: $PROVBENCH_NOTE)",
    )
    p.add_argument("--doc", type=Path, default=DOC, help="the Markdown file the figures are written into")
    p.add_argument("--no-doc", action="store_true", help="write only the results JSON")
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    unknown = [t for t in args.targets.split(",") if t and t not in TARGETS]
    if unknown:
        p.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    growth = preset["growth"] if args.growth is None else tuple(int(x) for x in args.growth.split(",") if int(x or 0))
    plan = Plan(
        mode="quick" if args.quick else "full",
        devices=args.devices or preset["devices"],
        warmup=preset["warmup"],
        lanes=args.lanes,
        inflight=args.inflight,
        procs=args.procs,
        open_seconds=args.open_seconds or preset["open_seconds"],
        fractions=tuple(float(x) for x in args.fractions.split(",") if x),
        echo_own_rates=preset["echo_own_rates"],
        herd=preset["herd"] if args.herd is None else args.herd,
        herd_seconds=args.herd_seconds,
        growth=growth,
        growth_claims=args.growth_claims or preset["growth_claims"],
        drain=preset["drain"],
        targets=tuple(t for t in args.targets.split(",") if t),
        log_level=args.log_level,
        micro=not args.no_micro,
        micro_args=preset["micro_args"],
        target_devices=dict(preset["target_devices"]) if args.target_devices is None else _pairs(args.target_devices),
        herd_targets=tuple(t for t in args.herd_targets.split(",") if t),
        growth_targets=tuple(t for t in args.growth_targets.split(",") if t),
        min_closed_seconds=preset["min_closed_seconds"],
        procs_check=preset["procs_check"],
        bridge_env=dict(item.split("=", 1) for item in args.bridge_env),
        api_poll=not args.no_api_poll,
    )
    if any(not key.startswith("PROVBRIDGE_") for key in plan.bridge_env):
        p.error("--bridge-env takes PROVBRIDGE_* settings only")
    if args.devices and args.target_devices is None:
        plan.target_devices = {}  # an explicit K applies to every broker
    return args, plan


def _pairs(text: str) -> dict[str, int]:
    pairs = {}
    for item in text.split(","):
        if item:
            name, _, value = item.partition("=")
            pairs[name] = int(value)
    return pairs


def main(argv: list[str] | None = None) -> int:
    args, plan = parse_args(argv)
    install_signal_exit()
    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    logs = RESULTS / "logs" / f"{stamp}-{plan.mode}"
    logs.mkdir(parents=True, exist_ok=True)
    given = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python -m bench.run", *given])
    make_target = os.environ.get("PROVBENCH_COMMAND")  # set by the Makefile: `make bench-quick`
    results: dict[str, Any] = {
        "meta": {
            "command": command,
            "make": make_target,
            "mode": plan.mode,
            "plan": asdict(plan),
            "note": args.note,
            "started_utc": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(started)),
            "git": git_commit(),
            "machine": machine_info(),
            "packages": package_versions(["amqtt", "paho-mqtt", "cryptography", "pydantic", "pyjwt"]),
            "loadavg_start": loadavg(),
            "logs": str(logs.relative_to(REPO)),
        },
        "targets": [],
        "growth": [],
        "micro": None,
    }
    log(f"{plan.mode} run, logs in {logs.relative_to(REPO)}; load average {loadavg()}")
    with Processes() as processes, tempfile.TemporaryDirectory(prefix="provbench-") as tmp:
        runner = Runner(plan, processes, logs)
        try:
            if plan.micro:
                results["micro"] = run_micro(runner, logs / "micro.json")
            for name in plan.targets:
                results["targets"].append(run_target(runner, TARGETS[name], Path(tmp)))
            if plan.growth:
                results["growth"] = []
                for name in plan.growth_targets:
                    target = TARGETS[name]
                    if target.unavailable() is None:
                        results["growth"] += run_growth(runner, target, Path(tmp))
        finally:
            results["meta"]["loadavg_end"] = loadavg()
            results["meta"]["duration_s"] = round(time.time() - started, 1)
            results["meta"]["failures"] = runner.failures
            out = RESULTS / f"{stamp}-{plan.mode}.json"
            out.write_text(json.dumps(results, indent=1))
            (RESULTS / f"latest-{plan.mode}.json").write_text(json.dumps(results, indent=1))
            log(f"results: {out.relative_to(REPO)}")
    if not args.no_doc:
        report.write(results, args.doc, PLOT)
        log(f"report: {args.doc.relative_to(REPO) if args.doc.is_relative_to(REPO) else args.doc}")
    if runner.failures:
        log("FAILED:\n  " + "\n  ".join(runner.failures))
        return 1
    log(f"done in {results['meta']['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
