"""What every route of the admin API shares: the store, the caller's admin token and its scope, tenant checks.

A caller proves who they are with `Authorization: Bearer pba_...`, or, from the dashboard, with its session
cookie (bridge/api/sessions.py) and, for a change, the session's CSRF token.
"""

import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Depends, Request, Security
from fastapi.dependencies.models import Dependant
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from bridge.api.live import LiveEvents
from bridge.api.sessions import CSRF_HEADER, Sessions, cookie_name, csrf_matches
from bridge.config import Settings
from bridge.errors import ApiError
from bridge.ops import admin
from bridge.ops import admin_tokens as tokens
from bridge.storage.keyfiles import KeyRing
from bridge.storage.records import AdminToken
from bridge.storage.rotation import LiveKeyRing
from bridge.storage.store import Store

ErrorCode = Literal[
    "invalid_request",
    "unauthorized",
    "forbidden",
    "csrf_failed",
    "not_found",
    "method_not_allowed",
    "conflict",
    "payload_too_large",
    "unsupported_media_type",
    "too_many_streams",
    "internal_error",
    "unavailable",
]


class ErrorDetail(BaseModel):
    code: ErrorCode = Field(description="stable: a client may branch on it (bridge/api/app.py, docs/API.md)")
    message: str = Field(description="for people: what was wrong, and for a CSV import every bad line")


class ErrorAnswer(BaseModel):
    """Every error the admin API answers, whatever the route (docs/API.md lists the codes)."""

    error: ErrorDetail


ERRORS: dict[int, str] = {
    400: "invalid_request: malformed JSON, a wrong, missing or unknown field or parameter, a refused value",
    401: "unauthorized: no admin token, or not a live one (wrong, unknown, revoked)",
    403: "forbidden: the token lacks the route's scope; csrf_failed: a dashboard change without X-CSRF-Token",
    404: "not_found: no such tenant, key, device or entry, or not in the token's tenant",
    409: "conflict: it exists already, or the operation does not apply in its state",
    413: "payload_too_large: a body over the route's limit",
    415: "unsupported_media_type: the body is not of the type the route takes",
    429: "too_many_streams: the admin token holds the most live-event streams it may",
    500: "internal_error: a fault of the bridge (logged); nothing is half done",
    503: "unavailable: storage busy or unavailable, or Mosquitto did not confirm: retry",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` of a route for the errors it answers beyond those every route with a token has (401,
    403, 500, 503, and 400 / 413 where it takes parameters / a body: bridge/api/app.py adds those)."""
    return {status: {"model": ErrorAnswer, "description": ERRORS[status]} for status in statuses}


class ApiContext:
    """The settings and, opened on first use in this process, the store and the live key ring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: Store | None = None
        self._keys: LiveKeyRing | None = None
        self._lock = threading.Lock()
        self.sessions = Sessions()
        self.live = LiveEvents(settings, lambda: self.store)

    @property
    def keys(self) -> KeyRing:
        """The data dir's keys as they are now (a rotation applies from the next request)."""
        with self._lock:
            if self._keys is None:
                self._keys = LiveKeyRing(self.settings.data_dir)
        return self._keys.current()

    @property
    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                self._store = admin.open_store(self.settings)
            return self._store


@dataclass(frozen=True)
class Caller:
    """Who is asking: their admin token, and the store to ask."""

    token: AdminToken
    context: ApiContext

    @property
    def store(self) -> Store:
        return self.context.store

    @property
    def settings(self) -> Settings:
        return self.context.settings

    @property
    def keys(self) -> KeyRing:
        return self.context.keys

    @property
    def actor(self) -> str:
        return tokens.actor_of(self.token)

    def tenant(self, asked: str | None) -> str | None:
        """The tenant a request is about: the token's own when it has one (another is not found), else `asked`."""
        own = self.token.tenant_name
        if own is None:
            return asked
        if asked is not None and asked not in (own, self.token.tenant_id):
            raise ApiError(404, f"no tenant {asked!r}")
        return own

    def tenant_or_default(self, asked: str | None) -> str:
        """The one tenant a request acts on: the token's own when it has one, so that its caller need not name
        it (naming another is not found); else `asked`, or "default" as the CLI's --tenant."""
        return self.tenant(asked) or asked or admin.DEFAULT_TENANT

    def owns(self, tenant_id: str, what: str) -> None:
        """404, as for something that does not exist, when `tenant_id` is not the token's tenant: a token of one
        tenant learns nothing about another's devices and keys."""
        if self.token.tenant_id is not None and self.token.tenant_id != tenant_id:
            raise ApiError(404, f"no {what}")


def context_of(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.context
    return context


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Declared so that the OpenAPI document has the scheme and each route that takes a token says so; it raises
# nothing itself (auto_error off): `Require` answers a missing or wrong token in the API's own error shape.
BEARER = HTTPBearer(
    scheme_name="bearer",
    bearerFormat="pba_...",
    description="An admin token (`provbridge admin-token create`); its scopes decide which routes it may call.",
    auto_error=False,
)


class Require:
    """A dependency: the caller, whose bearer token (or dashboard session) is live and has `scope` (401 or 403
    otherwise); `scope` None takes a live token of any scope. A class, not a closure, so that the OpenAPI
    document and docs/API.md's test can read the scope a route needs (`scope_of_route`)."""

    def __init__(self, scope: str | None) -> None:
        self.scope = scope

    def __call__(
        self,
        request: Request,
        context: ApiContext = Depends(context_of),  # noqa: B008
        bearer: HTTPAuthorizationCredentials | None = Security(BEARER),  # noqa: B008
    ) -> Caller:
        if "authorization" not in request.headers and cookie_name(context.settings.api.tls) in request.cookies:
            token = session_token(request, context)
        else:
            if bearer is None:  # no header, or not "Bearer <token>"
                raise ApiError(401, "an admin token is required: Authorization: Bearer pba_...")
            found = tokens.authenticate(context.store, bearer.credentials.strip())
            if found is None:
                raise ApiError(401, "not a valid admin token (wrong, unknown or revoked)")
            token = found
        if self.scope is not None and not tokens.permits(token, self.scope):
            raise ApiError(403, f"this admin token lacks the {self.scope!r} scope")
        return Caller(token, context)


def require(scope: str | None) -> Require:
    return Require(scope)


def scope_of_route(dependencies: list[Dependant]) -> tuple[bool, str | None]:
    """Whether a route (its `dependant.dependencies`) takes an admin token, and the scope it needs (None: any)."""
    for dependency in dependencies:
        if isinstance(dependency.call, Require):
            return True, dependency.call.scope
        found = scope_of_route(dependency.dependencies)
        if found[0]:
            return found
    return False, None


def session_token(request: Request, context: ApiContext) -> AdminToken:
    """The live admin token behind the request's session cookie; a change must also carry the CSRF token."""
    cookie = request.cookies.get(cookie_name(context.settings.api.tls), "")
    session = context.sessions.find(cookie, time.time())
    if session is None:
        raise ApiError(401, "the dashboard session has ended: log in again")
    if request.method not in SAFE_METHODS and not csrf_matches(session, request.headers.get(CSRF_HEADER)):
        raise ApiError(403, "a change from the dashboard needs its X-CSRF-Token header", "csrf_failed")
    token = context.store.admin_token_by_id(session.token_id)
    if token is None or token.revoked_at is not None:
        context.sessions.end(cookie)
        raise ApiError(401, "the admin token of this session was revoked: log in again")
    return token
