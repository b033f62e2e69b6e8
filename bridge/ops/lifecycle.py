"""A device's credentials through its life: revoke, reinstate, reset, delete; and the denylist that keeps
every broker honest about them.

    revoke      the row becomes `revoked`: re-claims and refreshes are refused (permission_denied, reason
                `device_revoked`), and the brokers refuse every credential it holds
    reinstate   a revoked device is `active` again; what it held before is still refused (its credential
                generation is raised): it re-claims or refreshes for new credentials
    reset       for a device that lost its key pair (storage wiped): the next valid claim for its hardware id
                may bring a new key pair, once; until then refreshes are refused, and everything it held before
                is refused by the brokers at once
    delete      the row goes, its hardware id is free for a new device; everything it held is refused

Each change is one transaction with its event, decided by a pure function over the device as stored
(`revocation`, `reinstatement`, `reset`, `deletion`). Then the denylist is written:

    <data_dir>/denylist.json   read by the embedded broker and the Mosquitto plugin (broker/denylist.py has the
                               format and the rules): a CONNECT with a listed credential is refused, a live
                               session holding one is ended within about a second
    Mosquitto, "dynsec" mode   cannot read the denylist: the device's dynamic-security client is deleted (which
                               ends its session); a later claim or refresh mirrors it anew
    RabbitMQ                   checks the token alone (no denylist), and cannot be asked: the device's connections are
                               ended through the management API, and a running bridge ends them again every
                               `rabbitmq.revoke_sweep_seconds` while a revoked or deleted device's tokens may be
                               valid (bridge/edges/rabbitmq.py)

A credential is listed until the latest moment it can expire: the token lifetime cap after the change, or the
notAfter of the device's last certificate if that is later. The denylist is derived from the database, not
edited in place: each write is complete, so a lost or stale file is repaired by the next change or bridge
start (`publish_denylist`; `provbridge denylist publish`; a running bridge also every 10 minutes), and
re-running `revoke` or `delete` repairs a denylist that a crash left behind.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bridge.config import TOKEN_TTL_CAP_SECONDS, Settings
from bridge.errors import BrokersNotTold, MirrorError, NotFound, RabbitMQError, UsageError
from bridge.mosquitto.dynsec import revoke_on_mosquitto
from bridge.ops.admin import CLI_ACTOR
from bridge.ops.devices import device_event
from bridge.rabbitmq.management import Management
from bridge.storage import keyfiles, statefiles
from bridge.storage.records import Device, Refused
from bridge.storage.store import Store
from broker.denylist import Entries, OlderCredentials
from provwire.models import Event

# --- the denylist ------------------------------------------------------------------------------


def denylist_entries(refused: list[Refused]) -> Entries:
    """The denylist for what the database says must be refused (pure)."""
    devices = {r.device_id: r.until for r in refused if r.generation is None}
    older = {
        r.device_id: OlderCredentials(r.generation, r.certificates, r.until)
        for r in refused
        if r.generation is not None
    }
    return Entries(devices, older)


def publish_denylist(settings: Settings, store: Store, now: int | None = None) -> Entries:
    """Rewrite denylist.json from the database (expired entries fall out); returns what was written."""
    now = int(time.time()) if now is None else now
    with statefiles.denylist_update(settings.data_dir):
        entries = denylist_entries(store.refused_credentials(now))
        statefiles.write_denylist(settings.data_dir, entries)
    return entries


def refused_until(now: int, certificates_expire_at: int) -> int:
    """Until when what a device holds now must be refused: no token it holds outlives the token lifetime cap
    (none is minted once the change is written: it waits for any claim or refresh in progress), no certificate
    its last notAfter."""
    return max(now + TOKEN_TTL_CAP_SECONDS, certificates_expire_at)


# --- the changes, decided over data ---------------------------------------------------------------


def revocation(device: Device, certificates_expire_at: int, now: int, actor: str) -> tuple[dict[str, Any], Event]:
    # Revoking again extends the listing from now: harmless, and it repairs a denylist a crash left behind.
    columns = {"status": "revoked", "refused_until": refused_until(now, certificates_expire_at), "updated_at": now}
    return columns, device_event("device.revoked", device, now, actor)


def reinstatement(device: Device, certificates_expire_at: int, now: int, actor: str) -> tuple[dict[str, Any], Event]:
    if device.status != "revoked":
        raise UsageError(f"{device.id} is not revoked: only a revoked device can be reinstated")
    columns = {
        "status": "active",
        "credential_generation": device.credential_generation + 1,
        "refused_until": refused_until(now, certificates_expire_at),
        "updated_at": now,
    }
    return columns, device_event("device.reinstated", device, now, actor)


def reset(device: Device, certificates_expire_at: int, now: int, actor: str) -> tuple[dict[str, Any], Event]:
    if device.status != "active":
        raise UsageError(f"{device.id} is revoked: reinstate it first, or delete it to free its hardware id")
    columns = {
        "credential_generation": device.credential_generation + 1,
        "reset_pending": 1,
        "refused_until": refused_until(now, certificates_expire_at),
        "updated_at": now,
    }
    return columns, device_event("device.reset", device, now, actor)


def deletion(device: Device, certificates_expire_at: int, now: int, actor: str) -> tuple[int, Event]:
    # A revoked device may already be listed for longer (revoked later than its last certificate's issue).
    until = max(refused_until(now, certificates_expire_at), device.refused_until or 0)
    return until, device_event("device.deleted", device, now, actor)


# --- the commands ------------------------------------------------------------------------------------

Change = Callable[[Device, int, int, str], tuple[dict[str, Any], Event]]


@dataclass(frozen=True)
class Deleted:
    device_id: str
    tenant: str
    hardware_id: str


def revoke_device(
    settings: Settings, store: Store, device_id: str, now: int | None = None, actor: str = CLI_ACTOR
) -> Device:
    """Revoke a device everywhere this process can reach; returns its updated row (NotFound if unknown)."""
    device = _change(settings, store, device_id, revocation, now, actor, mirror_inside=False)
    # Once revoked no token is minted for it, so Mosquitto's dynsec client can go after the commit; the revocation
    # itself must not wait for a broker that may be down (re-running the command finishes it).
    _dynsec_after(settings, device_id, "revoke")
    _rabbitmq_after(settings, device_id, "revoke")
    return device


def reinstate_device(
    settings: Settings, store: Store, device_id: str, now: int | None = None, actor: str = CLI_ACTOR
) -> Device:
    """Make a revoked device active again; the credentials it held stay refused (UsageError if not revoked).
    A reset still pending stays pending: the device claims, as after the reset."""
    device = _change(settings, store, device_id, reinstatement, now, actor, mirror_inside=True)
    _rabbitmq_after(settings, device_id, "reinstate")  # its sessions hold refused tokens
    return device


def reset_device(
    settings: Settings, store: Store, device_id: str, now: int | None = None, actor: str = CLI_ACTOR
) -> Device:
    """Let the device's next valid claim bring a new key pair, once; refuse everything it holds now."""
    device = _change(settings, store, device_id, reset, now, actor, mirror_inside=True)
    _rabbitmq_after(settings, device_id, "reset")
    return device


