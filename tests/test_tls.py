"""Issue 3, TLS: the private CA and server certificate, the settings rules, and the whole flow over TLS.

Real certificates (cryptography), real handshakes (Python's ssl, paho), the real embedded broker and
bridge on loopback, the simulator's device code. No test asserts on timing.
"""

import asyncio
import json
import logging
import os
import socket
import ssl
import stat
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from bridge.cli import main as cli
from bridge.config import Settings
from bridge.edges.serve import embedded_broker_settings, serve
from bridge.errors import ConfigError, NotInitialised, UsageError
from bridge.storage import keyfiles
from bridge.tls import certificates as tls
from broker.embedded import broker_config
from device_sim.device import DeviceIdentity, claim_over_mqtt, connect_with_token
from device_sim.errors import ConnectError
from tests.helpers.mosquitto import mosquitto_bridge
from tests.helpers.raw_mqtt import connect_packet
from tests.helpers.tls import initialise, running, tls_settings

TIMEOUT = 10.0


# --- helpers ----------------------------------------------------------------------------------


def files_of(settings: Settings) -> tls.TlsFiles:
    return tls.TlsFiles.of(settings.data_dir)


def cloud_key(settings: Settings) -> ec.EllipticCurvePublicKey:
    return keyfiles.load_keys(settings.data_dir).cloud_key.public_key()


