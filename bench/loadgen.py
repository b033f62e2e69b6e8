"""The load generator: K simulated devices claiming over L multiplexed MQTT connections ("lanes").

    python -m bench.loadgen --port 1883 --mode closed --devices 10000 --out result.json
    (provisioning key in the PROVBENCH_PROVISION_KEY environment variable, never in argv)

Each device is real: its own P-256 key pair (generated before the clock starts), its own hardware
id, a claim built with the simulator's `build_claim`. To avoid 10k TCP connections, claims ride on
`--lanes` connections, each a valid provisioning client id subscribed to its own response topic;
the protocol allows several claims with distinct request_ids on one client id.

Modes:
  closed  as fast as possible with at most `--inflight` claims outstanding (saturation throughput);
  open    a fixed offered rate; latency counts from each claim's *intended* send time, so a
          generator or broker that falls behind shows up as latency instead of being hidden;
  herd    open loop at devices / `--herd-seconds` (all claims within ~1 s), then wait for every answer.

Retryable error answers (rate_limited, internal_error) are re-sent with the same request_id after
their retry_after plus jitter, as the simulator does; latency then runs from the first intended send
to the final answer. After the clock stops, every final answer is verified: for provbridge the sealed
credentials are opened with the device's private key; for the echo floor the request_id must match.

Each worker process (`--procs`) runs one thread: a selector loop over its lanes driving paho's
loop_read/loop_write, so timing is not at the mercy of the GIL handing off between 32 paho threads.
This module imports `provwire` and `device_sim` (the device's side of the contract) but never `bridge`.
"""

from __future__ import annotations

import argparse
import heapq
import json
import multiprocessing
import os
import random
import select
import selectors
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import latency_summary, set_nodelay
from device_sim.device import DeviceIdentity, build_claim, build_csr, open_answer
from device_sim.errors import ClaimRejected
from provwire import crypto, topics
from provwire.models import Hardware, to_json

KEY_ENV = "PROVBENCH_PROVISION_KEY"
RETRYABLE = {"rate_limited", "internal_error"}
MAX_WINDOW = 65535  # paho's in-flight window per lane: large enough never to hold claims back
CONNECT_TIMEOUT_S = 20.0
BENCH_HARDWARE = Hardware(board_model="provbridge-bench", cpu_cores=1, ram_mb=256, os="linux", arch="armv7l")


@dataclass(frozen=True)
class Config:
    host: str
    port: int
    prefix: str
    mode: str  # closed | open | herd
    devices: int
    tag: str
    lanes: int
    inflight: int
    rate: float | None
    herd_seconds: float
    procs: int
    expect: str  # provbridge | echo
    cloud_key_pem: bytes | None
    provision_key: str = field(repr=False)
    drain_timeout: float
    max_attempts: int
    claim_username: str | None
    max_run_seconds: float = 900.0
    keepalive: int = 60
    certificate: bool = False  # claims carry a CSR (a key that issues certificates, PROTOCOL.md section 10.4)

    def offered_rate(self) -> float | None:
        if self.mode == "open":
            return self.rate
        if self.mode == "herd":
            return self.devices / self.herd_seconds
        return None


# --- one lane ------------------------------------------------------------------------------------


class Lane:
    """One MQTT connection carrying many devices' claims, driven by the worker's selector loop."""

    def __init__(self, cfg: Config, client_id: str, on_answer: Any) -> None:
        self.client_id = client_id
        self.claim_topic = topics.claim_topic(cfg.prefix, client_id)
        self.response_topic = topics.response_topic(cfg.prefix, client_id)
        self.connected = False
        self.subscribed = False
        self.failed: str | None = None
        self.lost = False
        self.closing = False
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=True
        )
        if cfg.claim_username:
            client.username_pw_set(cfg.claim_username)
        client.max_inflight_messages_set(MAX_WINDOW)
        client.max_queued_messages_set(0)
        client.on_socket_open = set_nodelay
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = lambda _c, _u, m: on_answer(self, m.topic, m.payload)
        self.client = client

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self.failed = f"CONNECT refused: {reason}"
            return
        self.connected = True
        client.subscribe(self.response_topic, qos=1)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        if any(getattr(code, "is_failure", False) for code in codes):
            self.failed = f"SUBSCRIBE {self.response_topic} refused"
        else:
            self.subscribed = True

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connected = False
        if self.closing:
            return
        self.lost = True
        if self.failed is None:
            self.failed = f"disconnected: {reason}"


