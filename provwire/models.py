"""The JSON messages of protocol v1, as pydantic models. Field limits here are the contract."""

import functools
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from cryptography import x509
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from provwire import crypto
from provwire.errors import ErrorCode

MAX_CLAIM_BYTES = 16 * 1024
# A P-256 CSR with a short subject is about 200 bytes of DER (270 base64 characters); 700 leaves room for a
# subject of a few names and still lets a renewal fit the 1024 bytes of a refresh (PROTOCOL.md section 10.4).
MAX_CSR_CHARS = 700


def _printable(value: str) -> str:
    # Device-supplied text ends up in logs, tables and events: no control characters.
    if not value.isprintable():
        raise ValueError("must be printable text (no control characters)")
    return value


RequestId = Annotated[str, StringConstraints(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=128), AfterValidator(_printable)]
Text64 = Annotated[str, StringConstraints(max_length=64), AfterValidator(_printable)]
Text32 = Annotated[str, StringConstraints(max_length=32), AfterValidator(_printable)]
CsrText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CSR_CHARS)]


@functools.lru_cache(maxsize=256)
def _csr_of(value: str) -> x509.CertificateSigningRequest:
    # Cached: the field validator checks a CSR and the model keeps it, and verifying its signature costs an ECDSA.
    try:
        der = crypto.b64decode(value)
    except ValueError as exc:
        raise ValueError("csr must be standard base64 of a DER PKCS#10 request") from exc
    return crypto.parse_csr_der(der)  # InvalidCsr is a ValueError: a field error


def _private(model: BaseModel, name: str) -> Any:
    """A private attribute's value, read from pydantic's own dict of them: `model._name` goes through
    `BaseModel.__getattr__`, 3 µs a read against 0.1 µs, and a claim reads its public key three times."""
    private = model.__pydantic_private__
    assert private is not None  # every model here declares its private attributes
    return private[name]


class _Strict(BaseModel):
    # What devices send. strict: "4" is not 4; forbid: a misspelt field is an error, not dropped.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _CarriesCsr(_Strict):
    """A device message that may carry `csr` (certificate credentials): its CSR, parsed once by its validator."""

    _csr: x509.CertificateSigningRequest | None = PrivateAttr(default=None)

    @property
    def parsed_csr(self) -> x509.CertificateSigningRequest | None:
        value: x509.CertificateSigningRequest | None = _private(self, "_csr")
        return value

    # Pickled by the bridge, from the process that parsed a claim to its claim worker: a parsed CSR is not
    # picklable, so it travels as its text and is read again on arrival.
    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        private = state.get("__pydantic_private__")
        if private and private.get("_csr") is not None:
            state["__pydantic_private__"] = {**private, "_csr": None}
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        csr = self.__dict__.get("csr")
        if csr is not None and self.__pydantic_private__ is not None:
            self.__pydantic_private__["_csr"] = _csr_of(csr)

    @property
    def csr_public_key_sec1(self) -> bytes | None:
        """The SEC1 point of the key the CSR is for (None without a CSR)."""
        csr = self.parsed_csr
        return None if csr is None else crypto.csr_key_sec1(csr)


class _Answer(BaseModel):
    # What devices receive: unknown members are ignored, so the bridge can add fields without
    # breaking firmware already in the field (PROTOCOL.md, compatibility).
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class Hardware(_Strict):
    board_model: ShortText | None = None
    cpu_cores: Annotated[int, Field(ge=1, le=65536)] | None = None
    ram_mb: Annotated[int, Field(ge=0, le=1 << 40)] | None = None
    os: ShortText | None = None
    arch: ShortText | None = None
    kernel: ShortText | None = None


class Network(_Strict):
    hostname: ShortText | None = None
    ip: Text64 | None = None
    mac: Text64 | None = None
    connection_type: Text32 | None = None


