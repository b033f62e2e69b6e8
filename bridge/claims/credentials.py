"""What the bridge derives and hands to one device: its device key, a token, sealed credentials.

Shared by the claim (`bridge.claims.provisioning`) and the token refresh (`bridge.claims.refresh`), so a device
gets the same token scope, the same Credentials and the same sealed ClaimOk from both paths.
"""

from bridge.claims.mirror import TokenMirror
from bridge.config import Settings
from bridge.storage.keyfiles import KeyRing
from bridge.storage.records import Device
from bridge.tls.certificates import device_endpoint
from bridge.tokens import fill_scope, mint_token
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
    profile = settings.profiles.get(device.profile) or settings.profiles["default"]
    grant = mint_token(
        key=keys.token_key,
        kid=keys.active_token,
        issuer=settings.token.issuer,
        audience=settings.token.audience,
        device_id=device.id,
        tenant=device.tenant_name,
        publish=fill_scope(profile.publish, device.id, device.tenant_name),
        subscribe=fill_scope(profile.subscribe, device.id, device.tenant_name),
        now=now,
        ttl_seconds=settings.token.ttl_seconds,
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
