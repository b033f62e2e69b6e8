"""The certificate credential type on the bridge's side (PROTOCOL.md section 10.4): a key that issues X.509
client certificates, the CSR in the claim, the sealed certificate chain, renewal with proof of possession.

Through the claim and refresh handlers with a real SQLite store, real keys and a real device CA; the
brokers' side (the certificate listener, the scope in the certificate, revocation) is in
tests/test_certificate_auth.py, and a whole device's life on both brokers in tests/test_certificate_e2e.py.
"""

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509

from bridge.claims.provisioning import Outcome, Provisioner
from bridge.claims.refresh import Refresher
from bridge.config import Settings
from bridge.errors import UsageError
from bridge.ops import admin
from bridge.storage import keyfiles
from bridge.storage.store import Store
from bridge.tls.device_ca import DeviceCaFiles, load_device_ca, verify_device_certificate
from broker.certificates import scope_of
from device_sim.device import build_csr, build_token_refresh
from provwire import crypto, topics
from provwire.errors import ErrorCode
from provwire.models import Claim, ClaimError, ClaimOk, Credentials, to_json
from tests.helpers.bridge import make_settings
from tests.helpers.devices import answer_of

# Storage-dependent: each test runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends

PREFIX = "prov/v1"


@dataclass
class Site:
    settings: Settings
    store: Store
    provisioner: Provisioner
    refresher: Refresher

    def key(self, **spec: object) -> str:
        spec.setdefault("tenant", "default")
        spec.setdefault("name", f"k-{uuid.uuid4().hex[:6]}")
        _, raw = admin.create_key(self.store, self.settings, admin.KeySpec(**spec), int(time.time()))  # type: ignore[arg-type]
        return raw


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    settings = make_settings(tmp_path / "data")
    admin.init_data_dir(settings)
    store = Store(settings.database)
    keys = keyfiles.load_keys(settings.data_dir)
    provisioner = Provisioner(settings, store, keys)
    try:
        yield Site(settings, store, provisioner, Refresher(settings, store, keys, device_ca=provisioner.device_ca))
    finally:
        store.close()


class CertDevice:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.hardware_id = f"hw-{uuid.uuid4().hex[:10]}"
        self.client_id = f"c-{uuid.uuid4().hex[:10]}"
        self.private_key = crypto.generate_private_key()
        self.device_id = ""
        self.cloud_kid = ""

    @property
    def public_key_b64(self) -> str:
        return crypto.b64encode(crypto.sec1(self.private_key.public_key()))

    def claim_payload(self, key: str, *, csr: str | None = None, request_id: str | None = None) -> bytes:
        claim = Claim(
            request_id=request_id or f"r-{uuid.uuid4().hex}",
            provision_key=key,
            hardware_id=self.hardware_id,
            public_key=self.public_key_b64,
            csr=csr,
        )
        return to_json(claim)

    def claim(self, key: str, *, csr: str | None = None, request_id: str | None = None) -> Outcome:
        payload = self.claim_payload(key, csr=csr, request_id=request_id)
        return self.site.provisioner.handle(topics.claim_topic(PREFIX, self.client_id), payload)

    def open(self, answer: ClaimOk) -> Credentials:
        cloud = keyfiles.load_keys(self.site.settings.data_dir).cloud[answer.cloud_key_id].public_key()
        shared = crypto.shared_secret(self.private_key, cloud)
        box = crypto.SealedBox(crypto.b64decode(answer.sealed.nonce), crypto.b64decode(answer.sealed.ciphertext))
        plain = crypto.open_sealed(crypto.derive_seal_key(shared, answer.request_id), box, answer.request_id)
        self.device_id, self.cloud_kid = answer.device_id, answer.cloud_key_id
        return Credentials.model_validate_json(plain)

    def provision(self, key: str) -> Credentials:
        answer = answer_of(self.claim(key, csr=build_csr(self.private_key, self.hardware_id)).answer or b"")
        assert isinstance(answer, ClaimOk), answer
        return self.open(answer)

    @property
    def device_key(self) -> bytes:
        cloud = keyfiles.load_keys(self.site.settings.data_dir).cloud[self.cloud_kid].public_key()
        return crypto.derive_device_key(crypto.shared_secret(self.private_key, cloud))

    def renew(self, *, csr: str | None = None, renewing: bool = True) -> tuple[Outcome, ClaimOk | ClaimError]:
        request = build_token_refresh(
            self.device_id,
            self.device_key,
            f"r-{uuid.uuid4().hex}",
            int(time.time()),
            (csr or build_csr(self.private_key, self.hardware_id)) if renewing else None,
        )
        outcome = self.site.refresher.handle(topics.token_topic(PREFIX, self.client_id), to_json(request))
        return outcome, answer_of(outcome.answer or b"")


