"""The data dir's key files and bridge secret, shared through PostgreSQL by the bridges of several hosts.

On PostgreSQL (`storage.url`) bridges on several hosts must sign with the same token keys, seal with the same cloud
keys, follow the same rotations and log in to the broker with the same secret. These files are shared as rows of
`shared_files` (name, sealed content, updated_at):

    keys/cloud-<kid>.pem, keys/token-<kid>.pem   the private keys
    keys/active.json                             which keys are active, the next token key, retirements
    bridge.secret                                the bridge's broker password (when it is the data dir's)

Each is sealed with AES-256-GCM under the host key (`storage.key_file`, default `<data_dir>/storage.key`: 32 random
bytes that `init` makes, and that every host of a deployment is given; never in the database), its name as
associated data, so a row cannot be passed off as another file. A deleted file (a pruned key) is a row without
content, so every host deletes it too.

Each host's data dir stays the working copy: the bridge, the embedded broker and the Mosquitto plugin read files,
and rotation writes them (bridge/storage/rotation.py). The database holds the deployment's truth:

- `push` (inside a write transaction) writes the data dir's files to the database, and marks deleted what it no
  longer has.
- `pull` writes the database's files into the data dir: private keys first, `keys/active.json` last (it names
  them), deleted ones after; then the JWKS and cloud_public.pem are republished. A local key the database never
  heard of is kept (a rotation killed before its commit may have signed with it); the next push records it.
- `rotate` and `prune` hold the key directory's lock and the database's write lock (one at a time on every host),
  pull, change the files, push, commit. A running bridge pulls every `storage.key_sync_seconds`
  (`bridge.edges.serve`), and its `LiveKeyRing` follows `keys/active.json` from there.
- The bridge secret is never deleted by a pull, and a host whose secret lives outside its data dir neither shares
  nor deletes it.

On SQLite (one host) nothing is shared: the table stays empty and the files are the truth.
"""

import base64
import binascii
import logging
import os
import re
import secrets
import time
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bridge.config import Settings
from bridge.errors import NotInitialised, StorageError, UsageError
from bridge.storage import keyfiles, rotation
from bridge.storage.filelock import locked
from bridge.storage.rotation import Kind, Rotation
from bridge.storage.store import Store, Transaction

log = logging.getLogger("provbridge.keys")

ACTIVE = "keys/active.json"
SECRET = "bridge.secret"
# Only these names are ever written from the database into the data dir: no row can name another path.
NAME_RE = re.compile(r"keys/(cloud|token)-[0-9a-f]{16}\.pem|keys/active\.json|bridge\.secret")
HOST_KEY_BYTES = 32
NONCE_BYTES = 12


def is_shared(settings: Settings) -> bool:
    """Whether this data dir's keys are shared through the database (PostgreSQL)."""
    return settings.storage.url is not None


# --- the host key ---------------------------------------------------------------------------------


def create_host_key(settings: Settings) -> bool:
    """Make the host key file (0600) unless it exists; whether it was made. Created exclusively: of two processes
    making it at once, one makes it and both then use that one."""
    path = settings.storage_key_file
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64encode(secrets.token_bytes(HOST_KEY_BYTES)) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def host_key(settings: Settings) -> AESGCM:
    path = settings.storage_key_file
    try:
        text = path.read_text().strip()
    except FileNotFoundError as exc:
        raise NotInitialised(
            f"{path} is missing: the key files in the database are sealed with a deployment's storage key;"
            " copy that file from one of its hosts (or set storage.key_file)"
        ) from exc
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise NotInitialised(f"{path} is not a storage key (base64 of {HOST_KEY_BYTES} bytes)") from exc
    if len(raw) != HOST_KEY_BYTES:
        raise NotInitialised(f"{path} is not a storage key (base64 of {HOST_KEY_BYTES} bytes)")
    return AESGCM(raw)


def seal(aead: AESGCM, name: str, data: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + aead.encrypt(nonce, data, name.encode())


def unseal(aead: AESGCM, name: str, sealed: bytes) -> bytes:
    try:
        return aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], name.encode())
    except InvalidTag as exc:
        raise NotInitialised(
            f"the database's {name} does not open with this host's storage key: give this host the"
            " deployment's storage.key"
        ) from exc


# --- the files ------------------------------------------------------------------------------------


def _shares_secret(settings: Settings) -> bool:
    return settings.bridge_secret_file == settings.data_dir / SECRET


def local_files(settings: Settings) -> dict[str, bytes]:
    """The shared files the data dir has, by name."""
    data_dir = settings.data_dir
    kdir = keyfiles.keys_dir(data_dir)
    names = [f"keys/{p.name}" for p in sorted(kdir.glob("*-*.pem"))] + [ACTIVE]
    if _shares_secret(settings):
        names.append(SECRET)
    files = {}
    for name in names:
        path = data_dir / name
        if NAME_RE.fullmatch(name) and path.is_file():
            files[name] = path.read_bytes()
    return files


def push(tx: Transaction, settings: Settings, aead: AESGCM, now: int) -> list[str]:
    """Write the data dir's files to the database (those that differ), and mark deleted what it no longer has;
    returns the names changed. Inside the caller's write transaction."""
    stored = tx.shared_files()
    local = local_files(settings)
    changed = []
    for name, data in local.items():
        old = stored.get(name)
        if old is not None and unseal(aead, name, old) == data:
            continue
        tx.put_shared_file(name, seal(aead, name, data), now)
        changed.append(name)
    for name, old in stored.items():
        # A host whose bridge secret is not the data dir's has none to share: that deletes nothing.
        if old is not None and name not in local and name != SECRET:
            tx.put_shared_file(name, None, now)
            changed.append(name)
    return changed