def delete_device(
    settings: Settings, store: Store, device_id: str, now: int | None = None, actor: str = CLI_ACTOR
) -> Deleted:
    """Delete a device (its hardware id is free again) and refuse everything it held. Deleting a device that is
    gone already tells the brokers again (repairing a denylist a failed write left behind)."""
    stamp = int(time.time()) if now is None else now
    try:
        device, _ = store.delete_device(device_id, stamp, lambda d, certs: deletion(d, certs, stamp, actor))
        done = Deleted(device.id, device.tenant_name, device.hardware_id)
    except NotFound:
        gone = store.deleted_device(device_id)
        if gone is None:
            raise
        done = Deleted(gone[2], gone[0], gone[1])
    _publish(settings, store, device_id, stamp)
    _dynsec_after(settings, device_id, "delete")  # its id is never used again: no claim can race it
    _rabbitmq_after(settings, device_id, "delete")
    return done


def _change(
    settings: Settings, store: Store, device_id: str, change: Change, now: int | None, actor: str, mirror_inside: bool
) -> Device:
    stamp = int(time.time()) if now is None else now
    inside = _dynsec_inside(settings, device_id) if mirror_inside else None
    device, _ = store.change_credentials(device_id, lambda d, certs: change(d, certs, stamp, actor), inside)
    _publish(settings, store, device_id, stamp)
    return device


def _uses_dynsec(settings: Settings) -> bool:
    """Mosquitto's dynsec mode, which cannot read the denylist: the device's dynamic-security client goes instead."""
    broker = settings.broker
    return broker.mode == "external" and broker.dynsec and broker.mosquitto_auth == "dynsec"


def _dynsec_inside(settings: Settings, device_id: str) -> Callable[[], None] | None:
    """For reinstate and reset: delete the device's client inside the change's transaction, as the janitor does under
    the write lock, so no refresh or claim mirrors a new token in between (which a deletion after the commit would
    take away); a broker that does not confirm undoes the change."""
    if not _uses_dynsec(settings):
        return None

    def delete_client() -> None:
        try:
            revoke_on_mosquitto(settings, device_id)  # its live session is ended
        except MirrorError as exc:
            raise MirrorError(f"Mosquitto did not confirm ({exc}): nothing was changed; retry once it is up") from exc

    return delete_client


def _dynsec_after(settings: Settings, device_id: str, command: str) -> None:
    if not _uses_dynsec(settings):
        return
    try:
        revoke_on_mosquitto(settings, device_id)  # deletes the dynsec client: its live session is ended
    except MirrorError as exc:
        raise MirrorError(
            f"{device_id} is changed in the database, but Mosquitto did not confirm ({exc}); "
            f"run `provbridge device {command} {device_id}` again once the broker is reachable"
        ) from exc


def _rabbitmq_after(settings: Settings, device_id: str, command: str) -> None:
    """On RabbitMQ, which cannot refuse a valid token: end the device's connections now (a running bridge also
    ends them every `rabbitmq.revoke_sweep_seconds` while a revoked or deleted device's tokens may be valid)."""
    if settings.broker.mode != "rabbitmq":
        return
    rabbit = settings.rabbitmq
    password = keyfiles.read_secret(settings.bridge_secret_file)
    try:
        Management(rabbit.management, settings.broker.username, password).close_connections(device_id)
    except RabbitMQError as exc:
        raise BrokersNotTold(
            f"{device_id} is changed in the database, but its RabbitMQ connections could not be ended ({exc}):"
            f" run `provbridge device {command} {device_id}` again once the management API answers"
        ) from exc


def _publish(settings: Settings, store: Store, device_id: str, now: int) -> None:
    """The denylist after a change (the embedded broker and the provbridge_jwt plugin read it)."""
    try:
        publish_denylist(settings, store, now)
    except OSError as exc:
        raise BrokersNotTold(
            f"{device_id} is changed in the database, but {statefiles.denylist_file(settings.data_dir)} could not be"
            f" written ({exc.strerror or exc}): brokers accept its old credentials until it is. Fix the cause, then"
            " run `provbridge denylist publish` or repeat a revoke or delete (a running bridge also rewrites it"
            " within 10 minutes)"
        ) from exc
