"""The operator's dashboard: three static files (bridge/api/static: no build step) that drive the admin API from the
browser, its session endpoints (bridge/api/sessions.py) and the live event stream (bridge/api/live.py).

    GET    /ui/                 the page (and /ui/static/app.js, /ui/static/app.css)
    POST   /ui/session          {"token": "pba_..."}: log in; a session cookie and {"csrf", "token"}
    GET    /ui/session          the session's {"csrf", "token"}, or 401
    DELETE /ui/session          log out (X-CSRF-Token)
    GET    /ui/events/stream    Server-Sent Events: `ready` (subscribed), `event` (an ops event), `presence`
                                ({device_id, online, time}), `lagged` (some were lost: re-read the lists), `ended`
                                (the admin token was revoked or the session ended: the stream closes)

Every /ui response carries a CSP that allows only the page's own script and style, no framing, no inline code.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from bridge.api.context import ApiContext, Caller, context_of, require, session_token
from bridge.api.live import Stream
from bridge.api.sessions import CSRF_HEADER, MAX_SECONDS, Session, cookie_name, csrf_matches
from bridge.errors import ApiError, ConfigError, TooManyStreams
from bridge.ops import admin_tokens as tokens
from bridge.storage.records import AdminToken

STATIC = Path(__file__).parent / "static"
_FILES = {"app.js": "text/javascript", "app.css": "text/css"}
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:;"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
KEEPALIVE_SECONDS = 15.0  # a comment line, so proxies and the browser keep an idle stream open
RECHECK_SECONDS = 5.0  # an open stream ends this soon after its admin token is revoked or its session ends
WAIT_SECONDS = 0.25  # how long a stream waits for an item before looking at the rest again

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
    name = cookie_name(context.settings.api.tls)
    previous = request.cookies.get(name)
    if previous is not None:  # a new login never keeps a session the browser held before (fixation)
        context.sessions.end(previous)
    token = tokens.authenticate(context.store, body.token.strip())
    if token is None:
        raise ApiError(401, "not a valid admin token (wrong, unknown or revoked)")
    if not tokens.permits(token, "read"):
        raise ApiError(403, "the dashboard needs an admin token with the 'read' or 'write' scope")
    opened = context.sessions.open(token.id, time.time())
    response.set_cookie(
        name,
        opened.cookie,
        max_age=MAX_SECONDS,  # the server decides when it ends, sooner when idle
        path="/",
        secure=context.settings.api.tls,
        httponly=True,
        samesite="strict",
    )
    return session_view(opened.session, token)


@router.get("/session")
def current_session(request: Request) -> dict[str, Any]:
    context = context_of(request)
    cookie = request.cookies.get(cookie_name(context.settings.api.tls))
    if cookie is None:
        raise ApiError(401, "not logged in")
    token = session_token(request, context)
    session = context.sessions.find(cookie, time.time())
    if session is None:
        raise ApiError(401, "not logged in")
    return session_view(session, token)


@router.delete("/session", status_code=204)
def log_out(request: Request, response: Response) -> None:
    context = context_of(request)
    name = cookie_name(context.settings.api.tls)
    cookie = request.cookies.get(name)
    if cookie is not None:
        session = context.sessions.find(cookie, time.time())
        if session is not None and not csrf_matches(session, request.headers.get(CSRF_HEADER)):
            raise ApiError(403, "logging out from the dashboard needs its X-CSRF-Token header", "csrf_failed")
        context.sessions.end(cookie)
    response.delete_cookie(name, path="/", secure=context.settings.api.tls, httponly=True, samesite="strict")


@router.get("/events/stream")
async def event_stream(caller: Reader, request: Request) -> StreamingResponse:
    context = context_of(request)
    cookie = None if "authorization" in request.headers else request.cookies.get(cookie_name(context.settings.api.tls))
    try:
        stream = await run_in_threadpool(context.live.open, asyncio.get_running_loop(), caller.token.id)
    except TooManyStreams as exc:
        raise ApiError(429, str(exc), "too_many_streams") from exc
    except (OSError, ConfigError) as exc:
        raise ApiError(503, f"live events are unavailable: {exc}") from exc
    return StreamingResponse(
        _sse(caller, context, stream, cookie), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"}
    )


async def _sse(caller: Caller, context: ApiContext, stream: Stream, cookie: str | None) -> AsyncIterator[bytes]:
    """The stream's bytes until the client goes (Starlette then cancels this) or its right to them ends."""
    said_ready = 0  # the `LiveEvents.subscriptions` last announced as `ready`
    last_sent = last_check = time.monotonic()
    try:
        yield b": provbridge live events\n\n"
        while True:
            now = time.monotonic()
            if now - last_check >= RECHECK_SECONDS:
                last_check = now
                if not await run_in_threadpool(_still_allowed, caller, context, cookie):
                    yield b"event: ended\ndata: {}\n\n"
                    return
            if stream.lagged:
                stream.lagged = False
                yield b"event: lagged\ndata: {}\n\n"
            if context.live.subscriptions != said_ready:
                said_ready = context.live.subscriptions
                yield b"event: ready\ndata: {}\n\n"
            try:
                item = await asyncio.wait_for(stream.items.get(), WAIT_SECONDS)
            except TimeoutError:
                if time.monotonic() - last_sent >= KEEPALIVE_SECONDS:
                    last_sent = time.monotonic()
                    yield b": keepalive\n\n"
                continue
            if caller.token.tenant_name in (None, item.tenant):  # a tenant's token: its events and devices only
                last_sent = time.monotonic()
                yield f"event: {item.kind}\ndata: {json.dumps(item.data, separators=(',', ':'))}\n\n".encode()
    finally:
        context.live.close(stream)


def _still_allowed(caller: Caller, context: ApiContext, cookie: str | None) -> bool:
    """Whether the stream's admin token is still live, and its dashboard session too (not touched: an open
    stream is not the user's activity, so an idle session still ends)."""
    token = context.store.admin_token_by_id(caller.token.id)
    if token is None or token.revoked_at is not None:
        return False
    return cookie is None or context.sessions.find(cookie, time.time(), touch=False) is not None
