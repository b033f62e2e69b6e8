"""The bridge's MQTT sessions on an external broker: one per bridge process.

One process (`claims.processes = 1`) keeps the layout of earlier versions: client id `broker.client_id`,
plain subscriptions. N processes each get client id `{client_id}-{i}` and a persistent session
subscribed to the shared subscriptions `$share/{broker.share_group}/{prefix}/claim/+` and `.../token/+`,
so the broker hands each claim to one of them.

A persistent session outlives its process, and Mosquitto keeps handing a shared subscription's
share of the claims to a member that is disconnected (they queue in its session): a session of a
previous layout (N was larger, or 1 became N) would swallow claims for good. So the client ids in
use are recorded (`bridge-sessions.json`, bridge/storage/statefiles.py), and sessions a previous
layout left behind are retired (a clean-session CONNECT, which makes the broker drop the session,
its subscriptions and its queue) when the bridge starts. Claims that were waiting in a retired session are dropped;
devices re-send them after their time-out (PROTOCOL.md §6).
"""

import hashlib
import hmac
import logging
import queue
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bridge.config import Settings
from bridge.edges.coalescing import CoalescingSocket
from bridge.errors import ConfigError
from bridge.storage import keyfiles, statefiles
from bridge.tls.certificates import bridge_endpoint
from provwire import topics

log = logging.getLogger("provbridge.sessions")

RETIRE_TIMEOUT_SECONDS = 10.0
RETIRE_RETRY_SECONDS = 5.0


def bridge_client_id(settings: Settings) -> str:
    """`broker.client_id` plus a suffix only the holder of the bridge secret can compute.

    Mosquitto lets any accepted CONNECT take over any client id: an anonymous client connecting as a
    guessable bridge id with a clean session would wipe the bridge's persistent session and the
    claims queued in it. The suffix is stable (same secret, same id), so the session survives restarts.
    """
    secret = keyfiles.read_secret(settings.bridge_secret_file).encode("utf-8")
    suffix = hmac.new(secret, b"provbridge bridge client id", hashlib.sha256).hexdigest()[:16]
    return f"{settings.broker.client_id}-{suffix}"


@dataclass(frozen=True)
class Shard:
    """Which of this host's `count` bridge processes this one is."""

    index: int = 0
    count: int = 1

    def client_id(self, settings: Settings) -> str:
        """The bridge id, then `-{broker.host_id}` on a host that has one, then `-{index}` with several processes."""
        base = bridge_client_id(settings)
        if settings.broker.host_id:
            base = f"{base}-{settings.broker.host_id}"
        return base if self.count == 1 else f"{base}-{self.index}"

    def subscription(self, settings: Settings, topic_filter: str) -> str:
        """Shared (`$share`) whenever more than one bridge process takes claims, on this host or on several
        (`claims.fleet_processes`): the broker then hands each claim to one of them."""
        if self.count == 1 and settings.claims.limit_shares == 1:
            return topic_filter
        return f"{topics.SHARED_PREFIX}/{settings.broker.share_group}/{topic_filter}"

    def owns_status(self, settings: Settings) -> bool:
        # One writer: N processes publishing online/offline (and N wills) would contradict each other. On several
        # hosts, the one without a `broker.host_id`.
        return self.index == 0 and not settings.broker.host_id


def check_processes(settings: Settings, count: int) -> None:
    """Raise ConfigError unless `count` bridge processes can share this broker's claims."""
    if count > 1 and settings.broker.mode == "embedded":
        raise ConfigError(
            f'{count} bridge processes need an external broker (broker.mode = "external" or "rabbitmq"): the embedded'
            " amqtt broker has no shared subscriptions ($share), so every process would answer every claim"
        )


def client_ids(settings: Settings, count: int) -> list[str]:
    return [Shard(i, count).client_id(settings) for i in range(count)]


def set_nodelay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    # Without it, small request/answer exchanges stall 40-90 ms on Nagle + delayed ACK.
    if isinstance(sock, socket.socket | CoalescingSocket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def bridge_client(
    settings: Settings, client_id: str, persistent: bool, client_class: type[mqtt.Client] = mqtt.Client, **options: Any
) -> mqtt.Client:
    """A paho client logged in as the bridge account, TLS as `certificates.bridge_endpoint` says; not connected.

    `persistent`: claims published while it is away wait in its session (3.1.1 clean_session False;
    with MQTT 5, clean_start False and a session expiry are given at connect). `client_class`: paho's
    client or `CoalescingClient` (an edge that flushes its writes itself).
    """
    if settings.broker.protocol == "5":
        session: dict[str, Any] = {"protocol": mqtt.MQTTv5}
    else:
        session = {"protocol": mqtt.MQTTv311, "clean_session": not persistent}
    client = client_class(CallbackAPIVersion.VERSION2, client_id=client_id, **session, **options)
    client.username_pw_set(settings.broker.username, keyfiles.read_secret(settings.bridge_secret_file))
    endpoint = bridge_endpoint(settings)
    if endpoint.tls:
        ca_file = str(endpoint.ca_file) if endpoint.ca_file else None
        client.tls_set(ca_certs=ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.on_socket_open = set_nodelay
    return client


# --- retiring the sessions of a previous layout -----------------------------------------------


def retire_session(settings: Settings, client_id: str) -> None:
    """Make the broker drop `client_id`'s session: CONNECT with a clean session, then DISCONNECT.

    Raises OSError when the broker cannot be reached or refuses.
    """
    client = bridge_client(settings, client_id, persistent=False, reconnect_on_failure=False)
    connack: queue.Queue[Any] = queue.Queue()
    client.on_connect = lambda _c, _u, _f, reason, _p: connack.put(reason)
    endpoint = bridge_endpoint(settings)
    client.connect(endpoint.host, endpoint.port, keepalive=settings.broker.keepalive)  # MQTT 5: clean_start
    client.loop_start()
    try:
        reason = connack.get(timeout=RETIRE_TIMEOUT_SECONDS)
        if reason.is_failure:
            raise OSError(f"broker refused the bridge account: {reason}")
    except queue.Empty:
        raise OSError("broker did not answer") from None
    finally:
        client.disconnect()
        client.loop_stop()


def retire_stale_sessions(settings: Settings, current: list[str], stopping: threading.Event) -> None:
    """Retire the recorded sessions `current` does not use; retried until it worked or `stopping` is set.

    Run it on a thread of its own: the broker may not be up yet.
    """
    host = settings.broker.host_id
    stale = [c for c in statefiles.recorded_sessions(settings.data_dir, host) if c not in current]
    # What is not retired yet is retried by the next start.
    statefiles.record_sessions(settings.data_dir, current + stale, host)
    while stale:
        try:
            for client_id in list(stale):
                retire_session(settings, client_id)
                stale.remove(client_id)
                log.info("retired the bridge session %s of a previous layout", client_id)
        except (OSError, ssl.SSLError) as exc:
            log.warning("could not retire old bridge sessions yet (%s); retrying", exc)
            if stopping.wait(RETIRE_RETRY_SECONDS):
                break
        statefiles.record_sessions(settings.data_dir, current + stale, host)