# --- one worker ----------------------------------------------------------------------------------


@dataclass
class _Device:
    identity: DeviceIdentity
    request_id: str
    payload: bytes
    lane: Lane
    intended: float = 0.0  # first intended send (perf_counter)
    sent_at: float = 0.0
    attempts: int = 0
    answers: int = 0
    final: bytes | None = None
    final_at: float = 0.0


class Worker:
    """A share of the devices (global index j with j % procs == index) on a share of the lanes."""

    def __init__(self, cfg: Config, index: int) -> None:
        self.cfg = cfg
        self.index = index
        self.selector = selectors.DefaultSelector()
        lanes_here = max(1, len(range(index, cfg.lanes, cfg.procs)))
        self.lanes = [Lane(cfg, f"bl-{cfg.tag}-{index}-{n}", self._on_answer) for n in range(lanes_here)]
        self.global_ids = list(range(index, cfg.devices, cfg.procs))
        self.devices: list[_Device] = []
        self.retries: list[tuple[float, int]] = []
        self.retry_answers: Counter[str] = Counter()
        self.unmatched = 0
        self.done = 0
        self.outstanding = 0
        self.lag: list[float] = []
        self.last_progress = 0.0
        self.window = max(1, cfg.inflight // cfg.procs + (1 if index < cfg.inflight % cfg.procs else 0))

    # -- setup, not timed --

    def prepare(self) -> None:
        """Key pairs and claim payloads for every device, built before the clock starts."""
        cloud_kid = None
        if self.cfg.cloud_key_pem:
            cloud_kid = crypto.key_id(self._cloud_public())
        for local, j in enumerate(self.global_ids):
            identity = DeviceIdentity.generate(f"{self.cfg.tag}-{j:07d}")
            request_id = f"{self.cfg.tag}.{j:07d}"
            csr = build_csr(identity.private_key, identity.hardware_id) if self.cfg.certificate else None
            claim = build_claim(
                identity, self.cfg.provision_key, request_id, hardware=BENCH_HARDWARE, cloud_key_id=cloud_kid, csr=csr
            )
            lane = self.lanes[local % len(self.lanes)]
            self.devices.append(_Device(identity, request_id, to_json(claim), lane))

    def _cloud_public(self) -> ec.EllipticCurvePublicKey:
        assert self.cfg.cloud_key_pem is not None
        key = serialization.load_pem_public_key(self.cfg.cloud_key_pem)
        assert isinstance(key, ec.EllipticCurvePublicKey)
        return key

    def connect(self) -> None:
        for lane in self.lanes:
            lane.client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
            sock = lane.client.socket()
            assert sock is not None  # connect() raises when it cannot open one
            self.selector.register(sock, selectors.EVENT_READ, lane)
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while not all(lane.subscribed for lane in self.lanes):
            failed = [lane.failed for lane in self.lanes if lane.failed]
            if failed:
                raise RuntimeError(f"lane setup failed: {failed[0]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"lanes not connected and subscribed within {CONNECT_TIMEOUT_S:.0f}s")
            self._poll(0.05)

    # -- the timed loop --

    def run(self, start_perf: float) -> tuple[float, float]:
        """Send and collect until every device has a final answer or the drain deadline passes.

        Returns (first intended send, end) on the perf_counter clock.
        """
        cfg = self.cfg
        n = len(self.devices)
        rate = cfg.offered_rate()
        interval = None if rate is None else cfg.procs / rate  # this worker's share of the schedule
        offset = 0.0 if rate is None else self.index / rate  # workers interleave on the global schedule
        while time.perf_counter() < start_perf:
            self._poll(min(0.01, max(0.0, start_perf - time.perf_counter())))
        # Bounded twice: no progress (no send, no final answer) for drain_timeout seconds ends the
        # run, and so does the hard cap, however the run is going.
        hard_stop = start_perf + cfg.max_run_seconds
        next_index = 0
        last_misc = time.monotonic()
        while self.done < n:
            now = time.perf_counter()
            if now > hard_stop or now - max(self.last_progress, start_perf) > cfg.drain_timeout:
                break
            if interval is None:
                while next_index < n and self.outstanding < self.window:
                    self._send(next_index, now, first=True)
                    next_index += 1
            else:
                while next_index < n and start_perf + offset + next_index * interval <= now:
                    intended = start_perf + offset + next_index * interval
                    self._send(next_index, intended, first=True)
                    next_index += 1
            while self.retries and self.retries[0][0] <= now:
                _, local = heapq.heappop(self.retries)
                self._send(local, None, first=False)
            timeout = 0.05
            if interval is not None and next_index < n:
                timeout = min(timeout, start_perf + offset + next_index * interval - time.perf_counter())
            if self.retries:
                timeout = min(timeout, self.retries[0][0] - time.perf_counter())
            self._poll(max(0.0, timeout))
            if time.monotonic() - last_misc > 1.0:
                for lane in self.lanes:
                    lane.client.loop_misc()
                last_misc = time.monotonic()
            if all(lane.lost for lane in self.lanes):
                break  # nothing more can arrive
        return start_perf + offset, time.perf_counter()

    def _send(self, local: int, intended: float | None, *, first: bool) -> None:
        device = self.devices[local]
        now = time.perf_counter()
        if first:
            device.intended = now if intended is None else intended
            self.outstanding += 1
            if intended is not None and self.cfg.mode != "closed":
                self.lag.append(now - intended)
        device.sent_at = now
        device.attempts += 1
        self.last_progress = now
        lane = device.lane
        sock = lane.client.socket()
        if sock is None:
            return  # the lane is gone: this claim stays unanswered and is reported as lost
        # Outside a paho callback with no paho thread, publish() writes straight to the socket.
        lane.client.publish(lane.claim_topic, device.payload, qos=1)
        if lane.client.want_write():
            self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, lane)

    def _poll(self, timeout: float) -> None:
        for key, mask in self.selector.select(timeout):
            lane: Lane = key.data
            if mask & selectors.EVENT_READ:
                lane.client.loop_read()
            if mask & selectors.EVENT_WRITE:
                lane.client.loop_write()
            sock = lane.client.socket()
            if sock is None:
                self.selector.unregister(key.fileobj)
                continue
            # PUBACKs and re-queued packets can leave bytes to write: ask for writability only then.
            wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if lane.client.want_write() else 0)
            if wanted != key.events:
                self.selector.modify(sock, wanted, lane)

    def _on_answer(self, lane: Lane, topic: str, payload: bytes) -> None:
        now = time.perf_counter()
        if topic != lane.response_topic:
            self.unmatched += 1
            return
        try:
            doc = json.loads(payload)
            request_id = doc["request_id"]
            tag, _, number = request_id.rpartition(".")
            j = int(number)
        except (ValueError, KeyError, TypeError, AttributeError):
            self.unmatched += 1
            return
        if tag != self.cfg.tag or j % self.cfg.procs != self.index or j >= self.cfg.devices:
            self.unmatched += 1
            return
        local = j // self.cfg.procs
        device = self.devices[local]
        device.answers += 1
        if device.final is not None:
            return  # a duplicate; counted from answers vs attempts afterwards
        code = doc.get("code") if doc.get("status") == "error" else None
        if code in RETRYABLE and device.attempts < self.cfg.max_attempts:
            self.retry_answers[str(code)] += 1
            retry_after = doc.get("retry_after")
            base = float(retry_after) if isinstance(retry_after, int | float) else 1.0
            heapq.heappush(self.retries, (now + base * random.uniform(1.0, 1.25), local))
            return
        device.final = bytes(payload)
        device.final_at = now
        self.last_progress = now
        self.done += 1
        self.outstanding -= 1

    def close(self) -> None:
        for lane in self.lanes:
            lane.closing = True
            try:
                lane.client.disconnect()
                lane.client.loop_write()
            except Exception:  # best effort at the end of a run
                pass
        self.selector.close()

    # -- after the clock --

    def verify(self) -> dict[str, Any]:
        """Open every final answer; classify outcomes. Not timed."""
        outcomes: Counter[str] = Counter()
        cloud = self._cloud_public() if self.cfg.expect == "provbridge" else None
        for device in self.devices:
            if device.final is None:
                outcomes["lost"] += 1
                continue
            outcomes[self._verify_one(device, cloud)] += 1
        return dict(outcomes)

    def _verify_one(self, device: _Device, cloud: ec.EllipticCurvePublicKey | None) -> str:
        assert device.final is not None
        if self.cfg.expect == "echo":
            try:
                doc = json.loads(device.final)
            except ValueError:
                return "error:not_json"
            ok = doc.get("status") == "echo" and doc.get("request_id") == device.request_id
            return "ok" if ok else "error:bad_echo"
        assert cloud is not None
        try:
            result = open_answer(device.final, device.identity, cloud, device.request_id)
        except ClaimRejected as exc:
            return f"error:{exc.code}"
        except Exception as exc:  # a wrong seal, a malformed answer: each is a failed claim
            return f"error:{type(exc).__name__}"
        creds = result.credentials.mqtt
        credential = creds.certificate if self.cfg.certificate else creds.token
        if not result.created or creds.client_id != result.device_id or not credential:
            return "error:unexpected_answer"
        return "ok"


