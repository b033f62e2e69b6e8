"""The one way tests wait: on a condition, with a deadline, never on a duration."""

import time
from collections.abc import Callable


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> bool:
    """Poll `condition` every `interval` seconds until it holds or `timeout` passes; then whether it holds.

    An exception `condition` raises (an assertion about a process that died, say) ends the wait at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()
