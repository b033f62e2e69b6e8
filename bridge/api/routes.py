"""The admin endpoints: tenants, keys and codes, devices and their life cycle, the allowlist, events.

Each calls the function the CLI calls (bridge/ops), so both refuse the same input with the same reason. Reads
need the `read` scope (or `write`), changes `write`; a token of one tenant sees and changes that tenant only,
and where a request acts on one tenant without naming it, acts on its own ("default" for a token of every tenant).
Each route's `responses` lists the errors particular to it; bridge/api/app.py adds those every route has.
"""

import time
from dataclasses import asdict, fields
from functools import partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from bridge.api.context import Caller, errors, require
from bridge.errors import ApiError, NotFound
from bridge.ops import admin, allowlist, devices, lifecycle
from bridge.storage.records import AllowlistEntry, Device, ProvisionKey
from provwire import crypto

router = APIRouter(prefix="/v1")
Reader = Annotated[Caller, Depends(require("read"))]
Writer = Annotated[Caller, Depends(require("write"))]
Text = Annotated[str, Field(min_length=1, max_length=256)]
_TENANT_HELP = "default: the token's own tenant, or 'default' for a token of every tenant"
# The tenant a change acts on (a body member; a query parameter as TenantQuery): None until the caller's token
# says (Caller.tenant_or_default), so that a tenant's token need not name its own tenant.
OneTenant = Annotated[str | None, Field(description=_TENANT_HELP)]
TenantQuery = Annotated[str | None, Query(description=_TENANT_HELP)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# --- views ------------------------------------------------------------------------------------------


def key_view(key: ProvisionKey) -> dict[str, Any]:
    view = asdict(key)
    view.pop("key_hash")
    view.pop("tenant_id")
    view["tenant"] = view.pop("tenant_name")
    return view


_DEVICE_FIELDS = tuple(f.name for f in fields(Device))


def device_view(device: Device) -> dict[str, Any]:
    # Field by field, not `asdict`: its deep copy of every value was a quarter of a device page's time.
    view = {name: getattr(device, name) for name in _DEVICE_FIELDS}
    view["public_key"] = crypto.b64encode(device.public_key)
    view.pop("tenant_id")
    view["tenant"] = view.pop("tenant_name")
    return view


def entry_view(entry: AllowlistEntry) -> dict[str, Any]:
    return {
        "hardware_id": entry.hardware_id,
        "device_id": entry.device_id,
        "api_key_made": entry.api_key_hash is not None,
        "name": entry.name,
        "labels": entry.labels,
        "created_at": entry.created_at,
    }


def _now() -> int:
    return int(time.time())


# --- tenants ------------------------------------------------------------------------------------------


class TenantCreate(Body):
    name: Text


@router.get("/tenants", summary="List tenants by name, a page at a time (next_cursor: the next page)")
def list_tenants(
    caller: Reader,
    limit: Annotated[int, Query(ge=1, le=admin.MAX_TENANT_PAGE)] = 100,
    after: Annotated[str | None, Query(description="the next_cursor of the page before")] = None,
) -> dict[str, Any]:
    page = admin.list_tenants(caller.store, after, limit, caller.token.tenant_id)  # a tenant's token: its own only
    return {"tenants": [asdict(t) for t in page.tenants], "next_cursor": page.next_cursor}


@router.post(
    "/tenants",
    status_code=201,
    summary="Create a tenant and its default key (its value shown once)",
    responses=errors(409),
)
def create_tenant(body: TenantCreate, caller: Writer) -> dict[str, Any]:
    if caller.token.tenant_id is not None:
        raise ApiError(403, "a token of one tenant cannot create tenants")
    made = admin.create_tenant(caller.store, caller.settings, body.name, _now(), caller.actor)
    return {
        "id": made.id,
        "name": made.name,
        "default_key": key_view(made.default_key),
        "provision_key": made.provision_key,
    }


# --- keys -----------------------------------------------------------------------------------------------


class KeyCreate(Body):
    name: Text
    tenant: OneTenant = None
    profile: str = "default"
    hardware_id_pattern: str | None = None
    expires_at: int | None = None
    max_registrations: int | None = Field(default=None, ge=0, le=2**31 - 1)
    labels: dict[str, str] = Field(default_factory=dict)
    groups: list[str] = Field(default_factory=list)
    reclaim_policy: Literal["reject", "rotate"] = "reject"
    code: bool = False
    credential_type: Literal["token", "certificate"] = "token"
    certificate_validity_seconds: int | None = Field(default=None, ge=1)
    preprovisioned_only: bool = False


class KeyChange(Body):
    name: Text | None = None
    profile: str | None = None
    max_registrations: int | None = Field(default=None, ge=1, le=2**31 - 1)
    unlimited: bool = False
    expires_at: int | None = None
    no_expiry: bool = False
    set_labels: dict[str, str] = Field(default_factory=dict)
    remove_labels: list[str] = Field(default_factory=list)
    add_groups: list[str] = Field(default_factory=list)
    remove_groups: list[str] = Field(default_factory=list)
    reclaim_policy: Literal["reject", "rotate"] | None = None
    preprovisioned_only: bool | None = None


class CodesCreate(Body):
    name: Text
    count: int = Field(ge=1, le=admin.MAX_CODES_AT_ONCE)
    tenant: OneTenant = None
    profile: str = "default"
    expires_at: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    groups: list[str] = Field(default_factory=list)


def _key_of(caller: Caller, key_id: str) -> ProvisionKey:
    key = caller.store.key(key_id)
    caller.owns(key.tenant_id, f"provisioning key {key_id!r}")
    return key


@router.get(
    "/keys",
    summary="List provisioning keys and codes, oldest first, a page at a time (next_cursor)",
    responses=errors(404),
)
def list_keys(
    caller: Reader,
    tenant: str | None = None,
    limit: Annotated[int, Query(ge=1, le=admin.MAX_KEY_PAGE)] = 100,
    after: str | None = None,
) -> dict[str, Any]:
    scoped = caller.tenant(tenant)
    page = admin.list_keys(caller.store, caller.store.tenant_id(scoped) if scoped else None, after, limit)
    return {"keys": [key_view(k) for k in page.keys], "next_cursor": page.next_cursor}


@router.post(
    "/keys",
    status_code=201,
    summary="Create a provisioning key or human code (its value shown once)",
    responses=errors(404),
)
def create_key(body: KeyCreate, caller: Writer) -> dict[str, Any]:
    spec = admin.KeySpec(
        tenant=caller.tenant_or_default(body.tenant),
        name=body.name,
        profile=body.profile,
        hardware_id_pattern=body.hardware_id_pattern,
        expires_at=body.expires_at,
        max_registrations=body.max_registrations,
        labels=body.labels,
        groups=body.groups,
        reclaim_policy=body.reclaim_policy,
        human_code=body.code,
        credential_type=body.credential_type,
        certificate_validity_seconds=body.certificate_validity_seconds,
        preprovisioned_only=body.preprovisioned_only,
    )
    key, raw = admin.create_key(caller.store, caller.settings, spec, _now(), caller.actor)
    return key_view(key) | {"provision_key": raw}


@router.post(
    "/keys/codes",
    status_code=201,
    summary="Create one-time human codes in bulk (each shown once)",
    responses=errors(404),
)
def create_codes(body: CodesCreate, caller: Writer) -> list[dict[str, Any]]:
    spec = admin.KeySpec(
        tenant=caller.tenant_or_default(body.tenant),
        name=body.name,
        profile=body.profile,
        expires_at=body.expires_at,
        labels=body.labels,
        groups=body.groups,
        human_code=True,
    )
    codes = admin.create_codes(caller.store, caller.settings, spec, body.count, _now(), caller.actor)
    return [{"key_id": key.id, "code": raw, "expires_at": key.expires_at} for key, raw in codes]


@router.get("/keys/{key_id}", summary="One provisioning key", responses=errors(404))
def get_key(key_id: str, caller: Reader) -> dict[str, Any]:
    return key_view(_key_of(caller, key_id))


@router.patch("/keys/{key_id}", summary="Change a key (what is not given stays)", responses=errors(404))
def update_key(key_id: str, body: KeyChange, caller: Writer) -> dict[str, Any]:
    _key_of(caller, key_id)
    update = admin.KeyUpdate(
        name=body.name,
        profile=body.profile,
        max_registrations=body.max_registrations,
        unlimited=body.unlimited,
        expires_at=body.expires_at,
        no_expiry=body.no_expiry,
        labels=admin.LabelChanges(body.set_labels, body.remove_labels, body.add_groups, body.remove_groups),
        reclaim_policy=body.reclaim_policy,
        preprovisioned_only=body.preprovisioned_only,
    )
    key, changed = admin.update_key(caller.store, caller.settings, key_id, update, _now(), caller.actor)
    return key_view(key) | {"changed": changed}


@router.post("/keys/{key_id}/revoke", summary="Revoke a key: new claims with it are refused", responses=errors(404))
def revoke_key(key_id: str, caller: Writer) -> dict[str, Any]:
    _key_of(caller, key_id)
    return key_view(admin.revoke_key(caller.store, key_id, _now(), caller.actor))


@router.post("/keys/{key_id}/reinstate", summary="Take claims with a revoked key again", responses=errors(404))
def reinstate_key(key_id: str, caller: Writer) -> dict[str, Any]:
    _key_of(caller, key_id)
    return key_view(admin.reinstate_key(caller.store, key_id, _now(), caller.actor))


# --- devices -----------------------------------------------------------------------------------------------


class DeviceChange(Body):
    name: Text | None = None
    clear_name: bool = False
    profile: str | None = None
    set_labels: dict[str, str] = Field(default_factory=dict)
    remove_labels: list[str] = Field(default_factory=list)
    add_groups: list[str] = Field(default_factory=list)
    remove_groups: list[str] = Field(default_factory=list)


def _device_of(caller: Caller, device_id: str) -> Device:
    device = caller.store.device(device_id)
    caller.owns(device.tenant_id, f"device {device_id!r}")
    return device


@router.get(
    "/devices",
    summary="List devices, newest first, a page at a time (next_cursor: the next page)",
    responses=errors(404),
)
def list_devices(
    caller: Reader,
    tenant: str | None = None,
    status: Literal["active", "revoked"] | None = None,
    hardware_id: str | None = None,
    q: Annotated[str | None, Query(description="a device id (dev_...), or the start of hardware ids")] = None,
    label: Annotated[str | None, Query(description="NAME=VALUE: only devices with this label")] = None,
    presence: Literal["online", "offline"] | None = None,
    limit: Annotated[int, Query(ge=1, le=devices.MAX_PAGE)] = 100,
    after: str | None = None,
) -> JSONResponse:
    scoped = caller.tenant(tenant)
    where = devices.device_filter(
        caller.store.tenant_id(scoped) if scoped else None, status, hardware_id, q, label, presence
    )
    page = devices.list_devices(caller.store, where, after, limit)
    # A JSONResponse as it is: FastAPI's encoder, walking every value of a page of devices, would cost more
    # than the query (the views are plain JSON types already).
    return JSONResponse({"devices": [device_view(d) for d in page.devices], "next_cursor": page.next_cursor})


@router.get("/devices/{device_id}", summary="One device", responses=errors(404))
def get_device(device_id: str, caller: Reader) -> dict[str, Any]:
    return device_view(_device_of(caller, device_id))


@router.patch(
    "/devices/{device_id}", summary="Change a device's name, profile, labels or groups", responses=errors(404)
)
def update_device(device_id: str, body: DeviceChange, caller: Writer) -> dict[str, Any]:
    _device_of(caller, device_id)
    update = devices.DeviceUpdate(
        name=body.name,
        clear_name=body.clear_name,
        profile=body.profile,
        labels=admin.LabelChanges(body.set_labels, body.remove_labels, body.add_groups, body.remove_groups),
    )
    device, changed = devices.update_device(caller.store, caller.settings, device_id, update, _now(), caller.actor)
    return device_view(device) | {"changed": changed}


@router.post(
    "/devices/{device_id}/revoke",
    summary="Revoke a device: its claims, refreshes and credentials refused",
    responses=errors(404),
)
def revoke_device(device_id: str, caller: Writer) -> dict[str, Any]:
    _device_of(caller, device_id)
    return device_view(lifecycle.revoke_device(caller.settings, caller.store, device_id, actor=caller.actor))


@router.post(
    "/devices/{device_id}/reinstate",
    summary="Make a revoked device active (what it held stays refused)",
    responses=errors(404),
)
def reinstate_device(device_id: str, caller: Writer) -> dict[str, Any]:
    _device_of(caller, device_id)
    return device_view(lifecycle.reinstate_device(caller.settings, caller.store, device_id, actor=caller.actor))


@router.post(
    "/devices/{device_id}/reset",
    summary="Let a wiped device's next valid claim bring a new key pair, once",
    responses=errors(404),
)
def reset_device(device_id: str, caller: Writer) -> dict[str, Any]:
    _device_of(caller, device_id)
    return device_view(lifecycle.reset_device(caller.settings, caller.store, device_id, actor=caller.actor))


@router.delete(
    "/devices/{device_id}",
    summary="Delete a device: its hardware id is free; what it held is refused",
    responses=errors(404),
)
def delete_device(device_id: str, caller: Writer) -> dict[str, Any]:
    try:
        _device_of(caller, device_id)
    except NotFound:
        # Deleted already and still refused: deleting it again tells the brokers again, as the CLI does (the
        # repair after a denylist write that failed). Another tenant's is not found, as any of its devices.
        gone = caller.store.deleted_device(device_id)
        if gone is None or caller.token.tenant_name not in (None, gone[0]):
            raise
    device = lifecycle.delete_device(caller.settings, caller.store, device_id, actor=caller.actor)
    return {"deleted": device.device_id, "tenant": device.tenant, "hardware_id": device.hardware_id}


@router.post(
    "/devices/{device_id}/api-key", summary="A new dk_ API key for a device (shown once)", responses=errors(404)
)
def rotate_api_key(device_id: str, caller: Writer) -> dict[str, Any]:
    _device_of(caller, device_id)
    device, raw = devices.rotate_api_key(caller.store, device_id, _now(), caller.actor)
    return {"device_id": device.id, "api_key": raw}


# --- the allowlist -----------------------------------------------------------------------------------------


class EntryCreate(Body):
    hardware_id: Text
    tenant: OneTenant = None
    name: Text | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    with_credentials: bool = False


@router.get("/allowlist", summary="A tenant's allowlist, newest first, a page at a time", responses=errors(404))
def list_allowlist(
    caller: Reader,
    tenant: TenantQuery = None,
    limit: Annotated[int, Query(ge=1, le=allowlist.MAX_PAGE)] = 100,
    after: str | None = None,
) -> dict[str, Any]:
    page = allowlist.list_entries(caller.store, caller.tenant_or_default(tenant), after, limit)
    return {"entries": [entry_view(e) for e in page.entries], "next_cursor": page.next_cursor}


@router.post(
    "/allowlist",
    status_code=201,
    summary="Put a hardware id on a tenant's allowlist",
    responses=errors(404, 409),
)
def add_allowlist_entry(body: EntryCreate, caller: Writer) -> dict[str, Any]:
    new = allowlist.NewEntry(body.hardware_id, body.name, body.labels)
    tenant = caller.tenant_or_default(body.tenant)
    added = allowlist.add_entry(caller.store, tenant, new, body.with_credentials, _now(), caller.actor)
    view = entry_view(added.entry)
    return view if added.api_key is None else view | {"api_key": added.api_key}


@router.delete("/allowlist/{hardware_id}", summary="Take a hardware id off a tenant's allowlist", responses=errors(404))
def remove_allowlist_entry(hardware_id: str, caller: Writer, tenant: TenantQuery = None) -> dict[str, Any]:
    allowlist.remove_entry(caller.store, caller.tenant_or_default(tenant), hardware_id, _now(), caller.actor)
    return {"removed": hardware_id}


@router.post(
    "/allowlist/import",
    summary="Import a CSV file onto a tenant's allowlist, all or nothing (body: text/csv)",
    openapi_extra={"requestBody": {"content": {"text/csv": {"schema": {"type": "string"}}}, "required": True}},
    # 409: another import took this one's staged rows for a dead import's while it ran (run it again).
    responses=errors(404, 409, 415),
)
async def import_allowlist(
    request: Request,
    caller: Writer,
    tenant: TenantQuery = None,
    dry_run: bool = False,
    with_credentials: bool = False,
) -> dict[str, Any]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("text/csv", "text/plain"):
        raise ApiError(415, "send the CSV file as the body, Content-Type: text/csv")
    data = await request.body()
    scoped = caller.tenant_or_default(tenant)
    # A bad file is a UsageError (400) whose message lists the lines and what is wrong with each.
    # In a worker thread: an import of a million lines takes a minute of short transactions and pauses, which on
    # the event loop would hold up every other request (health, the dashboard, its live events) until the end.
    done = await run_in_threadpool(
        partial(allowlist.import_csv, dry_run=dry_run, with_credentials=with_credentials, actor=caller.actor),
        caller.store,
        scoped,
        data,
    )
    credentials = [
        {"hardware_id": a.entry.hardware_id, "device_id": a.entry.device_id, "api_key": a.api_key}
        for a in done.credentials
    ]
    # `skipped`: hardware ids that a claim made devices of while the import ran (bridge/ops/allowlist.py).
    return {"dry_run": done.dry_run, "entries": done.entries, "credentials": credentials, "skipped": done.skipped}


# --- events ---------------------------------------------------------------------------------------------------


@router.get(
    "/events",
    summary="Events, newest last, a page at a time going back (next_before: the older page)",
    responses=errors(404),
)
def list_events(
    caller: Reader,
    tenant: str | None = None,
    event: str | None = None,
    device_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    before: Annotated[int | None, Query(ge=1, description="the next_before of the newer page")] = None,
) -> dict[str, Any]:
    if device_id is not None:
        _device_of(caller, device_id)
    found = caller.store.events_page(caller.tenant(tenant), event, device_id, before, limit + 1)
    page = found[-limit:]  # the newest `limit`; one more tells whether there are older ones
    older = len(found) > limit and bool(page)
    return {"events": [body for _, body in page], "next_before": page[0][0] if older else None}