def _order(name: str) -> int:
    return 2 if name == ACTIVE else 1 if name == SECRET else 0  # keys, the secret, then what names the keys


def pull(stored: dict[str, bytes | None], settings: Settings, aead: AESGCM) -> list[str]:
    """Write the database's files (`stored`, from `shared_files()`) into the data dir; returns the names changed.
    Every file is opened before any is written: a wrong host key changes nothing."""
    with locked(rotation.lock_file(settings.data_dir)):  # never in the middle of a local rotation
        return _pull(stored, settings, aead)


def _pull(stored: dict[str, bytes | None], settings: Settings, aead: AESGCM) -> list[str]:
    """`pull`, the key directory's lock held."""
    data_dir = settings.data_dir
    wanted = {name: data for name, data in stored.items() if NAME_RE.fullmatch(name)}
    if len(wanted) != len(stored):
        log.warning("ignored shared files with unexpected names: %s", sorted(set(stored) - set(wanted)))
    if not _shares_secret(settings):
        wanted.pop(SECRET, None)
    files = {name: unseal(aead, name, data) for name, data in wanted.items() if data is not None}
    changed = []
    for name in sorted(files, key=_order):
        path = data_dir / name
        if path.is_file() and path.read_bytes() == files[name]:
            continue
        if name == ACTIVE:
            keyfiles.write_public(path, files[name])
        else:
            keyfiles.write_private(path, files[name])
        changed.append(name)
    for name, data in wanted.items():
        if data is None and name != SECRET and (data_dir / name).exists():  # a pruned key; never the secret
            (data_dir / name).unlink()
            changed.append(name)
    if changed and keyfiles.is_initialised(data_dir):
        keyfiles.publish_public_keys(data_dir, keyfiles.load_keys(data_dir))
    return changed


def sync(settings: Settings, store: Store) -> list[str]:
    """Pull the database's files into the data dir (a running bridge, every few seconds). A database that holds
    none yet (a deployment from before they were shared) gets this data dir's instead. Read with the key
    directory's lock held: a local rotation holds it until its commit, so what is read is never older than it."""
    with locked(rotation.lock_file(settings.data_dir)):
        stored = store.shared_files()
        if any(data is not None for data in stored.values()):
            changed = _pull(stored, settings, host_key(settings))
            if changed:
                log.info("shared key files taken from the database: %s", ", ".join(changed))
            return changed
    if publish(settings, store, int(time.time())):
        log.info("the database held no shared key files: this data dir's are the deployment's now")
    return []


def publish(settings: Settings, store: Store, now: int) -> list[str]:
    """Push the data dir's files into a database that holds none (a first `init`, or a bridge of a deployment from
    before they were shared): they become the deployment's. Returns the names pushed: none when another host was
    first, whose files are then pulled instead."""
    create_host_key(settings)
    aead = host_key(settings)
    with locked(rotation.lock_file(settings.data_dir)), store.transaction() as tx:
        stored = tx.shared_files()
        if any(data is not None for data in stored.values()):
            _pull(stored, settings, aead)
            return []
        return push(tx, settings, aead, now)


def copy_files(settings: Settings, now: int) -> Callable[[Transaction], list[str]]:
    """For `storage copy`: push the data dir's files in the copy's transaction, then read them back and check each
    opens to the file's bytes (StorageError otherwise: the whole copy is undone)."""
    create_host_key(settings)
    aead = host_key(settings)

    def put(tx: Transaction) -> list[str]:
        if any(data is not None for data in tx.shared_files().values()):
            raise UsageError("the PostgreSQL database holds shared key files already: copy into a new database")
        push(tx, settings, aead, now)
        local = local_files(settings)
        back = {name: unseal(aead, name, data) for name, data in tx.shared_files().items() if data is not None}
        if back != local:
            raise StorageError("the key files read back from PostgreSQL differ from the data dir's: nothing was kept")
        return sorted(local)

    return put


# --- rotation, one host at a time -----------------------------------------------------------------


def rotate(settings: Settings, kind: Kind, now: int) -> Rotation:
    """`rotation.rotate`, and on PostgreSQL between a pull and a push under the database's write lock: the rotation
    starts from the deployment's keys and every host takes its result. The key directory's lock is held from the
    pull to the commit, so this host's sync cannot write an older `active.json` in between."""
    if not is_shared(settings):
        return rotation.rotate(settings.data_dir, kind, now)
    aead = host_key(settings)
    store = Store(settings.database)
    try:
        with locked(rotation.lock_file(settings.data_dir)), store.transaction() as tx:
            _pull(tx.shared_files(), settings, aead)
            done = rotation.rotate_locked(settings.data_dir, kind, now)
            push(tx, settings, aead, now)
        return done
    finally:
        store.close()


def prune(settings: Settings, now: int) -> tuple[str, ...]:
    """`rotation.prune`, shared as `rotate` is."""
    if not is_shared(settings):
        return rotation.prune(settings.data_dir, now)
    aead = host_key(settings)
    store = Store(settings.database)
    try:
        with locked(rotation.lock_file(settings.data_dir)), store.transaction() as tx:
            _pull(tx.shared_files(), settings, aead)
            pruned = rotation.prune_locked(settings.data_dir, now)
            push(tx, settings, aead, now)
        return pruned
    finally:
        store.close()
