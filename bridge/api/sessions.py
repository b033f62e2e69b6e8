"""Dashboard sessions: what a browser holds in place of the admin token.

Logging in (`POST /ui/session`, the token in the JSON body) trades a live admin token for a session: a random id
in an HttpOnly, SameSite=Strict cookie (Secure under TLS), kept in this process's memory only as its SHA-256,
beside the admin token's id and a CSRF token. The page keeps the CSRF token in a variable and sends it as
`X-CSRF-Token` with every change. So:

* the admin token travels once, in a POST body: never in a URL, a cookie or the browser's storage, and the
  server logs no bodies (uvicorn's access log is off);
* another site cannot act through the browser: SameSite=Strict withholds the cookie from its requests, and it
  cannot read the CSRF token (no CORS);
* a script on the page cannot read the cookie (HttpOnly), and the page's CSP allows no script but its own;
* every request reads the admin token again by id: revoking it ends its sessions at once.

A session ends after IDLE_SECONDS without a request, MAX_SECONDS after login, at logout, and when the API process
restarts (log in again).
"""

import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass

COOKIE = "provbridge_session"
# Under TLS: a name the browser accepts only from this origin over HTTPS, with Path=/ and no Domain, so that a
# sibling (sub)domain cannot plant or overwrite it.
SECURE_COOKIE = "__Host-" + COOKIE
CSRF_HEADER = "x-csrf-token"
IDLE_SECONDS = 30 * 60
MAX_SECONDS = 12 * 3600
MAX_SESSIONS = 10_000  # in all; the least recently used go first
MAX_SESSIONS_PER_TOKEN = 50  # so that one token cannot push everyone else's sessions out


@dataclass
class Session:
    token_id: str
    csrf: str
    started: float
    last_used: float


@dataclass(frozen=True)
class Opened:
    cookie: str  # the session id: the cookie's value, shown to the browser only
    session: Session


class Sessions:
    """The live sessions of this process. Thread-safe: routes run on a thread pool."""

    def __init__(self) -> None:
        self._by_digest: dict[bytes, Session] = {}
        self._lock = threading.Lock()

    def open(self, token_id: str, now: float) -> Opened:
        cookie = secrets.token_urlsafe(32)
        session = Session(token_id, secrets.token_urlsafe(32), now, now)
        with self._lock:
            own = [digest for digest, held in self._by_digest.items() if held.token_id == token_id]
            if len(own) >= MAX_SESSIONS_PER_TOKEN:
                self._drop_least_recently_used(own)
            elif len(self._by_digest) >= MAX_SESSIONS:
                self._drop_least_recently_used(list(self._by_digest))
            self._by_digest[_digest(cookie)] = session
        return Opened(cookie, session)

    def find(self, cookie: str, now: float, touch: bool = True) -> Session | None:
        """The live session of this cookie, or None. `touch`: a request of the user's (its idle time starts
        again), not a check of an open stream's."""
        digest = _digest(cookie)
        with self._lock:
            session = self._by_digest.get(digest)
            if session is None:
                return None
            if now - session.last_used > IDLE_SECONDS or now - session.started > MAX_SECONDS:
                del self._by_digest[digest]
                return None
            if touch:
                session.last_used = now
            return session

    def held_by(self, token_id: str) -> int:
        """How many live sessions an admin token has."""
        with self._lock:
            return sum(1 for held in self._by_digest.values() if held.token_id == token_id)

    def _drop_least_recently_used(self, digests: list[bytes]) -> None:
        del self._by_digest[min(digests, key=lambda digest: self._by_digest[digest].last_used)]

    def end(self, cookie: str) -> None:
        with self._lock:
            self._by_digest.pop(_digest(cookie), None)


def cookie_name(tls: bool) -> str:
    return SECURE_COOKIE if tls else COOKIE


def csrf_matches(session: Session, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(session.csrf.encode(), presented.encode())


def _digest(cookie: str) -> bytes:
    return hashlib.sha256(cookie.encode()).digest()
