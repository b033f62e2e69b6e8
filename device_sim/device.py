"""One device's side of protocol v1, as a small library.

Pure steps (no I/O):  `build_claim` -> bytes on the wire -> `open_answer` -> `ProvisionResult`;
                      `build_token_refresh` (the MAC'd refresh request; its answer opens the same way);
                      `build_csr` (the CSR of a claim or renewal for certificate credentials, section 10.4).
Blocking I/O:         `claim_over_mqtt` (claim, with retries), `refresh_over_mqtt` (a fresh token or
                      certificate, no provisioning key needed) and `connect_with_credentials` (prove the
                      token, or the certificate over TLS; `connect_with_token` is its older name).

Firmware authors can read this file next to docs/PROTOCOL.md: every protocol step is one function.
"""

import hashlib
import json
import random
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from device_sim.errors import (
    BrokerRefused,
    Cancelled,
    ClaimRejected,
    ClaimTimeout,
    CloudKeyMismatch,
    ConnectError,
    ConnectionLost,
    InvalidAnswer,
    StaleAnswer,
)
from device_sim.session import Session
from device_sim.vault import client_certificate_files, load_or_create_private_key
from provwire import crypto, topics
from provwire.errors import ErrorCode
from provwire.models import (
    Claim,
    ClaimError,
    ClaimOk,
    Credentials,
    Hardware,
    Network,
    TokenRefresh,
    to_json,
)
from provwire.topics import topic_matches

AGENT_VERSION = "provbridge-sim/0.1.0"  # sent as the claim's agent_version
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_ATTEMPTS = 5
MAX_ANSWER_WAIT_S = 60.0  # the exponential wait between re-sends stops growing here
DEFAULT_RETRY_AFTER_S = 1  # an error answer that is retryable but names no delay

# Hardware ids that are already safe as a directory name; anything else is hashed.
_SAFE_DIRNAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


# --- identity -------------------------------------------------------------------------------------------


def client_id_for(hardware_id: str, public_key_sec1: bytes) -> str:
    """The claim client id: the hardware id when that is a valid v1 client id, else derived from the key.

    The derived form is the one PROTOCOL.md section 4 recommends, `c-` + the kid of the device's
    public key: stable across reboots (the key is kept for life) and unique per device.
    """
    if topics.is_valid_client_id(hardware_id):
        return hardware_id
    return "c-" + hashlib.sha256(public_key_sec1).digest()[:8].hex()


def device_state_dir(root: Path, hardware_id: str) -> Path:
    """Where one device keeps its key and vault under a fleet's state dir (never outside it)."""
    if _SAFE_DIRNAME.fullmatch(hardware_id):
        return root / hardware_id
    return root / ("h-" + hashlib.sha256(hardware_id.encode("utf-8")).hexdigest()[:40])


def check_hardware_id(hardware_id: str) -> None:
    """The contract's rules for hardware_id, checked early so the error names the device (ValueError)."""
    if not (1 <= len(hardware_id) <= 128) or not hardware_id.isprintable():
        raise ValueError(f"hardware id {hardware_id!r} must be 1-128 printable characters")
    if any(c in hardware_id for c in "+#/"):
        raise ValueError(f"hardware id {hardware_id!r} must not contain '+', '#' or '/'")


@dataclass(frozen=True)
class DeviceIdentity:
    """What a device is: its hardware id and its P-256 key pair (the public half goes into the claim)."""

    hardware_id: str
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    state_dir: Path | None = None

    def __post_init__(self) -> None:
        check_hardware_id(self.hardware_id)

    @classmethod
    def generate(cls, hardware_id: str) -> "DeviceIdentity":
        """A fresh identity kept only in memory (tests, one-shot runs)."""
        return cls(hardware_id, crypto.generate_private_key())

    @classmethod
    def load_or_create(cls, state_dir: Path, hardware_id: str) -> "DeviceIdentity":
        """The identity kept in this device's own state dir, created (key 0600) on first use."""
        check_hardware_id(hardware_id)  # before anything is written for it
        return cls(hardware_id, load_or_create_private_key(state_dir), state_dir)

    @property
    def client_id(self) -> str:
        return client_id_for(self.hardware_id, self.public_key_sec1)

    @property
    def public_key_sec1(self) -> bytes:
        return crypto.sec1(self.private_key.public_key())

    @property
    def public_key_b64(self) -> str:
        return crypto.b64encode(self.public_key_sec1)


