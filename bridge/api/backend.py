"""The backend endpoints (scope `backend`), for a backend that owns the device workflow (Infuse IoT's model):

    GET  /v1/backend/cloud-key                      the cloud public key devices are built with
    POST /v1/backend/devices/{id}/purpose-key       a key for one purpose, derived from the device key
    POST /v1/backend/devices/{id}/token             an MQTT token for the device, with a chosen TTL (capped)
    POST /v1/backend/api-keys/verify                which device a `dk_` API key belongs to

The device key itself is never handed out: it authenticates the device's token refreshes, so its holder could
impersonate the device. A purpose key is HKDF-SHA256(device key, info "provbridge v1 purpose key " + label):
the device derives the same from its own device key (PROTOCOL.md §9.2), and the backend gets only that.
Every call is an event naming the admin token that made it (actor `api:<token id>`): `backend.cloud_key_read`,
`backend.purpose_key_derived`, `backend.token_minted`, `backend.api_key_checked`; none carries a secret.
"""

import re
import time
from typing import Annotated, Any

from cryptography.hazmat.primitives import serialization
from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from bridge.api.context import Caller, errors, require
from bridge.claims.credentials import device_key_of, device_scope, rabbitmq_scope
from bridge.config import TOKEN_TTL_CAP_SECONDS
from bridge.errors import ApiError
from bridge.ops import devices
from bridge.storage.records import Device
from bridge.tokens import mint_token
from provwire import crypto
from provwire.models import Event, rfc3339

router = APIRouter(prefix="/v1/backend")
Backend = Annotated[Caller, Depends(require("backend"))]
LABEL_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PurposeKeyRequest(Body):
    label: str = Field(description="what the key is for, 1-64 of A-Z a-z 0-9 . _ : -, e.g. 'payload-encryption'")


class TokenRequest(Body):
    ttl_seconds: int | None = Field(default=None, ge=60, le=TOKEN_TTL_CAP_SECONDS)


class ApiKeyCheck(Body):
    api_key: str = Field(max_length=256)


def _active_device(caller: Caller, device_id: str) -> Device:
    device = caller.store.device(device_id)
    caller.owns(device.tenant_id, f"device {device_id!r}")
    if device.status != "active" or device.reset_pending:
        raise ApiError(409, f"{device_id} is revoked or awaits its claim after a reset: nothing is issued for it")
    return device


def _record(caller: Caller, name: str, device: Device | None, **fields: Any) -> None:
    tenant = device.tenant_name if device else (caller.token.tenant_name or "_")
    event = Event(
        event=name,
        time=rfc3339(time.time()),
        tenant=tenant,
        device_id=device.id if device else None,
        actor=caller.actor,
        **fields,
    )
    caller.store.add_events([event])


@router.get("/cloud-key", summary="The cloud public key (PEM, base64 SEC1, kid) that firmware is built with")
def cloud_key(caller: Backend) -> dict[str, str]:
    ring = caller.keys
    public = ring.cloud_key.public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    # Public, but who reads it (which backends build or check firmware) is still worth a trail.
    _record(caller, "backend.cloud_key_read", None)
    return {"kid": ring.active_cloud, "sec1_base64": crypto.b64encode(crypto.sec1(public)), "pem": pem}


@router.post(
    "/devices/{device_id}/purpose-key",
    summary="A key for one purpose, derived from the device key",
    responses=errors(404, 409),
)
def purpose_key(device_id: str, body: PurposeKeyRequest, caller: Backend) -> dict[str, str]:
    if LABEL_RE.fullmatch(body.label) is None:
        raise ApiError(400, "label must be 1-64 of A-Z a-z 0-9 . _ : -")
    device = _active_device(caller, device_id)
    ring = caller.keys
    key = crypto.derive_purpose_key(device_key_of(device, ring), body.label)
    _record(caller, "backend.purpose_key_derived", device, label=body.label)
    return {"device_id": device.id, "label": body.label, "key": crypto.b64encode(key)}


@router.post(
    "/devices/{device_id}/token",
    summary="An MQTT token for the device, scoped by its profile",
    responses=errors(404, 409),
)
def device_token(device_id: str, body: TokenRequest, caller: Backend) -> dict[str, Any]:
    settings = caller.settings
    if settings.broker.mode == "external" and settings.broker.mosquitto_auth == "dynsec":
        raise ApiError(409, "Mosquitto's dynsec mode holds one token per device, mirrored by the bridge: not here")
    device = _active_device(caller, device_id)
    ring = caller.keys
    publish, subscribe = device_scope(settings, device)
    grant = mint_token(
        key=ring.token_key,
        kid=ring.active_token,
        issuer=settings.token.issuer,
        audience=settings.token.audience,
        device_id=device.id,
        tenant=device.tenant_name,
        publish=publish,
        subscribe=subscribe,
        now=int(time.time()),
        ttl_seconds=body.ttl_seconds or settings.token.ttl_seconds,
        generation=device.credential_generation,
        scope=rabbitmq_scope(settings, device.id, publish, subscribe),
    )
    _record(caller, "backend.token_minted", device)
    return {
        "device_id": device.id,
        "token": grant.token,
        "expires_at": grant.expires_at,
        "publish": grant.publish,
        "subscribe": grant.subscribe,
    }


@router.post("/api-keys/verify", summary="Whether a dk_ API key is valid, and for which device")
def verify_api_key(body: ApiKeyCheck, caller: Backend) -> dict[str, Any]:
    device = devices.verify_api_key(caller.store, body.api_key)
    if device is not None and caller.token.tenant_id not in (None, device.tenant_id):
        device = None  # another tenant's: as unknown
    _record(caller, "backend.api_key_checked", device, reason="valid" if device else "invalid")
    if device is None:
        return {"valid": False}
    return {"valid": True, "device_id": device.id, "tenant": device.tenant_name}
