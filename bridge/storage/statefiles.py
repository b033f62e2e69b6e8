"""The bridge's state kept in files under the data dir, other than the key rings (`keyfiles`, `rotation`).

    denylist.json          device credentials brokers must refuse until they expire (broker/denylist.py; written
                           by `device revoke/reinstate/reset/delete` and at start; read by both brokers)
    bridge-sessions.json   the bridge's client ids on an external broker, so that sessions a previous
                           layout left behind can be retired (bridge/edges/sessions.py)

Everything reads and writes them through these functions: what bridges on several hosts must share
can then move into a shared database behind the same names.
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bridge.storage.filelock import locked
from bridge.storage.keyfiles import write_public
from broker.denylist import DENYLIST_FILE_NAME, Entries, render_denylist

SESSIONS_FILE_NAME = "bridge-sessions.json"


def denylist_file(data_dir: Path) -> Path:
    return data_dir / DENYLIST_FILE_NAME


@contextmanager
def denylist_update(data_dir: Path) -> Iterator[None]:
    """Hold the denylist's lock while computing and writing it: a writer that read the database before
    another revocation must not write last."""
    path = denylist_file(data_dir)
    with locked(path.with_name(path.name + ".lock")):
        yield


def write_denylist(data_dir: Path, entries: Entries) -> None:
    """Replace the denylist (broker/denylist.py) atomically, unless it says that already (its readers reload it on
    every change); call it in `denylist_update()`."""
    path, content = denylist_file(data_dir), render_denylist(entries)
    try:
        if path.read_bytes() == content:
            return
    except OSError:
        pass  # missing or unreadable: written below
    write_public(path, content)


def _sessions_file(data_dir: Path, host_id: str | None) -> Path:
    # One file per host (`broker.host_id`): a host must never retire another host's sessions as its own old ones,
    # even where the hosts share a data dir.
    return data_dir / (SESSIONS_FILE_NAME if not host_id else f"bridge-sessions-{host_id}.json")


def recorded_sessions(data_dir: Path, host_id: str | None = None) -> list[str]:
    """The bridge client ids this host recorded in use; none when the file is missing or unreadable."""
    try:
        recorded = json.loads(_sessions_file(data_dir, host_id).read_text())["client_ids"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [c for c in recorded if isinstance(c, str)] if isinstance(recorded, list) else []


def record_sessions(data_dir: Path, client_ids: list[str], host_id: str | None = None) -> None:
    write_public(_sessions_file(data_dir, host_id), json.dumps({"client_ids": sorted(set(client_ids))}).encode())
