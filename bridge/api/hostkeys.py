"""The host-wide admin endpoints: the bridge's own key rings and JWKS, the brokers' denylist, ops accounts.

    POST   /v1/denylist/publish       rewrite denylist.json from the database   (`provbridge denylist publish`)
    GET    /v1/jwks                   the JWKS that verifies device tokens       (`provbridge jwks`)
    GET    /v1/signing-keys           every token and cloud key, no private part (`provbridge keys list`)
    POST   /v1/signing-keys/rotate    a new active token or cloud key            (`provbridge keys rotate`)
    POST   /v1/signing-keys/prune     drop retired token keys no token needs     (`provbridge keys prune`)
    GET    /v1/ops-users              the ops accounts' names                    (`provbridge ops-user list`)
    POST   /v1/ops-users              an ops account; its password shown once    (`provbridge ops-user create`)
    DELETE /v1/ops-users/{name}       delete one, ending its Mosquitto session   (`provbridge ops-user delete`)

These act on the host's files, not on one tenant: a token of one tenant is refused (403), as for creating a
tenant. Each route calls the function its CLI command calls. Those functions change files, not the database,
and record no event, so each change here records one after it is made (`_record`), naming the admin token;
none carries a secret, and the ops password is in the answer that made it only.
"""

import time
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from bridge.api.context import Caller, errors, require
from bridge.errors import ApiError, MirrorError, NotFound
from bridge.mosquitto import dynsec
from bridge.mosquitto.files import ops_user_created, ops_user_deleted
from bridge.ops import admin, lifecycle
from bridge.storage import keyfiles, rotation, sharedfiles
from provwire.models import Event, rfc3339

router = APIRouter(prefix="/v1")
HOST_TENANT = "_"  # the events' tenant: these changes are nobody's tenant's


def _host_wide(caller: Caller) -> Caller:
    if caller.token.tenant_id is not None:
        raise ApiError(403, "a token of one tenant cannot act on the host's keys, denylist or ops accounts")
    return caller


# Dependencies over `require(...)`, not checks in each route: a tenant's token is refused before a body is
# read, and the OpenAPI document and docs/API.md's test still find the scope (`scope_of_route` looks inside).
def host_reader(caller: Annotated[Caller, Depends(require("read"))]) -> Caller:
    return _host_wide(caller)


def host_writer(caller: Annotated[Caller, Depends(require("write"))]) -> Caller:
    return _host_wide(caller)


