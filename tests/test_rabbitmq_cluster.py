"""What provbridge's RabbitMQ support (issue 13, in progress: docs/SCALING.md) will stand on, checked on a real
3-node cluster on loopback (tests/helpers/rabbitmq.py): the nodes cluster, RabbitMQ's OAuth 2 backend verifies an
ES256 JWT at CONNECT and takes MQTT topic permissions from its scopes (`<resource_server_id>.write:*/*/<topic>`, `/`
written `.`), a message crosses nodes, a publish outside the scope ends the connection, expired, wrong-audience and
garbage tokens are refused, and a node stopped and started again rejoins. In `make test-full` (a cluster takes
half a minute to start here)."""

import threading
import time
from collections.abc import Iterator

import jwt
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion

from tests.helpers.rabbitmq import RabbitCluster, require_rabbitmq
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.xdist_group("rabbitmq")  # one cluster at a time (Makefile: --dist loadgroup)

KEY = ec.generate_private_key(ec.SECP256R1())
SCOPE = "provbridge.read:*/*/devices.dev1.* provbridge.write:*/*/devices.dev1.* provbridge.configure:*/*/*"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    require_rabbitmq()
    root = tmp_path_factory.mktemp("rabbitmq")
    public = root / "signing.pem"
    public.write_bytes(
        KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with RabbitCluster(root, 3, public) as running:
        yield running


def token(aud: str = "provbridge", expires_in: int = 300, scope: str = SCOPE) -> str:
    now = int(time.time())
    claims = {"sub": "dev1", "aud": aud, "scope": scope, "iat": now, "exp": now + expires_in}
    return jwt.encode(claims, KEY, algorithm="ES256", headers={"kid": "provbridge"})


class Client:
    """A paho MQTT 3.1.1 client (RabbitMQ 3.10 speaks no MQTT 5): its CONNACK, what it received, whether it is up."""

    def __init__(self, port: int, password: str, client_id: str) -> None:
        self.connack: mqtt.ReasonCode | None = None
        self.received: list[tuple[str, bytes]] = []
        self.answered = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        self.client.username_pw_set("dev1", password)
        self.client.on_connect = self._connected
        self.client.on_disconnect = lambda _c, _u, _f, rc, _p: self._connected(None, None, None, rc, None)
        self.client.on_message = lambda _c, _u, m: self.received.append((m.topic, m.payload))
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert self.answered.wait(15), "no CONNACK"

    def _connected(self, _c: object, _u: object, _f: object, rc: mqtt.ReasonCode, _p: object) -> None:
        if self.connack is None:
            self.connack = rc
        self.answered.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_the_nodes_form_one_cluster(cluster: RabbitCluster) -> None:
    disc, running = cluster.cluster_members(0)
    assert disc == running == set(cluster.names)


def test_a_token_s_scopes_are_its_topics_on_every_node(cluster: RabbitCluster) -> None:
    subscriber = Client(cluster.mqtt_ports[1], token(), "dev1-sub")
    publisher = Client(cluster.mqtt_ports[0], token(), "dev1-pub")
    try:
        assert subscriber.connack is not None and not subscriber.connack.is_failure
        assert publisher.connack is not None and not publisher.connack.is_failure
        subscribed = threading.Event()
        subscriber.client.on_subscribe = lambda *_: subscribed.set()
        subscriber.client.subscribe("devices/dev1/#", qos=1)
        assert subscribed.wait(10)
        publisher.client.publish("devices/dev1/x", b"hello", qos=1).wait_for_publish(10)
        assert wait_for(lambda: subscriber.received == [("devices/dev1/x", b"hello")])  # node 1 to node 2
        publisher.client.publish("devices/dev2/x", b"not mine", qos=1)
        assert wait_for(lambda: not publisher.client.is_connected())  # outside the scope: the connection ends
    finally:
        subscriber.close()
        publisher.close()


@pytest.mark.parametrize(
    "password", [token(expires_in=-60), token(aud="someone-else"), "not-a-jwt"], ids=["expired", "audience", "garbage"]
)
def test_tokens_that_do_not_verify_are_refused_at_connect(cluster: RabbitCluster, password: str) -> None:
    refused = Client(cluster.mqtt_ports[0], password, "dev1-refused")
    refused.close()
    assert refused.connack is not None and refused.connack.is_failure


def test_a_node_stopped_and_started_again_rejoins_and_serves(cluster: RabbitCluster) -> None:
    cluster.stop_node(2)
    assert cluster.cluster_members(0)[1] == set(cluster.names) - {cluster.names[2]}
    survivor = Client(cluster.mqtt_ports[1], token(), "dev1-survivor")  # the others go on meanwhile
    survivor.close()
    assert survivor.connack is not None and not survivor.connack.is_failure
    cluster.start_node(2)
    assert cluster.cluster_members(0)[1] == set(cluster.names)
    back = Client(cluster.mqtt_ports[2], token(), "dev1-back")
    back.close()
    assert back.connack is not None and not back.connack.is_failure