def _result(
    worker: Worker, first_perf: float, end_perf: float, cpu_s: float, outcomes: dict[str, Any]
) -> dict[str, Any]:
    # perf_counter -> wall clock, so several workers' timelines can be merged by the parent.
    to_wall = time.time() - time.perf_counter()
    finals = [d for d in worker.devices if d.final is not None]
    return {
        "first_send_wall": first_perf + to_wall,
        "end_wall": end_perf + to_wall,
        "latencies": [d.final_at - d.intended for d in finals],
        "final_walls": [d.final_at + to_wall for d in finals],
        "lag": worker.lag,
        "sent": sum(1 for d in worker.devices if d.attempts),
        "attempts": sum(d.attempts for d in worker.devices),
        "answers": sum(d.answers for d in worker.devices),
        "duplicates": sum(max(0, d.answers - d.attempts) for d in worker.devices),
        "multi_answered": sum(1 for d in worker.devices if d.answers > 1 and d.answers > d.attempts),
        "retried_answers": dict(worker.retry_answers),
        "unmatched": worker.unmatched,
        "answer_bytes": sum(len(d.final) for d in finals if d.final is not None),
        "outcomes": outcomes,
        "cpu_s": cpu_s,
        "lanes_lost": sum(1 for lane in worker.lanes if lane.lost),
        "lane_failures": [lane.failed for lane in worker.lanes if lane.failed][:5],
    }


