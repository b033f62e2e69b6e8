"""Generating, normalising and hashing the secrets the bridge hands out. Pure, no I/O.

Raw secrets are shown once and never stored: the database keeps SHA-256 digests.
"""

import base64
import hashlib
import re
import secrets

CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I, L, O, U
CODE_RE = re.compile(r"PROV-[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}")


def _token_urlsafe(nbytes: int) -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(nbytes)).rstrip(b"=").decode("ascii")


def new_provision_key() -> str:
    """`pk_` + 256 random bits."""
    return "pk_" + _token_urlsafe(32)


def new_human_code() -> str:
    """A one-time code a person can type: PROV-XXXX-XXXX, 40 random bits."""
    chars = "".join(secrets.choice(CODE_ALPHABET) for _ in range(8))
    return f"PROV-{chars[:4]}-{chars[4:]}"


def new_api_key() -> str:
    """`dk_` + 256 random bits, sealed to the device and stored only as a hash."""
    return "dk_" + _token_urlsafe(32)


def new_ops_password() -> str:
    """256 random bits: a fast digest is then as good as a slow password hash."""
    return "op_" + _token_urlsafe(32)


def new_admin_token() -> str:
    """`pba_` + 256 random bits: a bearer token of the admin HTTP API, stored only as a hash."""
    return "pba_" + _token_urlsafe(32)


def new_admin_token_id() -> str:
    """Public handle of an admin token, safe to show and log (events name it as their actor)."""
    return "adm_" + secrets.token_hex(8)


# RFC 4648's base32 characters in ASCII order, standing for 0-31: text written with them sorts as its numbers do.
SORTABLE_BASE32 = "234567abcdefghijklmnopqrstuvwxyz"
_TO_SORTABLE = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", SORTABLE_BASE32)


def new_device_id(now: float) -> str:
    """`dev_` + 26 characters of `a-z 2-7`: 16 bytes, the time `now` in milliseconds (6, big-endian) then 10
    random bytes, in base32 as RFC 4648 writes it but with the digits 0-31 written as `SORTABLE_BASE32`.

    Ids sort by creation, so a claim adds its device to the end of every index keyed by the id (the devices',
    a device's events) instead of to a random page of each: a batch of claims then writes a few pages rather
    than one per claim per index (docs/BENCHMARKS.md). 80 random bits keep ids unguessable (no secret rests on
    an id: it is the device's MQTT user name, which its token or certificate must match)."""
    raw = (int(now * 1000) % (1 << 48)).to_bytes(6, "big") + secrets.token_bytes(10)
    return "dev_" + base64.b32encode(raw).decode("ascii").rstrip("=").translate(_TO_SORTABLE)


def new_key_id() -> str:
    """Public handle of a provisioning key, safe to show and log."""
    return "key_" + secrets.token_hex(8)


def new_tenant_id() -> str:
    return "ten_" + secrets.token_hex(8)


def normalise_key(raw: str) -> str:
    """Human codes are case-insensitive and forgive spaces; `pk_` keys are taken as they are."""
    candidate = raw.strip().upper().replace(" ", "")
    return candidate if CODE_RE.fullmatch(candidate) else raw


def is_human_code(raw: str) -> bool:
    return CODE_RE.fullmatch(normalise_key(raw)) is not None


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()
