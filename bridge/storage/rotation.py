"""Key rotation without downtime, and a KeyRing that follows it in a running bridge.

    provbridge keys rotate --token   the next token-signing key becomes active: new tokens carry its kid.
                                     It has been in jwks.json since the rotation before (or `init`), so a
                                     verifier that caches the JWKS (EMQX) knows it before any token it
                                     signs; a new next key is published in its place. The old key stays
                                     in jwks.json, so tokens it signed keep verifying until they expire;
                                     once they all have, it is pruned.
    provbridge keys rotate --cloud   a new cloud key becomes active: claims that name no cloud key and
                                     new firmware (cloud_public.pem) use it. Older cloud keys are kept
                                     for good: every device's device key and refresh MAC depend on the
                                     cloud key it was provisioned with (`devices.cloud_key_id`).

The switch is one atomic rewrite of keys/active.json, which also records when each key retired:

    {"cloud": kid, "token": kid, "next_token": kid, "next_published_at": unix time,
     "retired": {"cloud": {kid: unix time}, "token": {kid: unix time}}}

A data dir made before the next key existed gets one at its first token rotation, whose new key is then active at
once (unannounced, as before).

A running bridge notices the rewrite on its next claim or refresh (`LiveKeyRing`); the embedded
broker re-reads jwks.json on change.
"""

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from bridge.config import TOKEN_TTL_CAP_SECONDS
from bridge.errors import NotInitialised, ProvbridgeError
from bridge.storage import keyfiles
from bridge.storage.filelock import locked
from bridge.storage.keyfiles import KeyRing
from provwire import crypto

log = logging.getLogger("provbridge.keys")

Kind = Literal["cloud", "token"]
KINDS: tuple[Kind, ...] = ("cloud", "token")
# A token signed by a retired key lives at most the TTL cap. The grace covers what may still be signed with
# it after the switch: claims in flight when active.json changed, and clocks a little apart.
RETIRED_TOKEN_GRACE_SECONDS = 300
LOCK_FILE = ".rotation.lock"  # also held by bridge/storage/sharedfiles.py while it writes keys


def _active_file(data_dir: Path) -> Path:
    return keyfiles.keys_dir(data_dir) / "active.json"