def worker_main(cfg: Config, index: int, conn: Connection) -> None:
    """A worker process: prepare, report ready, wait for the common start time, run, verify, report."""
    worker = Worker(cfg, index)
    try:
        worker.prepare()
        worker.connect()
        conn.send(("ready", None))
        if not conn.poll(60):
            raise RuntimeError("no start signal from the load generator within 60 s")
        _, start_wall = conn.recv()
        start_perf = time.perf_counter() + (start_wall - time.time())
        cpu0 = time.process_time()
        first, end = worker.run(start_perf)
        cpu_s = time.process_time() - cpu0
        worker.close()
        conn.send(("done", None))
        outcomes = worker.verify()
        conn.send(("result", _result(worker, first, end, cpu_s, outcomes)))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        worker.close()
        raise SystemExit(1) from None


# --- the parent ----------------------------------------------------------------------------------


class Hooks:
    """Where the timed window starts and ends, for a harness measuring the server around it."""

    def ready(self) -> None:
        """Every lane is connected and subscribed; returns when the run may start."""

    def done(self) -> None:
        """Sending and collecting are over (verification, not timed, follows)."""


class StdioHooks(Hooks):
    """`--sync`: print READY and wait for a line on stdin; print DONE at the end of the timed window."""

    def ready(self) -> None:
        print("READY", flush=True)
        readable, _, _ = select.select([sys.stdin], [], [], 120)
        if not readable or not sys.stdin.readline():
            raise RuntimeError("--sync: no go-ahead on stdin within 120 s")

    def done(self) -> None:
        print("DONE", flush=True)


