"""Credentials as the bridge seals them, for the simulator's tests that need no bridge."""

from provwire.models import Credentials, MqttCredentials


def sample_credentials(device_id: str, api_key: str = "ak_secret") -> Credentials:
    """What a claim's answer carries for `device_id` on 127.0.0.1:1883: `api_key` ("" on a re-claim), a
    token, its own topics."""
    return Credentials(
        api_key=api_key,
        mqtt=MqttCredentials(
            host="127.0.0.1",
            port=1883,
            tls=False,
            client_id=device_id,
            username=device_id,
            token="tok_secret",
            expires_at=2_000_000_000,
            publish=[f"devices/{device_id}/up/#"],
            subscribe=[f"devices/{device_id}/down/#"],
        ),
    )
