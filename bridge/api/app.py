"""The admin HTTP API as an ASGI app (FastAPI): every CLI admin action as a JSON endpoint, the backend endpoints,
health. Each route is a thin edge over `bridge.ops`: it checks the caller's admin token, calls the same function
the CLI calls (the change is one transaction with its event, the actor `api:<token id>`), and returns JSON.

Errors have one shape, `{"error": {"code": ..., "message": ...}}`, with these stable codes:

    400 invalid_request       malformed JSON, a wrong or missing field, a refused value (the CLI's exit 2)
    401 unauthorized          no admin token, or not a live one (wrong, unknown, revoked)
    403 forbidden             the token lacks the scope the route needs
    403 csrf_failed           a change from a dashboard session without its X-CSRF-Token (bridge/api/sessions.py)
    404 not_found             no such tenant, key, device or entry (or not in the token's tenant), or no such path
    405 method_not_allowed    the path exists, not with this method (the Allow header lists those it has)
    409 conflict              it exists already, or the operation does not apply in its state
    413 payload_too_large     a body over the route's limit
    415 unsupported_media_type  an import's body not sent as text/csv (a JSON route answers 400 to a non-JSON body)
    429 too_many_streams      the admin token holds the most live-event streams it may (bridge/api/live.py)
    500 internal_error        a fault of the bridge; nothing is half done (each change is one transaction)
    503 unavailable           storage busy or unavailable, or Mosquitto (dynsec mode) did not confirm: retry

The routes are in `bridge.api.routes` (admin), `bridge.api.hostkeys` (admin, host-wide) and `bridge.api.backend`
(backend scope), the dashboard's in `bridge.api.dashboard`; docs/API.md lists every one, and the OpenAPI document
(`/openapi.json`, `/docs`: an admin token of any scope) every one but the dashboard's. The server runs in its own
process (`provbridge api`, or started by `serve`): never on the claim path's event loop.
"""

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.routing import APIRoute
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridge.api import backend, dashboard, health, hostkeys, routes
from bridge.api.context import ERRORS, ApiContext, Caller, ErrorAnswer, require, scope_of_route
from bridge.config import Settings
from bridge.errors import (
    AlreadyExists,
    ApiError,
    BodyTooLarge,
    BrokersNotTold,
    MirrorError,
    NotFound,
    StorageError,
    UsageError,
)

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
    429: "too_many_streams",
    500: "internal_error",
    503: "unavailable",
}