def _certificates_of(credentials: Credentials) -> list[x509.Certificate]:
    assert credentials.mqtt.certificate is not None
    return x509.load_pem_x509_certificates(credentials.mqtt.certificate.encode("ascii"))


def test_a_certificate_key_gets_a_certificate_for_the_device_key_signed_by_the_device_ca(site: Site) -> None:
    key = site.key(credential_type="certificate", certificate_validity_seconds=3 * 86400)
    device = CertDevice(site)
    before = int(time.time())
    credentials = device.provision(key)
    mqtt = credentials.mqtt
    assert mqtt.token is None and mqtt.tls and mqtt.port == site.settings.broker.certificate_port
    assert mqtt.client_id == mqtt.username == device.device_id
    assert credentials.api_key.startswith("dk_")
    certificate, ca_certificate = _certificates_of(credentials)
    ca = load_device_ca(site.settings.data_dir)
    assert ca_certificate == ca.certificate
    verify_device_certificate(ca.certificate, certificate, datetime.now(UTC))
    assert certificate.public_key() == device.private_key.public_key()
    assert certificate.subject.rfc4514_string() == f"CN={device.device_id},OU=default,O=provbridge"
    assert before + 3 * 86400 <= mqtt.expires_at == int(certificate.not_valid_after_utc.timestamp())
    scope = scope_of(certificate)
    assert scope is not None
    assert list(scope.publish) == mqtt.publish == [f"devices/{device.device_id}/#"]
    assert list(scope.subscribe) == mqtt.subscribe
    issued = site.store.certificates(device.device_id)
    assert [c.serial for c in issued] == [format(certificate.serial_number, "x")]
    assert issued[0].not_after == mqtt.expires_at
    assert site.store.device(device.device_id).credential_type == "certificate"


def test_a_retried_certificate_claim_gets_the_same_answer_and_signs_nothing_more(site: Site) -> None:
    key = site.key(credential_type="certificate")
    device = CertDevice(site)
    payload = device.claim_payload(key, csr=build_csr(device.private_key, device.hardware_id))
    first = site.provisioner.handle(topics.claim_topic(PREFIX, device.client_id), payload)
    again = site.provisioner.handle(topics.claim_topic(PREFIX, device.client_id), payload)
    assert first.answer == again.answer
    answer = answer_of(first.answer or b"")
    assert isinstance(answer, ClaimOk)
    assert len(site.store.certificates(answer.device_id)) == 1


@pytest.mark.parametrize(
    ("credential_type", "with_csr", "message"),
    [
        ("certificate", False, "required: this provisioning key issues certificates"),
        ("token", True, "not accepted: this provisioning key issues tokens, not certificates"),
    ],
)
def test_a_claim_that_asks_for_the_other_credential_is_refused_on_csr_and_creates_nothing(
    site: Site, credential_type: str, with_csr: bool, message: str
) -> None:
    key = site.key(credential_type=credential_type)
    device = CertDevice(site)
    outcome = device.claim(key, csr=build_csr(device.private_key, device.hardware_id) if with_csr else None)
    answer = answer_of(outcome.answer or b"")
    assert isinstance(answer, ClaimError) and answer.code is ErrorCode.VALIDATION_ERROR
    assert [(e.field, e.message) for e in answer.errors or []] == [("csr", message)]
    assert [(e.event, e.reason) for e in outcome.events] == [("claim.rejected", "credential_mismatch")]
    assert site.store.count("devices") == 0 and site.store.count("device_certificates") == 0


