"""amqtt's broker with the holes that matter to provbridge closed.

Stock amqtt 0.12.1 (read `amqtt/broker.py`), and what this subclass changes:

1. Retained leak. On every CONNECT it replays the retained messages matching *any* client's
   subscriptions to the new client, without an ACL check. Here a client only gets retained
   messages for filters it is subscribed to itself, and only topics it may RECEIVE.
2. Pre-authentication side effects. For a clean-session CONNECT it drops the session of that
   client id, and for a persistent one it takes the session over, *before* authenticating: a
   refused CONNECT naming someone's client id silently cuts their subscriptions or their
   connection. And any accepted CONNECT may take any client id, inheriting a persistent
   session's subscriptions and queued messages. Here the CONNECT is decided first, and a client
   id held by an authenticated principal cannot be taken by another one: otherwise an anonymous
   provisioning client could connect as the bridge's client id and take its claims.
3. A clean-session takeover leaves the old connection open but deaf. Here it is closed, as
   [MQTT-3.1.4-2] requires.
4. Wills are published without a PUBLISH check. The plugin refuses a CONNECT whose will topic
   is not allowed; here the will is dropped if the grant no longer allows it at disconnect.
5. Other MQTT versions. amqtt speaks MQTT 3.1.1 only, but parses a CONNECT as 3.1.1 before it
   checks the protocol level: an MQTT 5 CONNECT carrying properties (most do) is misread and the
   connection reset without a CONNACK. Here the level is read first, and a CONNECT of any other
   MQTT version (3.1, 5) gets the MQTT 3.1.1 refusal [MQTT-3.1.2-2], exactly `20 02 00 01`
   (CONNACK, return code 0x01 "unacceptable protocol version"), and the connection is closed.
   paho-mqtt with MQTTv5 reports that as reason 0x84 "Unsupported Protocol Version".
6. amqtt answers every CONNECT its plugin refuses with 0x05 "not authorized". Here a client id the
   broker does not allow gets 0x02 "identifier rejected", as [MQTT-3.1.3-9] requires
   (`ConnectRefused.return_code`).

And one addition: in-process subscribers (`subscribe_in_process`), for a bridge that runs inside the
broker's process without an MQTT connection of its own. amqtt calls `_broadcast_message` for a
client's PUBLISH only after the PUBLISH ACL allowed it (`_handle_message_delivery`; its
`on_broker_message_received` event fires before that check, so it is not used), and for a will.
What an in-process subscriber publishes (`publish_in_process`) takes amqtt's broadcast path, so
every receiving session is still checked against the RECEIVE ACL.

And a bound on packets (`broker.framing`): a packet longer than `max_packet_bytes` aborts its
connection before amqtt reads any of it; stock amqtt has no bound.

And backpressure: an in-process subscriber may ask the broker to read no more from the publisher for
a while (a client beyond its flood limit). amqtt has one event loop for every connection, so a client
publishing back to back would otherwise take as much of it as the broker can give, and everyone
else's messages would queue behind its refusals; paused, its next packets wait in its own TCP buffers.

And a listener for devices with a client certificate (`CERTIFICATE_LISTENER`, configured by
broker/embedded.py): stock amqtt makes every TLS listener CERT_OPTIONAL against the system's CAs and never
looks at the peer's certificate. That one requires a certificate verified against the device CA alone
(CERT_REQUIRED: the handshake fails without one, or with one of another CA, the server CA's included), and
hands the verified certificate (DER) to the plugin with the CONNECT, which authenticates by it alone
(broker/auth.py `authenticate_certificate`).

And revocation ends live sessions: every `revocation_check_seconds` the broker ends the connected
sessions of the devices the denylist (broker/denylist.py) refuses, as Mosquitto does. A device session's
client id is its device id, so this looks up each denied device, not each session: one `stat` of
the denylist file and a few dictionary lookups a second, none of it on the claim path. Until its
session is ended, the plugin refuses a revoked device's every PUBLISH, SUBSCRIBE and delivery.
"""

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import MQTTError
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.utils import gen_client_id

from broker.acl import Role, may_take_over, topic_matches
from broker.auth import Authenticator
from broker.errors import CONNACK_NOT_AUTHORIZED
from broker.framing import PacketReader, connect_protocol
from broker.plugin import (
    CERTIFICATE_ATTRIBUTE,
    GRANT_ATTRIBUTE,
    REFUSAL_ATTRIBUTE,
    REFUSAL_CODE_ATTRIBUTE,
    ProvbridgeAclPlugin,
    grant_of,
)
from provwire.topics import PRESENCE_OFFLINE, PRESENCE_ONLINE, presence_topic

logger = logging.getLogger(__name__)