def run(cfg: Config, hooks: Hooks | None = None, start_delay: float = 0.2) -> dict[str, Any]:
    """Run all workers (in-process when procs == 1) and merge their results."""
    hooks = hooks or Hooks()
    t_setup = time.monotonic()
    ctx = multiprocessing.get_context("fork")
    pipes: list[Connection] = []
    procs: list[Any] = []
    results: list[dict[str, Any]] = []
    try:
        if cfg.procs == 1:
            results.append(_run_inline(cfg, hooks, start_delay))
        else:
            for index in range(cfg.procs):
                parent_end, child_end = ctx.Pipe()
                proc = ctx.Process(target=worker_main, args=(cfg, index, child_end), daemon=True)
                proc.start()
                pipes.append(parent_end)
                procs.append(proc)
            for pipe in pipes:
                _expect(pipe, "ready", 120)
            hooks.ready()
            start_wall = time.time() + start_delay
            for pipe in pipes:
                pipe.send(("start", start_wall))
            budget = cfg.max_run_seconds + 60
            for pipe in pipes:
                _expect(pipe, "done", budget)
            hooks.done()
            for pipe in pipes:
                results.append(_expect(pipe, "result", 600))
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    merged = merge(cfg, results)
    merged["setup_s"] = round(time.monotonic() - t_setup, 2)
    return merged


def _run_inline(cfg: Config, hooks: Hooks, start_delay: float) -> dict[str, Any]:
    worker = Worker(cfg, 0)
    try:
        worker.prepare()
        worker.connect()
        hooks.ready()
        start_perf = time.perf_counter() + start_delay
        cpu0 = time.process_time()
        first, end = worker.run(start_perf)
        cpu_s = time.process_time() - cpu0
    finally:
        worker.close()
    hooks.done()
    return _result(worker, first, end, cpu_s, worker.verify())


def _expect(pipe: Connection, kind: str, timeout: float) -> Any:
    if not pipe.poll(timeout):
        raise RuntimeError(f"a load generator worker sent no {kind!r} within {timeout:.0f}s")
    got, payload = pipe.recv()
    if got == "error":
        raise RuntimeError(f"a load generator worker failed: {payload}")
    if got != kind:
        raise RuntimeError(f"a load generator worker sent {got!r}, expected {kind!r}")
    return payload


