"""Structured logs: JSON lines, and the request id on every line of a claim's or a refresh's life."""

import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bridge import logs
from bridge.claims.provisioning import Provisioner
from bridge.claims.refresh import Refresher
from bridge.config import Settings
from bridge.ops import admin
from bridge.storage import keyfiles
from bridge.storage.store import Store
from provwire import crypto, topics
from provwire.models import ClaimError, ClaimOk, Credentials
from tests.helpers.bridge import Bridge
from tests.helpers.devices import Device
from tests.helpers.mqtt import MqttClient
from tests.helpers.waiting import wait_for

WAIT_SECONDS = 10.0


class Lines(logging.Handler):
    """The formatted lines a handler built by `logs.make_handler` writes."""

    def __init__(self, log_format: logs.LogFormat) -> None:
        super().__init__(logging.DEBUG)
        self.stream = io.StringIO()
        self.inner = logs.make_handler(log_format, self.stream)

    def emit(self, record: logging.LogRecord) -> None:
        self.inner.handle(record)  # its filter, its formatter, its stream: the real path

    @property
    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()


@contextmanager
def captured(log_format: logs.LogFormat, level: int = logging.INFO) -> Iterator[Lines]:
    handler = Lines(log_format)
    root, provbridge = logging.getLogger(), logging.getLogger("provbridge")
    old_level = provbridge.level
    root.addHandler(handler)
    provbridge.setLevel(level)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        provbridge.setLevel(old_level)


def test_every_line_of_a_claims_life_carries_its_request_id_as_json(bridge: Bridge) -> None:
    sent: dict[str, str] = {}  # request id -> the client id it came from
    secrets = [bridge.provision_key]
    with captured("json") as capture:
        with Device(bridge) as device:
            rid = f"r-ok-{uuid.uuid4().hex[:8]}"
            answer = device.claim(bridge.provision_key, rid)
            assert isinstance(answer, ClaimOk)
            creds: Credentials = device.open(answer)
            secrets += [creds.api_key, creds.mqtt.token]
            sent[rid] = device.client_id
        with Device(bridge) as refused:
            rid = f"r-no-{uuid.uuid4().hex[:8]}"
            assert isinstance(refused.claim("pk_" + "B" * 43, rid), ClaimError)
            sent[rid] = refused.client_id
        with Device(bridge) as invalid:
            rid = f"r-bad-{uuid.uuid4().hex[:8]}"
            bad = json.loads(invalid.claim_payload(bridge.provision_key, rid))
            bad["hardware"] = {"cpu_cores": "4"}
            assert ClaimError.model_validate_json(invalid.send(json.dumps(bad).encode())).request_id == rid
            sent[rid] = invalid.client_id

        refresher_id = f"refresh-{uuid.uuid4().hex[:8]}"
        with MqttClient(bridge.port, refresher_id) as conn:
            assert conn.connect() and conn.subscribe(topics.response_topic(bridge.prefix, refresher_id)) == [1]
            rid, now = f"r-rf-{uuid.uuid4().hex[:8]}", int(time.time())
            cloud = bridge.keys.cloud[answer.cloud_key_id].public_key()
            device_key = crypto.derive_device_key(crypto.shared_secret(device.private_key, cloud))
            mac = crypto.b64encode(crypto.refresh_mac(device_key, answer.device_id, rid, now))
            request = {"request_id": rid, "device_id": answer.device_id, "timestamp": now, "mac": mac}
            conn.publish(topics.token_topic(bridge.prefix, refresher_id), json.dumps(request).encode())
            renewed = ClaimOk.model_validate_json(conn.next_message()[1])
            secrets.append(device.open(renewed).mqtt.token)
            sent[rid] = refresher_id

        def claim_lines(lines: list[str]) -> list[dict[str, Any]]:
            parsed = [json.loads(line) for line in lines]  # every line is one JSON object
            return [p for p in parsed if any(f"/{cid}:" in p["message"] for cid in sent.values())]

        # The edge may log a claim's outcome just after the device got its answer: wait for the line.
        assert wait_for(lambda: len(claim_lines(capture.lines)) >= len(sent), timeout=WAIT_SECONDS), capture.lines

    records = [json.loads(line) for line in capture.lines]
    for record in records:
        assert set(record) >= {"time", "level", "logger", "message"}, record
        assert record["time"].endswith("Z") and record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR")
    for record in claim_lines(capture.lines):
        cid = record["message"].rsplit("/", 1)[1].split(":")[0]
        assert record.get("request_id") in sent and sent[record["request_id"]] == cid, record
    tagged = {r["request_id"] for r in records if "request_id" in r}
    assert tagged == set(sent)  # each request tagged its lines, and nothing else was tagged
    text = "\n".join(capture.lines)
    for secret in secrets:
        assert secret not in text