MQTT_3_1_1_LEVEL = 4  # the one protocol level amqtt speaks
MQTT_PROTOCOL_NAMES = ("MQTT", "MQIsdp")  # 3.1.1 and 5; 3.1
# CONNACK, remaining length 2, no session present, return code 0x01 "unacceptable protocol version":
# what an MQTT 3.1.1 server answers any other protocol level [MQTT-3.1.2-2].
UNACCEPTABLE_PROTOCOL_VERSION_CONNACK = bytes([0x20, 0x02, 0x00, 0x01])
DEFAULT_REVOCATION_CHECK_SECONDS = 1.0
# The listener whose clients authenticate by a client certificate of the device CA (its `cafile`).
CERTIFICATE_LISTENER = "certificate"


def bound_port(broker: Any) -> int:
    """The TCP port an amqtt broker's default listener is bound to (the real one when asked for 0)."""
    return int(broker._servers["default"].instance.sockets[0].getsockname()[1])


# Called on the broker's event loop with a PUBLISH's topic and payload: it must not block. It returns
# the seconds the broker should wait before reading the publisher's next packet (0: no pause).
InProcessSubscriber = Callable[[str, bytes], float]


def unsupported_protocol(packet: bytes) -> int | None:
    """The protocol level of a CONNECT for an MQTT version other than 3.1.1, else None.

    A protocol name that is not MQTT's is left to amqtt, which closes the connection without a
    CONNACK, as MQTT 3.1.1 allows [MQTT-3.1.2-1].
    """
    protocol = connect_protocol(packet)
    if protocol is None or protocol[0] not in MQTT_PROTOCOL_NAMES or protocol[1] == MQTT_3_1_1_LEVEL:
        return None
    return protocol[1]


class _ListenerWriter(StreamWriterAdapter):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's writer, knowing which listener accepted the connection (amqtt does not tell the session)."""

    def __init__(self, writer: asyncio.StreamWriter, listener_name: str) -> None:
        super().__init__(writer)
        self.listener_name = listener_name


def client_certificate(writer: Any) -> bytes | None:
    """The verified client certificate (DER) of a connection on the certificate listener; b"" should the TLS
    layer have none (so the CONNECT is refused, never taken for a token device's); None on other listeners."""
    if getattr(writer, "listener_name", None) != CERTIFICATE_LISTENER:
        return None
    ssl_object = writer.get_ssl_info()
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return der or b""


