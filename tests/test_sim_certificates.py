"""The simulator with certificate credentials (PROTOCOL.md section 10.4): the CSR in its claim, the certificate
chain in its vault, renewal with `--refresh`, and the proof step over TLS with that certificate.

Pure steps first; then claims and renewals through `serve` on the embedded broker (plain listener, no TLS:
the claim side needs none); then the connect step and the CLI against the embedded broker's certificate
listener, on a data dir with TLS files and a device CA from the start (`certificate_listen = "auto"`), on the
embedded broker and on Mosquitto with the provbridge_jwt plugin.
"""

import json
import stat
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bridge.config import Settings
from bridge.tls import certificates as tls
from bridge.tls.device_ca import create_device_ca, load_device_ca, verify_device_certificate
from device_sim import cli
from device_sim.device import (
    DeviceIdentity,
    ProvisionResult,
    build_claim,
    build_csr,
    check_certificate_key,
    claim_over_mqtt,
    connect_with_credentials,
    connect_with_token,
    device_state_dir,
    refresh_over_mqtt,
)
from device_sim.errors import BrokerRefused, ClaimRejected
from device_sim.vault import PRIVATE_KEY_FILE, VAULT_FILE, VAULT_KEY_FILE, Vault, client_certificate_files
from provwire import crypto
from provwire.errors import ErrorCode
from provwire.models import Claim, to_json
from tests.helpers.bridge import Bridge
from tests.helpers.brokers import EMBEDDED, JWT, bridge_on
from tests.helpers.cli import run_cli
from tests.helpers.network import free_ports

TIMEOUT = 10.0


def _hardware_id() -> str:
    return f"sim-cert-{uuid.uuid4().hex[:10]}"


def _cloud_key(settings: Settings) -> ec.EllipticCurvePublicKey:
    return cli.load_cloud_public_key(str(settings.data_dir / "cloud_public.pem"))


def _chain(pem: str | None) -> list[x509.Certificate]:
    assert pem is not None, "no certificate in the credentials"
    return x509.load_pem_x509_certificates(pem.encode("ascii"))


def _device_certificate(result: ProvisionResult) -> x509.Certificate:
    return _chain(result.credentials.mqtt.certificate)[0]


# --- pure steps -------------------------------------------------------------------------------------------


def test_a_certificate_claim_carries_a_csr_for_the_device_key() -> None:
    identity = DeviceIdentity.generate("sim-cert-000001")
    claim = build_claim(
        identity, "pk_test", "r-0123456789abcdef", csr=build_csr(identity.private_key, "sim-cert-000001")
    )
    assert Claim.model_validate_json(to_json(claim)) == claim  # the contract's checks: the CSR is for public_key
    csr = x509.load_der_x509_csr(crypto.b64decode(claim.csr or ""))
    assert csr.is_signature_valid
    assert csr.public_key() == identity.private_key.public_key()
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "sim-cert-000001"
    assert len(claim.csr or "") <= 700


def test_a_claim_with_another_keys_csr_does_not_validate() -> None:
    identity = DeviceIdentity.generate("sim-cert-000002")
    other = crypto.generate_private_key()
    with pytest.raises(ValueError):
        build_claim(identity, "pk_test", "r-0123456789abcdef", csr=build_csr(other, identity.hardware_id))


