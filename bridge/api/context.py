"""What every route of the admin API shares: the store, the caller's admin token and its scope, tenant checks.

A caller proves who they are with `Authorization: Bearer pba_...`, or, from the dashboard, with its session
cookie (bridge/api/sessions.py) and, for a change, the session's CSRF token.
"""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Depends, Request

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

    def owns(self, tenant_id: str, what: str) -> None:
        """404, as for something that does not exist, when `tenant_id` is not the token's tenant: a token of one
        tenant learns nothing about another's devices and keys."""
        if self.token.tenant_id is not None and self.token.tenant_id != tenant_id:
            raise ApiError(404, f"no {what}")


def context_of(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.context
    return context


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def require(scope: str) -> Callable[..., Caller]:
    """A dependency: the caller, whose bearer token (or dashboard session) is live and has `scope` (401 or 403
    otherwise)."""

    def caller(request: Request, context: ApiContext = Depends(context_of)) -> Caller:  # noqa: B008
        header = request.headers.get("authorization")
        if header is None and cookie_name(context.settings.api.tls) in request.cookies:
            token = session_token(request, context)
        else:
            kind, _, presented = (header or "").partition(" ")
            if kind.lower() != "bearer" or not presented:
                raise ApiError(401, "an admin token is required: Authorization: Bearer pba_...")
            bearer = tokens.authenticate(context.store, presented.strip())
            if bearer is None:
                raise ApiError(401, "not a valid admin token (wrong, unknown or revoked)")
            token = bearer
        if not tokens.permits(token, scope):
            raise ApiError(403, f"this admin token lacks the {scope!r} scope")
        return Caller(token, context)

    return caller


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
