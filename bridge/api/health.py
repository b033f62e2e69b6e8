"""Health, metrics and the public JWKS. `/metrics` (Prometheus, bridge/metrics) needs an admin token with the read
scope; health and the JWKS need none (the only routes without one):

GET /healthz   200 while the API process runs
GET /readyz    200 when the bridge is connected to its broker and the database takes a write:
               {"status": "ready", "checks": {"broker": "ok", "database": "ok"}}
               503 otherwise: the same status and checks, each naming what failed, and the API's error shape, so
               that a client of the API reads it as it reads any other error:
               {"status": "unavailable", "checks": {"broker": "not connected: ...", "database": "ok"},
                "error": {"code": "unavailable", "message": "not ready: broker"}}

GET /.well-known/jwks.json   the public keys that verify device tokens, as `provbridge jwks` prints them, for brokers
               that fetch a JWKS (EMQX): `Cache-Control: public, max-age=<token.jwks_max_age_seconds>` and an ETag
               (If-None-Match: 304). Each token key is in it from the rotation before the one that makes it
               sign (bridge/storage/rotation.py), so a verifier refreshing within max-age knows every key before
               its first token. Public keys only: nothing in it needs a token to read.

The broker check is the bridge's own connection, not a probe of the broker's port: a broker that accepts
connections is no use while the bridge is not subscribed to it (lost, refused, still reconnecting). The API runs
in a process of its own, so it reads what the bridge processes share: their `provbridge_broker_connected`
gauges under `<data_dir>/metrics/` (bridge/metrics/counters.py), those of running processes only.
"""

import hashlib
import json
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from bridge.api.context import ApiContext, Caller, context_of, require
from bridge.metrics import counters
from bridge.storage import keyfiles
from bridge.storage.store import write_probe
from bridge.tls.certificates import bridge_endpoint

router = APIRouter()
PROBE_TIMEOUT_SECONDS = 1.0


@router.get("/healthz", summary="The API process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/.well-known/jwks.json", summary="The JWKS that verifies device tokens (public; cacheable)")
def public_jwks(request: Request, context: ApiContext = Depends(context_of)) -> Response:  # noqa: B008
    body = json.dumps(keyfiles.jwks(keyfiles.load_keys(context.settings.data_dir)), sort_keys=True).encode()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {"Cache-Control": f"public, max-age={context.settings.token.jwks_max_age_seconds}", "ETag": etag}
    if etag in (tag.strip() for tag in request.headers.get("if-none-match", "").split(",")):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


@router.get("/metrics", summary="Prometheus metrics of every bridge process (admin token with the read scope)")
def metrics(caller: Annotated[Caller, Depends(require("read"))]) -> Response:
    return Response(counters.exposition(caller.settings.data_dir), media_type=CONTENT_TYPE_LATEST)


@router.get("/readyz", summary="The bridge connected to its broker and the database writable (503 otherwise)")
def readyz(context: ApiContext = Depends(context_of)) -> JSONResponse:  # noqa: B008
    checks = {"broker": _broker(context), "database": _database(context)}
    failed = [name for name, result in checks.items() if result != "ok"]
    if not failed:
        return JSONResponse({"status": "ready", "checks": checks})
    error = {"code": "unavailable", "message": f"not ready: {', '.join(failed)}"}
    return JSONResponse({"status": "unavailable", "checks": checks, "error": error}, 503)


def _broker(context: ApiContext) -> str:
    if counters.broker_connected(context.settings.data_dir):
        return "ok"
    where = bridge_endpoint(context.settings)
    return f"not connected: no running bridge of this data dir is connected to its broker at {where.host}:{where.port}"


def _database(context: ApiContext) -> str:
    return write_probe(context.settings.database, PROBE_TIMEOUT_SECONDS)
