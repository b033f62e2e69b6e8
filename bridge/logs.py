"""Log lines: text or JSON, each tagged with the claim or token refresh it belongs to.

`Provisioner.handle` and `Refresher.handle` bind the message's `request_id` (`bind_request_id`) as soon
as it is read; `RequestIdFilter` copies the binding onto every record logged in that context, so one
search for a request id finds every line of that request's life, whichever module wrote it.

The binding is a `ContextVar`: each thread (and each asyncio task) has its own, so concurrent workers
never tag each other's lines. It deliberately outlives the handler's return, because the MQTT edge
logs a request's outcome and any publish failure after the handler returned, on the same worker; the
next request in that context re-binds first. Work that shares a context with requests and must not
be tagged runs inside `request_scope()`.

Only validated request ids are bound (the pattern `[A-Za-z0-9._:-]{8,64}`): device-supplied text never
reaches a log line through here, and no secret ever does.
"""

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal, TextIO

from provwire.models import rfc3339

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"

_request_id: ContextVar[str | None] = ContextVar("provbridge_request_id", default=None)


def bind_request_id(request_id: str | None) -> None:
    """Tag this context's log lines with `request_id` (None: with none) until the next binding."""
    _request_id.set(request_id)


def current_request_id() -> str | None:
    return _request_id.get()


@contextmanager
def request_scope() -> Iterator[None]:
    """A unit of work whose binding ends with it: the previous one (usually none) is restored on exit."""
    token = _request_id.set(None)
    try:
        yield
    finally:
        _request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (None outside a request) to each record; put it on the handler, not a logger,
    so records from every logger, the broker's included, pass through it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):  # an explicit `extra={"request_id": ...}` wins
            record.request_id = _request_id.get()
        return True


class TextFormatter(logging.Formatter):
    """The classic one-line text format, with ` [request_id]` after the logger name inside a request."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.request_tag = f" [{request_id}]" if request_id else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and request_id inside a request.

    ASCII-only output (`ensure_ascii`): a newline, a lone surrogate or a terminal escape in a message
    cannot break the line, the stream's encoding or the terminal.
    """

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            line["request_id"] = request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=True)


def make_handler(log_format: LogFormat, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing `log_format` lines to `stream` (stdout), with the request id filter on it."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    return handler


def configure(level: str, log_format: LogFormat, stream: TextIO | None = None) -> None:
    """Configure the root logger once per process; later calls (and an embedding application's own
    configuration, made first) are left alone, as with `logging.basicConfig`."""
    logging.basicConfig(level=level, handlers=[make_handler(log_format, stream)])
