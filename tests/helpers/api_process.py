"""The admin API as `provbridge serve` runs it: `ApiProcess`, a process of its own started from the bridge's
settings (pickled to it, as `serve` does), beside a bridge a test serves on any broker (tests/helpers/brokers.py).

The thread-hosted `api_server` (tests/helpers/api.py) shares the test's process with the bridge; this one does
not, so whatever the API changes reaches the brokers only the way it does in production: through the database,
the denylist file, and (Mosquitto's dynsec mode) the API's own connection to the broker.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from bridge.api.server import ApiProcess
from bridge.config import Settings
from tests.helpers.api import Api
from tests.helpers.waiting import wait_for


def _healthy(api: Api) -> bool:
    try:
        return api.request("GET", "/healthz").status == 200
    except OSError:  # not listening yet
        return False


@contextmanager
def api_process(settings: Settings) -> Iterator[Api]:
    """The admin API in its own process on `settings.api.port` until the block ends (ApiProcess: our child,
    killed by the kernel should the test process die first)."""
    process = ApiProcess(settings)
    # Started from the test's own thread: the kernel's parent-death signal fires when the *thread* that started
    # the child ends (bridge/edges/lifeline.py), and this one outlives the block.
    process.start()
    try:
        api = Api(settings.api.port, settings)
        assert wait_for(lambda: _healthy(api), timeout=30), "the admin API process did not start"
        yield api
    finally:
        process.stop()
