"""A file parsed again only when it changes, so key rotation needs no broker restart."""

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")
logger = logging.getLogger(__name__)

_Signature = tuple[int, int, int]  # inode, size, mtime in ns: an atomic rename changes the inode


class WatchedFile(Generic[T]):
    """The parsed content of `path`, re-read when its inode, size or mtime changes.

    A missing, unreadable or unparsable file yields `fallback`: callers fail closed. Each
    problem is logged once per change of the file, not once per lookup.
    """

    def __init__(self, path: Path, parse: Callable[[bytes], T], fallback: T) -> None:
        self.path = path
        self._parse = parse
        self._fallback = fallback
        self._signature: _Signature | None = None
        self._value = fallback
        self._missing_logged = False

    def get(self) -> T:
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            if not self._missing_logged:
                logger.warning("cannot read %s: %s", self.path, exc.strerror or exc)
                self._missing_logged = True
            self._signature = None
            return self._fallback
        self._missing_logged = False
        signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if signature != self._signature:
            self._signature = signature
            self._value = self._load()
        return self._value

    def _load(self) -> T:
        try:
            return self._parse(self.path.read_bytes())
        except (OSError, ValueError) as exc:
            # Keep the last good content: a corrupt denylist must not un-revoke devices, a corrupt JWKS
            # must not lock every device out. Only a file never read successfully yields the fallback.
            logger.warning("ignoring unreadable %s (keeping its last good content): %s", self.path, exc)
            return self._value
