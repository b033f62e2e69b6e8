"""What the TLS tests share: settings with a free TLS port, `init` (+ `--tls`), the bridge serving."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bridge.config import Settings
from bridge.ops import admin
from bridge.tls import certificates as tls
from tests.helpers.bridge import make_settings, serving
from tests.helpers.network import free_port


def tls_settings(data_dir: Path, **broker: object) -> Settings:
    settings = make_settings(data_dir)
    updated = settings.broker.model_copy(update={"tls_port": free_port(), **broker})
    return settings.model_copy(update={"broker": updated})


def initialise(settings: Settings, tls_files: bool = True) -> str:
    """`provbridge init` (+ `--tls`); returns the first provisioning key."""
    result = admin.init_data_dir(settings)
    assert result.provision_key is not None
    if tls_files:
        tls.ensure_tls(settings)
    return result.provision_key


@contextmanager
def running(settings: Settings) -> Iterator[Settings]:
    """`provbridge serve` on its own thread until the block ends; yields the settings it resolved."""
    with serving(settings):
        yield tls.resolve(settings)
