"""The admin API polled while claims are measured (issue 12: the API must cost the claim path nothing measurable).

During each provbridge phase of `bench.run`, a thread asks the admin API `serve` started for a page of devices
(`GET /v1/devices?limit=100`, following the cursor, from the start again at the end) every POLL_SECONDS, as a
dashboard left open would. The phase records how many requests it made, their latency and any that failed; the
claim figures are then those of a bridge whose API is in use.
"""

import http.client
import json
import threading
import time
from types import TracebackType
from typing import Any

from bench.common import latency_summary
from bench.targets import System

POLL_SECONDS = 0.25
PAGE = 100


class ApiPoller:
    def __init__(self, system: System, enabled: bool = True) -> None:
        self.port = system.api_port if enabled and system.kind == "provbridge" else None
        self.token = system.data_dir.admin_token
        self.latencies: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="api-poller", daemon=True)

    def __enter__(self) -> "ApiPoller":
        if self.port and self.token:
            self._thread.start()
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def summary(self) -> dict[str, Any] | None:
        if not (self.port and self.token):
            return None
        return {"poll_seconds": POLL_SECONDS, "page": PAGE, "errors": self.errors, **latency_summary(self.latencies)}

    def _run(self) -> None:
        assert self.port is not None
        cursor: str | None = None
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.wait(POLL_SECONDS):
            path = f"/v1/devices?limit={PAGE}" + (f"&after={cursor}" if cursor else "")
            t0 = time.monotonic()
            try:
                conn.request("GET", path, headers={"Authorization": f"Bearer {self.token}"})
                answer = conn.getresponse()
                body = answer.read()
            except (OSError, http.client.HTTPException):
                self.errors += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                continue
            self.latencies.append(time.monotonic() - t0)
            if answer.status != 200:
                self.errors += 1
                continue
            cursor = json.loads(body).get("next_cursor")
        conn.close()
