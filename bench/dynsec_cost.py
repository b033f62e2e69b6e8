"""What one claim costs Mosquitto with the dynamic-security opt-in, as the mirrored fleet grows.

    python -m bench.dynsec_cost                      steps of 100 devices up to 2,000 (a few minutes)
    python -m bench.dynsec_cost --step 50 --max 1000

Mosquitto 2.0's dynamic-security plugin rewrites its whole state file on every command, so each token
the bridge mirrors costs Mosquitto time proportional to the devices already mirrored. This starts
Mosquitto from `provbridge mosquitto-config` with `broker.mosquitto_auth = "dynsec"` and the bridge in
external mode, then provisions the fleet in steps (closed loop, 4 claims in flight) and reads
Mosquitto's CPU time (utime + stime from /proc) around each step: CPU per claim against the fleet
mirrored when the step began. The fleet size where a claim first costs Mosquitto more than 10 ms is
what `bridge.mosquitto.dynsec.MIRRORED_FLEET_WARNING` is set from (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, Processes, cpu_seconds, install_signal_exit, log
from bench.loadgen import KEY_ENV
from bench.run import make_data_dir
from bench.targets import MosquittoTarget

BUDGET_MS = 10.0  # the cost above which `serve` and `doctor` warn (issue 11)
DYNSEC = {"PROVBRIDGE_BROKER__MOSQUITTO_AUTH": "dynsec", "PROVBRIDGE_CLAIMS__RATE_LIMITS": "false"}


def provision(port: int, cloud_key: Path, provision_key: str, devices: int, tag: str, out: Path) -> dict[str, Any]:
    """`devices` new devices through bench.loadgen, closed loop; its result."""
    argv = [sys.executable, "-m", "bench.loadgen", "--port", str(port), "--mode", "closed"]
    argv += ["--devices", str(devices), "--tag", tag, "--lanes", "4", "--inflight", "4", "--procs", "1"]
    argv += ["--expect", "provbridge", "--cloud-key", str(cloud_key), "--out", str(out), "--max-seconds", "900"]
    done = subprocess.run(
        argv, cwd=REPO, env={**os.environ, KEY_ENV: provision_key}, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"load generator exited {done.returncode}: {done.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    if result["answered_devices"] != devices or result["lost"]:
        raise RuntimeError(f"step {tag}: {result['answered_devices']} of {devices} answered, {result['lost']} lost")
    return result


def measure(step: int, maximum: int, work: Path) -> list[dict[str, float]]:
    rows: list[dict[str, float]] = []
    with Processes() as processes:
        data_dir = make_data_dir(work, "dynsec")
        system = MosquittoTarget().start_provbridge(processes, data_dir, work / "logs", "WARNING", DYNSEC)
        broker = system.pids["broker"]
        mirrored = 0
        while mirrored < maximum:
            tag = f"dc{mirrored:06d}"
            before, t0 = cpu_seconds(broker), time.monotonic()
            provision(system.port, data_dir.cloud_key, data_dir.provision_key, step, tag, work / f"{tag}.json")
            wall = time.monotonic() - t0
            per_claim_ms = (cpu_seconds(broker) - before) / step * 1000
            rate = step / wall
            rows.append({"mirrored": mirrored, "broker_ms_per_claim": round(per_claim_ms, 2), "claims_s": round(rate)})
            log(f"{mirrored:>6} mirrored: {per_claim_ms:6.2f} ms of Mosquitto CPU per claim, {rate:6.1f} claims/s")
            mirrored += step
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dynsec_cost", description=__doc__.split("\n")[0])
    p.add_argument("--step", type=int, default=100, help="devices provisioned per step (default 100)")
    p.add_argument("--max", type=int, default=2000, help="stop once this many devices are mirrored (default 2,000)")
    p.add_argument("--json", type=Path, help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.step < 10 or args.max < args.step:
        p.error("--step must be at least 10 and --max at least --step")
    install_signal_exit()
    with tempfile.TemporaryDirectory(prefix="provbench-dynsec-") as tmp:
        rows = measure(args.step, args.max, Path(tmp))
    over = next((r["mirrored"] for r in rows if r["broker_ms_per_claim"] > BUDGET_MS), None)
    print(json.dumps({"rows": rows, "first_fleet_over_budget": over, "budget_ms": BUDGET_MS}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
