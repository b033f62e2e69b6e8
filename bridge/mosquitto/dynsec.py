"""Mirroring device tokens into Mosquitto's dynamic-security plugin, which cannot verify JWTs.

For each token the bridge mints, Mosquitto gets a client `username = device id`, `password = the
token` (Mosquitto stores its PBKDF2 hash), bound to `client id = device id`, with one role holding
exactly the token's scope (`bridge.mosquitto.conf.device_role`). A client has one password, so a
device's newest token replaces its previous one, and Mosquitto ends the session that used it. Commands go out on
`$CONTROL/dynamic-security/v1` over the bridge's own MQTT connection; the plugin answers on
`.../response`, which the bridge's network thread hands to `DynsecChannel.deliver`, so a claim
worker can block in `grant()` until Mosquitto confirmed (or time out: `MirrorError`, the claim rolls back).

Expiry: Mosquitto does not know when a token expires, so the mirror does. Each device client carries
its expiry in its `textdescription`; the janitor reads them back with `listClients` when it starts
(Mosquitto is the one copy of that state, so it cannot drift from a database), keeps them in memory,
updated by every grant and revocation, and every `broker.dynsec_janitor_seconds` disables (which
ends the live session) and deletes the clients whose token expired. Until the janitor's next pass an
expired token still connects: the enforcement granularity is that interval.

Cost: Mosquitto 2.0.11's plugin rewrites its whole state file on every command, so a claim costs
Mosquitto CPU time that grows with the devices mirrored (about 4 ms + 0.05 ms per mirrored device on
the 2-core bench machine, `python -m bench.dynsec_cost`). That is why this mode is an opt-in for small
fleets, and why the janitor and `provbridge doctor` warn past MIRRORED_FLEET_WARNING devices.

`revoke_on_mosquitto` does a revocation from another process (the admin CLI): it connects as the
bridge account under a client id of its own, sends the commands, waits for the answer, disconnects.
"""

import json
import logging
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bridge.config import Settings
from bridge.errors import MirrorError
from bridge.mosquitto import conf as mc
from bridge.storage import keyfiles
from bridge.tls import certificates as tls
from bridge.tokens import TokenGrant
from broker.errors import ConnectRefused
from provwire.models import MAX_CLAIM_BYTES

log = logging.getLogger("provbridge.dynsec")

ROLE_EXISTS = "Role already exists"
CLIENT_EXISTS = "Client already exists"
NOT_FOUND = ("Client not found", "Role not found")
_STRIPES = 64
# Mirrored devices beyond which one claim costs Mosquitto more than 10 ms of CPU (measured with
# `python -m bench.dynsec_cost --step 25`: 7.6 ms at 125, 10.8 ms at 150; docs/BENCHMARKS.md).
MIRRORED_FLEET_WARNING = 150


def mirrored_fleet_warning(mirrored: int) -> str | None:
    """The warning `serve` logs and `doctor` prints once `mirrored` devices cost too much per claim."""
    if mirrored <= MIRRORED_FLEET_WARNING:
        return None
    return (
        f"{mirrored} devices are mirrored into Mosquitto's dynamic security: past {MIRRORED_FLEET_WARNING}, each"
        " claim costs Mosquitto more than 10 ms of CPU, growing with the fleet; set broker.mosquitto_auth ="
        ' "jwt" (the default: the provbridge_jwt plugin verifies tokens, nothing is mirrored) and re-run'
        " `provbridge mosquitto-config`"
    )


_EXPIRY_NOTE = "token expires_at="


def uses_dynsec(settings: Settings) -> bool:
    """Whether the bridge mirrors tokens into Mosquitto (external broker with dynamic security)."""
    return settings.broker.mode == "external" and settings.broker.dynsec


# --- pure: the commands ---------------------------------------------------------------------


def expiry_note(expires_at: int) -> str:
    return f"{_EXPIRY_NOTE}{expires_at}"


