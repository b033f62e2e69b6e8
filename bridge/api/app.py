"""The admin HTTP API as an ASGI app (FastAPI): every CLI admin action as a JSON endpoint, the backend endpoints,
health. Each route is a thin edge over `bridge.ops`: it checks the caller's admin token, calls the same function
the CLI calls (the change is one transaction with its event, the actor `api:<token id>`), and returns JSON.

Errors have one shape, `{"error": {"code": ..., "message": ...}}`, with these stable codes:

    400 invalid_request       malformed JSON, a wrong or missing field, a refused value (the CLI's exit 2)
    401 unauthorized          no admin token, or not a live one (wrong, unknown, revoked)
    403 forbidden             the token lacks the scope the route needs
    403 csrf_failed           a change from a dashboard session without its X-CSRF-Token (bridge/api/sessions.py)
    404 not_found             no such tenant, key, device or entry (or not in the token's tenant)
    409 conflict              it exists already, or the operation does not apply in its state
    413 payload_too_large     a body over the route's limit
    415 unsupported_media_type  not application/json (text/csv for an import)
    429 too_many_streams      the admin token holds the most live-event streams it may (bridge/api/live.py)
    500 internal_error        a fault of the bridge; nothing is half done (each change is one transaction)
    503 unavailable           storage busy or unavailable, or Mosquitto (dynsec mode) did not confirm: retry

The routes are in `bridge.api.routes` (admin) and `bridge.api.backend` (backend scope), the dashboard's in
`bridge.api.dashboard`. The server runs in its own process (`provbridge api`, or started by `serve`): never on the
claim path's event loop.
"""

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridge.api import backend, dashboard, health, routes
from bridge.api.context import ApiContext
from bridge.config import Settings
from bridge.errors import AlreadyExists, ApiError, BodyTooLarge, MirrorError, NotFound, StorageError, UsageError

log = logging.getLogger("provbridge.api")

MAX_BODY_BYTES = 1024 * 1024  # every route but the CSV import
MAX_IMPORT_BODY_BYTES = 128 * 1024 * 1024  # bridge.ops.allowlist.MAX_IMPORT_BYTES

_STATUS_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    500: "internal_error",
    503: "unavailable",
}


def error_response(status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code or _STATUS_CODES.get(status, "error"), "message": message}},
        status_code=status,
        headers={"WWW-Authenticate": "Bearer"} if status == 401 else None,
    )


class BodyLimit:
    """Refuse a body over its route's limit (413) before the route reads it, with or without Content-Length."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = MAX_IMPORT_BODY_BYTES if scope["path"].endswith("/allowlist/import") else MAX_BODY_BYTES
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await error_response(413, f"the body is larger than {limit} bytes")(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge as exc:
            await error_response(413, str(exc))(scope, receive, send)


def create_app(settings: Settings) -> FastAPI:
    """The API for the data dir and broker `settings` name (the store is opened on first use, per process)."""
    app = FastAPI(
        title="provbridge admin API",
        version="1",
        description="Keys, codes, devices, the allowlist, events and the backend endpoints of a provbridge. "
        "Authenticate with `Authorization: Bearer pba_...` (`provbridge admin-token create`). "
        'Errors: `{"error": {"code", "message"}}`.',
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.context = ApiContext(settings)
    app.include_router(health.router)
    app.include_router(routes.router)
    app.include_router(backend.router)
    app.include_router(dashboard.router)

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/ui/")

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code)

    @app.exception_handler(UsageError)
    async def usage_error(_request: Request, exc: UsageError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(NotFound)
    async def not_found(_request: Request, exc: NotFound) -> JSONResponse:
        return error_response(404, str(exc))

    @app.exception_handler(AlreadyExists)
    async def already_exists(_request: Request, exc: AlreadyExists) -> JSONResponse:
        return error_response(409, str(exc))

    @app.exception_handler(MirrorError)
    async def broker_error(_request: Request, exc: MirrorError) -> JSONResponse:
        return error_response(503, str(exc))

    @app.exception_handler(StorageError)
    async def storage_error(_request: Request, exc: StorageError) -> JSONResponse:
        log.warning("storage unavailable: %s", exc)
        return error_response(503, "storage busy or unavailable; retry")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid')}"[:300])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        log.error("admin API request failed", exc_info=exc)
        return error_response(500, "internal error (logged)")

    @app.middleware("http")
    async def no_store(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        response = await call_next(request)
        response.headers["Cache-Control"] = "no-store"  # answers may hold a secret shown once
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        if settings.api.tls:
            response.headers["Strict-Transport-Security"] = "max-age=31536000"
        if request.url.path.startswith("/ui"):  # not /docs, whose Swagger UI needs its CDN and inline script
            response.headers["Content-Security-Policy"] = dashboard.CONTENT_SECURITY_POLICY
        return response

    app.add_middleware(BodyLimit)
    return app
