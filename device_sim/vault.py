"""A device's secrets at rest: its private key (PEM) and its credentials (AES-256-GCM), in its state dir.

Layout of one device's state dir (0700):

    device_key.pem     P-256 private key, PKCS#8 PEM, 0600. Kept across runs: a re-run re-claims with the
                       same public key, which the bridge treats as the same device.
    vault.key          32 random bytes, 0600: the AES-256-GCM key of the vault.
    credentials.vault  MAGIC || nonce (12) || AES-256-GCM(Credentials JSON, aad=MAGIC), 0600. With certificate
                       credentials (PROTOCOL.md section 10.4) the JSON holds the certificate chain too
                       (`mqtt.certificate`), and no token.
    .tls-*/            only while a certificate connection is being set up (`client_certificate_files`):
                       the chain and a copy of the private key as PEM files for the TLS library, removed
                       once it has read them.

The vault key sits next to the vault, so this guards against a copied or misplaced vault file and
against reading secrets by accident, not against someone who can read the whole directory. A real
device would keep `vault.key` in a secure element or TPM; the file layout makes that swap obvious.
"""

import contextlib
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import ValidationError

from device_sim.errors import VaultError
from provwire import crypto
from provwire.models import Credentials

PRIVATE_KEY_FILE = "device_key.pem"
VAULT_KEY_FILE = "vault.key"
VAULT_FILE = "credentials.vault"
MAGIC = b"PBSIMV1\x00"  # also the associated data: a blob from another format or version never opens
KEY_BYTES = 32
NONCE_BYTES = 12


def ensure_private_dir(path: Path) -> Path:
    """Create the directory (and parents) as 0700; an existing one is left as its owner made it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def write_secret_file(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write `data` to a file that is 0600 from its first byte on, replacing it atomically.

    With `exclusive`, refuse (FileExistsError) when the file exists, so two writers racing to create a
    key cannot both win and leave different keys behind.
    """
    if exclusive:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        _write_all(fd, data)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    _write_all(fd, data)
    os.replace(tmp, path)


def _write_all(fd: int, data: bytes) -> None:
    try:
        # The umask can only remove bits; fchmod makes 0600 exact even when O_TRUNC reused a file.
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_secret_file(path: Path) -> bytes:
    """Read a secret, refusing one that group or others may read (as ssh does with private keys)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise  # callers treat "not there yet" differently from "unreadable"
    except OSError as exc:
        raise VaultError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise VaultError(f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); want 0600")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


# --- the device private key -----------------------------------------------------------------------------


def load_or_create_private_key(state_dir: Path) -> ec.EllipticCurvePrivateKey:
    ensure_private_dir(state_dir)
    path = state_dir / PRIVATE_KEY_FILE
    try:
        return _load_private_key(path)
    except FileNotFoundError:
        pass
    key = crypto.generate_private_key()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        write_secret_file(path, pem, exclusive=True)
    except FileExistsError:
        return _load_private_key(path)  # another process created it first: use theirs
    return key


def _load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    pem = read_secret_file(path)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except ValueError as exc:
        raise VaultError(f"{path} is not a PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise VaultError(f"{path} is not a P-256 private key")
    return key


@contextlib.contextmanager
def client_certificate_files(
    private_key: ec.EllipticCurvePrivateKey, certificate_chain: str, parent: Path | None = None
) -> Iterator[tuple[Path, Path]]:
    """(certificate chain, private key) as PEM files for a TLS library that reads only files (paho's
    `tls_set`), for the length of the block: in a fresh 0700 directory under `parent` (the device's
    state dir; the system's temporary directory when None), the key 0600, all removed at the end."""
    directory = Path(tempfile.mkdtemp(prefix=".tls-", dir=parent))  # mkdtemp makes it 0700
    try:
        cert_file, key_file = directory / "certificate.pem", directory / "key.pem"
        key_pem = private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_secret_file(key_file, key_pem, exclusive=True)
        write_secret_file(cert_file, certificate_chain.encode("ascii"), exclusive=True)
        yield cert_file, key_file
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- the credentials vault ------------------------------------------------------------------------------


class Vault:
    """Credentials of one device, encrypted at rest in its state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.key_path = state_dir / VAULT_KEY_FILE
        self.path = state_dir / VAULT_FILE

    def _key(self, *, create: bool) -> bytes | None:
        try:
            key = read_secret_file(self.key_path)
        except FileNotFoundError:
            if not create:
                return None
            ensure_private_dir(self.state_dir)
            # Losing a creation race is fine: the winner's key is the one to use.
            with contextlib.suppress(FileExistsError):
                write_secret_file(self.key_path, os.urandom(KEY_BYTES), exclusive=True)
            key = read_secret_file(self.key_path)
        if len(key) != KEY_BYTES:
            raise VaultError(f"{self.key_path} must hold exactly {KEY_BYTES} bytes")
        return key

    def store(self, credentials: Credentials) -> None:
        key = self._key(create=True)
        assert key is not None  # create=True either returns a key or raises
        nonce = os.urandom(NONCE_BYTES)
        blob = AESGCM(key).encrypt(nonce, credentials.model_dump_json().encode("utf-8"), MAGIC)
        write_secret_file(self.path, MAGIC + nonce + blob)

    def load(self) -> Credentials | None:
        """The stored credentials, or None when nothing was stored yet. Tampering raises VaultError."""
        try:
            data = read_secret_file(self.path)
        except FileNotFoundError:
            return None
        key = self._key(create=False)
        if key is None:
            raise VaultError(f"{self.path} exists but its key {self.key_path} is missing")
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + NONCE_BYTES + 16:
            raise VaultError(f"{self.path} is not a credentials vault")
        nonce, blob = data[len(MAGIC) : len(MAGIC) + NONCE_BYTES], data[len(MAGIC) + NONCE_BYTES :]
        try:
            plaintext = AESGCM(key).decrypt(nonce, blob, MAGIC)
        except InvalidTag as exc:
            raise VaultError(f"{self.path} does not decrypt: tampered, or written with another key") from exc
        try:
            return Credentials.model_validate_json(plaintext)
        except ValidationError as exc:
            raise VaultError(f"{self.path} holds no valid credentials") from exc