class Claim(_CarriesCsr):
    """What a device publishes on `{prefix}/claim/{client_id}`."""

    request_id: RequestId
    provision_key: Annotated[
        str, StringConstraints(min_length=1, max_length=256), AfterValidator(_printable), Field(repr=False)
    ]
    hardware_id: ShortText
    public_key: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    device_name: ShortText | None = None
    cloud_key_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")] | None = None
    hardware: Hardware | None = None
    network: Network | None = None
    agent_version: Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(_printable)] | None = (
        None
    )
    csr: CsrText | None = None  # certificate credentials: a CSR for the key of `public_key`

    _public_key_sec1: bytes = PrivateAttr(default=b"")

    @field_validator("hardware_id")
    @classmethod
    def _hardware_id_is_topic_safe(cls, value: str) -> str:
        if any(c in value for c in "+#/"):
            raise ValueError("hardware_id must not contain '+', '#' or '/'")
        return value

    @field_validator("public_key")
    @classmethod
    def _public_key_is_a_p256_point(cls, value: str) -> str:
        try:
            raw = crypto.b64decode(value)
        except ValueError as exc:
            raise ValueError("public_key must be standard base64") from exc
        crypto.public_key_from_sec1(raw)  # InvalidPublicKey is a ValueError: a field error
        return value

    @field_validator("csr")
    @classmethod
    def _csr_is_for_the_public_key(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        csr = _csr_of(value)
        public_key = info.data.get("public_key")  # absent when it was itself refused
        if public_key is not None and crypto.csr_key_sec1(csr) != crypto.b64decode(public_key):
            raise ValueError("csr is for another key than public_key")
        return value

    def model_post_init(self, _context: Any) -> None:
        self._public_key_sec1 = crypto.b64decode(self.public_key)
        if self.csr is not None:
            self._csr = _csr_of(self.csr)

    @property
    def public_key_sec1(self) -> bytes:
        value: bytes = _private(self, "_public_key_sec1")
        return value


class Sealed(_Answer):
    nonce: str  # base64, 12 bytes
    ciphertext: str  # base64, AES-256-GCM output with its 16-byte tag


class MqttCredentials(_Answer):
    host: str
    port: int
    tls: bool
    client_id: str
    username: str
    token: str | None = Field(default=None, repr=False)  # token credentials
    certificate: str | None = None  # certificate credentials: PEM, the device's certificate then the device CA's
    expires_at: int  # unix seconds: the token's exp, or the certificate's notAfter
    publish: list[str]
    subscribe: list[str]


class Credentials(_Answer):
    """The plaintext inside `sealed`: only the device that made the claim can read it."""

    api_key: str = Field(repr=False)  # "" on an idempotent re-claim
    mqtt: MqttCredentials


class ClaimOk(_Answer):
    request_id: str
    status: Literal["ok"] = "ok"
    device_id: str
    created: bool
    labels: dict[str, str]
    groups: list[str]
    profile: str
    cloud_key_id: str
    sealed: Sealed


class FieldError(_Answer):
    field: str
    message: str


class ClaimError(_Answer):
    request_id: str | None = None
    status: Literal["error"] = "error"
    code: Annotated[ErrorCode, Field(strict=False)]  # accept the plain string, as it is on the wire
    message: str
    errors: list[FieldError] | None = None
    retry_after: int | None = None


Answer = ClaimOk | ClaimError


def rfc3339(now: float) -> str:
    """Unix seconds as `Event.time` has them: RFC 3339, UTC, milliseconds (also the time of JSON log lines)."""
    return datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Event(_Answer):
    """An ops event on `{prefix}/events/{tenant}/{event}`. Never carries a secret."""

    event: str
    time: str  # RFC 3339, UTC
    tenant: str
    request_id: str | None = None
    client_id: str | None = None
    hardware_id: str | None = None
    device_id: str | None = None
    key_name: str | None = None
    key_id_prefix: str | None = None
    reason: str | None = None
    actor: str | None = None  # administration events: who made the change
    changes: list[str] | None = None  # `key.updated`: the fields that changed
    count: int | None = None  # `key.codes_created`, `allowlist.imported`: how many
    label: str | None = None  # `backend.purpose_key_derived`: the purpose the backend named


class BridgeStatus(_Answer):
    status: Literal["online", "offline"]


def to_json(model: BaseModel) -> bytes:
    """The one serialisation used on the wire: compact, fields in model order, None fields left out."""
    return model.model_dump_json(exclude_none=True).encode("utf-8")


# --- token refresh (PROTOCOL.md section 10.1) ---------------------------------------------------

MAX_REFRESH_BYTES = 1024
DeviceId = Annotated[str, StringConstraints(pattern=r"^dev_[a-z2-7]{26}$")]


class TokenRefresh(_CarriesCsr):
    """What a provisioned device publishes on `{prefix}/token/{client_id}` to get a fresh token.

    No secret travels: `mac` proves possession of the device key (`crypto.refresh_mac`). The answer
    is a ClaimOk (its sealed Credentials have `api_key` "") or a ClaimError, on the response topic.
    """

    request_id: RequestId
    device_id: DeviceId
    timestamp: Annotated[int, Field(ge=0, le=1 << 40)]  # unix seconds; the bridge allows a clock skew window
    mac: Annotated[str, StringConstraints(min_length=44, max_length=44)]
    csr: CsrText | None = None  # a certificate renewal: a CSR for the device's key

    @field_validator("mac")
    @classmethod
    def _mac_is_base64_of_32_bytes(cls, value: str) -> str:
        try:
            raw = crypto.b64decode(value)
        except ValueError as exc:
            raise ValueError("mac must be standard base64") from exc
        if len(raw) != crypto.REFRESH_MAC_BYTES:
            raise ValueError("mac must encode 32 bytes")
        return value

    @field_validator("csr")
    @classmethod
    def _csr_is_a_csr(cls, value: str | None) -> str | None:
        if value is not None:
            _csr_of(value)
        return value

    def model_post_init(self, _context: Any) -> None:
        if self.csr is not None:
            self._csr = _csr_of(self.csr)

    @property
    def mac_bytes(self) -> bytes:
        return crypto.b64decode(self.mac)