def parse_expiry(note: object) -> int | None:
    if not isinstance(note, str) or not note.startswith(_EXPIRY_NOTE):
        return None
    try:
        return int(note.removeprefix(_EXPIRY_NOTE))
    except ValueError:
        return None


def device_client(device_id: str, grant: TokenGrant) -> dict[str, Any]:
    """The client fields of `createClient` / `modifyClient` (the token is its password: never log these)."""
    return {
        "username": device_id,
        "password": grant.token,
        "clientid": device_id,
        "textname": mc.DEVICE_TEXTNAME,
        "textdescription": expiry_note(grant.expires_at),
        "roles": [{"rolename": mc.device_role_name(device_id)}],
    }


def device_role_for(device_id: str, grant: TokenGrant) -> dict[str, Any]:
    try:
        scope = mc.device_grant(device_id, grant.publish, grant.subscribe, grant.expires_at)
    except ConnectRefused as exc:  # a profile with an invalid filter: the same refusal the embedded broker makes
        raise MirrorError(f"token scope cannot be mirrored: {exc.reason}") from exc
    return mc.device_role(device_id, scope)


def revoke_commands(device_id: str) -> list[dict[str, Any]]:
    # disableClient ends the live session at once; deleteClient and deleteRole forget the device.
    return [
        {"command": "disableClient", "username": device_id},
        {"command": "deleteClient", "username": device_id},
        {"command": "deleteRole", "rolename": mc.device_role_name(device_id)},
    ]


def acl_set(acls: list[dict[str, Any]]) -> set[tuple[str, str, int, bool]]:
    return {(a["acltype"], a["topic"], int(a.get("priority", 0)), bool(a["allow"])) for a in acls}


def check(response: dict[str, Any], tolerated: tuple[str, ...] = ()) -> None:
    """Raise MirrorError for a failed command, unless its error is one the caller expects."""
    error = response.get("error")
    if error and error not in tolerated:
        raise MirrorError(f"Mosquitto refused {response.get('command')}: {error}")


# --- the request/response channel -----------------------------------------------------------


# A command message's size, under any allowed `broker.max_packet_bytes` (at least a maximal claim packet,
# whose payload alone is MAX_CLAIM_BYTES). A single larger command is sent alone.
MAX_BATCH_BYTES = MAX_CLAIM_BYTES - 256  # the control topic and the packet's headers
_PER_COMMAND_BYTES = 64  # `, "correlationData": "<16 hex>:<index>"` and the separator