def read_active(data_dir: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(_active_file(data_dir).read_text())
    except FileNotFoundError as exc:
        raise NotInitialised(f"{data_dir} is not initialised: run `provbridge init`") from exc
    doc.setdefault("retired", {})
    for kind in KINDS:
        doc["retired"].setdefault(kind, {})
    return doc


def _write_active(data_dir: Path, doc: dict[str, Any]) -> None:
    keyfiles.write_public(_active_file(data_dir), json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n")


def prunable_at(retired_at: int) -> int:
    """When every token a token key retired at `retired_at` can have signed has expired."""
    return retired_at + TOKEN_TTL_CAP_SECONDS + RETIRED_TOKEN_GRACE_SECONDS


@dataclass(frozen=True)
class Rotation:
    kind: Kind
    old_kid: str
    new_kid: str
    pruned: tuple[str, ...]  # retired token keys removed because all their tokens have expired
    # Token keys: since when the new active key has been published (None: it was made now, unannounced), and
    # the next key published in its place.
    published_at: int | None = None
    next_kid: str | None = None


@dataclass(frozen=True)
class KeyInfo:
    kind: Kind
    kid: str
    status: Literal["active", "next", "retired"]  # next: a published token key, active at the next rotation
    retired_at: int | None
    prunable_at: int | None  # token keys only; cloud keys are never pruned


def rotate(data_dir: Path, kind: Kind, now: int) -> Rotation:
    """Make a fresh key of `kind` the active one; republish jwks.json and cloud_public.pem."""
    with locked(lock_file(data_dir)):
        return rotate_locked(data_dir, kind, now)


def rotate_locked(data_dir: Path, kind: Kind, now: int) -> Rotation:
    """`rotate`, for a caller that holds `lock_file` (bridge/storage/sharedfiles.py)."""
    if kind not in KINDS:
        raise ProvbridgeError(f"unknown key kind {kind!r}")
    doc = read_active(data_dir)
    ring = keyfiles.load_keys(data_dir)  # refuses a broken key directory before anything is written
    _remove_leftovers(data_dir)
    _adopt_strays(doc, ring, now)  # written with active.json below
    old_kid = str(doc[kind])
    published_at: int | None = None
    if kind == "token" and doc.get("next_token") in ring.token:
        new_kid, published_at = str(doc["next_token"]), int(doc["next_published_at"])
    else:
        new_kid = keyfiles.store_private_key(data_dir, kind, crypto.generate_private_key())
    next_kid = None
    if kind == "token":  # the one after it, published from now on
        next_kid = keyfiles.store_private_key(data_dir, "token", crypto.generate_private_key())
        doc["next_token"], doc["next_published_at"] = next_kid, now
    # The JWKS first: a broker must know the new token key before any token carries its kid.
    keyfiles.publish_public_keys(data_dir, keyfiles.load_keys(data_dir))
    doc[kind] = new_kid
    doc["retired"][kind][old_kid] = now
    _write_active(data_dir, doc)
    pruned = _prune(data_dir, doc, now)
    keyfiles.publish_public_keys(data_dir, keyfiles.load_keys(data_dir))
    log.debug("rotated the %s key: %s -> %s", kind, old_kid, new_kid)
    return Rotation(kind, old_kid, new_kid, pruned, published_at, next_kid)


def prune(data_dir: Path, now: int) -> tuple[str, ...]:
    """Remove the retired token keys whose tokens have all expired; returns their kids."""
    with locked(lock_file(data_dir)):
        return prune_locked(data_dir, now)


def prune_locked(data_dir: Path, now: int) -> tuple[str, ...]:
    """`prune`, for a caller that holds `lock_file`."""
    _remove_leftovers(data_dir)
    doc = read_active(data_dir)
    if _adopt_strays(doc, keyfiles.load_keys(data_dir), now):
        _write_active(data_dir, doc)
    pruned = _prune(data_dir, doc, now)
    if pruned:
        keyfiles.publish_public_keys(data_dir, keyfiles.load_keys(data_dir))
    return pruned


def lock_file(data_dir: Path) -> Path:
    """The key directory's lock: whoever writes key files (a rotation, a pull of the shared files) holds it."""
    return keyfiles.keys_dir(data_dir) / LOCK_FILE


def _remove_leftovers(data_dir: Path) -> None:
    """Delete the temporary files a run killed half-way left in the key directory (one may hold a private
    key). Called under the rotation lock: only rotation writes there after `init`."""
    for path in keyfiles.keys_dir(data_dir).iterdir():
        if path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted key rotation", path.name)


def _adopt_strays(doc: dict[str, Any], ring: KeyRing, now: int) -> list[str]:
    """Record as retired at `now` every key on disk that is neither active nor recorded: a rotation killed
    after writing its new key and before active.json named it. Nothing ever signed with such a token key,
    but unrecorded it would stay in jwks.json for good, never pruned. Returns their kids."""
    strays = []
    for kind, kids in (("cloud", ring.cloud), ("token", ring.token)):
        for kid in kids:
            if kid != doc[kind] and kid not in doc["retired"][kind] and kid != doc.get(f"next_{kind}"):
                doc["retired"][kind][kid] = now
                strays.append(kid)
                log.info("%s key %s was never made active (an interrupted rotation): recorded as retired", kind, kid)
    return strays


def _prune(data_dir: Path, doc: dict[str, Any], now: int) -> tuple[str, ...]:
    retired: dict[str, int] = doc["retired"]["token"]
    due = sorted(kid for kid, at in retired.items() if kid != doc["token"] and prunable_at(int(at)) <= now)
    for kid in due:
        # The private key goes first: a crash before active.json is rewritten leaves a record of a
        # missing file, which the next prune drops, never a live key nobody will prune.
        (keyfiles.keys_dir(data_dir) / f"token-{kid}.pem").unlink(missing_ok=True)
        del retired[kid]
    if due:
        _write_active(data_dir, doc)
        log.debug("pruned retired token keys %s: every token they signed has expired", ", ".join(due))
    return tuple(due)


def key_status(data_dir: Path) -> list[KeyInfo]:
    """Every key on disk, the active ones first."""
    ring, doc = keyfiles.load_keys(data_dir), read_active(data_dir)
    kids: dict[Kind, list[str]] = {"cloud": list(ring.cloud), "token": list(ring.token)}
    infos = []
    for kind in KINDS:
        for kid in kids[kind]:
            retired_at = doc["retired"][kind].get(kid)
            at = None if retired_at is None else int(retired_at)
            infos.append(
                KeyInfo(
                    kind=kind,
                    kid=kid,
                    status="active" if doc[kind] == kid else "next" if doc.get(f"next_{kind}") == kid else "retired",
                    retired_at=at,
                    prunable_at=prunable_at(at) if kind == "token" and at is not None else None,
                )
            )
    order = {"active": 0, "next": 1, "retired": 2}
    return sorted(infos, key=lambda k: (k.kind, order[k.status], -(k.retired_at or 0)))


# --- a running bridge follows rotations --------------------------------------------------------


class KeySource(Protocol):
    def current(self) -> KeyRing:
        """The key ring to use for one claim or refresh: take it once and use it throughout."""


_Signature = tuple[int, int, int] | None  # inode, size, mtime: an atomic rename changes the inode


class LiveKeyRing:
    """The data dir's KeyRing, loaded again when keys/active.json changes.

    One stat per `current()` call (a few microseconds, once per claim), so a rotation applies from the
    very next claim, deterministically. A key directory that fails to load keeps the last good ring
    (unlike the broker's fail-closed `WatchedFile`): refusing every claim would be worse than signing
    a little longer with the previous key, which stays valid anyway.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._lock = threading.Lock()
        self._signature = self._stat()
        self._ring = keyfiles.load_keys(data_dir)

    def _stat(self) -> _Signature:
        try:
            stat = os.stat(_active_file(self.data_dir))
        except OSError:
            return None
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def current(self) -> KeyRing:
        signature = self._stat()
        if signature == self._signature:
            return self._ring
        with self._lock:
            if signature != self._signature:
                self._signature = signature  # also on failure: log once per change, not once per claim
                try:
                    self._ring = keyfiles.load_keys(self.data_dir)
                except (ProvbridgeError, OSError, ValueError, KeyError) as exc:
                    log.error("keeping the previous keys: %s could not be loaded: %s", self.data_dir, exc)
                else:
                    log.info("keys reloaded: cloud %s, token %s", self._ring.active_cloud, self._ring.active_token)
            return self._ring


def current_ring(keys: KeyRing | KeySource) -> KeyRing:
    return keys if isinstance(keys, KeyRing) else keys.current()