def test_a_csr_for_another_key_is_refused_before_the_key_is_looked_at(site: Site) -> None:
    device = CertDevice(site)
    other = crypto.generate_private_key()
    claim = json.loads(device.claim_payload("pk_unknown")) | {"csr": build_csr(other, device.hardware_id)}
    outcome = site.provisioner.handle(topics.claim_topic(PREFIX, device.client_id), json.dumps(claim).encode())
    answer = answer_of(outcome.answer or b"")
    assert isinstance(answer, ClaimError) and answer.code is ErrorCode.VALIDATION_ERROR
    assert [e.field for e in answer.errors or []] == ["csr"]
    assert "another key than public_key" in (answer.errors or [])[0].message


def test_a_certificate_device_renews_with_a_csr_for_its_key_and_gets_a_new_certificate(site: Site) -> None:
    key = site.key(credential_type="certificate")
    device = CertDevice(site)
    first = _certificates_of(device.provision(key))[0]
    outcome, answer = device.renew()
    assert isinstance(answer, ClaimOk) and not answer.created and answer.device_id == device.device_id
    credentials = device.open(answer)
    assert credentials.api_key == "" and credentials.mqtt.token is None
    renewed = _certificates_of(credentials)[0]
    assert renewed.serial_number != first.serial_number
    assert renewed.public_key() == first.public_key() and renewed.subject == first.subject
    assert [e.event for e in outcome.events] == ["certificate.renewed"]
    assert len(site.store.certificates(device.device_id)) == 2


@pytest.mark.parametrize("case", ["no_csr", "csr_for_another_key"])
def test_a_certificate_device_cannot_renew_without_a_csr_for_its_own_key(site: Site, case: str) -> None:
    key = site.key(credential_type="certificate")
    device = CertDevice(site)
    device.provision(key)
    if case == "no_csr":
        outcome, answer = device.renew(renewing=False)
        reason = "credential_mismatch"
    else:
        outcome, answer = device.renew(csr=build_csr(crypto.generate_private_key(), device.hardware_id))
        reason = "csr_key_mismatch"
    assert isinstance(answer, ClaimError) and answer.code is ErrorCode.PERMISSION_DENIED
    assert [(e.event, e.reason) for e in outcome.events] == [("token.refresh_rejected", reason)]
    assert len(site.store.certificates(device.device_id)) == 1


def test_a_token_device_cannot_get_a_certificate_by_renewal(site: Site) -> None:
    key = site.key()
    device = CertDevice(site)
    answer = answer_of(device.claim(key).answer or b"")
    assert isinstance(answer, ClaimOk)
    assert device.open(answer).mqtt.token
    outcome, refused = device.renew()
    assert isinstance(refused, ClaimError) and refused.code is ErrorCode.PERMISSION_DENIED
    assert [e.reason for e in outcome.events] == ["credential_mismatch"]
    assert site.store.count("device_certificates") == 0


def test_a_renewal_mac_does_not_cover_another_csr(site: Site) -> None:
    key = site.key(credential_type="certificate")
    device = CertDevice(site)
    device.provision(key)
    request = build_token_refresh(
        device.device_id, device.device_key, "r-swapped-csr-1", int(time.time()), build_csr(device.private_key, "a")
    )
    swapped = request.model_copy(update={"csr": build_csr(device.private_key, "b")})
    outcome = site.refresher.handle(topics.token_topic(PREFIX, device.client_id), to_json(swapped))
    assert [e.reason for e in outcome.events] == ["bad_mac"]


