"""The bridge serving claims on each broker a device may meet: the embedded one, Mosquitto with dynamic
security, Mosquitto with the provbridge_jwt plugin."""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from bridge.config import Settings
from tests.helpers.bridge import Bridge, serving_bridge
from tests.helpers.mosquitto import mosquitto_bridge, require_plugin

EMBEDDED, DYNSEC, JWT = "embedded", "mosquitto-dynsec", "mosquitto-jwt"


def use_jwt_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mosquitto verifies device tokens with the provbridge_jwt plugin (skipped when it cannot be built,
    except under CI). The CLI run in this process (`mosquitto-config`, `device revoke`, `doctor`) reads a
    config file written from the settings: the environment puts it in jwt mode too."""
    require_plugin()
    monkeypatch.setenv("PROVBRIDGE_BROKER__MOSQUITTO_AUTH", "jwt")


@contextmanager
def bridge_on(
    kind: str, initialised: tuple[Settings, str], monkeypatch: pytest.MonkeyPatch, **broker: object
) -> Iterator[Bridge]:
    """The bridge serving claims on the broker `kind` (EMBEDDED, DYNSEC or JWT); `broker`: settings to change."""
    settings, key = initialised
    if kind == EMBEDDED:
        settings = settings.model_copy(update={"broker": settings.broker.model_copy(update=broker)})
        with serving_bridge(settings, key) as bridge:
            yield bridge
        return
    auth = kind.removeprefix("mosquitto-")
    if auth == "jwt":
        use_jwt_plugin(monkeypatch)
    with mosquitto_bridge(settings, key, mosquitto_auth=auth, **broker) as mosquitto:
        yield mosquitto