def test_key_and_chain_files_exist_only_for_the_block_and_the_key_is_private(tmp_path: Path) -> None:
    key = crypto.generate_private_key()
    with client_certificate_files(key, "-----BEGIN CERTIFICATE-----\n", tmp_path) as (cert_file, key_file):
        assert cert_file.parent == key_file.parent and cert_file.parent.parent == tmp_path
        assert stat.S_IMODE(cert_file.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert b"PRIVATE KEY" in key_file.read_bytes()
    assert list(tmp_path.iterdir()) == []


def test_a_certificate_that_is_not_pem_is_refused_before_any_connection(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a PEM certificate chain"):
        check_certificate_key("not PEM", crypto.generate_private_key())


# --- claims and renewals through the bridge (embedded broker, plain listener) -----------------------------


@pytest.fixture
def certificate_key(bridge: Bridge) -> str:
    return bridge.create_key(credential_type="certificate")


def test_a_certificate_claim_gets_a_certificate_for_its_own_key(bridge: Bridge, certificate_key: str) -> None:
    identity = DeviceIdentity.generate(_hardware_id())
    result = claim_over_mqtt(
        "127.0.0.1",
        bridge.port,
        identity,
        certificate_key,
        _cloud_key(bridge.settings),
        timeout=TIMEOUT,
        certificate=True,
    )
    mqtt_creds = result.credentials.mqtt
    assert result.created and mqtt_creds.token is None and result.credentials.api_key
    assert mqtt_creds.tls and mqtt_creds.port == bridge.settings.broker.certificate_port
    assert mqtt_creds.client_id == mqtt_creds.username == result.device_id
    cert, ca = _chain(mqtt_creds.certificate)
    device_ca = load_device_ca(bridge.settings.data_dir)
    assert ca == device_ca.certificate
    verify_device_certificate(ca, cert, datetime.now(UTC))
    assert cert.public_key() == identity.private_key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == result.device_id
    assert mqtt_creds.expires_at == int(cert.not_valid_after_utc.timestamp())
    assert check_certificate_key(mqtt_creds.certificate or "", identity.private_key) == cert


def test_the_claim_must_match_the_keys_credential_type(bridge: Bridge, certificate_key: str) -> None:
    cloud = _cloud_key(bridge.settings)
    for key, certificate in ((certificate_key, False), (bridge.provision_key, True)):
        with pytest.raises(ClaimRejected) as refused:
            claim_over_mqtt(
                "127.0.0.1", bridge.port, DeviceIdentity.generate(_hardware_id()), key, cloud, certificate=certificate
            )
        assert refused.value.code is ErrorCode.VALIDATION_ERROR
        assert [name for name, _ in refused.value.field_errors] == ["csr"]


def test_refresh_renews_the_certificate_same_key_new_serial(bridge: Bridge, certificate_key: str) -> None:
    cloud = _cloud_key(bridge.settings)
    identity = DeviceIdentity.generate(_hardware_id())
    first = claim_over_mqtt("127.0.0.1", bridge.port, identity, certificate_key, cloud, certificate=True)
    renewed = refresh_over_mqtt("127.0.0.1", bridge.port, identity, first.device_id, cloud, certificate=True)
    assert renewed.device_id == first.device_id and renewed.credentials.api_key == ""
    assert renewed.credentials.mqtt.token is None
    old, new = _device_certificate(first), _device_certificate(renewed)
    assert new.serial_number != old.serial_number
    assert new.public_key() == old.public_key() == identity.private_key.public_key()
    assert new.subject == old.subject
    verify_device_certificate(load_device_ca(bridge.settings.data_dir).certificate, new, datetime.now(UTC))
    # A plain token refresh from a certificate device is refused, as a renewal from a token device is.
    with pytest.raises(ClaimRejected) as refused:
        refresh_over_mqtt("127.0.0.1", bridge.port, identity, first.device_id, cloud, max_attempts=1)
    assert refused.value.code is ErrorCode.PERMISSION_DENIED
    token_device = DeviceIdentity.generate(_hardware_id())
    token = claim_over_mqtt("127.0.0.1", bridge.port, token_device, bridge.provision_key, cloud)
    with pytest.raises(ClaimRejected) as refused:
        refresh_over_mqtt(
            "127.0.0.1", bridge.port, token_device, token.device_id, cloud, max_attempts=1, certificate=True
        )
    assert refused.value.code is ErrorCode.PERMISSION_DENIED


# --- the connect step and the CLI (embedded broker, certificate listener) ---------------------------------


@pytest.fixture(params=[EMBEDDED, JWT])
def listening(
    request: pytest.FixtureRequest, initialised: tuple[Settings, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Bridge, str]]:
    """A bridge whose broker (embedded, or Mosquitto with the provbridge_jwt plugin) listens for device
    certificates, as `init --tls` and a device CA turn on by `certificate_listen = "auto"`; and a key that
    issues certificates."""
    settings, first_key = initialised
    tls_port, certificate_port = free_ports(2, taken=(settings.broker.port,))
    ports = {"tls_port": tls_port, "certificate_port": certificate_port, "tls_listen": "auto"}
    settings = settings.model_copy(update={"broker": settings.broker.model_copy(update=ports)})
    tls.ensure_tls(settings)  # `provbridge tls init`
    create_device_ca(settings.data_dir, datetime.now(UTC))
    assert tls.certificate_listener_enabled(settings)
    with bridge_on(request.param, (settings, first_key), monkeypatch, **ports) as bridge:
        yield bridge, bridge.create_key(credential_type="certificate")


def _ca_file(settings: Settings) -> Path:
    return tls.TlsFiles.of(settings.data_dir).ca_cert


def test_a_device_proves_its_certificate_on_the_certificate_listener(
    listening: tuple[Bridge, str], tmp_path: Path
) -> None:
    bridge, key = listening
    settings = bridge.settings
    cloud = _cloud_key(settings)
    identity = DeviceIdentity.generate(_hardware_id())
    result = claim_over_mqtt("127.0.0.1", bridge.port, identity, key, cloud, timeout=TIMEOUT, certificate=True)
    files_dir = tmp_path / "device"
    files_dir.mkdir(mode=0o700)
    port = result.credentials.mqtt.port
    assert port == settings.broker.certificate_port
    topic = connect_with_credentials(
        "127.0.0.1",
        port,
        result.credentials,
        TIMEOUT,
        ca_file=_ca_file(settings),
        private_key=identity.private_key,
        files_dir=files_dir,
    )
    assert topic == f"devices/{result.device_id}/hello"  # published, acknowledged and echoed back
    assert list(files_dir.iterdir()) == []  # the key and chain files are gone

    # Without the device's key there is nothing to connect with; a token connect has no certificate to show.
    with pytest.raises(ValueError, match="private key"):
        connect_with_credentials("127.0.0.1", port, result.credentials, TIMEOUT, ca_file=_ca_file(settings))
    with pytest.raises(ValueError, match="private key"):
        connect_with_token("127.0.0.1", port, result.credentials, TIMEOUT, ca_file=_ca_file(settings))
    # Another device's key does not go with this certificate.
    with pytest.raises(ValueError, match="not for this device's key"):
        connect_with_credentials(
            "127.0.0.1", port, result.credentials, ca_file=_ca_file(settings), private_key=crypto.generate_private_key()
        )

    # The renewed certificate connects, and so does the old one until its notAfter; after a revoke neither.
    renewed = refresh_over_mqtt("127.0.0.1", bridge.port, identity, result.device_id, cloud, certificate=True)
    for credentials in (renewed.credentials, result.credentials):
        assert (
            connect_with_credentials(
                "127.0.0.1", port, credentials, TIMEOUT, ca_file=_ca_file(settings), private_key=identity.private_key
            )
            == topic
        )
    assert run_cli(settings, "device", "revoke", result.device_id) == 0
    with pytest.raises(BrokerRefused):
        connect_with_credentials(
            "127.0.0.1",
            port,
            renewed.credentials,
            TIMEOUT,
            ca_file=_ca_file(settings),
            private_key=identity.private_key,
        )


def test_the_cli_claims_certificates_keeps_them_in_the_vault_and_renews_them(
    listening: tuple[Bridge, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bridge, key = listening
    settings = bridge.settings
    monkeypatch.delenv(cli.KEY_ENV, raising=False)
    state = tmp_path / "sim"
    common = ["--port", str(bridge.port), "--cloud-key", str(settings.data_dir / "cloud_public.pem")]
    common += ["--ca-file", str(_ca_file(settings)), "--state-dir", str(state), "--devices", "3"]
    common += ["--hardware-id-prefix", "cert-", "--timeout", str(TIMEOUT), "--json"]

    assert cli.main([*common, "--key", key, "--certificate"]) == cli.EXIT_OK
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert doc["ok"] and doc["created"] == 3
    assert all(r["credential"] == "certificate" and r["topic"] for r in doc["results"])
    for secret in (key, "BEGIN"):  # neither the provisioning key nor any PEM (key or certificate) is printed
        assert secret not in out.out and secret not in out.err

    def held(index: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        hardware_id = f"cert-{index:06d}"
        directory = device_state_dir(state, hardware_id)
        # Only the key and the vault: the files handed to the TLS library were removed.
        assert sorted(p.name for p in directory.iterdir()) == sorted([PRIVATE_KEY_FILE, VAULT_KEY_FILE, VAULT_FILE])
        credentials = Vault(directory).load()
        assert credentials is not None and credentials.mqtt.token is None and credentials.api_key
        identity = DeviceIdentity.load_or_create(directory, hardware_id)
        return _chain(credentials.mqtt.certificate)[0], identity.private_key

    before = [held(i) for i in (1, 2, 3)]
    assert all(cert.public_key() == private.public_key() for cert, private in before)

    # --refresh renews what each device holds, a certificate here, without the flag or a provisioning key.
    assert cli.main([*common, "--refresh"]) == cli.EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and all(r["refreshed"] and r["credential"] == "certificate" for r in doc["results"])
    after = [held(i) for i in (1, 2, 3)]
    for (old, old_key), (new, new_key) in zip(before, after, strict=True):
        assert new.serial_number != old.serial_number
        assert new.public_key() == old.public_key() == new_key.public_key() == old_key.public_key()
    vault = Vault(device_state_dir(state, "cert-000001")).load()
    assert vault is not None and vault.api_key  # the api_key of the claim is kept across the renewal


def test_the_cli_hints_when_the_key_issues_the_other_credential_type(
    bridge: Bridge, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--port", str(bridge.port), "--cloud-key", str(bridge.settings.data_dir / "cloud_public.pem")]
    argv += ["--key", bridge.provision_key, "--certificate", "--state-dir", str(tmp_path / "sim")]
    argv += ["--hardware-id-prefix", "wrong-type-"]
    assert cli.main(argv) == cli.EXIT_FAILED
    out = capsys.readouterr().out
    assert "rejected: validation_error (csr)" in out and "hint: the provisioning key issues certificates" in out


def test_the_cli_refuses_a_certificate_port_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--key", "pk_x", "--certificate-port", "70000"]) == cli.EXIT_USAGE
    assert "--certificate-port 70000" in capsys.readouterr().err