def merge(cfg: Config, parts: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [x for p in parts for x in p["latencies"]]
    finals = sorted(x for p in parts for x in p["final_walls"])
    first = min(p["first_send_wall"] for p in parts)
    end = max(p["end_wall"] for p in parts)
    outcomes: Counter[str] = Counter()
    retried: Counter[str] = Counter()
    for p in parts:
        outcomes.update(p["outcomes"])
        retried.update(p["retried_answers"])
    answered = len(finals)
    span = (finals[-1] - first) if finals else 0.0
    mid_rate = None
    if answered >= 20:
        lo, hi = finals[answered // 10], finals[(answered * 9) // 10]
        if hi > lo:
            mid_rate = ((answered * 9) // 10 - answered // 10) / (hi - lo)
    lag = sorted(x for p in parts for x in p["lag"])
    cpu_s = sum(p["cpu_s"] for p in parts)
    ok = outcomes.get("ok", 0)
    return {
        "mode": cfg.mode,
        "expect": cfg.expect,
        "tag": cfg.tag,
        "devices": cfg.devices,
        "lanes": cfg.lanes,
        "inflight": cfg.inflight if cfg.mode == "closed" else None,
        "procs": cfg.procs,
        "offered_rate": cfg.offered_rate(),
        "sent": sum(p["sent"] for p in parts),
        "attempts": sum(p["attempts"] for p in parts),
        "answers": sum(p["answers"] for p in parts),
        "answered_devices": answered,
        "ok": ok,
        "errors": {k: v for k, v in outcomes.items() if k not in ("ok", "lost")},
        "lost": outcomes.get("lost", 0),
        "duplicates": sum(p["duplicates"] for p in parts),
        "unmatched": sum(p["unmatched"] for p in parts),
        "retried_answers": dict(retried),
        "lanes_lost": sum(p["lanes_lost"] for p in parts),
        "lane_failures": [f for p in parts for f in p["lane_failures"]][:5],
        "wall_s": round(end - first, 3),
        "span_s": round(span, 3),
        "throughput": round(answered / span, 1) if span > 0 else None,
        "throughput_mid80": round(mid_rate, 1) if mid_rate else None,
        "latency": latency_summary(latencies),
        "send_lag": latency_summary(lag) if lag else None,
        "answer_bytes_mean": round(sum(p["answer_bytes"] for p in parts) / answered, 1) if answered else None,
        "loadgen_cpu_s": round(cpu_s, 3),
        "loadgen_cpu_util": round(cpu_s / (end - first), 3) if end > first else None,
        "first_send_wall": first,
        "quantiles_ms": _quantiles(latencies),
    }


def _quantiles(latencies: list[float], points: int = 100) -> list[float]:
    """A compact latency distribution: the 1st..100th percentiles in ms, for plots and comparisons."""
    values = sorted(latencies)
    if not values:
        return []
    return [
        round(values[min(len(values) - 1, max(0, int(q / points * len(values)) - 1))] * 1000, 3)
        for q in range(1, points + 1)
    ]


# --- command line --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--prefix", default=topics.DEFAULT_PREFIX)
    p.add_argument("--mode", choices=["closed", "open", "herd"], default="closed")
    p.add_argument("--devices", type=int, default=10_000, help="claims (each by a distinct device) in this run")
    p.add_argument("--tag", default=None, help="prefix of hardware ids and request ids (default: random)")
    p.add_argument("--lanes", type=int, default=32, help="MQTT connections the claims are multiplexed over")
    p.add_argument("--inflight", type=int, default=32, help="closed loop: claims outstanding at once")
    p.add_argument("--rate", type=float, default=None, help="open loop: offered claims per second")
    p.add_argument("--herd-seconds", type=float, default=1.0, help="herd: spread all claims over this long")
    p.add_argument("--procs", type=int, default=1, help="load generator worker processes")
    p.add_argument("--expect", choices=["provbridge", "echo"], default="provbridge")
    p.add_argument("--cloud-key", type=Path, default=None, help="cloud_public.pem of the bridge's data dir")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="give up after this long without progress")
    p.add_argument("--max-seconds", type=float, default=900.0, help="hard cap on the timed run")
    p.add_argument("--max-attempts", type=int, default=5, help="sends per claim, retryable errors included")
    p.add_argument("--claim-username", default=None, help="username for provisioning connections, if required")
    p.add_argument(
        "--certificate", action="store_true", help="claims carry a CSR: the key issues certificates, not tokens"
    )
    p.add_argument("--out", type=Path, default=None, help="write the result JSON here (default: stdout)")
    p.add_argument("--sync", action="store_true", help="print READY, wait for a line on stdin, print DONE")
    args = p.parse_args(argv)
    if args.sync and args.out is None:
        p.error("--sync needs --out: stdout carries the READY/DONE lines")
    if args.mode == "open" and not args.rate:
        p.error("--mode open needs --rate")
    if args.expect == "provbridge" and args.cloud_key is None:
        p.error("--expect provbridge needs --cloud-key to open the sealed answers")
    if args.devices < 1 or args.lanes < 1 or args.inflight < 1 or args.procs < 1:
        p.error("--devices, --lanes, --inflight and --procs must be at least 1")
    if args.lanes < args.procs:
        p.error("--lanes must be at least --procs (each worker needs its own lanes)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    key = os.environ.get(KEY_ENV)
    if not key:
        print(f"loadgen: set the provisioning key in {KEY_ENV}", file=sys.stderr)
        return 2
    tag = args.tag or f"b{random.getrandbits(32):08x}"
    if not topics.is_valid_client_id(f"bl-{tag}-0-0") or "/" in tag or "." in tag:
        print("loadgen: --tag must be letters, digits, '-' or '_'", file=sys.stderr)
        return 2
    cfg = Config(
        host=args.host,
        port=args.port,
        prefix=args.prefix,
        mode=args.mode,
        devices=args.devices,
        tag=tag,
        lanes=args.lanes,
        inflight=args.inflight,
        rate=args.rate,
        herd_seconds=args.herd_seconds,
        procs=args.procs,
        expect=args.expect,
        cloud_key_pem=args.cloud_key.read_bytes() if args.cloud_key else None,
        provision_key=key,
        drain_timeout=args.drain_timeout,
        max_attempts=args.max_attempts,
        claim_username=args.claim_username,
        max_run_seconds=args.max_seconds,
        certificate=args.certificate,
    )
    result = run(cfg, StdioHooks() if args.sync else None)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        print(text)
    lat = result["latency"]
    print(
        f"loadgen {cfg.mode} {cfg.expect}: {result['ok']}/{cfg.devices} ok, lost {result['lost']},"
        f" errors {result['errors'] or 0}, {result['throughput']} claims/s,"
        f" p50 {lat['p50_ms']} ms p99 {lat['p99_ms']} ms, loadgen cpu {result['loadgen_cpu_util']}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
