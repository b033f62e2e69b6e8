"""A device as firmware would be, over the one MQTT test client: claim, open the answer, provision."""

import json
import threading
import uuid

from cryptography.hazmat.primitives.asymmetric import ec

from bridge.config import Settings
from bridge.edges.core import claim_handlers
from bridge.storage.store import Store
from provwire import crypto, topics
from provwire.models import Claim, ClaimError, ClaimOk, Credentials, to_json
from tests.helpers.bridge import Bridge
from tests.helpers.mqtt import MqttClient


def answer_of(raw: bytes) -> ClaimOk | ClaimError:
    """A claim's or a refresh's answer, parsed as the model its status says."""
    data = json.loads(raw)
    return ClaimOk.model_validate(data) if data["status"] == "ok" else ClaimError.model_validate(data)


class Device:
    """A device as firmware would be: a P-256 key pair, a hardware id, the cloud public key."""

    def __init__(self, bridge: Bridge, hardware_id: str | None = None, client_id: str | None = None) -> None:
        self.bridge = bridge
        self.hardware_id = hardware_id or f"hw-{uuid.uuid4().hex[:12]}"
        self.client_id = client_id or self.hardware_id
        self.private_key: ec.EllipticCurvePrivateKey = crypto.generate_private_key()
        self.conn = MqttClient(bridge.port, self.client_id)

    def __enter__(self) -> "Device":
        assert self.conn.connect()
        assert self.conn.subscribe(topics.response_topic(self.bridge.prefix, self.client_id)) == [1]
        return self

    def __exit__(self, *_exc: object) -> None:
        self.conn.close()

    @property
    def public_key_b64(self) -> str:
        return crypto.b64encode(crypto.sec1(self.private_key.public_key()))

    def claim_payload(self, key: str, request_id: str | None = None, **extra: object) -> bytes:
        claim = Claim(
            request_id=request_id or uuid.uuid4().hex,
            provision_key=key,
            hardware_id=self.hardware_id,
            public_key=self.public_key_b64,
            **extra,  # type: ignore[arg-type]
        )
        return to_json(claim)

    def send(self, payload: bytes) -> bytes:
        """Publish a raw payload on this device's claim topic; return the raw answer."""
        self.conn.publish(topics.claim_topic(self.bridge.prefix, self.client_id), payload)
        topic, answer = self.conn.next_message()
        assert topic == topics.response_topic(self.bridge.prefix, self.client_id)
        return answer

    def claim(self, key: str, request_id: str | None = None) -> ClaimOk | ClaimError:
        return answer_of(self.send(self.claim_payload(key, request_id)))

    def open(self, answer: ClaimOk) -> Credentials:
        cloud = self.bridge.keys.cloud[answer.cloud_key_id].public_key()
        shared = crypto.shared_secret(self.private_key, cloud)
        box = crypto.SealedBox(crypto.b64decode(answer.sealed.nonce), crypto.b64decode(answer.sealed.ciphertext))
        plain = crypto.open_sealed(crypto.derive_seal_key(shared, answer.request_id), box, answer.request_id)
        return Credentials.model_validate_json(plain)


def provision(bridge: Bridge, device: Device | None = None) -> tuple[str, Credentials]:
    """One device (`device`, or a new one) claims with the first key; its device id and opened credentials."""
    with device or Device(bridge) as d:
        answer = d.claim(bridge.provision_key)
    assert isinstance(answer, ClaimOk), answer
    return answer.device_id, d.open(answer)


def race_one_time_key(bridge: Bridge, contenders: int = 50) -> list[dict[str, object]]:
    """`contenders` distinct devices claim with one one-time key at the same moment; returns the answers.

    The core concurrency guarantee (exactly one device) is checked by the callers, per broker.
    """
    key = bridge.create_key(max_registrations=1)
    devices = [Device(bridge) for _ in range(contenders)]
    for d in devices:
        d.__enter__()
    payloads = [d.claim_payload(key) for d in devices]
    answers: list[bytes] = [b""] * contenders
    start = threading.Barrier(contenders)

    def go(i: int) -> None:
        start.wait()
        answers[i] = devices[i].send(payloads[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for d in devices:
        d.__exit__()
    statuses: list[dict[str, object]] = [json.loads(a) for a in answers]
    assert sum(s["status"] == "ok" for s in statuses) == 1
    assert sum(s.get("code") == "permission_denied" for s in statuses) == contenders - 1
    assert bridge.store.count("devices") == 1
    return statuses


def claim_devices(settings: Settings, store: Store, key: str, count: int, prefix: str = "hw") -> list[str]:
    """`count` devices made by real claims through the claim handlers (no broker needed); their ids."""
    handlers = claim_handlers(settings, store)
    made = []
    for n in range(count):
        hardware_id = f"{prefix}-{n:03d}-{uuid.uuid4().hex[:6]}"
        public_key = crypto.b64encode(crypto.sec1(crypto.generate_private_key().public_key()))
        claim = Claim(request_id=uuid.uuid4().hex, provision_key=key, hardware_id=hardware_id, public_key=public_key)
        outcome = handlers.handle(topics.claim_topic(settings.topic_prefix, hardware_id), to_json(claim))
        made.append(json.loads(outcome.answer or b"{}")["device_id"])
    return made