HostReader = Annotated[Caller, Depends(host_reader)]
HostWriter = Annotated[Caller, Depends(host_writer)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RotateRequest(Body):
    kind: Literal["token", "cloud"] = Field(description="token: the token-signing key; cloud: the cloud key")


class OpsUserCreate(Body):
    name: str = Field(description="1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit; not dev_*")


def _now() -> int:
    return int(time.time())


def _record(caller: Caller, name: str, **fields: Any) -> None:
    event = Event(event=name, time=rfc3339(time.time()), tenant=HOST_TENANT, actor=caller.actor, **fields)
    caller.store.add_events([event])


# --- the denylist --------------------------------------------------------------------------------------------


@router.post("/denylist/publish", summary="Rewrite denylist.json from the database (after a failed write)")
def publish_denylist(caller: HostWriter) -> dict[str, int]:
    entries = lifecycle.publish_denylist(caller.settings, caller.store)
    published = {"devices": len(entries.devices), "older_credentials": len(entries.older_credentials)}
    _record(caller, "denylist.published", count=published["devices"] + published["older_credentials"])
    return published


# --- the bridge's key rings ------------------------------------------------------------------------------------


@router.get("/jwks", summary="The JWKS that verifies device tokens (public keys only)")
def jwks(caller: HostReader) -> dict[str, list[dict[str, str]]]:
    # Loaded from disk as `provbridge jwks` does: every token key there, a stray of an interrupted rotation too.
    return keyfiles.jwks(keyfiles.load_keys(caller.settings.data_dir))


@router.get("/signing-keys", summary="Every token and cloud key: kid, active or retired, when it can go")
def list_signing_keys(caller: HostReader) -> dict[str, list[dict[str, Any]]]:
    # KeyInfo holds ids and times only: no private (or public) key material to leave out.
    return {"keys": [asdict(info) for info in rotation.key_status(caller.settings.data_dir)]}


@router.post("/signing-keys/rotate", summary="Make a new token or cloud key the active one (old ones keep working)")
def rotate_signing_key(body: RotateRequest, caller: HostWriter) -> dict[str, Any]:
    # A running bridge follows from its next claim (LiveKeyRing), the embedded broker re-reads jwks.json.
    done = sharedfiles.rotate(caller.settings, body.kind, _now())
    _record(caller, "signing_key.rotated", reason=done.kind, key_name=done.new_kid, changes=list(done.pruned))
    return asdict(done)


@router.post("/signing-keys/prune", summary="Remove the retired token keys whose tokens have all expired")
def prune_signing_keys(caller: HostWriter) -> dict[str, list[str]]:
    pruned = list(sharedfiles.prune(caller.settings, _now()))
    _record(caller, "signing_key.pruned", count=len(pruned), changes=pruned)
    return {"pruned": pruned}


# --- ops accounts ----------------------------------------------------------------------------------------------


@router.get("/ops-users", summary="The ops accounts (read-only broker accounts) by name")
def list_ops_users(caller: HostReader) -> dict[str, list[str]]:
    return {"ops_users": sorted(keyfiles.read_ops_users(caller.settings.data_dir))}


@router.post(
    "/ops-users",
    status_code=201,
    summary="Create an ops account: it may read the events and status topics; its password shown once",
    responses=errors(409),
)
def create_ops_user(body: OpsUserCreate, caller: HostWriter) -> dict[str, str]:
    settings = caller.settings
    keyfiles.load_keys(settings.data_dir)  # an uninitialised data dir is refused, not created by the lock
    # As `provbridge ops-user create`, under its lock. On Mosquitto (both its modes keep ops accounts in dynamic
    # security) the CLI makes the account in the files even when Mosquitto is down and says to re-run
    # mosquitto-config; an API caller gets 503 instead, and nothing is left: the password would be lost with it.
    with keyfiles.ops_users_locked(settings.data_dir):
        password = admin.create_ops_user(settings, body.name)
        if dynsec.uses_dynsec(settings):
            try:
                dynsec.put_ops_user_on_mosquitto(settings, body.name, password)
            except MirrorError:
                admin.delete_ops_user(settings, body.name)
                raise
        # Records the dynamic-security hash; on Mosquitto it puts the account again, which changes nothing
        # (it swallows a failure, so the confirmed put above is what decides the answer).
        ops_user_created(settings, body.name, password)
    _record(caller, "ops_user.created", key_name=body.name)
    return {"username": body.name, "password": password}


@router.delete(
    "/ops-users/{name}", summary="Delete an ops account (ending its session on Mosquitto)", responses=errors(404)
)
def delete_ops_user(name: str, caller: HostWriter) -> dict[str, str]:
    settings = caller.settings
    keyfiles.load_keys(settings.data_dir)  # as in create
    with keyfiles.ops_users_locked(settings.data_dir):  # as in create
        if name not in keyfiles.read_ops_users(settings.data_dir):
            raise NotFound(f"no ops user {name!r}")
        # Mosquitto first: should it not confirm (503), the account is still listed and the same request
        # repairs it; the other way round it would be gone from the files and still live on Mosquitto.
        if dynsec.uses_dynsec(settings):
            dynsec.delete_ops_user_on_mosquitto(settings, name)
        admin.delete_ops_user(settings, name)
        ops_user_deleted(settings, name)  # the hash; on Mosquitto, a second delete that changes nothing
    _record(caller, "ops_user.deleted", key_name=name)
    return {"deleted": name}