def certificate_ssl_context(cafile: str, certfile: str, keyfile: str) -> ssl.SSLContext:
    """TLS 1.2+, the server certificate, and a client certificate required, verified against `cafile` only.

    OpenSSL checks the chain, both validity windows and (a server verifying a client) the clientAuth purpose.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    context.load_verify_locations(cafile=cafile)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class ProvbridgeBroker(Broker):  # type: ignore[misc]  # amqtt is untyped
    def __init__(
        self,
        *args: Any,
        max_packet_bytes: int | None = None,
        revocation_check_seconds: float = DEFAULT_REVOCATION_CHECK_SECONDS,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_packet_bytes = max_packet_bytes
        self.revocation_check_seconds = revocation_check_seconds
        self._in_process: list[tuple[str, InProcessSubscriber]] = []
        self._revocation_task: asyncio.Task[None] | None = None
        # Told of every device session that starts or ends (the bridge's presence recorder), on the event loop:
        # it must not block.
        self.on_presence: Callable[[str, bool], None] | None = None

    @property
    def port(self) -> int:
        return bound_port(self)

    # --- lifecycle: the revocation check runs while the broker does --------------------------

    async def start(self) -> None:
        await super().start()
        if self._authenticator() is not None:
            self._revocation_task = asyncio.create_task(self._end_revoked_sessions_forever())

    async def shutdown(self) -> None:
        if self._revocation_task is not None:
            self._revocation_task.cancel()
            await asyncio.gather(self._revocation_task, return_exceptions=True)
            self._revocation_task = None
        await super().shutdown()

    def _authenticator(self) -> Authenticator | None:
        """The ACL plugin's authenticator (None for a configuration without it: then nothing is revoked)."""
        plugins = self.plugins_manager.plugins
        return next((p.authenticator for p in plugins if isinstance(p, ProvbridgeAclPlugin)), None)

    def _prefix(self) -> str | None:
        authenticator = self._authenticator()
        return None if authenticator is None else authenticator.settings.prefix

    def _create_ssl_context(self, listener: Any) -> ssl.SSLContext:
        # Only the certificate listener has a `cafile` (broker/embedded.py): the device CA.
        if listener.get("cafile") is None:
            return super()._create_ssl_context(listener)  # type: ignore[no-any-return]
        return certificate_ssl_context(str(listener["cafile"]), str(listener["certfile"]), str(listener["keyfile"]))

    # --- revocation ends live sessions -------------------------------------------------------

    async def _end_revoked_sessions_forever(self) -> None:
        while True:
            try:
                await self.end_revoked_sessions(time.time())
            except Exception:  # a failed check must not stop the next ones
                logger.exception("checking for revoked device sessions failed")
            await asyncio.sleep(self.revocation_check_seconds)

    async def end_revoked_sessions(self, now: float) -> int:
        """Close the connection of every device session the denylist refuses at `now`; returns how many."""
        authenticator = self._authenticator()
        if authenticator is None:
            return 0
        ended = 0
        for device_id in authenticator.listed_devices(now):
            # A device session's client id is its device id (broker/auth.py), so one lookup finds it.
            session, handler = self._sessions.get(device_id, (None, None))
            grant = None if session is None else grant_of(session)
            if grant is None or grant.role is not Role.DEVICE or handler is None:
                continue  # not connected, or an anonymous provisioning client using the id
            if session.transitions.is_connected() and authenticator.is_revoked(grant, now):
                logger.info("ending the session of %s: the denylist refuses its credential", device_id)
                await self._close_connection(handler)
                ended += 1
        return ended

    @staticmethod
    async def _close_connection(handler: Any) -> None:
        """End a live session as a lost connection would: amqtt's client loop then cleans up after it
        (the will is vetted again in `_handle_disconnect`), and the socket is closed."""
        await handler.handle_connection_closed()
        await handler.stop()

    # --- device presence ---------------------------------------------------------------------

    def _announce_presence(self, session: Any, online: bool) -> None:
        """A device session started or ended: tell the bridge (`on_presence`) and those watching
        {prefix}/presence/+ (ops), as the Mosquitto plugin does. Other roles' sessions are not devices."""
        grant = grant_of(session)
        if grant is None or grant.role is not Role.DEVICE:
            return
        device_id = session.client_id
        if self.on_presence is not None:
            try:
                self.on_presence(device_id, online)
            except Exception:  # presence is bookkeeping: it must never cost a connection
                logger.exception("presence of %s could not be recorded", device_id)
        prefix = self._prefix()
        if prefix is not None:
            self.publish_in_process(presence_topic(prefix, device_id), PRESENCE_ONLINE if online else PRESENCE_OFFLINE)

    # --- in-process subscribers ------------------------------------------------------------

    def subscribe_in_process(self, topic_filters: Iterable[str], deliver: InProcessSubscriber) -> None:
        """Hand every client PUBLISH (ACL-checked) on `topic_filters` to `deliver` instead of broadcasting it.

        Taken, not copied: these topics are the bridge's alone (only the bridge role may receive them).
        """
        self._in_process += [(topic_filter, deliver) for topic_filter in topic_filters]

    def unsubscribe_in_process(self) -> None:
        self._in_process.clear()

    def publish_in_process(self, topic: str, data: bytes) -> None:
        """Deliver like a client's PUBLISH: to each subscriber the RECEIVE ACL allows, at its QoS. Event loop only."""
        self._broadcast_queue.put_nowait({"session": None, "topic": topic, "data": data})

    async def retain_in_process(self, topic: str, data: bytes) -> None:
        """`publish_in_process`, and keep it as the topic's retained message (QoS 1)."""
        self.publish_in_process(topic, data)
        await self.retain_message(None, topic, data, QOS_1)

    async def flush(self, timeout: float = 2.0) -> None:
        """Give what is queued for broadcasting (a last status) up to `timeout` seconds to go out."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not self._broadcast_queue.empty() or any(not task.done() for task in self._tasks_queue):
            if asyncio.get_running_loop().time() >= deadline:
                return
            await asyncio.sleep(0.01)

    async def _broadcast_message(
        self, session: Any, topic: str | None, data: bytes | bytearray | None, force_qos: int | None = None
    ) -> None:
        if session is not None and topic is not None and data is not None:
            for topic_filter, deliver in self._in_process:
                if topic_matches(topic_filter, topic):
                    pause = deliver(topic, bytes(data))
                    handler = self._get_handler(session) if pause > 0 else None
                    if handler is not None and isinstance(handler.reader, PacketReader):
                        handler.reader.pause(pause)
                    return
        await super()._broadcast_message(session, topic, data, force_qos)

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        transport = writer.transport
        assert isinstance(transport, asyncio.WriteTransport)  # a TCP (or TLS) stream's transport
        framed = PacketReader(StreamReaderAdapter(reader), transport, self.max_packet_bytes)
        await self._client_connected(listener_name, framed, _ListenerWriter(writer, listener_name))

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[Any, Any]:
        if isinstance(reader, PacketReader):
            await self._refuse_other_protocol_versions(reader, writer)
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except MQTTError:
            await writer.close()
            raise
        if session.clean_session and not session.client_id:
            session.client_id = gen_client_id()
        session.attributes[CERTIFICATE_ATTRIBUTE] = client_certificate(writer)
        refusal = await self._admit(session)
        if refusal is not None:
            handler.attach(session, reader, writer)
            code = session.attributes.get(REFUSAL_CODE_ATTRIBUTE, CONNACK_NOT_AUTHORIZED)
            await ConnackPacket.build(0, code).to_stream(writer)
            await writer.close()
            # amqtt's connection handler logs this once, as a warning, and releases the connection.
            raise MQTTError(f"CONNECT refused for client id {session.client_id!r}: {refusal}")
        return handler, await self._bind_session(session)

    @staticmethod
    async def _refuse_other_protocol_versions(reader: PacketReader, writer: Any) -> None:
        """Answer a CONNECT of another MQTT version `20 02 00 01` and close, before amqtt misreads it."""
        level = unsupported_protocol(await reader.peek())
        if level is None:
            return
        with contextlib.suppress(ConnectionError):  # the client may be gone already: nothing to tell
            writer.write(UNACCEPTABLE_PROTOCOL_VERSION_CONNACK)
            await writer.close()  # drains first, so the CONNACK goes out before the FIN
        raise MQTTError(f"MQTT protocol level {level} refused: this broker speaks MQTT 3.1.1 (level 4) only")

    async def _admit(self, session: Any) -> str | None:
        """Why this CONNECT is refused, or None. Touches no other session."""
        if not await super()._authenticate(session, None) or grant_of(session) is None:
            return str(session.attributes.get(REFUSAL_ATTRIBUTE, "not authenticated"))
        holder = self._sessions.get(session.client_id, (None, None))[0]
        if holder is not None and not may_take_over(grant_of(holder), grant_of(session)):
            return "client id is in use by another principal"
        return None

    async def _bind_session(self, session: Any) -> Any:
        """amqtt's session-table step of a CONNECT, done once the CONNECT is accepted."""
        holder, holder_handler = self._sessions.get(session.client_id, (None, None))
        if session.clean_session:
            if holder is not None and holder.transitions.is_connected():
                await self._close_connection(holder_handler)
            await self._delete_session(session.client_id)
            session.parent = 0
        elif holder is not None:
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                         "username", "password", "is_anonymous"):  # fmt: skip
                setattr(holder, name, getattr(session, name))
            holder.attributes[GRANT_ATTRIBUTE] = session.attributes[GRANT_ATTRIBUTE]
            holder.parent = 1
            session = holder
        else:
            session.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return session

    async def _authenticate(self, session: Any, listener: Any) -> bool:
        # Decided in _admit, before the session table was touched.
        return grant_of(session) is not None

    async def _publish_session_retained_messages(self, client_session: Any) -> None:
        # amqtt's first step after a CONNECT is registered in the session table (and acknowledged): the device is
        # online from here. A session it took over either said offline before (its end found itself still in
        # the table) or says nothing (it found this one there): see _handle_disconnect.
        self._announce_presence(client_session, online=True)
        await super()._publish_session_retained_messages(client_session)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Any) -> None:
        topic_filter = subscription[0]
        subscribers = self._subscriptions.get(topic_filter, ())
        qos = next((q for s, q in subscribers if s.client_id == session.client_id), None)
        handler = self._get_handler(session)
        if qos is None or handler is None:
            return  # not this session's filter: the leak stock amqtt has on every CONNECT
        sends = []
        # A snapshot: the ACL check awaits, and the retained store may change meanwhile.
        for topic, retained in list(self._retained_messages.items()):
            if not topic_matches(topic_filter, topic):
                continue
            if await self._topic_filtering(session, topic, Action.RECEIVE):
                message_qos = min(qos, retained.qos or qos)
                publish = handler.mqtt_publish(topic, retained.data, message_qos, retain=True)
                sends.append(asyncio.ensure_future(publish))
        if sends:
            await asyncio.wait(sends)

    async def _handle_disconnect(self, client_session: Any, handler: Any, disconnect_waiter: Any) -> None:
        # The will was vetted at CONNECT, but a device token may have expired since.
        if client_session.will_flag:
            will_topic = client_session.will_topic
            client_session.will_flag = await self._topic_filtering(client_session, will_topic, Action.PUBLISH)
        # Offline only if this connection is still the session's: one taken over by a new CONNECT ends after the
        # new one said online (the table then holds the new handler), and must not say offline after it.
        still_current = self._sessions.get(client_session.client_id, (None, None))[1] is handler
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)
        if still_current:
            self._announce_presence(client_session, online=False)