def _batches(commands: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    size = len(b'{"commands": []}')
    for command in commands:
        grows = len(json.dumps(command).encode()) + _PER_COMMAND_BYTES
        if batch and size + grows > MAX_BATCH_BYTES:
            yield batch
            batch, size = [], len(b'{"commands": []}')
        batch.append(command)
        size += grows
    if batch:
        yield batch


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    responses: list[dict[str, Any]] = field(default_factory=list)


class DynsecChannel:
    """Commands out on a paho client that someone else connects and loops; answers in via `deliver`.

    Each batch's commands carry `correlationData` `<batch key>:<index>`, which the plugin echoes, so
    concurrent callers (claim workers, the janitor) each get their own answer.
    """

    def __init__(self, client: mqtt.Client, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()

    def deliver(self, payload: bytes) -> None:
        """One message from the response topic. Runs on paho's network thread: only parses and signals."""
        try:
            responses = json.loads(payload)["responses"]
            key = str(responses[0]["correlationData"]).partition(":")[0]
        except (ValueError, KeyError, IndexError, TypeError):
            log.warning("unreadable answer on %s ignored", mc.CONTROL_RESPONSE_TOPIC)
            return
        with self._lock:
            pending = self._pending.pop(key, None)
        if pending is not None:  # else: another bridge's batch, or one we gave up on
            pending.responses = [r for r in responses if isinstance(r, dict)]
            pending.done.set()

    def call(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send the commands and block until they are answered: one response per command, in order.

        In messages of at most MAX_BATCH_BYTES: Mosquitto disconnects a client whose packet is over its
        `max_packet_size` (`broker.max_packet_bytes`), the bridge too (a janitor pass over a herd's
        expired tokens is ~400 bytes a device).
        """
        responses: list[dict[str, Any]] = []
        for batch in _batches(commands):
            responses += self._call_batch(batch)
        return responses

    def _call_batch(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        key = secrets.token_hex(8)
        batch = [{**command, "correlationData": f"{key}:{n}"} for n, command in enumerate(commands)]
        pending = _Pending()
        with self._lock:
            self._pending[key] = pending
        try:
            # paho would queue a publish while disconnected and send it after a reconnect, long after
            # the caller gave up: a late password change could lock a device out of its current token.
            if not self._client.is_connected():
                raise MirrorError("not connected to the broker")
            info = self._client.publish(mc.CONTROL_TOPIC, json.dumps({"commands": batch}).encode(), qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise MirrorError(f"could not send dynamic-security commands: {mqtt.error_string(info.rc)}")
            if not pending.done.wait(self._timeout):
                raise MirrorError(f"Mosquitto's dynamic-security plugin did not answer within {self._timeout:g} s")
        finally:
            with self._lock:
                self._pending.pop(key, None)
        if len(pending.responses) != len(commands):
            raise MirrorError("Mosquitto's dynamic-security plugin answered a different number of commands")
        return pending.responses


# --- the mirror -----------------------------------------------------------------------------


class DynsecMirror:
    """`bridge.claims.mirror.TokenMirror` for Mosquitto. `bind` it to the bridge's client, then `start` it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._channel: DynsecChannel | None = None
        self._expiry: dict[str, int] = {}  # device id -> expiry of its mirrored token
        self._loaded = False
        self._lock = threading.Lock()
        # Per-device serialisation (striped): a grant and the janitor's deletion of the same device
        # must not interleave at the broker, or a fresh token could be deleted right after it was set.
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._stop = threading.Event()
        self._janitor: threading.Thread | None = None

    def bind(self, client: mqtt.Client, network_routes: dict[str, Callable[[bytes], None]]) -> None:
        """Use `client` (connected and looped by its owner) and receive the plugin's answers through it."""
        channel = DynsecChannel(client, self.settings.broker.dynsec_timeout_seconds)
        network_routes[mc.CONTROL_RESPONSE_TOPIC] = channel.deliver
        self.use(channel)

    def use(self, channel: DynsecChannel) -> None:
        """Send through `channel` (the bridge's connection, or an `admin_channel`)."""
        self._channel = channel

    def _call(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self._channel is None:
            raise MirrorError("dynamic-security mirror is not bound to a broker connection")
        return self._channel.call(commands)

    def _stripe(self, device_id: str) -> threading.Lock:
        return self._stripes[hash(device_id) % _STRIPES]

    # --- TokenMirror ------------------------------------------------------------------------

    def grant(self, device_id: str, grant: TokenGrant) -> None:
        role = device_role_for(device_id, grant)
        with self._stripe(device_id):
            with self._lock:
                # A create that times out may still be applied by Mosquitto later: known before it is sent,
                # the orphan is removed by the janitor at this expiry. (A known device keeps its current
                # expiry until the broker confirms, so a failed grant never extends an old token's life.)
                self._expiry.setdefault(device_id, grant.expires_at)
            self._apply(device_id, grant, role)
            with self._lock:
                self._expiry[device_id] = grant.expires_at

    def _apply(self, device_id: str, grant: TokenGrant, role: dict[str, Any]) -> None:
        client = device_client(device_id, grant)
        # The common case, a new device, is one round trip.
        created_role, created_client = self._call(
            [{"command": "createRole", **role}, {"command": "createClient", **client}]
        )
        check(created_role, (ROLE_EXISTS,))
        check(created_client, (CLIENT_EXISTS,))
        role_existed = created_role.get("error") == ROLE_EXISTS
        client_existed = created_client.get("error") == CLIENT_EXISTS
        if not role_existed and not client_existed:
            return
        # A re-claim or refresh: new password and expiry. Mosquitto 2.0 ends the device's live session
        # on any modifyClient (it reconnects with the token it is being given); modifyRole and
        # enableClient are sent only when the scope changed or the client was disabled.
        follow: list[dict[str, Any]] = []
        if role_existed:
            follow.append({"command": "getRole", "rolename": role["rolename"]})
        if client_existed:
            follow += [{"command": "modifyClient", **client}, {"command": "getClient", "username": device_id}]
        answers = self._call(follow)
        for answer in answers:
            check(answer)
        fixes: list[dict[str, Any]] = []
        if role_existed:
            current = answers[0].get("data", {}).get("role", {}).get("acls", [])
            if acl_set(current) != acl_set(role["acls"]):
                fixes.append({"command": "modifyRole", "rolename": role["rolename"], "acls": role["acls"]})
        if client_existed and answers[-1].get("data", {}).get("client", {}).get("disabled"):
            fixes.append({"command": "enableClient", "username": device_id})
        if fixes:
            for answer in self._call(fixes):
                check(answer)

    def revoke(self, device_id: str) -> None:
        with self._stripe(device_id):
            for answer in self._call(revoke_commands(device_id)):
                check(answer, NOT_FOUND)
            with self._lock:
                self._expiry.pop(device_id, None)

    # --- the janitor ------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._janitor = threading.Thread(target=self._janitor_loop, name="dynsec-janitor", daemon=True)
        self._janitor.start()

    def stop(self) -> None:
        self._stop.set()
        if self._janitor is not None:
            self._janitor.join(self.settings.broker.dynsec_timeout_seconds + 5)
            self._janitor = None

    def _janitor_loop(self) -> None:
        warned = False
        while not self._stop.wait(self.settings.broker.dynsec_janitor_seconds):
            try:
                removed = self.janitor_pass()
                if removed:
                    log.info("janitor removed %d expired device token(s) from Mosquitto", removed)
                warning = mirrored_fleet_warning(len(self.mirrored()))
                if warning is not None and not warned:
                    log.warning(warning)
                warned = warning is not None  # said once while the fleet stays large, again if it grows back
            except MirrorError as exc:
                log.warning("janitor pass skipped: %s", exc)
            except Exception:  # the janitor must outlive anything the broker answers
                log.exception("janitor pass failed")

    def janitor_pass(self) -> int:
        """What the janitor does every `dynsec_janitor_seconds`; returns how many tokens it removed."""
        return self.sweep()

    def load(self) -> int:
        """Read back the expiry of every device client Mosquitto holds (Mosquitto is the record)."""
        (answer,) = self._call([{"command": "listClients", "verbose": True}])
        check(answer)
        found = 0
        with self._lock:
            for client in answer.get("data", {}).get("clients", []):
                expires_at = parse_expiry(client.get("textdescription"))
                if mc.is_device_client(client) and expires_at is not None:
                    self._expiry.setdefault(str(client["username"]), expires_at)  # a grant since is newer
                    found += 1
            self._loaded = True
        return found

    def sweep(self, now: float | None = None) -> int:
        """One janitor pass: disable and delete every device client whose token expired. Returns how many."""
        if not self._loaded:
            self.load()
        now = time.time() if now is None else now
        with self._lock:
            expired = [device for device, expires_at in self._expiry.items() if expires_at <= now]
        removed = 0
        for device_id in expired:
            if self._stop.is_set():
                break
            with self._stripe(device_id):
                with self._lock:
                    expires_at = self._expiry.get(device_id)
                if expires_at is None or expires_at > now:
                    continue  # re-granted or revoked since the list was taken
                for answer in self._call(revoke_commands(device_id)):
                    check(answer, NOT_FOUND)
                with self._lock:
                    if self._expiry.get(device_id) == expires_at:
                        del self._expiry[device_id]
                removed += 1
        return removed

    def mirrored(self) -> dict[str, int]:
        """Device id -> token expiry, as the mirror knows them (for tests and status)."""
        with self._lock:
            return dict(self._expiry)


# --- one-off sessions for the admin CLI -----------------------------------------------------


@contextmanager
def admin_channel(settings: Settings) -> Iterator[DynsecChannel]:
    """A short-lived connection as the bridge account, under a client id of its own (so the running
    bridge keeps its session), subscribed to the plugin's answers."""
    endpoint = tls.bridge_endpoint(settings)
    broker = settings.broker
    password = keyfiles.read_secret(settings.bridge_secret_file)
    client_id = f"{broker.client_id}-admin-{secrets.token_hex(4)}"
    v5 = broker.protocol == "5"
    # reconnect_on_failure off: fail fast, an operator is waiting.
    session: dict[str, Any] = {"protocol": mqtt.MQTTv5} if v5 else {"clean_session": True}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, reconnect_on_failure=False, **session)
    client.username_pw_set(broker.username, password)
    if endpoint.tls:
        ca_file = str(endpoint.ca_file) if endpoint.ca_file else None
        client.tls_set(ca_certs=ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    timeout = broker.dynsec_timeout_seconds
    channel = DynsecChannel(client, timeout)
    ready = threading.Event()
    problems: list[str] = []

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            problems.append(f"broker refused the bridge account: {reason}")
            ready.set()
        else:
            c.subscribe(mc.CONTROL_RESPONSE_TOPIC, 1)

    def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        if any(code.is_failure for code in codes):
            problems.append(f"broker refused the subscription to {mc.CONTROL_RESPONSE_TOPIC}")
        ready.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = lambda _c, _u, message: channel.deliver(bytes(message.payload))
    try:
        client.connect(endpoint.host, endpoint.port, keepalive=max(5, int(timeout) * 2))
    except (OSError, ssl.SSLError) as exc:
        raise MirrorError(f"cannot reach the broker at {endpoint.host}:{endpoint.port}: {exc}") from exc
    client.loop_start()
    try:
        if not ready.wait(timeout):
            raise MirrorError(f"broker at {endpoint.host}:{endpoint.port} did not answer within {timeout:g} s")
        if problems:
            raise MirrorError(problems[0])
        yield channel
    finally:
        client.disconnect()
        client.loop_stop()


def count_mirrored_devices(settings: Settings) -> int:
    """How many device clients Mosquitto's dynamic security holds now (`provbridge doctor`)."""
    with admin_channel(settings) as channel:
        (answer,) = channel.call([{"command": "listClients", "verbose": True}])
    check(answer)
    return sum(1 for client in answer.get("data", {}).get("clients", []) if mc.is_device_client(client))


def revoke_on_mosquitto(settings: Settings, device_id: str) -> None:
    """Refuse `device_id` on Mosquitto from now on and end its live session. Idempotent.

    For `provbridge device revoke` (a separate process from the bridge). Raises MirrorError when
    Mosquitto cannot be reached or refuses.
    """
    with admin_channel(settings) as channel:
        for answer in channel.call(revoke_commands(device_id)):
            check(answer, NOT_FOUND)


def put_ops_user_on_mosquitto(settings: Settings, name: str, password: str) -> None:
    """Create (or re-password) an ops account in the running Mosquitto."""
    client = {"username": name, "password": password, "textname": "provbridge ops user"}
    with admin_channel(settings) as channel:
        (created,) = channel.call([{"command": "createClient", **client, "roles": [{"rolename": mc.OPS_ROLE}]}])
        check(created, (CLIENT_EXISTS,))
        if created.get("error") == CLIENT_EXISTS:
            (modified,) = channel.call([{"command": "modifyClient", **client, "roles": [{"rolename": mc.OPS_ROLE}]}])
            check(modified)


def delete_ops_user_on_mosquitto(settings: Settings, name: str) -> None:
    """Delete an ops account from the running Mosquitto (ending its live session). Idempotent."""
    with admin_channel(settings) as channel:
        (deleted,) = channel.call([{"command": "deleteClient", "username": name}])
        check(deleted, NOT_FOUND)