def handshake(port: int, context: ssl.SSLContext, server_hostname: str = "127.0.0.1") -> str:
    """A bare TLS handshake with the broker; returns the negotiated version. Raises ssl.SSLError."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as tls_sock,
    ):
        return str(tls_sock.version())


def pinned_context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))  # CERT_REQUIRED, hostname checked, this CA only


# --- the certificates -------------------------------------------------------------------------


def test_generated_ca_and_server_certificate_verify(tmp_path: Path) -> None:
    settings = tls_settings(tmp_path / "data", host="0.0.0.0", advertise_host="mqtt.example.com")
    initialise(settings, tls_files=False)
    result = tls.ensure_tls(settings, ["10.1.2.3", "broker.internal"])
    files = files_of(settings)
    assert result.ca_created and result.server_created and result.ca_file == files.ca_cert
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())

    # The CA: P-256, CA:true with path length 0 (it signs servers only), certSign, long-lived.
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and not usage.value.digital_signature
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > timedelta(days=10 * 365)

    # The server certificate: P-256, not a CA, serverAuth, the loopback names, 0.0.0.0 left out.
    assert server.public_key().curve.name == "secp256r1"
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert server.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "mqtt.example.com", "broker.internal"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ip_address(a) for a in ("127.0.0.1", "::1", "10.1.2.3")}
    assert server.not_valid_after_utc <= ca.not_valid_after_utc
    assert server.not_valid_after_utc - datetime.now(UTC) > timedelta(days=360)

    # The chain verifies for every name, the way a strict (RFC 5280) client checks it.
    verifier_store = verification.Store([ca])
    for name in result.server_names:
        try:
            subject: x509.GeneralName = x509.IPAddress(ip_address(name))
        except ValueError:
            subject = x509.DNSName(name)
        verifier = verification.PolicyBuilder().store(verifier_store).build_server_verifier(subject)
        assert verifier.verify(server, []) is not None
    with pytest.raises(verification.VerificationError):
        verification.PolicyBuilder().store(verifier_store).build_server_verifier(
            x509.DNSName("elsewhere.example")
        ).verify(server, [])

    # Private keys are the owner's only; certificates are public; the directory is closed.
    for key_file in (files.ca_key, files.server_key):
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    for cert_file in (files.ca_cert, files.server_cert):
        assert not stat.S_IMODE(cert_file.stat().st_mode) & 0o022
    assert stat.S_IMODE(files.directory.stat().st_mode) == 0o700
    assert sorted(p.name for p in files.directory.iterdir()) == ["ca.key", "ca.pem", "server.key", "server.pem"]


def test_tls_init_is_idempotent_force_renews_under_the_same_ca_and_new_ca_replaces_it(tmp_path: Path) -> None:
    settings = tls_settings(tmp_path / "data")
    initialise(settings, tls_files=False)
    first = tls.ensure_tls(settings, ["mqtt.example.com"])
    files = files_of(settings)
    before = {p.name: p.read_bytes() for p in files.directory.iterdir()}

    again = tls.ensure_tls(settings)
    assert not again.changed and {p.name: p.read_bytes() for p in files.directory.iterdir()} == before
    asked = tls.ensure_tls(settings, ["10.9.9.9"])  # kept, and says which name it lacks
    assert not asked.changed and asked.missing_names == ["10.9.9.9"]

    renewed = tls.ensure_tls(settings, ["10.9.9.9"], force=True)
    assert renewed.server_created and not renewed.ca_created
    assert files.ca_cert.read_bytes() == before["ca.pem"] and files.ca_key.read_bytes() == before["ca.key"]
    assert files.server_key.read_bytes() != before["server.key"]
    assert set(renewed.server_names) == {*first.server_names, "10.9.9.9"}  # a renewal keeps the names
    ca = x509.load_pem_x509_certificate(before["ca.pem"])
    assert tls.issued_by(x509.load_pem_x509_certificate(files.server_cert.read_bytes()), ca)

    replaced = tls.ensure_tls(settings, replace_ca=True)
    assert replaced.ca_created and replaced.server_created
    assert replaced.ca_fingerprint != first.ca_fingerprint
    assert set(replaced.server_names) == set(renewed.server_names)


def test_ca_key_may_be_kept_offline_until_a_certificate_must_be_issued(tmp_path: Path) -> None:
    settings = tls_settings(tmp_path / "data")
    initialise(settings)
    files = files_of(settings)
    offline = tmp_path / "ca.key.offline"
    files.ca_key.replace(offline)
    assert not tls.ensure_tls(settings).changed
    with pytest.raises(ConfigError, match=r"ca\.key is missing"):
        tls.ensure_tls(settings, force=True)
    offline.replace(files.ca_key)
    assert tls.ensure_tls(settings, force=True).server_created


def test_a_lost_ca_is_never_silently_replaced(tmp_path: Path) -> None:
    settings = tls_settings(tmp_path / "data")
    initialise(settings)
    files = files_of(settings)
    files.ca_cert.unlink()
    files.ca_key.unlink()
    with pytest.raises(ConfigError, match="--new-ca"):
        tls.ensure_tls(settings)
    assert tls.ensure_tls(settings, replace_ca=True).ca_created


def test_tls_init_needs_an_initialised_data_dir_and_valid_names(tmp_path: Path) -> None:
    settings = tls_settings(tmp_path / "data")
    with pytest.raises(NotInitialised):
        tls.ensure_tls(settings)
    with pytest.raises(NotInitialised, match="tls init"):
        tls.tls_status(settings.data_dir)
    initialise(settings, tls_files=False)
    for bad in ("bad name", "-x.example", "a/b", ""):
        with pytest.raises(UsageError):
            tls.general_name(bad)
    with pytest.raises(UsageError):
        tls.ensure_tls(settings, ["under_score.example!"])
    assert not files_of(settings).server_cert.exists()


def test_cli_init_tls_tls_init_and_tls_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = tmp_path / "data"
    assert cli.main(["--data-dir", str(data_dir), "init", "--tls", "--tls-san", "mqtt.example.com", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["created"] and out["tls"]["ca_created"] and "mqtt.example.com" in out["tls"]["server_names"]
    assert "PRIVATE KEY" not in json.dumps(out)

    assert cli.main(["--data-dir", str(data_dir), "init", "--tls", "--json"]) == 0
    assert not json.loads(capsys.readouterr().out)["tls"]["changed"]
    assert cli.main(["--data-dir", str(data_dir), "tls", "init", "--json"]) == 0
    assert not json.loads(capsys.readouterr().out)["changed"]
    assert cli.main(["--data-dir", str(data_dir), "tls", "init", "--force", "--san", "10.0.0.7", "--json"]) == 0
    renewed = json.loads(capsys.readouterr().out)
    assert renewed["server_created"] and not renewed["ca_created"] and "10.0.0.7" in renewed["server_names"]

    assert cli.main(["--data-dir", str(data_dir), "tls", "show"]) == 0
    shown = capsys.readouterr().out
    assert renewed["ca_fingerprint"] in shown and "10.0.0.7" in shown
    assert "PRIVATE KEY" not in shown

    assert cli.main(["--data-dir", str(tmp_path / "other"), "tls", "init"]) == 1
    assert "provbridge init --tls" in capsys.readouterr().err
    assert cli.main(["--data-dir", str(data_dir), "init", "--tls-san", "x.example"]) == 2  # a usage error
    assert "--tls-san needs --tls" in capsys.readouterr().err


# --- the settings rules -----------------------------------------------------------------------


def _endpoints(settings: Settings) -> tuple[tuple[int, bool], tuple[int, bool]]:
    bridge, device = tls.bridge_endpoint(settings), tls.device_endpoint(settings)
    return (bridge.port, bridge.tls), (device.port, device.tls)


def test_who_connects_where(tmp_path: Path) -> None:
    settings = tls_settings(tmp_path / "data", port=1883, tls_port=8883)
    initialise(settings, tls_files=False)
    # No TLS files, "auto": everyone plain on port.
    assert _endpoints(settings) == ((1883, False), (1883, False))
    assert broker_config(embedded_broker_settings(settings))["listeners"].keys() == {"default"}

    tls.ensure_tls(settings)
    # Files present: the bridge stays on plain loopback, devices are told TLS on tls_port.
    assert _endpoints(settings) == ((1883, False), (8883, True))
    listeners = broker_config(embedded_broker_settings(settings))["listeners"]
    assert listeners["default"] == {"type": "tcp", "bind": "127.0.0.1:1883"}
    assert listeners["tls"]["bind"] == "127.0.0.1:8883" and listeners["tls"]["ssl"] is True
    assert listeners["tls"]["keyfile"] == str(files_of(settings).server_key)

    def with_broker(**update: object) -> Settings:
        return settings.model_copy(update={"broker": settings.broker.model_copy(update=update)})

    # broker.tls: the bridge too connects over TLS, to tls_port, trusting the private CA by default.
    assert _endpoints(with_broker(tls=True)) == ((8883, True), (8883, True))
    assert tls.bridge_endpoint(with_broker(tls=True)).ca_file == files_of(settings).ca_cert
    # Listening everywhere: the bridge dials loopback, a name its certificate check accepts.
    assert tls.bridge_endpoint(with_broker(tls=True, host="0.0.0.0")).host == "127.0.0.1"
    # TLS only: one listener, TLS, on tls_port; the bridge has no choice but TLS.
    tls_only = with_broker(plain_listen=False)
    assert _endpoints(tls_only) == ((8883, True), (8883, True))
    assert broker_config(embedded_broker_settings(tls_only))["listeners"].keys() == {"default"}
    assert broker_config(embedded_broker_settings(tls_only))["listeners"]["default"]["ssl"] is True
    # advertise_port is what devices are told, whichever listener it is.
    advertised = with_broker(advertise_host="mqtt.example.com", advertise_port=443)
    assert tls.device_endpoint(advertised) == tls.Endpoint("mqtt.example.com", 443, True)
    # "off" ignores the files; an external broker that is TLS on its main port keeps the old rule.
    assert _endpoints(with_broker(tls_listen="off")) == ((1883, False), (1883, False))
    external = with_broker(mode="external", tls_listen="off", tls=True, port=8884)
    assert _endpoints(external) == ((8884, True), (8884, True))


def test_resolve_pins_auto_and_refuses_settings_that_cannot_work(tmp_path: Path) -> None:
    settings = tls_settings(tmp_path / "data")
    initialise(settings, tls_files=False)

    def with_broker(**update: object) -> Settings:
        return settings.model_copy(update={"broker": settings.broker.model_copy(update=update)})

    assert tls.resolve(settings).broker.tls_listen == "off"
    for impossible in ({"tls_listen": "on"}, {"plain_listen": False}, {"tls": True}):
        with pytest.raises(ConfigError):
            tls.resolve(with_broker(**impossible))
    tls.ensure_tls(settings)
    pinned = tls.resolve(settings)
    assert pinned.broker.tls_listen == "on"
    # Pinned: files vanishing later do not change what devices are told until a restart.
    files_of(settings).server_cert.rename(tmp_path / "moved.pem")
    assert tls.device_endpoint(pinned).tls and not tls.device_endpoint(settings).tls
    (tmp_path / "moved.pem").rename(files_of(settings).server_cert)
    with pytest.raises(ConfigError, match="both"):
        tls.resolve(with_broker(tls_port=settings.broker.port))


def test_an_expiring_certificate_is_reported_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = tls_settings(tmp_path / "data")
    initialise(settings)
    expires = x509.load_pem_x509_certificate(files_of(settings).server_cert.read_bytes()).not_valid_after_utc
    with caplog.at_level(logging.WARNING, logger="provbridge.tls"):
        tls.resolve(settings, now=expires - timedelta(days=10))
        tls.resolve(settings, now=expires + timedelta(days=1))
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.ERROR]
    assert all("tls init --force" in r.getMessage() for r in caplog.records)


# --- over the wire: the embedded broker and the bridge ----------------------------------------


def test_claim_connect_and_publish_over_tls_with_the_ca_pinned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = tls_settings(tmp_path / "data")
    key = initialise(settings)
    ca_file = files_of(settings).ca_cert
    with running(settings) as live:
        identity = DeviceIdentity.generate("hw-tls-0001")
        # The claim goes over TLS too: the seal protects the answer, TLS protects the provisioning key.
        result = claim_over_mqtt(
            "localhost", live.broker.tls_port, identity, key, cloud_key(settings), tls=True, ca_file=ca_file
        )
        assert result.created and result.device_id.startswith("dev_")
        mqtt = result.credentials.mqtt
        assert (mqtt.tls, mqtt.port, mqtt.host) == (True, live.broker.tls_port, "127.0.0.1")
        topic = connect_with_token("127.0.0.1", mqtt.port, result.credentials, ca_file=ca_file)
        assert topic.startswith(f"devices/{result.device_id}/")

        # A device that claims on the plain port is told the TLS one all the same, in the same sealed
        # answer (the sealed answers stay sealed either way), and can use it.
        plain = claim_over_mqtt(
            "127.0.0.1", live.broker.port, DeviceIdentity.generate("hw-tls-0002"), key, cloud_key(settings)
        )
        assert (plain.credentials.mqtt.tls, plain.credentials.mqtt.port) == (True, live.broker.tls_port)
        connect_with_token("127.0.0.1", plain.credentials.mqtt.port, plain.credentials, ca_file=ca_file)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (mqtt.token, result.credentials.api_key, files_of(settings).server_key.read_text()):
        assert secret not in logged


def test_tls_only_broker_and_a_bridge_that_connects_over_tls(tmp_path: Path) -> None:
    settings = tls_settings(tmp_path / "data", plain_listen=False, tls=True)
    key = initialise(settings)
    ca_file = files_of(settings).ca_cert
    with running(settings) as live:
        # The bridge itself is connected (running() waited for it) over TLS, with the CA by default.
        result = claim_over_mqtt(
            "127.0.0.1",
            live.broker.tls_port,
            DeviceIdentity.generate("hw-tls-only"),
            key,
            cloud_key(settings),
            tls=True,
            ca_file=ca_file,
        )
        assert (result.credentials.mqtt.tls, result.credentials.mqtt.port) == (True, live.broker.tls_port)
        connect_with_token("127.0.0.1", live.broker.tls_port, result.credentials, ca_file=ca_file)
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", live.broker.port), TIMEOUT):
            pass  # no plain listener at all


def test_clients_that_do_not_trust_the_ca_or_speak_plain_mqtt_are_refused(tmp_path: Path) -> None:
    settings = tls_settings(tmp_path / "data")
    key = initialise(settings)
    ca_file = files_of(settings).ca_cert
    stranger = tmp_path / "stranger-ca.pem"
    stranger.write_bytes(tls.certificate_pem(tls.new_ca(datetime.now(UTC)).certificate))
    with running(settings) as live:
        port = live.broker.tls_port
        # Pinned to the right CA: the handshake works, at TLS 1.2 or better.
        assert handshake(port, pinned_context(ca_file)) in {"TLSv1.2", "TLSv1.3"}
        # Another CA, or the system's store: the handshake fails, before any MQTT byte.
        for untrusted in (pinned_context(stranger), ssl.create_default_context()):
            with pytest.raises(ssl.SSLCertVerificationError):
                handshake(port, untrusted)
        # The simulator's device code refuses too, and so never sends the provisioning key.
        for ca in (stranger, None):
            with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                claim_over_mqtt(
                    "127.0.0.1",
                    port,
                    DeviceIdentity.generate("hw-untrusting"),
                    key,
                    cloud_key(settings),
                    tls=True,
                    ca_file=ca,
                    max_attempts=1,
                    timeout=5,
                )
        # Older than TLS 1.2: refused by the broker (or by the local OpenSSL before it asks).
        legacy = pinned_context(ca_file)
        legacy.minimum_version = ssl.TLSVersion.TLSv1
        legacy.maximum_version = ssl.TLSVersion.TLSv1_1
        legacy.set_ciphers("DEFAULT:@SECLEVEL=0")
        with pytest.raises(ssl.SSLError):
            handshake(port, legacy)
        # Plain MQTT on the TLS port: the CONNECT is not TLS, so no CONNACK ever comes back.
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
            raw.sendall(connect_packet("hw-p"))
            reply = _read_until_closed(raw)
        assert not reply.startswith(b"\x20")  # 0x20 is CONNACK; a TLS alert (0x15) or nothing at all
        with pytest.raises(ConnectError):
            claim_over_mqtt(
                "127.0.0.1",
                port,
                DeviceIdentity.generate("hw-plain"),
                key,
                cloud_key(settings),
                max_attempts=1,
                timeout=5,
            )
        # The broker and the bridge are unharmed: a good device still gets through.
        ok = claim_over_mqtt(
            "localhost", port, DeviceIdentity.generate("hw-after"), key, cloud_key(settings), tls=True, ca_file=ca_file
        )
        assert ok.created


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def test_device_checks_the_broker_name_not_just_the_ca(tmp_path: Path) -> None:
    """A certificate from the right CA but for another name is refused: the simulator checks hostnames."""
    settings = tls_settings(tmp_path / "data")
    key = initialise(settings)
    files = files_of(settings)
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = tls.Issued(x509.load_pem_x509_certificate(files.ca_cert.read_bytes()), ca_key)
    elsewhere = tls.new_server_certificate(ca, ["elsewhere.example"], datetime.now(UTC))
    keyfiles.write_private(files.server_key, tls.key_pem(elsewhere.key))
    keyfiles.write_public(files.server_cert, tls.certificate_pem(elsewhere.certificate))
    with running(settings) as live:
        with pytest.raises(ConnectError, match="mismatch"):
            claim_over_mqtt(
                "127.0.0.1",
                live.broker.tls_port,
                DeviceIdentity.generate("hw-name"),
                key,
                cloud_key(settings),
                tls=True,
                ca_file=files.ca_cert,
                max_attempts=1,
                timeout=5,
            )
        assert handshake(live.broker.tls_port, pinned_context(files.ca_cert), "elsewhere.example")


def test_serve_refuses_tls_settings_that_cannot_work(tmp_path: Path) -> None:
    settings = tls_settings(tmp_path / "data", tls_listen="on")
    initialise(settings, tls_files=False)

    async def start() -> None:
        await serve(settings, stop=asyncio.Event())

    with pytest.raises(ConfigError, match="tls init"):
        asyncio.run(start())
    assert not os.path.exists(files_of(settings).server_cert)


# --- the same over an external Mosquitto --------------------------------------------------------


@pytest.mark.parametrize("bridge_tls", [False, True], ids=["bridge-plain", "bridge-tls"])
def test_claim_connect_and_publish_over_tls_on_mosquitto(tmp_path: Path, bridge_tls: bool) -> None:
    settings = tls_settings(tmp_path / "data")
    key = initialise(settings)
    ca_file = files_of(settings).ca_cert
    stranger = tmp_path / "stranger-ca.pem"
    stranger.write_bytes(tls.certificate_pem(tls.new_ca(datetime.now(UTC)).certificate))
    # `mosquitto-config` adds the TLS listener because the files exist ("auto"), from the same ca.pem,
    # server.pem and server.key; with broker.tls the bridge itself connects over TLS too.
    with mosquitto_bridge(settings, key, tls_listen="auto", tls=bridge_tls) as running:
        live = running.settings
        assert tls.bridge_endpoint(live).tls is bridge_tls
        port = live.broker.tls_port
        result = claim_over_mqtt(
            "localhost", port, DeviceIdentity.generate("hw-mq-tls"), key, cloud_key(settings), tls=True, ca_file=ca_file
        )
        mqtt = result.credentials.mqtt
        assert (mqtt.tls, mqtt.port) == (True, port)
        assert connect_with_token("127.0.0.1", port, result.credentials, ca_file=ca_file).startswith(
            f"devices/{result.device_id}/"
        )
        assert handshake(port, pinned_context(ca_file)) in {"TLSv1.2", "TLSv1.3"}
        with pytest.raises(ssl.SSLCertVerificationError):
            handshake(port, pinned_context(stranger))
        with pytest.raises(ConnectError):
            claim_over_mqtt(
                "127.0.0.1",
                port,
                DeviceIdentity.generate("hw-mq-plain"),
                key,
                cloud_key(settings),
                max_attempts=1,
                timeout=5,
            )
