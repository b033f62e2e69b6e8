"""Acceptance 9: no raw provisioning key, API key, token or private key in logs, events or the database."""

import base64
import json
import logging

import pytest

from provwire.models import ClaimOk
from tests.helpers.bridge import Bridge
from tests.helpers.devices import Device


def test_no_secret_appears_in_logs_events_or_database(bridge: Bridge, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    one_time = bridge.create_key(max_registrations=1)
    secrets: list[str] = [bridge.provision_key, one_time]
    for key in (bridge.provision_key, one_time, one_time, "pk_guessed-key-that-does-not-exist"):
        with Device(bridge) as device:
            answer = device.claim(key)
            if isinstance(answer, ClaimOk):
                creds = device.open(answer)
                secrets += [creds.api_key, creds.mqtt.token]
                device.claim(key)  # a re-claim mints another token
    secrets.append("pk_guessed-key-that-does-not-exist")
    secrets.append((bridge.settings.data_dir / "bridge.secret").read_text().strip())
    private_keys = [p.read_text() for p in bridge.settings.data_dir.glob("keys/*.pem")]
    for pem in private_keys:
        body = "".join(line for line in pem.splitlines() if not line.startswith("-----"))
        secrets.append(body)
        der = base64.b64decode(body)
        secrets.append(der[36:68].hex())  # the raw scalar of a PKCS#8 P-256 key
    assert len([s for s in secrets if s.startswith("dk_")]) == 2

    bridge.store.connection().execute("PRAGMA wal_checkpoint(FULL)")
    haystacks = {
        "logs": caplog.text,
        "events": json.dumps(bridge.store.events(limit=10_000)),
        "database": b"".join(p.read_bytes() for p in bridge.settings.data_dir.glob("provbridge.db*")).decode("latin-1"),
    }
    for where, text in haystacks.items():
        for secret in secrets:
            assert secret not in text, f"a secret ({secret[:6]}...) appears in the {where}"
    assert "device.provisioned" in haystacks["events"]  # the scan looked at real content
