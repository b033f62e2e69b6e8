"""The operator's dashboard: three static files (bridge/api/static: no build step) that drive the admin API from the
browser, its session endpoints (bridge/api/sessions.py) and the live event stream (bridge/api/live.py).

    GET    /ui/                 the page (and /ui/static/app.js, /ui/static/app.css)
    POST   /ui/session          {"token": "pba_..."}: log in; a session cookie and {"csrf", "token"}
    GET    /ui/session          the session's {"csrf", "token"}, or 401
    DELETE /ui/session          log out (X-CSRF-Token)
    GET    /ui/events/stream    Server-Sent Events: `ready` (subscribed), `event` (an ops event), `presence`
                                ({device_id, online, time}), `lagged` (some were dropped: re-read the lists)

Every /ui response carries a CSP that allows only the page's own script and style, no framing, no inline code.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from bridge.api.context import ApiContext, Caller, context_of, require, session_token
from bridge.api.live import LiveItem, Stream
from bridge.api.sessions import COOKIE, CSRF_HEADER, IDLE_SECONDS, Session, csrf_matches
from bridge.errors import ApiError, NotFound
from bridge.ops import admin_tokens as tokens
from bridge.storage.records import AdminToken

STATIC = Path(__file__).parent / "static"
_FILES = {"app.js": "text/javascript", "app.css": "text/css"}
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:;"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
KEEPALIVE_SECONDS = 15.0  # a comment line, so proxies and the browser keep an idle stream open

router = APIRouter(prefix="/ui", include_in_schema=False)
Reader = Annotated[Caller, Depends(require("read"))]


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    token: str = Field(min_length=1, max_length=256)


def session_view(session: Session, token: AdminToken) -> dict[str, Any]:
    return {
        "csrf": session.csrf,
        "token": {"id": token.id, "name": token.name, "scopes": sorted(token.scopes), "tenant": token.tenant_name},
    }


@router.get("")
def to_page() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=308)


@router.get("/")
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/static/{name}")
def static_file(name: str) -> FileResponse:
    if name not in _FILES:  # a fixed list: no path from the request reaches the file system
        raise ApiError(404, "no such file")
    return FileResponse(STATIC / name, media_type=_FILES[name])


@router.post("/session")
def log_in(body: Login, request: Request, response: Response) -> dict[str, Any]:
    context = context_of(request)
    token = tokens.authenticate(context.store, body.token.strip())
    if token is None:
        raise ApiError(401, "not a valid admin token (wrong, unknown or revoked)")
    if not tokens.permits(token, "read"):
        raise ApiError(403, "the dashboard needs an admin token with the 'read' or 'write' scope")
    opened = context.sessions.open(token.id, time.time())
    response.set_cookie(
        COOKIE,
        opened.cookie,
        max_age=IDLE_SECONDS * 48,  # the server decides when it ends; the browser need not forget it first
        path="/",
        secure=context.settings.api.tls,
        httponly=True,
        samesite="strict",
    )
    return session_view(opened.session, token)


@router.get("/session")
def current_session(request: Request) -> dict[str, Any]:
    context = context_of(request)
    token = session_token(request, context) if COOKIE in request.cookies else None
    if token is None:
        raise ApiError(401, "not logged in")
    session = context.sessions.find(request.cookies[COOKIE], time.time())
    if session is None:
        raise ApiError(401, "not logged in")
    return session_view(session, token)


@router.delete("/session", status_code=204)
def log_out(request: Request, response: Response) -> None:
    context = context_of(request)
    cookie = request.cookies.get(COOKIE)
    if cookie is not None:
        session = context.sessions.find(cookie, time.time())
        if session is not None and not csrf_matches(session, request.headers.get(CSRF_HEADER)):
            raise ApiError(403, "logging out from the dashboard needs its X-CSRF-Token header", "csrf_failed")
        context.sessions.end(cookie)
    response.delete_cookie(COOKIE, path="/", secure=context.settings.api.tls, httponly=True, samesite="strict")


@router.get("/events/stream")
async def event_stream(caller: Reader, request: Request) -> StreamingResponse:
    context = context_of(request)
    stream = context.live.open()
    return StreamingResponse(
        _sse(caller, context, stream, request),
        media_type="text/event-stream",
        headers={"X-Accel-Buffering": "no"},
    )


async def _sse(caller: Caller, context: ApiContext, stream: Stream, request: Request) -> AsyncIterator[bytes]:
    ready = False  # `ready` is said once the broker granted the subscription: nothing after it is missed
    try:
        yield b": provbridge live events\n\n"
        while not await request.is_disconnected():
            if not ready and context.live.subscribed.is_set():
                ready = True
                yield b"event: ready\ndata: {}\n\n"
            try:
                item = await asyncio.wait_for(stream.items.get(), KEEPALIVE_SECONDS if ready else 0.05)
            except TimeoutError:
                if ready:
                    yield b": keepalive\n\n"
                continue
            if stream.lagged:
                stream.lagged = False
                yield b"event: lagged\ndata: {}\n\n"
            if _visible(caller, context, item):
                yield f"event: {item.kind}\ndata: {json.dumps(item.data, separators=(',', ':'))}\n\n".encode()
    finally:
        context.live.close(stream)


def _visible(caller: Caller, context: ApiContext, item: LiveItem) -> bool:
    """A token of one tenant sees that tenant's events and its devices' presence only."""
    own = caller.token.tenant_name
    if own is None:
        return True
    if item.kind == "event":
        return item.tenant == own
    try:
        return context.store.device(str(item.data["device_id"])).tenant_name == own
    except NotFound:
        return False
