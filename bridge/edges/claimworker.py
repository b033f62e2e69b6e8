"""The claim-worker process of the embedded broker, and the frames it exchanges with the broker's process.

`python -m bridge.edges.claimworker FD PARENT_PID`: FD is one end of a socket pair whose other end the
broker's event loop holds (`bridge.edges.inprocess`), PARENT_PID the pid of that process. The worker ties
its life to its parent's (`bridge.edges.lifeline`), reads the settings, builds the claim handlers (SQLite,
keys), says it is ready, then answers messages in order until the socket closes. The messages that
arrived together (at most MAX_BATCH) are handled in one database transaction, a group commit
(`ClaimHandlers.handle_batch`): under load the fixed cost of a transaction is shared, and a lone claim
is answered as soon as before.

Why a process: the handlers are blocking (SQLite, crypto) and amqtt is CPU-bound Python. On threads
they would share one GIL with the broker, and every release of it (each SQLite call, each syscall)
hands it over with a context switch: measured, that doubled the CPU a claim costs. In a process of
its own the claims run on the other core, and the broker's loop only moves bytes.

Frames are a 4-byte big-endian length, then a kind byte and its body:

    broker -> worker   S  the settings (pickled), first
                       Q  a message: seq (u64), topic length (u16), topic, payload
                       P  a claim prepared by the edge (`ClaimPreparer`, the external broker's edge): seq
                          (u64), topic length (u16), topic, the `Prepared` pickled
                       E  events to store, made by the edge (a refusal by the client-id limit): a JSON array
    worker -> broker   R  ready, once
                       A  its answer: seq (u64), count (u16), per publish: topic length (u16), topic,
                          payload length (u32), payload; then, when the message has one, its line
                          (`ClaimHandlers.report`): summary length (u16), summary, request_id length
                          (u16, 0 for none), request_id
                       L  a log record (JSON), re-emitted by the broker's process: one log output

The line every message gets (`claim on TOPIC: SUMMARY`) travels with its answer and is written by the
broker's process (`WorkerLink.answered`), not logged here: a log record made, encoded, sent and made again
cost a claim more than its key lookup, and the broker's process knows the topic already.
"""

import contextlib
import json
import logging
import pickle
import signal
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import Any

from bridge import logs
from bridge.claims.decision import ClaimRequest, Fresh
from bridge.claims.provisioning import Outcome, Prepared
from bridge.config import Settings
from bridge.edges import lifeline
from bridge.edges.core import BridgeCore, Publish, claim_handlers, retry_later
from bridge.storage.store import Store
from provwire.errors import ErrorCode
from provwire.models import Claim, Event, to_json

log = logging.getLogger("provbridge.service")

SETTINGS, REQUEST, PREPARED, EVENTS, READY, ANSWER, LOG = b"S", b"Q", b"P", b"E", b"R", b"A", b"L"
_LENGTH = struct.Struct(">I")
_REQUEST = struct.Struct(">QH")
_ANSWER = struct.Struct(">QH")
_PUBLISH = struct.Struct(">HI")
_TEXT_SIZE = struct.Struct(">H")
# A message's line (`ClaimHandlers.report`): its summary and the request_id it is tagged with.
Line = tuple[str, str | None]
_TEXT = "surrogatepass"  # a topic is whatever string amqtt decoded: carry it through unchanged
# Messages per group commit: the write lock is held for the batch (a few ms at most), which other bridge
# processes and the admin CLI wait for.
MAX_BATCH = 16
_READ_BYTES = 1 << 16


# --- frames ---------------------------------------------------------------------------------


def frame(kind: bytes, body: bytes = b"") -> bytes:
    return _LENGTH.pack(len(body) + 1) + kind + body


def encode_request(seq: int, topic: str, payload: bytes) -> bytes:
    raw = topic.encode("utf-8", _TEXT)
    return frame(REQUEST, _REQUEST.pack(seq, len(raw)) + raw + payload)


def decode_request(body: bytes) -> tuple[int, str, bytes]:
    seq, size = _REQUEST.unpack_from(body)
    start = _REQUEST.size
    return seq, body[start : start + size].decode("utf-8", _TEXT), body[start + size :]


