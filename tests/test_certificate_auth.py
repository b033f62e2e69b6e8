"""Issue 11 item 3, the broker side: devices that authenticate with a client certificate of the device CA.

The same tests on the embedded broker and on a real Mosquitto 2.0 with the provbridge_jwt plugin, both
started as `serve` / `mosquitto-config` start them, with TLS and a device CA in the data dir, so the
certificate listener (`broker.certificate_port`) is on by `certificate_listen = "auto"`:

- a certificate of the device CA lets its device in, on its scope alone (CN = username = client id);
- a certificate of another CA (the server CA included) gets no further than the TLS handshake;
- one without the scope extension, or with a malformed one, or whose CN is not the client id or the
  username, is refused at CONNECT (both brokers can: see docs/SECURITY.md 3.6 for Mosquitto);
- `device revoke` refuses the next CONNECT and ends the live session; notAfter ends what it grants;
- after `device reset` or `device reinstate` the certificates signed before are refused by serial (and their
  sessions ended), new ones accepted (issue 12);
- token devices and their listeners are unaffected.

Real brokers on 127.0.0.1, real paho clients over TLS; waits poll with generous deadlines, nothing is timed.
"""

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from bridge.config import Settings
from bridge.storage.records import IssuedCertificate
from bridge.tls import certificates as tls
from bridge.tls.device_ca import DeviceCa, DeviceScope, create_device_ca, new_device_ca
from tests.helpers.bridge import Bridge
from tests.helpers.brokers import EMBEDDED, JWT, bridge_on
from tests.helpers.certificates import (
    DeviceCertificate,
    issue,
    issue_raw,
    load_ca,
    scope_extension,
    scope_json,
)
from tests.helpers.cli import run_cli
from tests.helpers.mqtt import MqttClient, token_session
from tests.helpers.network import free_ports
from tests.helpers.refresh import provisioned
from tests.helpers.waiting import wait_for

NOT_AUTHORIZED = 0x87  # paho reports the MQTT 3.1.1 CONNACK return code 5 "not authorized" so
SUBACK_FAILURE = 0x80
BASE32 = "abcdefghijklmnopqrstuvwxyz234567"


@dataclass
class CertificateBroker:
    bridge: Bridge
    device_ca: DeviceCa
    certs: Path  # where the tests' device keys and certificates go

    @property
    def settings(self) -> Settings:
        return self.bridge.settings

    @property
    def kind(self) -> str:
        return EMBEDDED if self.settings.broker.mode == "embedded" else JWT

    def issue(
        self, device_id: str, scope: DeviceScope | None = None, validity_seconds: int = 3600
    ) -> DeviceCertificate:
        return issue(self.certs, self.device_ca, device_id, scope, validity_seconds)

    def client(
        self, cert: DeviceCertificate, *, client_id: str | None = None, username: str | None = "", port: int = 0
    ) -> MqttClient:
        """A TLS client to the certificate listener presenting `cert`; username and client id its CN unless given."""
        return MqttClient(
            port or self.settings.broker.certificate_port,
            cert.device_id if client_id is None else client_id,
            cert.device_id if username == "" else username,
            ca_file=tls.TlsFiles.of(self.settings.data_dir).ca_cert,
            client_certificate=cert.files,
        )

    def session(self, cert: DeviceCertificate) -> MqttClient:
        conn = self.client(cert)
        assert conn.connect(), f"{self.kind}: the device certificate of {cert.device_id} was refused"
        return conn


def new_device_id() -> str:
    return "dev_" + "".join(secrets.choice(BASE32) for _ in range(26))


