"""The simulator reconnects on its own: a Mosquitto that is down, then restarted, with the real bridge.

Issue 5 (broker restart): "the bridge and the simulator reconnect on their own". The bridge side is
proved by tests/test_faults.py (F4); this is the simulator's side, through `claim_over_mqtt` as the
fleet and the CLI use it.
"""

import socket
import threading
import uuid

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bridge.config import Settings
from device_sim.device import DeviceIdentity, ProvisionResult, claim_over_mqtt
from tests.helpers.mosquitto import mosquitto_bridge
from tests.helpers.waiting import wait_for


def test_the_simulator_claims_through_a_broker_that_was_down_and_restarted(initialised: tuple[Settings, str]) -> None:
    settings, key = initialised
    with mosquitto_bridge(settings, key) as bridge:
        cloud = serialization.load_pem_public_key((settings.data_dir / "cloud_public.pem").read_bytes())
        assert isinstance(cloud, ec.EllipticCurvePublicKey)
        identity = DeviceIdentity.generate(f"sim-{uuid.uuid4().hex[:12]}")
        bridge.mosquitto.stop()
        # The port refuses nothing but answers nothing either: it counts the simulator's attempts.
        attempts = []
        with socket.create_server(("127.0.0.1", bridge.port)) as down:
            down.settimeout(30)
            results: list[ProvisionResult | BaseException] = []

            def run() -> None:
                try:
                    results.append(
                        claim_over_mqtt("127.0.0.1", bridge.port, identity, key, cloud, timeout=3, max_attempts=10)
                    )
                except BaseException as exc:  # reported by the assertions below
                    results.append(exc)

            device = threading.Thread(target=run, daemon=True)
            device.start()
            for _ in range(2):  # two attempts met a dead broker: accepted, then closed without a CONNACK
                conn, _ = down.accept()
                attempts.append(conn)
                conn.close()
        bridge.mosquitto.start()  # back; the bridge reconnects by itself too
        device.join(60)
        assert wait_for(lambda: bool(results), timeout=1)
        (result,) = results
        assert isinstance(result, ProvisionResult), result
        assert bridge.store.count("devices") == 1
        assert bridge.store.device(result.device_id).hardware_id == identity.hardware_id  # after two failed connects