def test_lines_logged_inside_the_handlers_carry_the_request_id(settings: Settings) -> None:
    store = Store(settings.database)
    keys = keyfiles.load_keys(settings.data_dir)
    key = admin.create_key(store, settings, admin.KeySpec("default", "logs"), int(time.time()))[1]
    private = crypto.generate_private_key()
    claim = {
        "request_id": "r-storage-0001",
        "provision_key": key,
        "hardware_id": "hw-logs",
        "public_key": crypto.b64encode(crypto.sec1(private.public_key())),
    }
    refresh = {"request_id": "r-storage-0002", "device_id": "dev_" + "a" * 26, "timestamp": 1, "mac": "A" * 43 + "="}
    store.close()
    settings.database_file.write_bytes(b"this is not a database" * 100)  # the storage fails for real
    with captured("json") as capture:
        provisioner, refresher = Provisioner(settings, store, keys), Refresher(settings, store, keys)
        claimed = provisioner.handle("prov/v1/claim/c-logs", json.dumps(claim).encode())
        refreshed = refresher.handle("prov/v1/token/c-logs", json.dumps(refresh).encode())
    assert json.loads(claimed.answer or b"")["code"] == json.loads(refreshed.answer or b"")["code"] == "internal_error"
    records = [json.loads(line) for line in capture.lines]
    assert [(r["logger"], r["level"], r["request_id"]) for r in records] == [
        ("provbridge.claims", "ERROR", "r-storage-0001"),
        ("provbridge.refresh", "ERROR", "r-storage-0002"),
    ]
    assert key not in "\n".join(capture.lines)


def test_a_new_message_unbinds_the_previous_request_and_threads_do_not_mix(settings: Settings) -> None:
    store = Store(settings.database)
    provisioner = Provisioner(settings, store, keyfiles.load_keys(settings.data_dir))
    provisioner.handle("prov/v1/claim/c-1", b'{"request_id": "r-first-0001"}')
    assert logs.current_request_id() == "r-first-0001"  # still bound: the edge logs the outcome next
    provisioner.handle("prov/v1/claim/c-2", b"not json")
    assert logs.current_request_id() is None  # an unreadable claim belongs to no request id
    provisioner.handle("prov/v1/claim/c-1", b'{"request_id": "r-again-0001"}')
    with logs.request_scope():
        provisioner.handle("prov/v1/claim/c-3", b'{"request_id": "r-scoped-001"}')
        assert logs.current_request_id() == "r-scoped-001"
    assert logs.current_request_id() == "r-again-0001"  # the scope ended, the outer binding is back
    logs.bind_request_id(None)

    start = threading.Barrier(2)
    log = logging.getLogger("provbridge.test")

    def worker(request_id: str) -> None:
        logs.bind_request_id(request_id)
        start.wait()  # both bound before either logs
        for _ in range(20):
            log.info("working on %s", request_id)

    with captured("json") as capture:
        threads = [threading.Thread(target=worker, args=(f"r-thread-{n}xx",)) for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    records = [json.loads(line) for line in capture.lines]
    assert len(records) == 40
    assert all(r["message"] == f"working on {r['request_id']}" for r in records)
    assert logs.current_request_id() is None  # the workers' bindings stayed on their threads
    store.close()


def test_json_lines_stay_one_ascii_line_whatever_the_message() -> None:
    stream = io.StringIO()
    handler = logs.make_handler("json", stream)
    record = logging.LogRecord("provbridge.x", logging.WARNING, __file__, 1, "a\nb \ud800 \u202e %s", ("é",), None)
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record.exc_info = sys.exc_info()
    handler.handle(record)
    (line,) = stream.getvalue().splitlines()
    assert line.isascii()
    data = json.loads(line)
    assert data["message"] == "a\nb \ud800 \u202e é" and "ValueError: boom" in data["exception"]
    assert "request_id" not in data

    text = io.StringIO()
    logs.bind_request_id("r-text-00001")
    try:
        logs.make_handler("text", text).handle(logging.LogRecord("provbridge.y", logging.INFO, "", 1, "hi", (), None))
    finally:
        logs.bind_request_id(None)
    assert text.getvalue().rstrip().endswith(" INFO provbridge.y [r-text-00001]: hi")


def test_the_cli_logs_json_lines_when_log_format_is_json(settings: Settings) -> None:
    env = {**os.environ, "PROVBRIDGE_LOG_FORMAT": "json", "PROVBRIDGE_LOG_LEVEL": "DEBUG"}
    args = [sys.executable, "-m", "bridge.cli.main", "--data-dir", str(settings.data_dir), "keys", "rotate", "--token"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, cwd=Path(__file__).parents[1], check=True)
    (settings.data_dir.parent / "cli.log").write_text(done.stdout + done.stderr)  # for the whole-suite secret scan
    log_lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert any(r["logger"] == "provbridge.keys" and r["message"].startswith("rotated") for r in log_lines)
    assert "token key" in done.stdout  # the command's own output is still there, after the log