def test_a_certificate_key_makes_the_device_ca_once(site: Site) -> None:
    files = DeviceCaFiles.of(site.settings.data_dir)
    assert not files.cert.exists()  # `init` alone makes none: token deployments never need it
    site.key(credential_type="certificate")
    made = files.cert.read_bytes()
    site.key(credential_type="certificate")
    assert files.cert.read_bytes() == made


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"credential_type": "password"}, "credential type must be 'token' or 'certificate'"),
        ({"certificate_validity_seconds": 86400}, "applies only to keys of credential type 'certificate'"),
        ({"credential_type": "certificate", "certificate_validity_seconds": 30}, "certificate validity must be"),
        ({"credential_type": "certificate", "certificate_validity_seconds": 398 * 86400}, "397 days"),
    ],
)
def test_a_key_with_an_unusable_credential_option_is_refused_and_not_made(
    site: Site, spec: dict[str, object], message: str
) -> None:
    before = len(site.store.keys())
    with pytest.raises(UsageError, match=message):
        site.key(**spec)
    assert len(site.store.keys()) == before


def test_without_its_device_ca_a_certificate_claim_is_answered_retry_later(site: Site) -> None:
    key = site.key(credential_type="certificate")
    files = DeviceCaFiles.of(site.settings.data_dir)
    files.key.unlink()  # an operator lost the CA key: nothing can be signed
    device = CertDevice(site)
    outcome = device.claim(key, csr=build_csr(device.private_key, device.hardware_id))
    answer = answer_of(outcome.answer or b"")
    assert isinstance(answer, ClaimError) and answer.code is ErrorCode.INTERNAL_ERROR and answer.retry_after
    assert site.store.count("devices") == 0


def test_a_reclaim_with_a_key_of_the_other_type_is_refused_and_changes_nothing(site: Site) -> None:
    # Whoever holds any token key of the tenant knows the device's hardware id and public key (the latter is
    # in every TLS handshake): a re-claim must not turn the certificate device into a token one.
    certificate_key, token_key = site.key(credential_type="certificate"), site.key()
    device = CertDevice(site)
    device.provision(certificate_key)
    outcome = device.claim(token_key)
    answer = answer_of(outcome.answer or b"")
    assert isinstance(answer, ClaimError) and answer.code is ErrorCode.VALIDATION_ERROR
    assert [e.field for e in answer.errors or []] == ["csr"]
    assert [(e.event, e.reason) for e in outcome.events] == [("claim.rejected", "credential_mismatch")]
    assert site.store.device(device.device_id).credential_type == "certificate"
    _, renewed = device.renew()
    assert isinstance(renewed, ClaimOk)

    token_device = CertDevice(site)
    first = answer_of(token_device.claim(token_key).answer or b"")
    assert isinstance(first, ClaimOk)
    token_device.open(first)
    csr = build_csr(token_device.private_key, token_device.hardware_id)
    refused = answer_of(token_device.claim(certificate_key, csr=csr).answer or b"")
    assert isinstance(refused, ClaimError) and [e.field for e in refused.errors or []] == ["csr"]
    assert site.store.device(token_device.device_id).credential_type == "token"


def test_a_csr_of_another_version_is_a_validation_error_not_a_crash(site: Site) -> None:
    device = CertDevice(site)
    der = bytearray(crypto.b64decode(build_csr(device.private_key, device.hardware_id)))
    version = der.index(b"\x02\x01\x00") + 2  # the first INTEGER: the CSR's version, 0 for PKCS#10 v1
    der[version] = 1
    claim = json.loads(device.claim_payload("pk_any")) | {"csr": crypto.b64encode(bytes(der))}
    outcome = site.provisioner.handle(topics.claim_topic(PREFIX, device.client_id), json.dumps(claim).encode())
    answer = answer_of(outcome.answer or b"")
    assert isinstance(answer, ClaimError) and answer.code is ErrorCode.VALIDATION_ERROR
    assert [e.field for e in answer.errors or []] == ["csr"]
    renewal = {"request_id": "r-version-1", "device_id": "dev_" + "a" * 26, "timestamp": 1, "mac": "A" * 43 + "="}
    renewal["csr"] = claim["csr"]
    refused = site.refresher.handle(topics.token_topic(PREFIX, device.client_id), json.dumps(renewal).encode())
    assert [e.field for e in answer_of(refused.answer or b"").errors or []] == ["csr"]  # type: ignore[union-attr]
