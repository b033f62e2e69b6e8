"""A device that, once provisioned, also speaks the token-refresh message."""

import time
import uuid

from device_sim.device import build_token_refresh
from provwire import crypto, topics
from provwire.models import ClaimError, ClaimOk, Credentials, to_json
from tests.helpers.bridge import Bridge
from tests.helpers.devices import Device, answer_of


class RefreshingDevice(Device):
    """A Device that, once provisioned, also speaks the token-refresh message."""

    device_id = ""

    def provision(self, key: str | None = None) -> Credentials:
        """Claim with `key` (default: the bridge's first key); remember the device id and cloud key id."""
        answer = self.claim(key or self.bridge.provision_key)
        assert isinstance(answer, ClaimOk)
        self.device_id = answer.device_id
        self.cloud_kid = answer.cloud_key_id
        return self.open(answer)

    @property
    def device_key(self) -> bytes:
        cloud = self.bridge.keys.cloud[self.cloud_kid].public_key()
        return crypto.derive_device_key(crypto.shared_secret(self.private_key, cloud))

    def refresh_payload(
        self, *, device_id: str | None = None, timestamp: int | None = None, key: bytes | None = None
    ) -> bytes:
        request = build_token_refresh(
            device_id or self.device_id,
            key or self.device_key,
            f"r-{uuid.uuid4().hex}",
            int(time.time()) if timestamp is None else timestamp,
        )
        return to_json(request)

    def send_refresh(self, payload: bytes) -> ClaimOk | ClaimError:
        self.conn.publish(topics.token_topic(self.bridge.prefix, self.client_id), payload)
        topic, raw = self.conn.next_message()
        assert topic == topics.response_topic(self.bridge.prefix, self.client_id)
        return answer_of(raw)


def provisioned(bridge: Bridge, key: str | None = None) -> tuple[RefreshingDevice, Credentials]:
    """A RefreshingDevice provisioned with `key` (default: the first key), its connection closed again."""
    device = RefreshingDevice(bridge)
    with device:
        creds = device.provision(key)
    return device, creds