@pytest.fixture(params=[EMBEDDED, JWT])
def broker(
    request: pytest.FixtureRequest, initialised: tuple[Settings, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[CertificateBroker]:
    settings, key = initialised
    tls_port, certificate_port = free_ports(2, taken=(settings.broker.port,))
    ports = {
        "tls_port": tls_port,
        "certificate_port": certificate_port,
        "tls_listen": "auto",
        "certificate_listen": "auto",
    }
    settings = settings.model_copy(update={"broker": settings.broker.model_copy(update=ports)})
    tls.ensure_tls(settings)  # `provbridge tls init`: the server CA and certificate
    device_ca = create_device_ca(settings.data_dir, datetime.now(UTC))
    assert tls.certificate_listener_enabled(settings)
    with bridge_on(request.param, (settings, key), monkeypatch, **ports) as bridge:
        yield CertificateBroker(bridge, device_ca, tmp_path / "device-certs")


def echo(conn: MqttClient, device_id: str, payload: bytes) -> None:
    topic = f"devices/{device_id}/up"
    conn.publish(topic, payload)
    assert conn.next_message()[:2] == (topic, payload)


# --- a device certificate, and what it grants ---------------------------------------------------


def test_a_device_certificate_connects_and_publishes_in_its_scope_only(broker: CertificateBroker) -> None:
    device_id = new_device_id()
    # A wider subscriber: a certificate whose scope may read every device's topics.
    watcher = broker.issue(new_device_id(), DeviceScope(publish=(), subscribe=("devices/#",)))
    with broker.session(watcher) as wide, broker.session(broker.issue(device_id)) as device:
        assert wide.subscribe("devices/#") == [1]
        assert device.subscribe(f"devices/{device_id}/#") == [1]
        echo(device, device_id, b"in scope")
        assert wide.next_message()[:2] == (f"devices/{device_id}/up", b"in scope")

        # Outside its scope: subscriptions fail, publishes go nowhere.
        assert device.subscribe("devices/#", "#", f"devices/{new_device_id()}/#") == [SUBACK_FAILURE] * 3
        device.publish(f"devices/{new_device_id()}/up", b"out of scope")
        device.publish("elsewhere/up", b"out of scope")
        device.publish(f"devices/{device_id}/up", b"marker")  # in order after the refused ones
        assert wide.next_message()[:2] == (f"devices/{device_id}/up", b"marker")
        # The watcher may not publish at all.
        wide.publish(f"devices/{device_id}/up", b"from the watcher")
        assert device.next_message()[:2] == (f"devices/{device_id}/up", b"marker")
        echo(device, device_id, b"after")
        assert wide.next_message()[:2] == (f"devices/{device_id}/up", b"after")


def test_certificates_of_another_ca_are_refused_at_the_tls_handshake(broker: CertificateBroker) -> None:
    device_id = new_device_id()
    files = tls.TlsFiles.of(broker.settings.data_dir)
    server_ca, server_ca_key = load_ca(files.ca_cert, files.ca_key)
    other = new_device_ca(datetime.now(UTC))
    scope = scope_json(f'{{"pub":["devices/{device_id}/#"],"sub":["devices/{device_id}/#"]}}')
    for issuer, issuer_key in ((server_ca, server_ca_key), (other.certificate, other.key)):
        cert = issue_raw(broker.certs, issuer, issuer_key, device_id, [scope])
        assert broker.client(cert).connack() is None, f"{broker.kind}: {issuer.subject} must not be trusted"
    # Nor does the certificate listener take a client without a certificate (a token device, say).
    bare = MqttClient(broker.settings.broker.certificate_port, device_id, device_id, "x", ca_file=files.ca_cert)
    assert bare.connack() is None
    with broker.client(broker.issue(device_id)) as own:
        assert own.connect()  # the device CA's own is fine


@pytest.mark.parametrize(
    "extensions",
    [
        pytest.param([], id="no scope extension"),
        pytest.param([scope_json("pub, sub")], id="not JSON"),
        pytest.param([scope_json('{"pub":[],"pub":["#"],"sub":["#"]}')], id="a member twice"),
        pytest.param([scope_json('{"pub":["#"],"sub":["#"],"ver":1}')], id="another member"),
        pytest.param([scope_json('{"pub":["a/#/b"],"sub":[]}')], id="not a filter"),
        pytest.param([scope_extension(b"\x04\x02{}")], id="not a UTF8String"),
        pytest.param([scope_extension(b"\x0c\x81\x02{}")], id="not DER"),
    ],
)
def test_a_certificate_without_a_well_formed_scope_is_refused(
    broker: CertificateBroker, extensions: list[tuple[x509.ExtensionType, bool]]
) -> None:
    device_id = new_device_id()
    cert = issue_raw(broker.certs, broker.device_ca.certificate, broker.device_ca.key, device_id, extensions)
    assert broker.client(cert).connack() == NOT_AUTHORIZED


def test_the_client_id_and_username_must_be_the_certificates_cn(broker: CertificateBroker) -> None:
    device_id = new_device_id()
    cert = broker.issue(device_id)
    other = new_device_id()
    assert broker.client(cert, client_id=other).connack() == NOT_AUTHORIZED
    assert broker.client(cert, client_id=other, username=other).connack() == NOT_AUTHORIZED
    assert broker.client(cert, username=other).connack() == NOT_AUTHORIZED
    assert broker.client(cert, username=None).connack() == NOT_AUTHORIZED  # no provisioning rights here either
    assert broker.client(cert, username="provision").connack() == NOT_AUTHORIZED
    with broker.client(cert) as conn:
        assert conn.connect()


# --- revocation and expiry --------------------------------------------------------------------


def test_revoke_refuses_the_next_connect_and_ends_the_live_session(broker: CertificateBroker) -> None:
    revoked, _ = provisioned(broker.bridge)
    kept, kept_creds = provisioned(broker.bridge)
    cert, kept_cert = broker.issue(revoked.device_id), broker.issue(kept.device_id)
    with broker.session(cert) as live, broker.session(kept_cert) as other:
        assert live.subscribe(f"devices/{revoked.device_id}/#") == [1]
        assert other.subscribe(f"devices/{kept.device_id}/#") == [1]
        echo(live, revoked.device_id, b"before")

        assert run_cli(broker.settings, "device", "revoke", revoked.device_id) == 0

        assert live.disconnected.wait(30), f"{broker.kind}: revocation must end the certificate session"
        echo(other, kept.device_id, b"still here")
        assert not other.disconnected.is_set()
    assert broker.client(cert).connack() == NOT_AUTHORIZED
    assert broker.client(broker.issue(revoked.device_id)).connack() == NOT_AUTHORIZED  # a new one too
    with broker.client(kept_cert) as conn:
        assert conn.connect()
    # The kept device's token still works on the plain listener: revocation is per device, not per listener.
    with token_session(broker.bridge.port, kept_creds.mqtt) as token:
        assert token.subscribe(f"devices/{kept.device_id}/#") == [1]
        echo(token, kept.device_id, b"token")


@pytest.mark.parametrize("command", ["reset", "reinstate"])
def test_certificates_held_before_a_reset_or_reinstatement_are_refused(broker: CertificateBroker, command: str) -> None:
    device, _ = provisioned(broker.bridge)
    old = broker.issue(device.device_id)
    with broker.bridge.store.transaction() as tx:  # as the claim path records a certificate it signs
        tx.record_certificate(
            IssuedCertificate(format(old.serial, "x"), device.device_id, "r-test", 0, int(old.not_after.timestamp()), 0)
        )
    with broker.session(old) as live:
        assert live.subscribe(f"devices/{device.device_id}/#") == [1]
        echo(live, device.device_id, b"before")
        if command == "reinstate":
            assert run_cli(broker.settings, "device", "revoke", device.device_id) == 0
        assert run_cli(broker.settings, "device", command, device.device_id) == 0
        assert live.disconnected.wait(30), f"{broker.kind}: the session of a certificate signed before must end"
    assert broker.client(old).connack() == NOT_AUTHORIZED
    with broker.session(broker.issue(device.device_id)) as conn:  # signed after: not listed
        assert conn.subscribe(f"devices/{device.device_id}/#") == [1]
        echo(conn, device.device_id, b"a new certificate")


def test_what_a_certificate_grants_ends_at_its_not_after(broker: CertificateBroker) -> None:
    device_id = new_device_id()
    ca = broker.device_ca
    scope = scope_json(f'{{"pub":["devices/{device_id}/#"],"sub":["devices/{device_id}/#"]}}')
    not_after = datetime.now(UTC) + timedelta(seconds=6)  # shorter than the device CA signs: a raw one
    cert = issue_raw(broker.certs, ca.certificate, ca.key, device_id, [scope], not_after=not_after)
    with broker.session(cert) as live:
        assert live.subscribe(f"devices/{device_id}/#") == [1]
        echo(live, device_id, b"valid")

        def ended() -> bool:
            # Mosquitto ends the session on its next tick; the embedded broker refuses its every packet.
            if live.disconnected.is_set():
                return True
            try:
                return live.subscribe(f"devices/{device_id}/#") == [SUBACK_FAILURE]
            except AssertionError:  # no SUBACK: the session ended while the SUBSCRIBE was on its way
                return live.disconnected.is_set()

        assert wait_for(ended, timeout=60, interval=0.5), f"{broker.kind}: notAfter passed, the grant did not end"
        if broker.kind == JWT:
            assert live.disconnected.wait(30)
    assert broker.client(cert).connack() is None  # OpenSSL refuses the expired certificate in the handshake


# --- token devices are unaffected ---------------------------------------------------------------


def test_token_devices_and_their_listeners_are_unaffected(broker: CertificateBroker) -> None:
    device, creds = provisioned(broker.bridge)
    cert_device = new_device_id()
    with token_session(broker.bridge.port, creds.mqtt) as token, broker.session(broker.issue(cert_device)) as cert:
        assert token.subscribe(f"devices/{device.device_id}/#") == [1]
        assert cert.subscribe(f"devices/{cert_device}/#") == [1]
        echo(token, device.device_id, b"token")
        echo(cert, cert_device, b"certificate")
        echo(token, device.device_id, b"token again")
    # The TLS listener still takes tokens, with no client certificate.
    ca_file = tls.TlsFiles.of(broker.settings.data_dir).ca_cert
    with MqttClient(
        broker.settings.broker.tls_port, device.device_id, device.device_id, creds.mqtt.token, ca_file=ca_file
    ) as over_tls:
        assert over_tls.connect()
        assert over_tls.subscribe(f"devices/{device.device_id}/#") == [1]
        echo(over_tls, device.device_id, b"token over TLS")
    # A token is no credential on the certificate listener: a certificate is, whatever the password says.
    other = broker.issue(new_device_id())
    token_with_other_cert = MqttClient(
        broker.settings.broker.certificate_port,
        device.device_id,
        device.device_id,
        creds.mqtt.token,
        ca_file=ca_file,
        client_certificate=other.files,
    )
    assert token_with_other_cert.connack() == NOT_AUTHORIZED