def encode_prepared(seq: int, topic: str, prepared: Prepared) -> bytes:
    raw = topic.encode("utf-8", _TEXT)
    # Flat: pickling the dataclasses themselves cost twice as much as the claim in them (bench/worker_cpu.py).
    request, fresh = prepared.request, prepared.fresh
    fields = (
        *(prepared.reply_to, request.client_id, request.claim, request.digest, request.key_hash),
        *(request.cloud_kid, request.now, prepared.shared, fresh.device_id, fresh.api_key),
    )
    return frame(PREPARED, _REQUEST.pack(seq, len(raw)) + raw + pickle.dumps(fields, pickle.HIGHEST_PROTOCOL))


def decode_prepared(body: bytes) -> tuple[int, str, Prepared]:
    seq, topic, data = decode_request(body)
    # Pickled, as the settings are: from our parent, over a private socket pair (see `serve_claims`).
    reply_to, client_id, claim, digest, key_hash, cloud_kid, now, shared, device_id, api_key = pickle.loads(data)
    if not isinstance(claim, Claim):
        raise TypeError(f"a prepared claim frame held a {type(claim).__name__}")
    request = ClaimRequest(client_id, claim, digest, key_hash, cloud_kid, now)
    return seq, topic, Prepared(reply_to, request, shared, Fresh(device_id, api_key))


def encode_events(events: list[Event]) -> bytes:
    return frame(EVENTS, b"[" + b",".join(to_json(e) for e in events) + b"]")


def decode_events(body: bytes) -> list[Event]:
    return [Event.model_validate(e) for e in json.loads(body)]


def encode_answer(seq: int, publishes: list[Publish], line: Line | None = None) -> bytes:
    parts = [_ANSWER.pack(seq, len(publishes))]
    for publish in publishes:
        raw = publish.topic.encode("utf-8", _TEXT)
        parts += [_PUBLISH.pack(len(raw), len(publish.payload)), raw, publish.payload]
    if line is not None:
        summary, request_id = line[0].encode("utf-8", _TEXT), (line[1] or "").encode("utf-8", _TEXT)
        parts += [_TEXT_SIZE.pack(len(summary)), summary, _TEXT_SIZE.pack(len(request_id)), request_id]
    return frame(ANSWER, b"".join(parts))


def decode_answer(body: bytes) -> tuple[int, list[Publish], Line | None]:
    seq, count = _ANSWER.unpack_from(body)
    offset = _ANSWER.size
    publishes = []
    for _ in range(count):
        topic_size, payload_size = _PUBLISH.unpack_from(body, offset)
        offset += _PUBLISH.size
        topic = body[offset : offset + topic_size].decode("utf-8", _TEXT)
        offset += topic_size
        publishes.append(Publish(topic, body[offset : offset + payload_size]))
        offset += payload_size
    if offset == len(body):
        return seq, publishes, None
    texts = []
    for _ in range(2):  # the summary, the request_id
        (size,) = _TEXT_SIZE.unpack_from(body, offset)
        offset += _TEXT_SIZE.size
        texts.append(body[offset : offset + size].decode("utf-8", _TEXT))
        offset += size
    return seq, publishes, (texts[0], texts[1] or None)


def split_frames(buffer: bytearray) -> Iterator[tuple[bytes, bytes]]:
    """Take every complete frame off the front of `buffer`, as (kind, body); an incomplete one stays."""
    while len(buffer) >= _LENGTH.size:
        (size,) = _LENGTH.unpack_from(buffer)
        end = _LENGTH.size + size
        if len(buffer) < end:
            return
        kind, body = bytes(buffer[_LENGTH.size : _LENGTH.size + 1]), bytes(buffer[_LENGTH.size + 1 : end])
        del buffer[:end]
        yield kind, body


# --- log records, across the socket ---------------------------------------------------------


def encode_record(record: logging.LogRecord) -> bytes:
    message = record.getMessage()
    if record.exc_info:
        message += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
    fields = {
        "name": record.name,
        "levelno": record.levelno,
        "levelname": record.levelname,
        "msg": message,
        "created": record.created,
        "request_id": getattr(record, "request_id", None),
    }
    return frame(LOG, json.dumps(fields).encode())


def emit_record(body: bytes) -> None:
    """Log a worker's record in this process, as if it had been logged here (its request_id kept)."""
    fields: dict[str, Any] = json.loads(body)
    record = logging.makeLogRecord({**fields, "args": None, "msecs": (fields["created"] % 1) * 1000})
    logging.getLogger(record.name).handle(record)


