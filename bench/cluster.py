"""Claims per second with 1, 2 and 3 bridges on a 3-node RabbitMQ cluster with PostgreSQL, and what each process
spends per claim (docs/SCALING.md).

Everything runs on this machine: three RabbitMQ nodes on loopback (`provbridge rabbitmq-config`, the tests' launcher
tests/helpers/rabbitmq.py), one PostgreSQL (tests/helpers/postgres.py), N `provbridge serve` processes as N bridge
hosts would run them (each its own first node), and the devices: `--claims` claims from claimant connections spread
over the three nodes, their keys made beforehand, all sent at once (a herd), timed from the first send to the last
answer. The CPU time of every process tree (each bridge with its claim worker, each node, PostgreSQL, the load
generator) is read from /proc around that window: per claim, it says what each component costs wherever it runs.
On 2 cores shared by all of them, claims/s measures contention, not scale-out; the CPU per claim is what projects.

    python -m bench.cluster [--claims 3000] [--bridges 1 2 3] [--out FILE]
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import cpu_seconds, git_commit, log, machine_info
from bridge.config import BrokerSettings, RabbitMQSettings, StorageSettings
from bridge.ops import admin
from tests.helpers.bridge import make_settings
from tests.helpers.cli import run_cli
from tests.helpers.fleet import Fleet
from tests.helpers.postgres import PostgresServer
from tests.helpers.processes import ServeProcesses
from tests.helpers.rabbitmq import RabbitCluster
from tests.helpers.waiting import wait_for

ENV = {"PROVBRIDGE_CLAIMS__RATE_LIMITS": "false", "PROVBRIDGE_LOG_LEVEL": "INFO"}  # the default level
WARMUP = 60


def _measure(
    cluster: RabbitCluster, postgres: PostgresServer, bridges: list[ServeProcesses], claims: int, key: str, prefix: str
) -> dict[str, Any]:
    fleets = [Fleet(port, prefix, key, lanes=4) for port in cluster.mqtt_ports]
    try:
        for fleet in fleets:
            fleet.connect()
        warm = [fleet.add(WARMUP // len(fleets)) for fleet in fleets]
        for fleet, devices in zip(fleets, warm, strict=True):
            fleet.send(devices)
        assert wait_for(lambda: all(f.all_final() for f in fleets), timeout=120), "warm-up claims unanswered"
        batches = [fleet.add(claims // len(fleets)) for fleet in fleets]  # keys made here, before the clock
        sent = sum(len(b) for b in batches)
        pids = _pids(cluster, postgres, bridges)
        before = {role: _cpu(role, pid) for role, pid in pids.items()}
        start = time.monotonic()
        for fleet, devices in zip(fleets, batches, strict=True):
            fleet.send(devices)
        assert wait_for(lambda: all(f.all_final() for f in fleets), timeout=600, interval=0.05), "claims unanswered"
        elapsed = time.monotonic() - start
        after = {role: _cpu(role, pid) for role, pid in pids.items()}
    finally:
        for fleet in fleets:
            fleet.close()
    cpu_ms = {role: round(1000 * (after[role] - before[role]) / sent, 3) for role in pids}
    cpu_ms["all but loadgen"] = round(sum(ms for role, ms in cpu_ms.items() if role != "loadgen"), 3)
    return {
        "claims": sent,
        "seconds": round(elapsed, 2),
        "claims_per_second": round(sent / elapsed, 1),
        "cpu_ms_per_claim": cpu_ms,
    }


def _cpu(role: str, pid: int) -> float:
    """CPU seconds of a role: a process tree, but the load generator's own process only (its tree holds the rest)."""
    if role == "loadgen":
        times = os.times()
        return times.user + times.system
    return cpu_seconds(pid)


def _pids(cluster: RabbitCluster, postgres: PostgresServer, bridges: list[ServeProcesses]) -> dict[str, int]:
    pids: dict[str, int] = {"loadgen": os.getpid()}
    for i, bridge in enumerate(bridges):
        assert bridge.process is not None
        pids[f"bridge{i + 1}"] = bridge.process.pid  # its tree: the edge and its claim worker
    for i, process in enumerate(cluster.processes):
        assert process is not None
        pids[f"rabbit{i + 1}"] = process.pid
    assert postgres.process is not None
    pids["postgresql"] = postgres.process.pid
    return pids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", type=int, default=3000)
    parser.add_argument("--bridges", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/<time>-cluster.json")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="provbench-cluster-"))
    results: list[dict[str, Any]] = []
    with PostgresServer(root / "pg") as postgres:
        cluster = RabbitCluster(root / "cluster", 3, management=True)
        settings = make_settings(
            root / "data",
            log_level="INFO",
            storage=StorageSettings(url=postgres.create_database()),
            broker=BrokerSettings(mode="rabbitmq", port=cluster.mqtt_ports[0], tls_listen="off"),
            rabbitmq=RabbitMQSettings(
                amqp=[f"127.0.0.1:{p}" for p in cluster.amqp_ports],
                management=[f"http://127.0.0.1:{p}" for p in cluster.management_ports],
            ),
        )
        key = admin.init_data_dir(settings).provision_key
        assert key
        assert run_cli(settings, "rabbitmq-config", str(root / "rabbitmq")) == 0
        cluster.provbridge_conf = (root / "rabbitmq" / "rabbitmq.conf").read_text()
        with cluster:
            for count in args.bridges:
                bridges = []
                try:
                    for i in range(count):
                        amqp = settings.rabbitmq.amqp
                        one = settings.model_copy(
                            update={
                                "rabbitmq": settings.rabbitmq.model_copy(update={"amqp": amqp[i:] + amqp[:i]}),
                                "api": settings.api.model_copy(update={"enabled": False}),
                            }
                        )
                        bridge = ServeProcesses(one, env=ENV)
                        bridge.log_file = root / f"serve-{count}-{i}.log"
                        bridge.config_file = root / f"serve-{count}-{i}.toml"
                        bridges.append(bridge)  # stopped by the `finally` below, even if it fails to start
                        bridge.start()
                    log(f"{count} bridge(s): {args.claims} claims")
                    result = {
                        "bridges": count,
                        **_measure(cluster, postgres, bridges, args.claims, key, settings.topic_prefix),
                    }
                    log(json.dumps(result))
                    results.append(result)
                finally:
                    for bridge in bridges:
                        bridge.stop()
    report = {
        "machine": machine_info(),
        "commit": git_commit(),
        "command": "python -m bench.cluster",
        "results": results,
    }
    out = args.out or Path("bench/results") / time.strftime("%Y%m%d-%H%M%S-cluster.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(results))
    return 0


def _table(results: list[dict[str, Any]]) -> str:
    roles = sorted({role for r in results for role in r["cpu_ms_per_claim"]}, key=_order)
    lines = ["| bridges | claims/s | " + " | ".join(f"{r} ms" for r in roles) + " |", "|---|---|" + "---|" * len(roles)]
    for r in results:
        cpu = r["cpu_ms_per_claim"]
        lines.append(
            f"| {r['bridges']} | {r['claims_per_second']} | "
            + " | ".join(str(cpu.get(role, "")) for role in roles)
            + " |"
        )
    return "\n".join(lines)


def _order(role: str) -> tuple[int, str]:
    return (["bridge", "rabbit", "postgresql", "all but loadgen", "loadgen"].index(role.rstrip("0123456789")), role)


if __name__ == "__main__":
    raise SystemExit(main())
