"""An advisory lock between the processes that rewrite a file under the data dir (CLI runs, the bridge)."""

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created 0600 if missing) for the duration of the block.

    Read-modify-write cycles of one file must not interleave, or the later writer drops the earlier one's
    change. The lock file is separate from the file it guards, which is replaced atomically by rename.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
