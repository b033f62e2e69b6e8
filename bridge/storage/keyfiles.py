"""Key material on disk under the data directory. Private files are created with mode 0600.

data/keys/cloud-<kid>.pem   cloud ECDH private keys (all kept: devices stay bound to theirs)
data/keys/token-<kid>.pem   token-signing private keys (a retired one is pruned once its tokens expired)
data/keys/active.json       {"cloud": kid, "token": kid}: the ones new claims use, the next token key (published
                            before it signs anything) and when older ones retired (`bridge.storage.rotation`)
data/cloud_public.pem       public half of the active cloud key, to burn into firmware
data/jwks.json              public token keys, for brokers and backends that verify tokens
data/bridge.secret          the bridge's broker password
"""

import contextlib
import json
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bridge.errors import NotInitialised
from bridge.storage.filelock import locked
from bridge.tokens import jwk
from broker.auth import JWKS_FILE_NAME
from provwire import crypto


def write_private(path: Path, data: bytes) -> None:
    """Create or replace a file readable by its owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # A fresh temp file (mkstemp: 0600, never an existing file's wider mode) per write, so that two
    # writers never write into the same one; fsynced so the rename cannot outlive its content in a crash.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers (the broker, another CLI run) never see a half-written file
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_pem(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise NotInitialised(f"{path} is not a P-256 private key")
    return key


@dataclass(frozen=True)
class KeyRing:
    cloud: dict[str, ec.EllipticCurvePrivateKey]
    token: dict[str, ec.EllipticCurvePrivateKey]
    active_cloud: str
    active_token: str

    @property
    def cloud_key(self) -> ec.EllipticCurvePrivateKey:
        return self.cloud[self.active_cloud]

    @property
    def token_key(self) -> ec.EllipticCurvePrivateKey:
        return self.token[self.active_token]


def keys_dir(data_dir: Path) -> Path:
    return data_dir / "keys"


def is_initialised(data_dir: Path) -> bool:
    return (keys_dir(data_dir) / "active.json").is_file()


def create_keys(data_dir: Path) -> KeyRing:
    """Generate the first cloud and token keys, the next token key (published now, active at the first rotation)
    and the bridge secret (only when none exist)."""
    cloud = crypto.generate_private_key()
    token = crypto.generate_private_key()
    cloud_kid, token_kid = store_private_key(data_dir, "cloud", cloud), store_private_key(data_dir, "token", token)
    next_kid = store_private_key(data_dir, "token", crypto.generate_private_key())
    kdir = keys_dir(data_dir)
    write_private(data_dir / "bridge.secret", secrets.token_urlsafe(32).encode("ascii") + b"\n")
    write_ops_users(data_dir, {})
    active = {"cloud": cloud_kid, "token": token_kid, "next_token": next_kid, "next_published_at": int(time.time())}
    write_public(kdir / "active.json", json.dumps(active).encode())
    ring = load_keys(data_dir)
    publish_public_keys(data_dir, ring)
    return ring


def store_private_key(data_dir: Path, kind: str, key: ec.EllipticCurvePrivateKey) -> str:
    """Write `keys/<kind>-<kid>.pem` (0600) for a "cloud" or "token" key; returns its kid."""
    kid = crypto.key_id(key.public_key())
    write_private(keys_dir(data_dir) / f"{kind}-{kid}.pem", _pem(key))
    return kid


def load_keys(data_dir: Path) -> KeyRing:
    kdir = keys_dir(data_dir)
    if not is_initialised(data_dir):
        raise NotInitialised(f"{data_dir} is not initialised: run `provbridge init`")
    active = json.loads((kdir / "active.json").read_text())
    cloud = {p.stem.removeprefix("cloud-"): _load_pem(p) for p in sorted(kdir.glob("cloud-*.pem"))}
    token = {p.stem.removeprefix("token-"): _load_pem(p) for p in sorted(kdir.glob("token-*.pem"))}
    if active["cloud"] not in cloud or active["token"] not in token:
        raise NotInitialised(f"{kdir}/active.json names a key that is missing")
    return KeyRing(cloud, token, active["cloud"], active["token"])


def jwks_file(data_dir: Path) -> Path:
    return data_dir / JWKS_FILE_NAME


def cloud_public_file(data_dir: Path) -> Path:
    return data_dir / "cloud_public.pem"


def publish_public_keys(data_dir: Path, ring: KeyRing) -> None:
    public = ring.cloud_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_public(cloud_public_file(data_dir), public)
    write_public(jwks_file(data_dir), json.dumps(jwks(ring), indent=2).encode() + b"\n")


def published_token_kids(data_dir: Path) -> set[str]:
    """The token key ids jwks.json publishes. Raises OSError or ValueError when it does not load."""
    try:
        return {str(k["kid"]) for k in json.loads(jwks_file(data_dir).read_text())["keys"]}
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a JWKS: {exc!r}") from exc


def published_cloud_key(data_dir: Path) -> bytes:
    """The SEC1 bytes of the cloud public key cloud_public.pem publishes. Raises OSError or ValueError."""
    public = serialization.load_pem_public_key(cloud_public_file(data_dir).read_bytes())
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise ValueError("not an elliptic-curve public key")
    return crypto.sec1(public)


def jwks(ring: KeyRing) -> dict[str, list[dict[str, str]]]:
    return {"keys": [jwk(key.public_key(), kid) for kid, key in ring.token.items()]}


def ops_users_file(data_dir: Path) -> Path:
    return data_dir / "ops_users.json"


@contextmanager
def ops_users_locked(data_dir: Path) -> Iterator[None]:
    """Hold the ops users' lock: `ops-user create` / `delete` read, change and rewrite ops_users.json and
    mosquitto_ops_users.json, and two runs at once would otherwise each drop the other's change."""
    with locked(ops_users_file(data_dir).with_name("ops_users.json.lock")):
        yield


def read_ops_users(data_dir: Path) -> dict[str, str]:
    path = ops_users_file(data_dir)
    if not path.exists():
        return {}
    users: dict[str, str] = json.loads(path.read_text())["users"]
    return users


def write_ops_users(data_dir: Path, users: dict[str, str]) -> None:
    write_private(ops_users_file(data_dir), json.dumps({"users": users}, indent=2).encode() + b"\n")


def read_secret(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError as exc:
        raise NotInitialised(f"secret file {path} is missing: run `provbridge init`") from exc