def new_request_id() -> str:
    """A fresh request id: 128 random bits, well inside the contract's 8-64 chars of [A-Za-z0-9._:-]."""
    return "r-" + secrets.token_hex(16)


# --- pure protocol steps --------------------------------------------------------------------------------


def build_claim(
    identity: DeviceIdentity,
    provision_key: str,
    request_id: str,
    hardware: Hardware | None = None,
    network: Network | None = None,
    device_name: str | None = None,
    cloud_key_id: str | None = None,
    csr: str | None = None,
) -> Claim:
    """The claim message; the Claim model validates every field against the contract. `csr`: for a key that
    issues certificates (`build_csr`)."""
    return Claim(
        request_id=request_id,
        provision_key=provision_key,
        hardware_id=identity.hardware_id,
        public_key=identity.public_key_b64,
        device_name=device_name,
        cloud_key_id=cloud_key_id,
        hardware=hardware,
        network=network,
        agent_version=AGENT_VERSION,
        csr=csr,
    )


def device_key_for(identity: DeviceIdentity, cloud_public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The device key (PROTOCOL.md section 9.2): the same value the bridge derives, never transmitted."""
    return crypto.derive_device_key(crypto.shared_secret(identity.private_key, cloud_public_key))


def build_token_refresh(
    device_id: str, device_key: bytes, request_id: str, timestamp: int, csr: str | None = None
) -> TokenRefresh:
    """A token-refresh request: the MAC proves the device key without sending any secret (section 10.1); with
    `csr` (certificate devices), a certificate renewal (section 10.4)."""
    mac = crypto.refresh_mac(device_key, device_id, request_id, timestamp, csr)
    return TokenRefresh(
        request_id=request_id, device_id=device_id, timestamp=timestamp, mac=crypto.b64encode(mac), csr=csr
    )


def build_csr(private_key: ec.EllipticCurvePrivateKey, hardware_id: str) -> str:
    """The `csr` member of a claim or renewal for certificate credentials (section 10.4): base64 of a DER
    PKCS#10 request for the device key, subject CN = the hardware id, signed ECDSA-SHA256."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hardware_id)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(private_key, hashes.SHA256())
    return crypto.b64encode(csr.public_bytes(serialization.Encoding.DER))


@dataclass(frozen=True)
class ProvisionResult:
    """A successful claim. `credentials` holds secrets and is kept out of repr() so it is never logged."""

    request_id: str
    device_id: str
    created: bool
    profile: str
    labels: dict[str, str]
    groups: tuple[str, ...]
    cloud_key_id: str
    credentials: Credentials = field(repr=False)
    latency_s: float | None = None  # first claim published -> answer opened; set by claim_over_mqtt
    attempts: int = 1


def open_answer(
    answer: bytes,
    identity: DeviceIdentity,
    cloud_public_key: ec.EllipticCurvePublicKey,
    request_id: str,
) -> ProvisionResult:
    """Turn an answer from the response topic into credentials, or raise.

    Raises StaleAnswer (an answer to another request_id), ClaimRejected (an error answer, with its
    code and retry_after), CloudKeyMismatch (sealed with a cloud key this device does not hold),
    InvalidAnswer (not a v1 answer) or SealError (the box does not open: tampered, or sealed for
    another device or request).
    """
    try:
        doc = json.loads(answer)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidAnswer("answer is not JSON") from exc
    if not isinstance(doc, dict):
        raise InvalidAnswer("answer is not a JSON object")
    answered = doc.get("request_id")
    if answered is not None and answered != request_id:
        raise StaleAnswer(f"answer is for request {answered!r}, not {request_id!r}")
    status = doc.get("status")
    if status == "error":
        raise _rejection(answer, doc)
    if status != "ok":
        raise InvalidAnswer(f"answer has unknown status {status!r}")
    try:
        ok = ClaimOk.model_validate_json(answer)
    except ValidationError as exc:
        raise InvalidAnswer(f"ok answer does not match the contract: {_first_error(exc)}") from exc
    if ok.request_id != request_id:  # an ok answer must name its request; a missing one was let through above
        raise InvalidAnswer("ok answer without this request_id")
    credentials = _open_credentials(ok, identity, cloud_public_key, request_id)
    return ProvisionResult(
        request_id=request_id,
        device_id=ok.device_id,
        created=ok.created,
        profile=ok.profile,
        labels=dict(ok.labels),
        groups=tuple(ok.groups),
        cloud_key_id=ok.cloud_key_id,
        credentials=credentials,
    )


def _rejection(answer: bytes, doc: dict[str, Any]) -> ClaimRejected:
    try:
        err = ClaimError.model_validate_json(answer)
    except ValidationError as exc:
        # Lenient on errors only: an error answer that bends the contract (a code from a newer bridge,
        # a retryable code without retry_after) is still an answer. A known code keeps its meaning;
        # an unknown one is final.
        code, message, retry_after = doc.get("code"), doc.get("message"), doc.get("retry_after")
        if isinstance(code, str) and isinstance(message, str):
            known = code in {c.value for c in ErrorCode}
            return ClaimRejected(
                ErrorCode(code) if known else code,
                message,
                retry_after=retry_after if isinstance(retry_after, int) and not isinstance(retry_after, bool) else None,
                request_id=doc.get("request_id") if isinstance(doc.get("request_id"), str) else None,
            )
        raise InvalidAnswer(f"error answer does not match the contract: {_first_error(exc)}") from exc
    return ClaimRejected(
        err.code,
        err.message,
        retry_after=err.retry_after,
        request_id=err.request_id,
        field_errors=tuple((e.field, e.message) for e in err.errors or ()),
    )


def _open_credentials(
    ok: ClaimOk, identity: DeviceIdentity, cloud_public_key: ec.EllipticCurvePublicKey, request_id: str
) -> Credentials:
    trusted = crypto.key_id(cloud_public_key)
    if ok.cloud_key_id != trusted:
        # Checked before opening, as the protocol requires. The usual cause: the device was given
        # another bridge's (or a rotated-out) cloud key.
        raise CloudKeyMismatch(f"answer is sealed with cloud key {ok.cloud_key_id}, this device trusts {trusted}")
    try:
        box = crypto.SealedBox(crypto.b64decode(ok.sealed.nonce), crypto.b64decode(ok.sealed.ciphertext))
    except ValueError as exc:
        raise InvalidAnswer("sealed nonce or ciphertext is not standard base64") from exc
    shared = crypto.shared_secret(identity.private_key, cloud_public_key)
    plaintext = crypto.open_sealed(crypto.derive_seal_key(shared, request_id), box, request_id)
    try:
        return Credentials.model_validate_json(plaintext)
    except ValidationError as exc:
        raise InvalidAnswer(f"sealed credentials do not match the contract: {_first_error(exc)}") from exc


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "answer"
    return f"{where}: {first.get('msg', 'invalid')}"


def merge_reclaim(previous: Credentials | None, new: Credentials) -> Credentials:
    """Credentials to keep after a claim. A re-claim answers api_key "" (the bridge shows a key once),
    so keep the api_key stored from the first claim rather than overwriting it with nothing."""
    if new.api_key == "" and previous is not None and previous.api_key:
        return new.model_copy(update={"api_key": previous.api_key})
    return new


def concrete_topic(topic_filter: str, leaf: str = "hello", wildcard_level: str = "sim") -> str:
    """A topic a device may publish on, from a filter it was granted: `+` levels become `sim`,
    a trailing `#` becomes `hello` (`devices/+/up/#` -> `devices/sim/up/hello`)."""
    levels = topic_filter.split("/")
    if "#" in levels[:-1] or any("#" in lv and lv != "#" for lv in levels):
        raise ValueError(f"{topic_filter!r} is not a valid MQTT topic filter ('#' must be a whole last level)")
    if any("+" in lv and lv != "+" for lv in levels):
        raise ValueError(f"{topic_filter!r} is not a valid MQTT topic filter ('+' must be a whole level)")
    out = [wildcard_level if lv == "+" else lv for lv in levels]
    if out[-1] == "#":
        out[-1] = leaf
    return "/".join(out)


# --- timing policy --------------------------------------------------------------------------------------


def answer_wait(timeout: float, attempt: int) -> float:
    """How long attempt n (1-based) waits for an answer before re-sending: doubling, capped, jittered.

    Jitter spreads a fleet that timed out together (bridge restart) so it does not re-send in lockstep.
    """
    base = min(timeout * 2.0 ** (attempt - 1), max(timeout, MAX_ANSWER_WAIT_S))
    return base * random.uniform(1.0, 1.2)


def retry_delay(retry_after: int | None) -> float:
    """The bridge's retry_after plus up to 25% jitter, so rate-limited devices do not all return at once."""
    base = float(DEFAULT_RETRY_AFTER_S if retry_after is None else max(retry_after, 0))
    return base + random.uniform(0.0, max(base, 0.2) * 0.25)


# --- blocking I/O ---------------------------------------------------------------------------------------


def claim_over_mqtt(
    host: str,
    port: int,
    identity: DeviceIdentity,
    provision_key: str,
    cloud_public_key: ec.EllipticCurvePublicKey,
    prefix: str = topics.DEFAULT_PREFIX,
    timeout: float = DEFAULT_TIMEOUT_S,
    request_id: str | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    *,
    hardware: Hardware | None = None,
    network: Network | None = None,
    device_name: str | None = None,
    username: str | None = None,
    tls: bool = False,
    ca_file: Path | None = None,
    cancel: threading.Event | None = None,
    certificate: bool = False,
) -> ProvisionResult:
    """Claim over MQTT and open the answer. Blocking; safe to run on many threads at once.

    Every re-send carries the same request_id, so the bridge replays its answer instead of acting
    twice. Re-sends happen when no answer came in time (waits double), when the connection dropped,
    and after a retryable error answer (after its retry_after). `max_attempts` bounds all of them.
    Final outcomes raise: ClaimRejected, ClaimTimeout, ConnectError, InvalidAnswer or SealError.
    `username` is for brokers that require one to claim (PROTOCOL.md: `provision`, no password).
    Use `tls` whenever the broker offers it: the seal protects the credentials, not the provisioning key.
    Setting `cancel` (from another thread) ends the attempt promptly with Cancelled.
    `certificate`: the claim carries a CSR for the device's key (`build_csr`), as a provisioning key that
    issues certificates requires (section 10.4); the credentials then hold `mqtt.certificate`, no token.
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    request_id = request_id or new_request_id()
    payload = to_json(
        build_claim(
            identity,
            provision_key,
            request_id,
            hardware=hardware,
            network=network,
            device_name=device_name,
            cloud_key_id=crypto.key_id(cloud_public_key),
            csr=build_csr(identity.private_key, identity.hardware_id) if certificate else None,
        )
    )
    return _exchange(
        _Exchange(
            host, port, identity, cloud_public_key, prefix, timeout, max_attempts, username, tls, ca_file, cancel
        ),
        topics.claim_topic(prefix, identity.client_id),
        lambda: (request_id, payload),  # every re-send is the same bytes: the bridge replays its answer
    )


def refresh_over_mqtt(
    host: str,
    port: int,
    identity: DeviceIdentity,
    device_id: str,
    cloud_public_key: ec.EllipticCurvePublicKey,
    prefix: str = topics.DEFAULT_PREFIX,
    timeout: float = DEFAULT_TIMEOUT_S,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    *,
    username: str | None = None,
    tls: bool = False,
    ca_file: Path | None = None,
    cancel: threading.Event | None = None,
    clock: Callable[[], float] = time.time,
    certificate: bool = False,
) -> ProvisionResult:
    """Get a fresh token for a provisioned device over its token topic; no provisioning key needed.

    `cloud_public_key` must be the cloud key the device was provisioned with: the MAC's device key is
    derived from it. The device connects as a provisioning client (its claim client id; anonymous or
    `username`), since its token may have expired. Unlike a claim, every send is a new request (new
    request_id, timestamp and MAC): the bridge refuses a request_id it has seen, so a re-send of the same
    bytes could only be refused. An answer to any request sent is accepted. Same errors as claim_over_mqtt;
    `result.credentials.api_key` is "" (keep the stored one, `merge_reclaim`).

    `certificate`: renew the certificate of a device that holds certificate credentials (section 10.4):
    every request carries a CSR for the device's own key (the same key: its device key depends on it) and
    the renewal MAC; the answer holds the new certificate. The bridge refuses a renewal from a token device
    and a plain refresh from a certificate device (`permission_denied`).
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    device_key = device_key_for(identity, cloud_public_key)
    csr = build_csr(identity.private_key, identity.hardware_id) if certificate else None

    def next_request() -> tuple[str, bytes]:
        request_id = new_request_id()
        return request_id, to_json(build_token_refresh(device_id, device_key, request_id, int(clock()), csr))

    return _exchange(
        _Exchange(
            host, port, identity, cloud_public_key, prefix, timeout, max_attempts, username, tls, ca_file, cancel
        ),
        topics.token_topic(prefix, identity.client_id),
        next_request,
    )


@dataclass(frozen=True)
class _Exchange:
    """Where and how one device talks to the bridge: a request topic out, its response topic in."""

    host: str
    port: int
    identity: DeviceIdentity
    cloud_public_key: ec.EllipticCurvePublicKey
    prefix: str
    timeout: float
    max_attempts: int
    username: str | None
    tls: bool
    ca_file: Path | None
    cancel: threading.Event | None


def _answered_request_id(answer: bytes) -> str | None:
    try:
        doc = json.loads(answer)
    except (ValueError, UnicodeDecodeError):
        return None
    value = doc.get("request_id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


def _exchange(ex: _Exchange, request_topic: str, next_request: Callable[[], tuple[str, bytes]]) -> ProvisionResult:
    """Send requests on `request_topic` until an answer to one of them opens, with the claim's retry policy.

    `next_request()` gives the (request_id, payload) of each send. Answers to any request sent count
    (a late answer to an earlier send is as good as the latest); others are stale and skipped.
    """
    host, port, identity, cloud_public_key = ex.host, ex.port, ex.identity, ex.cloud_public_key
    timeout, max_attempts, cancel = ex.timeout, ex.max_attempts, ex.cancel
    response_topic = topics.response_topic(ex.prefix, identity.client_id)
    sent: list[str] = []
    request_id = ""

    session: Session | None = None
    attempt = 0
    first_sent: float | None = None
    next_send = time.monotonic()
    problem = "no answer"
    try:
        while True:
            if time.monotonic() >= next_send:
                if attempt >= max_attempts:
                    if first_sent is None:  # never got as far as sending the claim
                        raise ConnectError(f"gave up after {attempt} attempts: {problem}")
                    raise ClaimTimeout(f"no answer to {request_id} after {attempt} attempts ({problem})")
                attempt += 1
                try:
                    if session is None:
                        session = _claim_session(
                            host,
                            port,
                            identity.client_id,
                            response_topic,
                            timeout,
                            ex.username,
                            ex.tls,
                            ex.ca_file,
                            cancel,
                        )
                    request_id, payload = next_request()
                    sent.append(request_id)  # before publishing: an answer may follow a publish that "failed"
                    session.publish(request_topic, payload)
                except BrokerRefused:
                    raise
                except ConnectError as exc:
                    problem = str(exc)
                    _close(session)
                    session = None
                    next_send = time.monotonic() + answer_wait(min(timeout, 1.0), attempt)
                    continue
                first_sent = first_sent or time.monotonic()
                next_send = time.monotonic() + answer_wait(timeout, attempt)
                problem = f"nothing on {response_topic} for {next_send - time.monotonic():.1f}s"
            if session is None:  # reconnecting: wait out the backoff without a connection
                if (cancel or threading.Event()).wait(max(0.0, next_send - time.monotonic())):
                    raise Cancelled("cancelled")
                continue
            try:
                message = session.next_message(next_send)
            except ConnectionLost as exc:
                # The claim may be lost with the connection: reconnect and re-send after a short backoff.
                problem = str(exc)
                _close(session)
                session = None
                next_send = time.monotonic() + answer_wait(min(timeout, 1.0), attempt)
                continue
            if message is None or message[0] != response_topic:
                continue
            answered = _answered_request_id(message[1])
            try:
                result = open_answer(
                    message[1], identity, cloud_public_key, answered if answered in sent else request_id
                )
            except StaleAnswer:
                continue  # e.g. an answer retained from an earlier run
            except ClaimRejected as exc:
                if not exc.retryable or attempt >= max_attempts:
                    raise
                problem = str(exc)
                next_send = time.monotonic() + retry_delay(exc.retry_after)
                continue
            assert first_sent is not None  # an answer to our request_id implies we sent it
            return replace(result, latency_s=time.monotonic() - first_sent, attempts=attempt)
    finally:
        _close(session)


def _claim_session(
    host: str,
    port: int,
    client_id: str,
    response_topic: str,
    timeout: float,
    username: str | None,
    tls: bool,
    ca_file: Path | None,
    cancel: threading.Event | None,
) -> Session:
    """A connection subscribed (SUBACK seen) to the response topic before any claim is sent:
    a claim published earlier could be answered before the broker routes the answer to us."""
    session = Session(client_id, username=username, tls=tls, ca_file=ca_file, cancel=cancel)
    try:
        deadline = time.monotonic() + timeout
        session.connect(host, port, deadline)
        session.subscribe(response_topic, deadline)
    except BaseException:
        session.close()
        raise
    return session


def _close(session: Session | None) -> None:
    if session is not None:
        session.close()


def connect_with_credentials(
    host: str,
    port: int,
    credentials: Credentials,
    timeout: float = DEFAULT_TIMEOUT_S,
    *,
    ca_file: Path | None = None,
    private_key: ec.EllipticCurvePrivateKey | None = None,
    files_dir: Path | None = None,
    cancel: threading.Event | None = None,
) -> str:
    """Connect as the provisioned device and publish one QoS 1 message on its own topic.

    Token credentials: client id and username the device id, password the token, TLS when
    `credentials.mqtt.tls` says so. Certificate credentials (`mqtt.certificate`, section 10.4): TLS,
    presenting the certificate chain and `private_key` (required: the device's own key), username the
    device id and no password; `port` must then be the broker's certificate listener. The TLS library
    reads the chain and key from files only: they are written to a 0700 directory under `files_dir` (the
    device's state dir; the system's temporary directory when None), the key 0600, and removed before
    the connection is made.

    Returns the topic once the broker acknowledged it (PUBACK). MQTT 3.1.1 has no negative PUBACK,
    so a broker may acknowledge a publish its ACL dropped: when one of the granted subscribe filters
    covers the topic, the device also subscribes and waits for its own message to come back, which
    proves the credentials' publish and subscribe grants end to end.

    `host`/`port` are where this simulator reaches the broker; `credentials.mqtt.host/port` are what
    the bridge advertises to devices, which from here may not be reachable (NAT, a public name).
    """
    mqtt_creds = credentials.mqtt
    if not mqtt_creds.publish:
        raise ConnectError("credentials grant no publish topic to prove them with")
    topic = concrete_topic(mqtt_creds.publish[0])
    echo_filter = next((f for f in mqtt_creds.subscribe if topic_matches(f, topic)), None)
    payload = json.dumps({"hello": AGENT_VERSION, "nonce": secrets.token_hex(8)}).encode("utf-8")
    if mqtt_creds.certificate is None:
        session = Session(
            mqtt_creds.client_id,
            username=mqtt_creds.username,
            password=mqtt_creds.token,
            tls=mqtt_creds.tls,  # the bridge says whether the device port is TLS
            ca_file=ca_file,
            cancel=cancel,
        )
    else:
        if private_key is None:
            raise ValueError("certificate credentials need the device's private key to connect with")
        check_certificate_key(mqtt_creds.certificate, private_key)
        with client_certificate_files(private_key, mqtt_creds.certificate, files_dir) as files:
            session = Session(
                mqtt_creds.client_id,
                username=mqtt_creds.username,  # the device id; brokers take it from the certificate anyway
                tls=True,
                ca_file=ca_file,
                client_certificate=files,
                cancel=cancel,
            )
    try:
        deadline = time.monotonic() + timeout
        session.connect(host, port, deadline)
        if echo_filter is not None:
            session.subscribe(echo_filter, deadline)
        mid = session.publish(topic, payload)
        try:
            if not session.wait_puback(mid, deadline):
                raise ConnectError(f"no PUBACK for {topic} within {timeout:.1f}s")
            if echo_filter is not None and not _echoed(session, topic, payload, deadline):
                raise ConnectError(f"{topic} was acknowledged but never delivered back on {echo_filter}")
        except ConnectionLost as exc:
            # A broker that refuses a publish under MQTT 3.1.1 often just disconnects.
            raise ConnectError(f"broker closed the connection while publishing to {topic}") from exc
        return topic
    finally:
        session.close()


def connect_with_token(
    host: str,
    port: int,
    credentials: Credentials,
    timeout: float = DEFAULT_TIMEOUT_S,
    *,
    ca_file: Path | None = None,
    cancel: threading.Event | None = None,
) -> str:
    """`connect_with_credentials` for token credentials (its older name, kept for callers)."""
    return connect_with_credentials(host, port, credentials, timeout, ca_file=ca_file, cancel=cancel)


def check_certificate_key(certificate_chain: str, private_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """The first certificate of a PEM chain (the device's own), checked to be for `private_key`
    (ValueError otherwise: a TLS library would only say "key values mismatch")."""
    try:
        chain = x509.load_pem_x509_certificates(certificate_chain.encode("ascii"))
    except ValueError as exc:
        raise ValueError("mqtt.certificate is not a PEM certificate chain") from exc
    if chain[0].public_key() != private_key.public_key():
        raise ValueError("mqtt.certificate is not for this device's key")
    return chain[0]


def _echoed(session: Session, topic: str, payload: bytes, deadline: float) -> bool:
    while (message := session.next_message(deadline)) is not None:
        if message == (topic, payload):
            return True
    return False


__all__ = [
    "DeviceIdentity",
    "ProvisionResult",
    "build_claim",
    "build_csr",
    "build_token_refresh",
    "check_certificate_key",
    "claim_over_mqtt",
    "client_id_for",
    "concrete_topic",
    "connect_with_credentials",
    "connect_with_token",
    "device_state_dir",
    "merge_reclaim",
    "new_request_id",
    "open_answer",
    "refresh_over_mqtt",
    "topic_matches",
]
