"""CPU per claim of the claim-worker process alone, without a broker: a low-noise check of the claim path.

    python -m bench.worker_cpu [--claims 4000] [--batch 8] [--runs 3] [--tree OTHER_SOURCE_TREE]...

Starts `python -m bridge.edges.claimworker` on a socket pair, as the edges do (bridge.edges.workerlink),
on a fresh data dir with an unlimited key and the settings `bench.targets` gives the bridge, and hands it
new-device claims (each device its own key pair, the load generator's `hardware` block) `--batch` at a
time, each group written at once and its answers awaited, as they arrive under load. The worker's CPU time
(/proc/<pid>/task/*/schedstat), divided by the claims, is its CPU per claim: the figure `bench.cpu_split`
measures under a real broker, without the broker, the edge or the load generator on the same two cores.
Every answer must be an `ok`.

A/B: each `--tree` (a copy of the source tree, e.g. before a change) gets a worker of its own, run at the
same time as this tree's and handed the same groups in step, so both see the same load; the ratio of
their figures, run by run, is steadier than either figure (on a shared 2-core machine a figure alone moves
by +-15 % from one minute to the next, the paired ratio by +-3 %).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import log
from bench.loadgen import BENCH_HARDWARE
from bench.run import make_data_dir
from bench.targets import DataDir
from bridge.config import load_settings
from bridge.edges.claimworker import ANSWER, READY, SETTINGS, decode_answer, encode_request, frame, split_frames
from bridge.tls import certificates as tls
from device_sim.device import DeviceIdentity, build_claim
from provwire import crypto
from provwire.models import to_json


def _cpu_ns(pid: int) -> int:
    """Nanoseconds on a CPU of every thread of `pid` (schedstat: finer than utime+stime's 10 ms ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def _claims(tag: str, n: int, key: str, cloud_kid: str) -> list[tuple[str, bytes]]:
    # A key pair per device, as in the load generator: nothing derived from a device's key can be reused.
    out = []
    for j in range(n):
        identity = DeviceIdentity(f"{tag}-{j:07d}", crypto.generate_private_key())
        claim = build_claim(identity, key, f"{tag}.{j:07d}", hardware=BENCH_HARDWARE, cloud_key_id=cloud_kid)
        out.append((f"prov/v1/claim/bw-{tag}-{j % 32}", to_json(claim)))
    return out


class _Worker:
    """One claim-worker process of the tree at `tree` (None: this one), on its own data dir or `data`."""

    def __init__(self, tree: Path | None, root: Path, n: int, data: DataDir | None = None) -> None:
        self.tree = tree
        self.data = data or make_data_dir(root, f"w{n}")
        settings = load_settings(None).model_copy(update={"data_dir": self.data.path})
        self.settings = tls.resolve(settings)  # as `serve` pins it
        self.cloud_kid = crypto.key_id(crypto.public_key_from_sec1(_cloud_sec1(self.data.cloud_key)))
        self.channel, theirs = socket.socketpair()
        env = {**os.environ, "PROVBRIDGE_LOG_LEVEL": "INFO"}
        if tree is not None:
            env["PYTHONPATH"] = str(tree)
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bridge.edges.claimworker", str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),),
                cwd=tree,
                env=env,
            )
        self.buffer = bytearray()
        self.seq = 0
        self.channel.sendall(frame(SETTINGS, pickle.dumps(self.settings)))
        self.receive(1)

    def send(self, group: list[tuple[str, bytes]]) -> None:
        self.channel.sendall(b"".join(encode_request(self.seq + i, t, p) for i, (t, p) in enumerate(group)))
        self.seq += len(group)

    def receive(self, answers: int) -> None:
        got = 0
        while got < answers:
            data = self.channel.recv(1 << 16)
            if not data:
                raise RuntimeError("the worker closed its socket")
            self.buffer.extend(data)
            for kind, body in split_frames(self.buffer):
                if kind == ANSWER:
                    _, publishes, _ = decode_answer(body)
                    if b'"status":"ok"' not in publishes[0].payload:
                        raise RuntimeError(f"not ok: {publishes[0].payload[:200]!r}")
                    got += 1
                elif kind == READY:
                    got += 1

    def close(self) -> None:
        self.channel.close()
        self.process.wait(30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.worker_cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--claims", type=int, default=4000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--tree",
        type=Path,
        action="append",
        default=[],
        help="a copy of the source tree whose worker to measure as well, at the same time (A/B under the same load)",
    )
    p.add_argument(
        "--shared",
        type=int,
        default=1,
        help="this many workers of this tree on one database, each given its own claims at the same time"
        " (what `serve --processes N` does to the claim workers)",
    )
    args = p.parse_args(argv)
    # As bench.targets runs the bridge: no per-client flood limits (32 client ids carry every claim), plain MQTT.
    os.environ.update(PROVBRIDGE_CLAIMS__RATE_LIMITS="false", PROVBRIDGE_BROKER__TLS_LISTEN="off")
    trees: list[Path | None] = [*args.tree, *[None] * args.shared]
    names = [str(t) for t in args.tree] + [
        f"this tree{f' #{k}' if args.shared > 1 else ''}" for k in range(args.shared)
    ]
    results: list[list[float]] = [[] for _ in trees]
    with tempfile.TemporaryDirectory(prefix="provbench-worker-") as tmp:
        workers = [_Worker(tree, Path(tmp), n) for n, tree in enumerate(trees[: len(args.tree) + 1])]
        workers += [_Worker(None, Path(tmp), len(workers) + k, workers[-1].data) for k in range(args.shared - 1)]
        try:
            for run in range(args.runs + 1):  # the first is a warm-up
                tag = f"w{run}{os.getpid() % 1000}"
                n = args.claims if run else 500
                claims = [_claims(f"{tag}s{k}", n, w.data.provision_key, w.cloud_kid) for k, w in enumerate(workers)]
                before = [_cpu_ns(w.process.pid) for w in workers]
                for start in range(0, n, args.batch):
                    for worker, mine in zip(workers, claims, strict=True):  # all of them at once, in parallel
                        worker.send(mine[start : start + args.batch])
                    for worker, mine in zip(workers, claims, strict=True):
                        worker.receive(len(mine[start : start + args.batch]))
                if run:
                    for k, worker in enumerate(workers):
                        results[k].append((_cpu_ns(worker.process.pid) - before[k]) / 1e6 / n)
                    log(
                        f"  run {run}: "
                        + ", ".join(f"{name} {r[-1]:.3f}" for name, r in zip(names, results, strict=True))
                    )
        finally:
            for worker in workers:
                worker.close()
    for name, r in zip(names, results, strict=True):
        runs = ", ".join(f"{x:.3f}" for x in r)
        log(f"MEDIAN {name} batch {args.batch}: {statistics.median(r):.3f} ms CPU/claim, min {min(r):.3f} ({runs})")
    if args.tree:
        for name, r in zip(names[:-1], results[:-1], strict=True):
            ratios = [b / a for a, b in zip(r, results[-1], strict=True)]
            log(f"this tree / {name}: median {statistics.median(ratios):.3f} ({', '.join(f'{x:.3f}' for x in ratios)})")
    return 0


def _cloud_sec1(pem_path: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_public_key(pem_path.read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return crypto.sec1(key)


if __name__ == "__main__":
    sys.exit(main())
