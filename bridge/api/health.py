"""Health and metrics. `/metrics` (Prometheus, bridge/metrics) needs an admin token with the read scope; health
needs none (the only routes without one):

GET /healthz   200 while the API process runs
GET /readyz    200 when the broker accepts a connection where devices and the bridge connect and the
               database takes a write; 503 otherwise, naming what failed
"""

import socket
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from bridge.api.context import ApiContext, Caller, context_of, require
from bridge.metrics import counters
from bridge.storage.store import write_probe
from bridge.tls.certificates import bridge_endpoint

router = APIRouter()
PROBE_TIMEOUT_SECONDS = 1.0


@router.get("/healthz", summary="The API process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", summary="Prometheus metrics of every bridge process (admin token with the read scope)")
def metrics(caller: Annotated[Caller, Depends(require("read"))]) -> Response:
    return Response(counters.exposition(caller.settings.data_dir), media_type=CONTENT_TYPE_LATEST)


@router.get("/readyz", summary="Broker reachable and database writable (503 otherwise)")
def readyz(context: ApiContext = Depends(context_of)) -> JSONResponse:  # noqa: B008
    checks: dict[str, Any] = {"broker": _broker(context), "database": _database(context)}
    ready = all(result == "ok" for result in checks.values())
    return JSONResponse({"status": "ready" if ready else "unavailable", "checks": checks}, 200 if ready else 503)


def _broker(context: ApiContext) -> str:
    endpoint = bridge_endpoint(context.settings)
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=PROBE_TIMEOUT_SECONDS):
            return "ok"
    except OSError as exc:
        return f"unreachable at {endpoint.host}:{endpoint.port}: {exc.strerror or exc}"


def _database(context: ApiContext) -> str:
    return write_probe(context.settings.database_file, PROBE_TIMEOUT_SECONDS)