def error_response(
    status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    # A status without a code of its own still gets one of the documented codes, never a new one.
    fallback = "internal_error" if status >= 500 else "invalid_request"
    sent = dict(headers or {})
    if status == 401:
        sent["WWW-Authenticate"] = "Bearer"
    return JSONResponse(
        {"error": {"code": code or _STATUS_CODES.get(status, fallback), "message": message}},
        status_code=status,
        headers=sent or None,
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


PUBLIC_JWKS_PATH = "/.well-known/jwks.json"


class SecurityHeaders:
    """The headers every answer carries. Plain ASGI, not FastAPI's `@app.middleware("http")`: that one reads
    the request through a task group of its own, which wraps a BodyLimit refusal raised in a route's read of
    its body in an ExceptionGroup, and a streamed import over the limit was answered 500, not 413."""

    def __init__(self, app: ASGIApp, tls: bool) -> None:
        self.app = app
        self.tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = {
            "Cache-Control": "no-store",  # answers may hold a secret shown once
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer",
        }
        if scope["path"] == PUBLIC_JWKS_PATH:
            del extra["Cache-Control"]  # public keys only: the route says how long verifiers may cache them
        if self.tls:
            extra["Strict-Transport-Security"] = "max-age=31536000"
        if scope["path"].startswith("/ui"):  # not /docs, whose Swagger UI needs its CDN and inline script
            extra["Content-Security-Policy"] = dashboard.CONTENT_SECURITY_POLICY

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in extra.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, with_headers)


class AdminApi(FastAPI):
    """FastAPI, whose OpenAPI document says what the API really answers (`document_errors`)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            document = get_openapi(
                title=self.title, version=self.version, description=self.description, routes=self.routes
            )
            document_errors(document, served_routes())
            self.openapi_schema = document
        return self.openapi_schema


meta = APIRouter(include_in_schema=False)


@meta.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/ui/")


@meta.get("/openapi.json")
def openapi_document(request: Request, _caller: Caller = Depends(require(None))) -> JSONResponse:  # noqa: B008
    app: FastAPI = request.app
    return JSONResponse(app.openapi())


# No Swagger UI page: FastAPI's loads its script from a CDN, which would run on the dashboard's origin, where a
# logged-in operator's session (and its CSRF token, GET /ui/session) is within any script's reach. Point any
# OpenAPI viewer at /openapi.json instead.


# Every route the app serves comes from these: the OpenAPI document and docs/API.md's test walk them (FastAPI's
# own list of an app's routes nests included routers in private types that change between its versions).
ROUTERS = (health.router, routes.router, hostkeys.router, backend.router, dashboard.router, meta)


def served_routes() -> list[APIRoute]:
    return [route for router in ROUTERS for route in router.routes if isinstance(route, APIRoute)]


_ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorAnswer"}
_NOT_READY = {
    "type": "object",
    "properties": {
        "status": {"const": "unavailable"},
        "checks": {"type": "object", "additionalProperties": {"type": "string"}},
        "error": {"$ref": "#/components/schemas/ErrorDetail"},
    },
    "required": ["status", "checks", "error"],
}


def _error(status: int) -> dict[str, Any]:
    return {"description": ERRORS[status], "content": {"application/json": {"schema": _ERROR_SCHEMA}}}


def document_errors(document: dict[str, Any], routes: list[APIRoute]) -> None:
    """Make each operation's error responses the ones the API gives, in its one shape: FastAPI documents a 422
    `HTTPValidationError` the API never answers (a validation error is 400 `invalid_request`) and none of the
    others. The routes' own `responses` (bridge.api.context.errors) add the errors particular to them."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    error_schema = ErrorAnswer.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorAnswer"] = error_schema
    for route in routes:
        takes_token, scope = scope_of_route(route.dependant.dependencies)
        for method in route.methods or ():
            operation = document["paths"].get(route.path_format, {}).get(method.lower())
            if operation is None:  # not in the document (the dashboard's: docs/API.md lists them)
                continue
            responses = operation.setdefault("responses", {})
            if responses.pop("422", None) is not None:  # FastAPI's sign that the route validates its input
                responses.setdefault("400", _error(400))
            if "requestBody" in operation:
                responses.setdefault("413", _error(413))
            if takes_token:
                responses.setdefault("401", _error(401))
                if scope is not None:
                    responses.setdefault("403", _error(403))
                responses.setdefault("503", _error(503))
                operation["x-scope"] = scope or "any"
                needs = f"an admin token with the `{scope}` scope" if scope else "an admin token of any scope"
                operation["description"] = f"{operation.get('description', '')}\n\nNeeds {needs}.".strip()
            responses.setdefault("500", _error(500))
            operation["responses"] = dict(sorted(responses.items()))
    readyz = document["paths"].get("/readyz", {}).get("get")
    if readyz is not None:  # the error shape, and what is down beside it
        down = {
            "description": "unavailable: not ready; `checks` names what failed",
            "content": {"application/json": {"schema": _NOT_READY}},
        }
        readyz["responses"] = dict(sorted({**readyz["responses"], "503": down}.items()))


def allowed_methods(path: str) -> list[str]:
    """The methods some route serves `path` with (a 405's Allow header)."""
    return sorted(
        {method for route in served_routes() if route.path_regex.match(path) for method in route.methods or ()}
    )


def create_app(settings: Settings) -> FastAPI:
    """The API for the data dir and broker `settings` name (the store is opened on first use, per process)."""
    app = AdminApi(
        title="provbridge admin API",
        version="1",
        description="Keys, codes, devices, the allowlist, events and the backend endpoints of a provbridge. "
        "Authenticate with `Authorization: Bearer pba_...` (`provbridge admin-token create`). "
        'Errors: `{"error": {"code", "message"}}`. The dashboard\'s routes (/ui/...) are in docs/API.md.',
        # Served by `meta`, behind an admin token: only health is anonymous. No OAuth2 redirect page: no OAuth2.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.context = ApiContext(settings)
    for router in ROUTERS:
        app.include_router(router)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code)

    @app.exception_handler(BodyTooLarge)
    async def too_large(_request: Request, exc: BodyTooLarge) -> JSONResponse:
        return error_response(413, str(exc))  # BodyLimit stopped a body without Content-Length as a route read it

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

    @app.exception_handler(BrokersNotTold)
    async def brokers_not_told(_request: Request, exc: BrokersNotTold) -> JSONResponse:
        # The change is made; what to do about the brokers is the caller's to know (the same request again).
        log.warning("%s", exc)
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
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = exc.headers
        if exc.status_code == 405:  # Starlette's Allow names the methods of the first route of the path only
            headers = {"Allow": ", ".join(allowed_methods(request.scope["path"]))}
        return error_response(exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        log.error("admin API request failed", exc_info=exc)
        return error_response(500, "internal error (logged)")

    app.add_middleware(BodyLimit)
    app.add_middleware(SecurityHeaders, tls=settings.api.tls)  # outermost: BodyLimit's 413s carry them too
    return app
