"""What the bridge derives and hands to one device: its device key, a token or a certificate, sealed credentials.

Shared by the claim (`bridge.claims.provisioning`) and the token refresh or certificate renewal
(`bridge.claims.refresh`), so a device gets the same scope, the same Credentials and the same sealed ClaimOk
from both paths.
"""

from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509

from bridge.claims.mirror import TokenMirror
from bridge.config import Settings
from bridge.rabbitmq_scopes import device_scopes
from bridge.storage.keyfiles import KeyRing
from bridge.storage.records import Device, IssuedCertificate
from bridge.tls.certificates import device_endpoint
from bridge.tls.device_ca import DeviceCa, chain_pem, sign_device_certificate
from bridge.tokens import fill_scope, mint_token
from broker.certificates import DeviceScope
from provwire import crypto
from provwire.models import ClaimOk, Credentials, MqttCredentials, Sealed, to_json


def shared_secret(keys: KeyRing, cloud_kid: str, device_public_key: bytes) -> bytes:
    """ECDH of the cloud key `cloud_kid` (KeyError when the ring lacks it) and a device public key."""
    return crypto.shared_secret(keys.cloud[cloud_kid], crypto.public_key_from_sec1(device_public_key))


def device_key_of(device: Device, keys: KeyRing) -> bytes:
    """The device key of a provisioned device, from the cloud key it was provisioned with."""
    return crypto.derive_device_key(shared_secret(keys, device.cloud_key_id, device.public_key))


def seal_credentials(shared: bytes, request_id: str, credentials: Credentials) -> Sealed:
    box = crypto.seal(crypto.derive_seal_key(shared, request_id), to_json(credentials), request_id)
    return Sealed(nonce=crypto.b64encode(box.nonce), ciphertext=crypto.b64encode(box.ciphertext))


def issue_credentials(
    settings: Settings, keys: KeyRing, mirror: TokenMirror, device: Device, api_key: str, now: int
) -> Credentials:
    """Mint a token scoped by the device's profile, tell the broker, and build the device's Credentials.

    Call it inside the caller's database transaction: a MirrorError then rolls everything back, so no
    device ever holds a token its broker does not know.
    """
    publish, subscribe = device_scope(settings, device)
    grant = mint_token(
        key=keys.token_key,
        kid=keys.active_token,
        issuer=settings.token.issuer,
        audience=settings.token.audience,
        device_id=device.id,
        tenant=device.tenant_name,
        publish=publish,
        subscribe=subscribe,
        now=now,
        ttl_seconds=settings.token.ttl_seconds,
        generation=device.credential_generation,
        scope=rabbitmq_scope(settings, device.id, publish, subscribe),
    )
    mirror.grant(device.id, grant)
    endpoint = device_endpoint(settings)  # the TLS port whenever the broker offers TLS
    return Credentials(
        api_key=api_key,
        mqtt=MqttCredentials(
            host=endpoint.host,
            port=endpoint.port,
            tls=endpoint.tls,
            client_id=device.id,
            username=device.id,
            token=grant.token,
            expires_at=grant.expires_at,
            publish=grant.publish,
            subscribe=grant.subscribe,
        ),
    )


# A week: short enough that a leaked device key is worth little for long (there is no CRL: bridge/tls/device_ca.py),
# long enough that a device offline for days still renews in time. Set per key (`--certificate-validity`).
DEFAULT_CERTIFICATE_VALIDITY_SECONDS = 7 * 24 * 3600


def device_scope(settings: Settings, device: Device) -> tuple[list[str], list[str]]:
    """The topic filters a device may publish to and subscribe to: its profile's, filled in."""
    profile = settings.profiles.get(device.profile) or settings.profiles["default"]
    return (
        fill_scope(profile.publish, device.id, device.tenant_name),
        fill_scope(profile.subscribe, device.id, device.tenant_name),
    )


def rabbitmq_scope(settings: Settings, device_id: str, publish: list[str], subscribe: list[str]) -> list[str] | None:
    """The `scope` claim RabbitMQ's OAuth 2 backend reads (`broker.mode = "rabbitmq"`), else None: no such claim.
    Its prefix is the token's audience, which RabbitMQ's `auth_oauth2.resource_server_id` must equal."""
    if settings.broker.mode != "rabbitmq":
        return None
    rabbit = settings.rabbitmq
    return device_scopes(
        resource_server_id=settings.token.audience,
        vhost=rabbit.vhost,
        exchange=rabbit.exchange,
        prefix=settings.topic_prefix,
        device_id=device_id,
        publish=publish,
        subscribe=subscribe,
    )


@dataclass(frozen=True)
class CertificateOrder:
    """What a device certificate is made from besides the device: the CA, the device's CSR (already checked to
    be for the device's key), the key's validity, and the serial number drawn for it."""

    ca: DeviceCa
    csr: x509.CertificateSigningRequest = field(repr=False)
    validity_seconds: int
    serial: int


def issue_certificate(
    settings: Settings, order: CertificateOrder, device: Device, api_key: str, request_id: str, now: int
) -> tuple[Credentials, IssuedCertificate]:
    """Sign a certificate for the device's key, scoped by its profile, and build the device's Credentials.

    The scope travels inside the certificate (bridge/tls/device_ca.py); the broker reads it from there, so
    nothing is told to the broker, whatever `broker.mosquitto_auth` is.
    """
    publish, subscribe = device_scope(settings, device)
    certificate = sign_device_certificate(
        order.ca,
        order.csr,
        device_id=device.id,
        tenant=device.tenant_name,
        scope=DeviceScope(tuple(publish), tuple(subscribe)),
        not_before=datetime.fromtimestamp(now, UTC),
        validity_seconds=order.validity_seconds,
        serial=order.serial,
    )
    not_after = int(certificate.not_valid_after_utc.timestamp())
    host = device_endpoint(settings).host
    credentials = Credentials(
        api_key=api_key,
        mqtt=MqttCredentials(
            host=host,
            port=settings.broker.certificate_port,  # the listener that requires a device certificate
            tls=True,
            client_id=device.id,
            username=device.id,
            certificate=chain_pem(certificate, order.ca),
            expires_at=not_after,
            publish=publish,
            subscribe=subscribe,
        ),
    )
    issued = IssuedCertificate(
        serial=format(order.serial, "x"),
        device_id=device.id,
        request_id=request_id,
        not_before=int(certificate.not_valid_before_utc.timestamp()),
        not_after=not_after,
        issued_at=now,
        generation=device.credential_generation,
    )
    return credentials, issued


def sealed_answer(
    request_id: str, device: Device, created: bool, cloud_kid: str, shared: bytes, credentials: Credentials
) -> ClaimOk:
    """The ok answer: the device's public facts in clear, its credentials sealed to its key and request_id."""
    return ClaimOk(
        request_id=request_id,
        device_id=device.id,
        created=created,
        labels=device.labels,
        groups=device.groups,
        profile=device.profile,
        cloud_key_id=cloud_kid,
        sealed=seal_credentials(shared, request_id, credentials),
    )