class _Forward(logging.Handler):
    """Sends the worker's log records to the edge's process. Those of the main thread wait for its next
    answers and leave with them in one write (a claim logs a line: a write each cost as much as its
    ECDH); those of other threads (the purge) leave at once, as the main thread may be waiting."""

    def __init__(self, channel: socket.socket, send_lock: threading.Lock) -> None:
        super().__init__()
        self.channel = channel
        self.send_lock = send_lock
        self.held: list[bytes] = []
        self.addFilter(logs.RequestIdFilter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = encode_record(record)
            if threading.current_thread() is threading.main_thread():
                self.held.append(data)
                return
            with self.send_lock:
                self.channel.sendall(data)
        except Exception:
            self.handleError(record)

    def send_with(self, data: bytes) -> None:
        """Send the held records, then `data` (the answers they are about), in one write."""
        held, self.held = self.held, []
        with self.send_lock:
            self.channel.sendall(b"".join(held) + data)


# --- the worker -----------------------------------------------------------------------------


def _frames(channel: socket.socket) -> Iterator[list[tuple[bytes, bytes]]]:
    """The frames that arrive, as many as came together each time; ends when the other side closes."""
    buffer = bytearray()
    while data := channel.recv(_READ_BYTES):
        buffer += data
        frames = list(split_frames(buffer))
        if frames:
            yield frames


def serve_claims(channel: socket.socket) -> None:
    with channel:
        arrivals = _frames(channel)
        first = next(arrivals, [])  # the parent sends nothing else before we say we are ready
        if len(first) != 1 or first[0][0] != SETTINGS:
            return
        # Pickled, as multiprocessing passes arguments: it comes from our parent over a private socket
        # pair, and validating it again would re-read the environment and config file (pydantic-settings).
        settings: Settings = pickle.loads(first[0][1])
        send_lock = threading.Lock()  # the purge thread may log while the main loop answers
        forward = _Forward(channel, send_lock)
        logging.basicConfig(level=settings.log_level, handlers=[forward])
        store = Store(settings.database)
        stopping = threading.Event()
        try:
            handlers = claim_handlers(settings, store, one_thread=True)
            # id(outcome) -> the outcome (kept alive, so that no other takes its id) and its line, for the batch
            lines: dict[int, tuple[Outcome, Line]] = {}

            def report(_topic: str, outcome: Outcome) -> None:
                lines[id(outcome)] = (outcome, (outcome.summary, logs.current_request_id()))

            def line_of(outcome: Outcome) -> Line | None:
                reported = lines.get(id(outcome))
                return None if reported is None or reported[0] is not outcome else reported[1]

            handlers.report = report
            core = BridgeCore(settings)
            handlers.start_purge(stopping)
            forward.send_with(frame(READY))
            for frames in arrivals:
                requests: list[tuple[int, str, bytes | Prepared]] = []
                for kind, body in frames:
                    if kind == EVENTS:
                        handlers.record_events(decode_events(body))
                    elif kind == REQUEST:
                        requests.append(decode_request(body))
                    elif kind == PREPARED:
                        try:
                            requests.append(decode_prepared(body))
                        except Exception:  # cannot happen (our parent wrote it): one answer, not a restart loop
                            log.exception("a prepared claim could not be read; it is answered internal_error, retry")
                            seq, topic, _ = decode_request(body)
                            lost = retry_later(settings, topic, b"", ErrorCode.INTERNAL_ERROR, "internal error")
                            forward.send_with(encode_answer(seq, core.publishes(lost)))
                for start in range(0, len(requests), MAX_BATCH):
                    batch = requests[start : start + MAX_BATCH]
                    outcomes = handlers.handle_batch([(topic, message) for _, topic, message in batch])
                    answers = b"".join(
                        encode_answer(seq, core.publishes(outcome), line_of(outcome))
                        for (seq, _, _), outcome in zip(batch, outcomes, strict=True)
                    )
                    lines.clear()
                    forward.send_with(answers)
                if forward.held:  # logged without an answer to go with (storing edge events)
                    forward.send_with(b"")
        finally:
            stopping.set()
            store.close()
            with contextlib.suppress(OSError):
                forward.send_with(b"")  # what was logged on the way out


def main(argv: list[str]) -> int:
    # First: a worker busy in a long step would never read the end of its socket if the broker's
    # process were killed; the kernel kills it instead.
    lifeline.die_with_parent(int(argv[1]))
    # The broker's process decides when to stop (it closes the socket); Ctrl-C reaches it, not us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve_claims(socket.socket(fileno=int(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
