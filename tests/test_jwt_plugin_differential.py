"""The provbridge_jwt Mosquitto plugin against the embedded broker, decision for decision (issue 11).

bridge/mosquitto/jwt/provbridge_jwt.c is hand-written C that makes inside Mosquitto the decisions the
embedded broker makes in Python: PyJWT verifying a device token (broker/tokens.py, through the real
`Authenticator` of broker/auth.py, at a frozen `now`) and broker/acl.py holding a session to its token's
`acl`. Both sides get the same generated input and must answer the same: accepted or refused with the same
reason (what ops read in Mosquitto's log), the same session exp, acl and credential (token `gen`, certificate
serial), the same ACL answers, the same usable JWKS keys, the same denylist (broker/denylist.py: revoked devices
and older credentials, judged again for live sessions when the file changes). The C side runs in
bridge/mosquitto/jwt/harness.c (tests/helpers/jwt_harness.py), built with AddressSanitizer, UBSan and
LeakSanitizer: a memory error or a leak on any input fails too.

Inputs: what an attacker can make of a real token (every truncation, deletion and bit flip of one token, then
generated mutations: re-encodings, segment and `alg` games, forged, unknown-kid and malleable signatures); what
only the signing key's holder can make (any header, any claims, JSON at its edges); topics and filters over a
few levels that collide often (wildcards anywhere, `$` topics, `$share/`, empty levels, non-ASCII); JWKS and
denylist files.

Where the plugin deliberately differs (`deliberate_difference`), each harmless:
* Mosquitto hands a plugin the password as a C string: a valid token, a NUL and junk is read as the token.
* A password over 16 KiB is refused unread (a token is a few hundred bytes).
* JSON that Python reads but that is not JSON, or that cJSON cannot hold: NaN/Infinity, UTF-16/32 text, a lone
  surrogate escape, \\u0000 in a string, a number longer than 63 characters. The plugin refuses such a header or
  claims set. Only the key holder can sign one.
* A time claim (iat, nbf, exp) that is a JSON string Python's int() reads ("123"): the plugin refuses it, a
  NumericDate is a JSON number (RFC 7519 §2). Only the key holder can sign one.
Not generated, also deliberate: nesting between ~850 and 1000 levels (Python's recursion limit against cJSON's
1000); JWKS coordinates padded or with junk (PyJWT's JWK reader is lax, the plugin reads x and y as strictly as
tokens; the bridge writes them canonical); a denylist number (an `until`, a `generation`) written as 1.0 or 1e3,
which broker/denylist.py refuses as no int and the plugin reads as the whole number (cJSON has no int/float).
Token `gen` and denylist `generation` are doubles in the plugin: beyond 2**53 two different ones may compare
equal (generations are small counters).
Python-side finding, not changed here: an `exp` or `gen` integer beyond a float's range (10**400) makes
broker/acl.py `device_grant` raise OverflowError instead of refusing (needs the signing key).

Profiles (tests/helpers/strategies.py): `short` for `make test` (derandomized), HYPOTHESIS_PROFILE=long for more.
"""

import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import jwt
import jwt.api_jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jwt.api_jws import PyJWS

import broker.auth
import broker.certificates
from bridge.tokens import jwk
from broker import acl
from broker.auth import DEFAULT_AUDIENCE, DEFAULT_ISSUER, Authenticator, AuthSettings
from broker.certificates import SCOPE_OID, checked_scope, scope_of_value
from broker.errors import ConnectRefused, InvalidCertificate
from broker.tokens import parse_jwks
from broker.watched import WatchedFile
from provwire import topics
from tests.helpers.jwt_harness import Access, Connect, PluginHarness, harness_path
from tests.helpers.strategies import examples

AUDIENCE, ISSUER = DEFAULT_AUDIENCE, DEFAULT_ISSUER
DEVICE = "dev_abcdefghijklmnopqrstuvwxyz"  # its credentials below generation 2 and LISTED_SERIAL refused
OTHER_DEVICE = "dev_234567abcdefghijklmnopqrst"  # in the denylist, but its entries have expired
REVOKED = "dev_zzzzzzzzzzzzzzzzzzzzzzzzzz"  # in the denylist until long after any generated now
BASE_NOW = 1_750_000_000
GENERATION = 2  # DEVICE's credential generation: its tokens carry it, older ones are refused
# Certificate serial numbers: BN_bn2hex writes this one "0F00BA12", Python's format(n, "x") "f00ba12" (listed).
LISTED_SERIAL = 0x0F00BA12
UPPER_SERIAL = 0xF00BA13  # listed in upper case, "F00BA13": not the serial format(n, "x") gives, so not refused
OTHER_SERIAL = 0x5EED
MAX_TOKEN_BYTES = 16384  # provbridge_jwt.c
CJSON_NUMBER_MAX = 63  # cJSON 1.7 reads at most 63 characters of a number
K1, K2 = "k1", "k2"  # the JWKS's kids
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@dataclass(frozen=True)
class SigningKeys:
    k1: ec.EllipticCurvePrivateKey
    k2: ec.EllipticCurvePrivateKey
    outsider: ec.EllipticCurvePrivateKey  # in no JWKS


KEYS = SigningKeys(*(ec.generate_private_key(ec.SECP256R1()) for _ in range(3)))


# --- tokens, by hand: any header and claims bytes, any segment encoding ------------------------------------


def b64url(raw: bytes, *, pad: bool = False) -> str:
    text = base64.urlsafe_b64encode(raw).decode("ascii")
    return text if pad else text.rstrip("=")


def es256(key: ec.EllipticCurvePrivateKey, signing_input: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def jws(
    key: ec.EllipticCurvePrivateKey, header: bytes, payload: bytes, *, pad: tuple[bool, bool, bool] = (False,) * 3
) -> str:
    signing_input = f"{b64url(header, pad=pad[0])}.{b64url(payload, pad=pad[1])}"
    return f"{signing_input}.{b64url(es256(key, signing_input.encode()), pad=pad[2])}"


def good_claims(now: float, sub: str = DEVICE, gen: int | None = GENERATION) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": sub,
        "tenant": "default",
        "iat": math.floor(now) - 1,
        "exp": math.floor(now) + 900,
        "jti": "0123456789abcdef",
        "acl": {"pub": [f"devices/{sub}/#"], "sub": [f"devices/{sub}/#"]},
    }
    if gen is not None:  # as bridge/tokens.py writes it: absent at generation 0
        claims["gen"] = gen
    return claims


def good_token(
    now: float,
    sub: str = DEVICE,
    key: ec.EllipticCurvePrivateKey = KEYS.k1,
    kid: str = K1,
    gen: int | None = GENERATION,
) -> str:
    header = json.dumps({"alg": "ES256", "typ": "JWT", "kid": kid}).encode()
    return jws(key, header, json.dumps(good_claims(now, sub, gen)).encode())


def exact_now(seconds: int, micros: int) -> float:
    """A `now` PyJWT's datetime gives back unchanged (microseconds), so both sides compare with the same float."""
    now = datetime.fromtimestamp(seconds + micros / 1e6, UTC).timestamp()
    assert datetime.fromtimestamp(now, UTC).timestamp() == now
    return now


NOWS = st.builds(exact_now, st.integers(BASE_NOW - 10**6, BASE_NOW + 10**6), st.sampled_from([0, 1, 500_000, 999_999]))


# --- the reference: the embedded broker's Authenticator at a frozen now ------------------------------------


@contextmanager
def frozen_time(now: float) -> Iterator[None]:
    """PyJWT's clock (`datetime.now` in jwt.api_jwt) and broker/auth.py's (`time.time`) both at `now`."""

    class Frozen(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> "Frozen":
            return cls.fromtimestamp(now, tz)

    with (
        mock.patch.object(jwt.api_jwt, "datetime", Frozen),
        mock.patch.object(broker.auth, "time", SimpleNamespace(time=lambda: now)),
    ):
        yield


@dataclass(frozen=True)
class Reference:
    outcome: str  # "accepted" or "refused"
    reason: str = ""
    grant: acl.Grant | None = None


def reference_connect(auth: Authenticator, username: str, client_id: str, password: str, now: float) -> Reference:
    with frozen_time(now):
        try:
            grant = auth.authenticate(client_id=client_id, username=username, password=password)
        except ConnectRefused as exc:
            return Reference("refused", exc.reason)
        except OverflowError:  # device_grant on an exp beyond a float (see the module doc): not accepted
            return Reference("refused", "raised OverflowError")
    return Reference("accepted", grant=grant)


# --- where the plugin deliberately differs (see the module doc) --------------------------------------------


class _NotStrict(Exception):
    pass


def _reject_constant(name: str) -> Any:
    raise _NotStrict(name)


def strict_json(raw: bytes) -> bool:
    """False when Python reads `raw` as JSON but the plugin deliberately does not (NaN, UTF-16/32, a lone
    surrogate or NUL in a string, a number cJSON cannot hold); True otherwise, refused by both included."""
    if b"\0" in raw:
        return False  # UTF-16/32 text (Python reads it), or a NUL Python refuses too
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return True  # Python refuses it as well

    def number(literal: str) -> int:
        if len(literal) > CJSON_NUMBER_MAX:
            raise _NotStrict(literal)
        return 0

    try:
        value = json.loads(
            text.removeprefix("\ufeff"), parse_int=number, parse_float=number, parse_constant=_reject_constant
        )
    except _NotStrict:
        return False
    except (ValueError, RecursionError):
        return True
    return _strict_strings(value)


def _strict_strings(value: Any) -> bool:
    strings: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            strings.append(item)
        elif isinstance(item, dict):
            strings.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return not any("\0" in s or any(0xD800 <= ord(c) <= 0xDFFF for c in s) for s in strings)


def _python_int(value: Any) -> bool:
    try:
        int(value)
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def deliberate_difference(token: str) -> str | None:
    """Why the plugin may refuse `token` where the reference accepts it, or refuse it for another reason."""
    if len(token.encode("utf-8")) > MAX_TOKEN_BYTES:
        return "password over 16 KiB"
    signing_input, _, _signature = token.rpartition(".")
    header_segment, _, payload_segment = signing_input.partition(".")
    decoded: list[bytes] = []
    for segment in (header_segment, payload_segment):
        try:
            decoded.append(PyJWS._decode_base64url_segment(segment.encode("utf-8"), "segment"))
        except jwt.DecodeError:
            continue
    if not all(strict_json(raw) for raw in decoded):
        return "JSON the plugin does not read"
    try:
        claims = json.loads(decoded[1]) if len(decoded) == 2 else None
    except (ValueError, RecursionError):
        claims = None
    if isinstance(claims, dict):
        for name in ("iat", "nbf", "exp"):
            if isinstance(claims.get(name), str) and _python_int(claims[name]):
                return f"{name} a string Python's int() reads"
    return None


# --- the two sides side by side ----------------------------------------------------------------------------


@dataclass
class World:
    harness: PluginHarness
    auth: Authenticator


# REVOKED for long; DEVICE's tokens below GENERATION and certificate LISTED_SERIAL (its entry in "devices" has
# expired: the older credentials still count); OTHER_DEVICE's entries both expired.
WORLD_DENYLIST: dict[str, Any] = {
    "devices": {REVOKED: BASE_NOW + 10**7, OTHER_DEVICE: BASE_NOW - 10**7, DEVICE: BASE_NOW - 10**7},
    "older_credentials": {
        DEVICE: {
            "generation": GENERATION,
            "certificates": [format(LISTED_SERIAL, "x"), format(UPPER_SERIAL, "X"), format(OTHER_SERIAL + 1, "x")],
            "until": BASE_NOW + 10**7,
        },
        OTHER_DEVICE: {"generation": 5, "certificates": [format(OTHER_SERIAL, "x")], "until": BASE_NOW - 10**7},
    },
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The JWKS (k1, k2) and the denylist WORLD_DENYLIST, on both sides."""
    folder = tmp_path_factory.mktemp("jwt-differential")
    jwks_file, denylist_file = folder / "jwks.json", folder / "denylist.json"
    jwks_file.write_text(json.dumps({"keys": [jwk(KEYS.k1.public_key(), K1), jwk(KEYS.k2.public_key(), K2)]}))
    denylist_file.write_text(json.dumps(WORLD_DENYLIST))
    auth = Authenticator(
        AuthSettings(jwks_file=jwks_file, bridge_secret_file=folder / "no-secret", denylist_file=denylist_file)
    )
    harness = PluginHarness(harness_path())
    harness.configure(jwks_file=jwks_file, denylist_file=denylist_file, audience=AUDIENCE, issuer=ISSUER)
    assert harness.refresh() == [K1, K2]
    yield World(harness, auth)
    harness.close()  # fails the module's last test on a leak or a report at exit


def connect_both(w: World, token: str, now: float, *, username: str = DEVICE, client_id: str | None = None) -> None:
    """The plugin's answer to this CONNECT must be the embedded broker's (or within a deliberate difference)."""
    client_id = username if client_id is None else client_id
    password = token.encode("utf-8")
    plugin = w.harness.connect(username, client_id, password, now)
    # Mosquitto hands the plugin the password as a C string: the reference gets what the plugin reads.
    seen = token.split("\0", 1)[0]
    ref = reference_connect(w.auth, username, client_id, seen, now)
    why = deliberate_difference(seen)
    context = f"token {seen!r} for {username}/{client_id} at {now!r}: plugin {plugin}, reference {ref}"
    if why is not None:
        assert plugin.outcome == "refused", f"{why}: the plugin must refuse; {context}"
        return
    assert (plugin.outcome, plugin.reason) == (ref.outcome, ref.reason), context
    if ref.grant is not None:
        assert_same_session(plugin, ref.grant, now, context)


def assert_same_session(plugin: Connect, grant: acl.Grant, now: float, context: str) -> None:
    assert plugin.acl_json is not None and grant.expires_at is not None and plugin.denied_until is not None
    assert plugin.exp == max(-(9 * 10**18), min(grant.expires_at, 9 * 10**18)), context  # the C side clamps
    assert plugin.generation == float(grant.generation), context  # a double: exact for any generation in use
    assert not now < plugin.denied_until, context  # accepted: its credential is not refused at now
    session_acl = json.loads(plugin.acl_json)
    assert (session_acl.get("pub", []), session_acl.get("sub", [])) == (list(grant.publish), list(grant.subscribe))


# --- tokens an attacker can make from a real one -----------------------------------------------------------

EXHAUSTIVE_NOW = exact_now(BASE_NOW, 500_000)


def test_every_truncation_deletion_and_bit_flip_of_a_token(world: World) -> None:
    token = good_token(EXHAUSTIVE_NOW)
    connect_both(world, token, EXHAUSTIVE_NOW)
    variants = [token[:i] for i in range(len(token))]
    variants += [token[:i] + token[i + 1 :] for i in range(len(token))]
    variants += [token[:i] + chr(ord(c) ^ (1 << bit)) + token[i + 1 :] for i, c in enumerate(token) for bit in range(7)]
    for variant in variants:
        connect_both(world, variant, EXHAUSTIVE_NOW)


def _segments(token: str) -> list[str]:
    return token.split(".")


def _recode(segment: str, how: str) -> str:
    """`segment` spelled another way: padded, standard alphabet, with whitespace, ..."""
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if how == "padded":
        return b64url(raw, pad=True)
    if how == "over-padded":
        return segment + "==="
    if how == "standard":
        return base64.b64encode(raw).decode().rstrip("=")
    if how == "standard-padded":
        return base64.b64encode(raw).decode()
    if how == "wrapped":
        return segment[:10] + "\n" + segment[10:]
    if how == "spaced":
        return " " + segment + " "
    if how == "non-canonical":  # the unused low bits of the last character set
        if len(segment) % 4 in (2, 3):
            alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
            unused = 0b1111 if len(segment) % 4 == 2 else 0b11
            return segment[:-1] + alphabet[alphabet.index(segment[-1]) | unused]
        return segment
    raise AssertionError(how)


RECODINGS = ["padded", "over-padded", "standard", "standard-padded", "wrapped", "spaced", "non-canonical"]
ALGS: list[Any] = ["none", "HS256", "RS256", "ES384", "ES512", "PS256", "es256", "", None, "ES256 "]


def _header(**members: Any) -> str:
    return b64url(json.dumps({"typ": "JWT", **members}).encode())


def _high_s(signature_segment: str) -> str:
    raw = base64.urlsafe_b64decode(signature_segment + "==")
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    if len(raw) != 64 or not 0 < s < P256_ORDER:
        raise ValueError("not a signature")
    return b64url(r.to_bytes(32, "big") + (P256_ORDER - s).to_bytes(32, "big"))


@st.composite
def attacker_tokens(draw: st.DrawFn) -> tuple[str, float, str]:
    """(token, now, client id): a real token for DEVICE, then one to three mutations an attacker can make."""
    now = draw(NOWS)
    token = good_token(now)
    client_id = DEVICE
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(
                [
                    "truncate",
                    "flip",
                    "insert",
                    "delete",
                    "recode",
                    "segments",
                    "alg",
                    "hs256-with-public-key",
                    "forged",
                    "unknown-kid",
                    "high-s",
                    "signature-values",
                    "splice",
                    "nul",
                    "client-id",
                ]
            )
        )
        parts = _segments(token)
        if kind == "truncate" and token:
            token = token[: draw(st.integers(0, len(token) - 1))]
        elif kind == "flip" and token:
            i = draw(st.integers(0, len(token) - 1))
            token = token[:i] + chr(ord(token[i]) ^ (1 << draw(st.integers(0, 6)))) + token[i + 1 :]
        elif kind == "insert":
            i = draw(st.integers(0, len(token)))
            token = token[:i] + draw(st.sampled_from(["A", "=", ".", "+", "/", " ", "\n", "!", "é", "%3D"])) + token[i:]
        elif kind == "delete" and token:
            i = draw(st.integers(0, len(token) - 1))
            token = token[:i] + token[i + 1 :]
        elif kind == "recode" and len(parts) == 3:
            j = draw(st.integers(0, 2))
            how = draw(st.sampled_from(RECODINGS))
            with contextlib.suppress(ValueError):  # an earlier mutation left the segment undecodable
                parts[j] = _recode(parts[j], how)
            token = ".".join(parts)
        elif kind == "segments" and len(parts) == 3:
            games: list[Callable[[list[str]], str]] = [
                lambda p: ".".join(p[:2]) + ".",
                lambda p: ".".join(p[:2]),
                lambda p: ".".join([*p, p[-1]]),
                lambda p: "." + ".".join(p[1:]),
                lambda p: ".".join([p[1], p[0], *p[2:]]),
                lambda p: "..".join(p),
                lambda p: ".".join(p) + ".",
                lambda p: "",
            ]
            token = draw(st.sampled_from(games))(parts)
        elif kind == "alg" and len(parts) == 3:
            alg = draw(st.sampled_from([*ALGS, "missing"]))
            header = _header(kid=K1) if alg == "missing" else _header(alg=alg, kid=K1)
            token = ".".join([header, parts[1], draw(st.sampled_from([parts[2], ""]))])
        elif kind == "hs256-with-public-key" and len(parts) == 3:
            # Key confusion: HMAC keyed with the verifier's public key, which anyone can read in the JWKS.
            public = KEYS.k1.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            signing_input = f"{_header(alg='HS256', kid=K1)}.{parts[1]}"
            mac = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
            token = f"{signing_input}.{b64url(mac)}"
        elif kind == "forged" and len(parts) == 3:
            signing_input = f"{parts[0]}.{parts[1]}"
            token = f"{signing_input}.{b64url(es256(KEYS.outsider, signing_input.encode()))}"
        elif kind == "unknown-kid":
            token = good_token(now, key=KEYS.outsider, kid=draw(st.sampled_from(["k3", "", "K1", "k1 ", "k1\u00e9"])))
        elif kind == "high-s" and len(parts) == 3:
            with contextlib.suppress(ValueError):  # an earlier mutation left the segment undecodable
                parts[2] = _high_s(parts[2])  # the same signature's other valid form: accepted by both
            token = ".".join(parts)
        elif kind == "signature-values" and len(parts) == 3:
            r = draw(st.sampled_from([0, 1, P256_ORDER, P256_ORDER - 1, 2**256 - 1]))
            s = draw(st.sampled_from([0, 1, P256_ORDER, 2**256 - 1]))
            token = ".".join([*parts[:2], b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))])
        elif kind == "splice" and len(parts) == 3:
            other = _segments(good_token(now, sub=OTHER_DEVICE))
            token = ".".join(
                draw(st.sampled_from([[other[0], parts[1], parts[2]], [parts[0], other[1], parts[2]], other]))
            )
        elif kind == "nul":
            token = token + "\0" + draw(st.sampled_from(["", "junk", "." + token]))
        elif kind == "client-id":
            client_id = draw(st.sampled_from([OTHER_DEVICE, DEVICE.upper(), DEVICE + "x", ""]))
    return token, now, client_id


@settings(max_examples=examples(1500, 15_000))
@given(attacker_tokens())
@example((good_token(EXHAUSTIVE_NOW) + "\0junk", EXHAUSTIVE_NOW, DEVICE)).via("a NUL ends the password for a plugin")
@example(("", EXHAUSTIVE_NOW, DEVICE)).via("no password")
def test_tokens_an_attacker_can_make_get_the_embedded_brokers_answer(
    world: World, case: tuple[str, float, str]
) -> None:
    token, now, client_id = case
    connect_both(world, token, now, client_id=client_id)


def _recoded_token(now: float, segment: int, how: str) -> str:
    parts = _segments(good_token(now))
    parts[segment] = _recode(parts[segment], how)
    return ".".join(parts)


@pytest.mark.parametrize(
    "segment,how,accepted",
    [
        (2, "padded", True),  # PyJWT takes `=` padding (some issuers pad): the plugin did not, now does
        (2, "over-padded", False),
        (2, "standard", None),  # `+` or `/` only where the signature has them
        (2, "non-canonical", False),  # one signature, one spelling: the plugin took the unused bits, now refuses
        (2, "wrapped", False),
    ],
)
def test_signature_spellings(world: World, segment: int, how: str, accepted: bool | None) -> None:
    """Found by the differential test: the plugin refused padded segments and accepted non-canonical ones."""
    for micros in (0, 1, 500_000):
        now = exact_now(BASE_NOW, micros)
        token = _recoded_token(now, segment, how)
        connect_both(world, token, now)
        if accepted is not None:
            assert (world.harness.connect(DEVICE, DEVICE, token.encode(), now).outcome == "accepted") is accepted


def test_a_high_s_signature_is_accepted_by_both(world: World) -> None:
    """ECDSA's other valid form of the same signature: neither side insists on low S, as PyJWT does not."""
    parts = _segments(good_token(EXHAUSTIVE_NOW))
    token = ".".join([*parts[:2], _high_s(parts[2])])
    connect_both(world, token, EXHAUSTIVE_NOW)
    assert world.harness.connect(DEVICE, DEVICE, token.encode(), EXHAUSTIVE_NOW).outcome == "accepted"


# --- tokens only the key holder can make: any header, any claims, JSON at its edges ------------------------

TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=12)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8
)

LEVELS = ["a", "b", "devices", DEVICE, "", "+", "#", "$SYS", "$share", "$x", "g", "é", "𝄞", "a+", "#a", "+b", " "]
FILTERS = st.lists(st.sampled_from(LEVELS), min_size=1, max_size=5).map("/".join)
TOPICS = st.lists(
    st.sampled_from([lv for lv in LEVELS if "+" not in lv and "#" not in lv]), min_size=1, max_size=5
).map("/".join)


def _time_values(now: float) -> st.SearchStrategy[Any]:
    second = math.floor(now)
    return st.one_of(
        st.integers(-3, 3).map(lambda d: second + d),
        st.sampled_from([-1.0, -0.5, -1e-6, 0.0, 1e-6, 0.5, 1.0]).map(lambda d: now + d),
        st.sampled_from([0, -1, 10**18, -(10**18), 10**19, 2**63, 1e300, -1e300, 1.5, True, False]),
        st.sampled_from([str(second + 100), str(second - 100), "abc", " 5 ", "1_000", "", "1e3", "१२"]),
        st.sampled_from([None, [], {}, [second + 100]]),
        JSON_VALUES,
    )


AUDIENCES = st.sampled_from(
    [
        AUDIENCE,
        [AUDIENCE],
        ["x", AUDIENCE],
        ["x"],
        [],
        "",
        0,
        1,
        0.0,
        True,
        False,
        {},
        {"a": 1},
        [AUDIENCE, 1],
        "other",
        None,
    ]
)
# A token's gen: whole numbers at least 0 (floats too, 2.0 is 2), and what is not one.
GENS = st.one_of(
    st.integers(0, 4),
    st.sampled_from([10**6, 2**53 + 1, 2**63, 10**30, -1, -(2**63), 0.0, -0.0, 1.0, 2.0, 3.0, 1.5, 2.5, 1e-300]),
    st.sampled_from([-1e-300, 1e300, -1e300, True, False, "2", "", [], {}, [2]]),
    JSON_VALUES,
)
ISSUERS = st.sampled_from([ISSUER, "other", 1, None, [ISSUER], ISSUER.upper(), ""])
SUBJECTS = st.sampled_from([DEVICE, OTHER_DEVICE, REVOKED, "", 1, None, [DEVICE], DEVICE.upper(), DEVICE + " "])
ACLS = st.one_of(
    st.fixed_dictionaries({}, optional={"pub": st.lists(FILTERS, max_size=3), "sub": st.lists(FILTERS, max_size=3)}),
    st.fixed_dictionaries({"pub": st.one_of(JSON_VALUES, st.lists(FILTERS)), "sub": st.lists(FILTERS, max_size=2)}),
    JSON_VALUES,
)
ABSENT = object()


def _member(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A member's value, or ABSENT (left out), or null."""
    return st.one_of(values, st.just(ABSENT), st.none())


# Raw edits of a JSON object's text: what json.dumps never writes.
RAW_EDITS: list[tuple[str, Callable[[str], str]]] = [
    ("duplicate sub", lambda t: t[:-1] + f', "sub": "{OTHER_DEVICE}"}}'),
    ("duplicate alg", lambda t: t[:-1] + ', "alg": "none"}'),
    ("duplicate acl", lambda t: t[:-1] + ', "acl": {"pub": ["#"], "sub": ["#"]}}'),
    ("trailing garbage", lambda t: t + "x"),
    ("trailing object", lambda t: t + "{}"),
    ("BOM", lambda t: "\ufeff" + t),
    ("form feed", lambda t: "\f" + t),
    ("vertical tab", lambda t: t + "\v"),
    ("CR LF tab", lambda t: "\r\n\t" + t + " "),
    ("control char in a string", lambda t: t[:-1] + ', "x": "a\x01b"}'),
    ("raw tab in a string", lambda t: t[:-1] + ', "x": "a\tb"}'),
    ("NaN", lambda t: t[:-1] + ', "x": NaN}'),
    ("-Infinity", lambda t: t[:-1] + ', "x": -Infinity}'),
    ("leading zero", lambda t: t[:-1] + ', "x": 01}'),
    ("plus sign", lambda t: t[:-1] + ', "x": +1}'),
    ("bare fraction", lambda t: t[:-1] + ', "x": .5}'),
    ("trailing dot", lambda t: t[:-1] + ', "x": 1.}'),
    ("exponent", lambda t: t[:-1] + ', "x": 1E+2}'),
    ("negative zero", lambda t: t[:-1] + ', "x": -0.0e-0}'),
    ("63-digit number", lambda t: t[:-1] + ', "x": ' + "9" * 63 + "}"),
    ("64-digit number", lambda t: t[:-1] + ', "x": ' + "9" * 64 + "}"),
    ("huge exp", lambda t: t[:-1] + ', "exp": 1' + "0" * 400 + "}"),
    ("1e400 iat", lambda t: t[:-1] + ', "iat": 1e400}'),
    ("1e400 gen", lambda t: t[:-1] + ', "gen": 1e400}'),
    ("2e0 gen", lambda t: t[:-1] + ', "gen": 2e0}'),
    ("lone surrogate", lambda t: t[:-1] + ', "x": "\\ud800"}'),
    ("surrogate pair", lambda t: t[:-1] + ', "x": "\\ud834\\udd1e"}'),
    ("NUL escape", lambda t: t[:-1] + ', "x": "a\\u0000b"}'),
    ("escaped backslash then u0000", lambda t: t[:-1] + ', "x": "a\\\\u0000b"}'),
    ("NUL escape in sub", lambda t: t[:-1] + f', "sub": "{DEVICE}\\u0000x"}}'),
    ("escaped slash", lambda t: t[:-1] + ', "x": "a\\/b"}'),
    ("bad escape", lambda t: t[:-1] + ', "x": "\\x41"}'),
    ("trailing comma", lambda t: t[:-1] + ",}"),
    ("single quotes", lambda t: t[:-1] + ", 'x': 1}"),
    ("deep nesting 400", lambda t: t[:-1] + ', "x": ' + "[" * 400 + "]" * 400 + "}"),
    ("deep nesting 3000", lambda t: t[:-1] + ', "x": ' + "[" * 3000 + "]" * 3000 + "}"),
    ("huge string", lambda t: t[:-1] + ', "x": "' + "a" * 20000 + '"}'),
    ("not an object", lambda t: "[" + t + "]"),
    ("a string", lambda t: json.dumps(t)),
]


def _one_in(n: int, draw: st.DrawFn) -> bool:
    """True about once in n + 1 draws, and never on Hypothesis's all-zero (simplest) data: the plain case."""
    return draw(st.integers(0, n)) == n


def _json_text(obj: dict[str, Any], draw: st.DrawFn) -> bytes:
    text = json.dumps(
        obj,
        ensure_ascii=draw(st.booleans()),
        separators=draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")])),
    )
    if _one_in(5, draw):
        _name, edit = draw(st.sampled_from(RAW_EDITS))
        text = edit(text)
    encoding = "utf-8"
    if _one_in(19, draw):
        encoding = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32", "utf-8-sig"]))
    return text.encode(encoding)


def _edit(obj: dict[str, Any], name: str, value: Any) -> None:
    if value is ABSENT:
        obj.pop(name, None)
    else:
        obj[name] = value


@st.composite
def signed_tokens(draw: st.DrawFn) -> tuple[str, float, str]:
    """(token, now, username): any header and claims, signed by a key of the JWKS (or not)."""
    now = draw(NOWS)
    header: dict[str, Any] = {"alg": "ES256", "typ": "JWT", "kid": K1}
    for name, values in [
        ("alg", st.sampled_from(["ES256", *ALGS])),
        ("kid", st.sampled_from([K1, K2, "k3", "", 1, None, [K1]])),
        ("typ", st.sampled_from(["JWT", "at+jwt", 1])),
        ("crit", st.sampled_from([["b64"], [], ["exp"], "b64", [1], ["b64", "b64"]])),
        ("b64", st.sampled_from([False, True, 0, "false"])),
        ("jku", st.just("https://evil.example/jwks")),
    ]:
        if _one_in(7, draw):
            _edit(header, name, draw(_member(values)))
    username = draw(st.sampled_from([DEVICE] * 6 + [REVOKED, OTHER_DEVICE]))
    claims = good_claims(now, username)
    edits: dict[str, st.SearchStrategy[Any]] = {
        "iat": _time_values(now),
        "nbf": _time_values(now),
        "exp": _time_values(now),
        "iss": ISSUERS,
        "aud": AUDIENCES,
        "sub": SUBJECTS,
        "jti": st.sampled_from(["j", 1, [], ""]),
        "acl": ACLS,
        "tenant": JSON_VALUES,
        "gen": GENS,
    }
    # Few edits at a time (shrinking towards none): most tokens fail or pass on one claim.
    for name in draw(st.lists(st.sampled_from(sorted(edits)), max_size=3, unique=True)):
        _edit(claims, name, draw(_member(edits[name])))
    header_raw, claims_raw = _json_text(header, draw), _json_text(claims, draw)
    kid = header.get("kid")
    key = {K1: KEYS.k1, K2: KEYS.k2}.get(kid, KEYS.k1) if isinstance(kid, str) else KEYS.k1
    if _one_in(9, draw):
        key = draw(st.sampled_from([KEYS.k1, KEYS.k2, KEYS.outsider]))
    if header.get("b64") is False and draw(st.booleans()):  # RFC 7797's detached form: an empty payload segment
        signing_input = f"{b64url(header_raw)}."
        return f"{signing_input}.{b64url(es256(key, signing_input.encode()))}", now, username
    pad = (_one_in(7, draw), _one_in(7, draw), _one_in(7, draw))
    return jws(key, header_raw, claims_raw, pad=pad), now, username


def _signed(now: float, header: dict[str, Any], claims: dict[str, Any] | str) -> tuple[str, float, str]:
    payload = claims if isinstance(claims, str) else json.dumps(claims)
    return jws(KEYS.k1, json.dumps(header).encode(), payload.encode()), now, DEVICE


_EX_NOW = EXHAUSTIVE_NOW
_EX_HEADER = {"alg": "ES256", "typ": "JWT", "kid": K1}
_EX_CLAIMS = json.dumps(good_claims(_EX_NOW))


@settings(max_examples=examples(1500, 15_000))
@given(signed_tokens())
# Found by this test, now explicit: the C side read the first of duplicate members, Python keeps the last.
@example(_signed(_EX_NOW, _EX_HEADER, _EX_CLAIMS[:-1] + f', "sub": "{OTHER_DEVICE}"}}')).via("duplicate sub")
@example(_signed(_EX_NOW, _EX_HEADER, _EX_CLAIMS[:-1] + ', "acl": {"pub": ["#"], "sub": ["#"]}}')).via("duplicate acl")
# Found: cJSON took trailing data, whitespace bytes below 0x20, control characters in strings, `01` and `1.`
# (`+1` it refuses itself: kept as a guard).
@example(_signed(_EX_NOW, _EX_HEADER, _EX_CLAIMS + "x")).via("trailing garbage")
@example(_signed(_EX_NOW, _EX_HEADER, "\f" + _EX_CLAIMS)).via("form feed")
@example(_signed(_EX_NOW, _EX_HEADER, _EX_CLAIMS[:-1] + ', "x": "a\x01b"}')).via("control character")
@example(_signed(_EX_NOW, _EX_HEADER, _EX_CLAIMS[:-1] + ', "x": 01}')).via("leading zero")
@example(_signed(_EX_NOW, _EX_HEADER, _EX_CLAIMS[:-1] + ', "x": 1.}')).via("trailing dot")
@example(_signed(_EX_NOW, _EX_HEADER, _EX_CLAIMS[:-1] + ', "x": +1}')).via("plus sign")
# Found: cJSON took bytes that are not UTF-8 (Python decodes the whole text first).
@example(
    (jws(KEYS.k1, json.dumps(_EX_HEADER).encode(), _EX_CLAIMS[:-1].encode() + b', "x": "\xff"}'), _EX_NOW, DEVICE)
).via("not UTF-8")
# Found: a kid that is not a string is "not a JWT" for PyJWT; an escaped backslash before u0000 is no NUL.
@example(_signed(_EX_NOW, {**_EX_HEADER, "kid": 1}, _EX_CLAIMS)).via("kid a number")
@example(_signed(_EX_NOW, _EX_HEADER, _EX_CLAIMS[:-1] + ', "x": "a\\\\u0000b"}')).via("escaped backslash")
# Found: a boolean iat/nbf is int() 1 or 0 for PyJWT (accepted); `crit: ["b64"]` with b64 true is accepted.
@example(_signed(_EX_NOW, _EX_HEADER, {**good_claims(_EX_NOW), "iat": True})).via("boolean iat")
@example(_signed(_EX_NOW, {**_EX_HEADER, "crit": ["b64"], "b64": True}, _EX_CLAIMS)).via("crit b64")
# Found: reasons in PyJWT's order (acl.sub before acl.pub, a bad iat/nbf is "token invalid").
@example(_signed(_EX_NOW, _EX_HEADER, {**good_claims(_EX_NOW), "acl": {"pub": ["#/a"], "sub": ["+a"]}})).via(
    "acl order"
)
@example(_signed(_EX_NOW, _EX_HEADER, {**good_claims(_EX_NOW), "nbf": []})).via("nbf a list")
def test_tokens_the_key_holder_can_make_get_the_embedded_brokers_answer(
    world: World, case: tuple[str, float, str]
) -> None:
    token, now, username = case
    connect_both(world, token, now, username=username)


def test_a_deliberate_difference_is_one_the_plugin_refuses(world: World) -> None:
    """The exceptions `connect_both` allows are real: the reference accepts these, the plugin refuses them."""
    now = EXHAUSTIVE_NOW
    for token in [
        _signed(now, _EX_HEADER, _EX_CLAIMS[:-1] + ', "x": NaN}')[0],
        _signed(now, _EX_HEADER, _EX_CLAIMS[:-1] + ', "x": "a\\u0000b"}')[0],
        _signed(now, _EX_HEADER, {**good_claims(now), "iat": str(math.floor(now))})[0],
        jws(KEYS.k1, json.dumps(_EX_HEADER).encode("utf-16"), _EX_CLAIMS.encode()),
    ]:
        assert reference_connect(world.auth, DEVICE, DEVICE, token, now).outcome == "accepted"
        assert deliberate_difference(token) is not None
        assert world.harness.connect(DEVICE, DEVICE, token.encode(), now).outcome == "refused"


# The `gen` member as written in the claims' JSON (None: absent), against DEVICE's older credentials (below
# GENERATION refused), OTHER_DEVICE's expired ones and REVOKED: the same answer, the same reason, in the same
# order of checks (broker/acl.py `device_grant`: after the acl object and exp, before acl.sub and acl.pub).
GEN_TEXTS: list[str | None] = [
    None,
    "0",
    "1",
    "2",
    "3",
    "1000000",
    "-1",
    "-0",
    "-0.0",
    "1.5",
    "1.0",
    "2.0",
    "2e0",
    "0.2e1",
    "1.9999999999999999",  # 2.0 as a double, on both sides
    "1.999999999999999",
    "1e-400",  # 0.0
    "1e308",
    "1e400",
    "-1e400",
    "9" * 63,
    "true",
    "false",
    "null",
    '"2"',
    '""',
    "[]",
    "{}",
    "[2]",
]


@pytest.mark.parametrize("gen", GEN_TEXTS)
def test_token_generations_against_older_credentials(world: World, gen: str | None) -> None:
    now = EXHAUSTIVE_NOW
    for username in (DEVICE, OTHER_DEVICE, REVOKED):
        for acl_object in (
            {"pub": [f"devices/{username}/#"], "sub": []},
            {"pub": [], "sub": ["#/a"]},  # not a filter: refused after gen
            "no acl object",  # refused before gen
        ):
            claims = good_claims(now, username, gen=None)
            claims["acl"] = acl_object
            text = json.dumps(claims)
            if gen is not None:
                text = text[:-1] + f', "gen": {gen}}}'
            connect_both(world, _signed(now, _EX_HEADER, text)[0], now, username=username)
    token = _signed(now, _EX_HEADER, json.dumps(good_claims(now, gen=None))[:-1] + f', "gen": {gen or 0}}}')[0]
    plugin = world.harness.connect(DEVICE, DEVICE, token.encode(), now)
    if plugin.outcome == "accepted":  # DEVICE's token: only at GENERATION or above
        assert plugin.generation is not None and plugin.generation >= GENERATION


# --- ACL decisions, topics and filters ---------------------------------------------------------------------

ACCESS: dict[Access, acl.Access] = {
    "write": acl.Access.PUBLISH,
    "read": acl.Access.RECEIVE,
    "subscribe": acl.Access.SUBSCRIBE,
}


@settings(max_examples=examples(2000, 20_000))
@given(
    acl_object=ACLS,
    access=st.sampled_from(sorted(ACCESS)),
    topic=st.one_of(TOPICS, FILTERS),
    exp_offset=st.sampled_from([-1, 0, 1, 3600]),
    denied_offset=st.sampled_from([None, -1, 0, 1]),
)
def test_acl_checks_of_a_device_session(
    world: World, acl_object: Any, access: Access, topic: str, exp_offset: int, denied_offset: int | None
) -> None:
    now = BASE_NOW
    exp, denied_until = now + exp_offset, 0 if denied_offset is None else now + denied_offset
    plugin = world.harness.acl(
        json.dumps(acl_object), exp=exp, denied_until=denied_until, access=access, topic=topic, now=now
    )
    try:
        grant = acl.device_grant(DEVICE, {"acl": acl_object, "exp": exp})
    except ConnectRefused:
        assert plugin is None, "the plugin took an acl object the embedded broker refuses"
        return
    expected = grant.permits(ACCESS[access], topic, now) and not now < denied_until
    assert plugin is expected, (acl_object, access, topic)


@settings(max_examples=examples(3000, 30_000))
@given(a=st.one_of(FILTERS, TOPICS), b=st.one_of(TOPICS, FILTERS))
@example(a="a/+", b="a/b/c").via("+ is one level")
@example(a="+/+", b="/").via("empty levels")
@example(a="a/#", b="a").via("# matches the parent")
@example(a="#", b="$SYS/x").via("$ topics escape wildcards")
@example(a="$share/g/a/#", b="$share/g/a/b").via("shared")
@example(a="$share/+/a/#", b="$share/g/a/b").via("shared, any group")
def test_topic_matching_filter_coverage_and_filter_validity(world: World, a: str, b: str) -> None:
    h = world.harness
    assert h.topic_matches(a, b) is topics.topic_matches(a, b), ("topic_matches", a, b)
    assert h.filter_covers(a, b) is acl.filter_covers(a, b), ("filter_covers", a, b)
    assert h.is_valid_filter(a) is topics.is_valid_filter(a), ("is_valid_filter", a)


def test_every_pair_of_short_filters(world: World) -> None:
    """All filters of up to three levels over a small alphabet, each against each: no sampling gaps there."""
    levels = ["a", "", "+", "#", "$s", "$share", "g"]
    filters = ["/".join(p) for n in (1, 2, 3) for p in itertools.product(levels, repeat=n)]
    pairs = list(itertools.product(filters, filters))
    covers = world.harness.many_filter_covers(pairs)
    assert [pair for pair, c in zip(pairs, covers, strict=True) if c is not acl.filter_covers(*pair)] == []
    named = [(f, t) for f, t in pairs if "+" not in t and "#" not in t]
    matches = world.harness.many_topic_matches(named)
    assert [pair for pair, m in zip(named, matches, strict=True) if m is not topics.topic_matches(*pair)] == []


# --- the JWKS and denylist files ---------------------------------------------------------------------------


def replace_file(path: Path, content: bytes | None) -> None:
    """New content under a new inode (as the bridge writes: rename), so both sides see a change; None removes it."""
    if content is None:
        path.unlink(missing_ok=True)
        return
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(content)
    os.replace(temporary, path)


def _good_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    return dict(jwk(key.public_key(), kid))


_OFF_CURVE_Y = b64url(
    (int.from_bytes(base64.urlsafe_b64decode(_good_jwk(KEYS.k1, K1)["y"] + "="), "big") ^ 1).to_bytes(32, "big")
)


JWK_VALUES: list[Any] = ["", "EC", "RSA", "P-256", "P-384", "ES256", "ES384", "sig", "enc", 1, True, [], "k1", "secret"]


@st.composite
def jwk_entries(draw: st.DrawFn) -> Any:
    entry: Any = _good_jwk(
        draw(st.sampled_from([KEYS.k1, KEYS.k2, KEYS.outsider])), draw(st.sampled_from([K1, K2, "k3"]))
    )
    if _one_in(2, draw):
        name = draw(st.sampled_from(["kid", "kty", "crv", "alg", "use", "d", "x", "y"]))
        value = draw(
            _member(
                st.sampled_from([*JWK_VALUES, b64url(bytes(31)), b64url(bytes(33)), b64url(bytes(32)), _OFF_CURVE_Y])
            )
        )
        if value is ABSENT:
            entry.pop(name, None)
        else:
            entry[name] = value
    if _one_in(9, draw):
        entry = draw(JSON_VALUES)
    return entry


JWKS_DOCUMENTS = st.one_of(
    st.lists(jwk_entries(), max_size=4).map(lambda keys: json.dumps({"keys": keys}).encode()),
    st.sampled_from([b"", b"{", b"[]", b'{"keys": {}}', b'{"keys": null}', b'{"keys": []} x', b"\xff", b"null"]),
    st.none(),  # the file removed
)


@pytest.fixture(scope="module")
def files_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PluginHarness, Path]]:
    """A harness of its own for the file tests, which reconfigure the plugin for every example."""
    harness = PluginHarness(harness_path())
    yield harness, tmp_path_factory.mktemp("jwt-files")
    harness.close()


@settings(max_examples=examples(300, 3000))
@given(document=JWKS_DOCUMENTS)
@example(document=b'{"keys": []} x').via("trailing data: the last good keys stay (the C side dropped all keys)")
@example(document=None).via("a missing JWKS: no key, on both sides")
def test_jwks_files_give_the_same_keys(files_harness: tuple[PluginHarness, Path], document: bytes | None) -> None:
    """After a good JWKS, the generated one: the same usable kids on both sides (the last good ones when the
    new file cannot be parsed, as broker/watched.py keeps them)."""
    harness, folder = files_harness
    jwks_file = folder / "jwks.json"
    good = json.dumps({"keys": [_good_jwk(KEYS.k2, K2)]}).encode()
    replace_file(jwks_file, good)
    watched: WatchedFile[Any] = WatchedFile(jwks_file, parse_jwks, {})
    harness.configure(jwks_file=jwks_file, denylist_file=folder / "none", audience=AUDIENCE, issuer=ISSUER)
    assert harness.refresh() == list(watched.get()) == [K2]
    replace_file(jwks_file, document)
    assert harness.refresh() == list(watched.get()), document


# --- device certificates: the scope extension and the CONNECT over a certificate -----------------------------
#
# broker/certificates.py is the reference. The deliberate differences are the JSON ones above (strict_json);
# and where Python's parser meets a duplicate member before finding that the text is not JSON at all, Python
# says "has a member twice" and the plugin, which parses first, "is not JSON": both refuse.

SCOPE_MEMBERS = st.lists(st.one_of(FILTERS, TEXT), max_size=3)


def _der_utf8string(body: bytes, form: str) -> bytes:
    """A UTF8String of `body` in DER, or a near miss of it (`form`)."""
    if form == "long":
        return bytes([0x0C, 0x83]) + len(body).to_bytes(3, "big") + body  # a non-minimal length
    size = len(body)
    length = bytes([size]) if size < 0x80 else bytes([0x80 | 2]) + size.to_bytes(2, "big")
    if 0x80 <= size < 0x100:
        length = bytes([0x81, size])
    der = bytes([0x0C]) + length + body
    if form == "octet string":
        return b"\x04" + der[1:]
    if form == "trailing byte":
        return der + b"\x00"
    if form == "truncated":
        return der[:-1]
    return der


@st.composite
def scope_values(draw: st.DrawFn) -> bytes:
    obj = draw(
        st.one_of(
            st.fixed_dictionaries({"pub": SCOPE_MEMBERS, "sub": SCOPE_MEMBERS}),
            st.dictionaries(
                st.sampled_from(["pub", "sub", "ver", ""]), st.one_of(SCOPE_MEMBERS, JSON_VALUES), max_size=3
            ),
            JSON_VALUES,
        )
    )
    text = json.dumps(
        obj, ensure_ascii=draw(st.booleans()), separators=draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    )
    if isinstance(obj, dict) and _one_in(4, draw):
        name = draw(st.sampled_from(["pub", "sub", "x"]))
        text = text[:-1] + ("," if obj else "") + f'"{name}": []}}'  # a member twice (or an extra one)
    if _one_in(5, draw):
        _name, edit = draw(st.sampled_from(RAW_EDITS))
        text = edit(text)
    body = text.encode("utf-8")
    if _one_in(9, draw):
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\x00", b"\x7f"])) + body[at:]
    form = (
        "der" if not _one_in(6, draw) else draw(st.sampled_from(["long", "octet string", "trailing byte", "truncated"]))
    )
    return _der_utf8string(body, form)


def reference_scope(der: bytes) -> tuple[str, str]:
    try:
        scope = checked_scope(scope_of_value(der))
    except InvalidCertificate as exc:
        return "refused", str(exc)
    return "accepted", json.dumps({"pub": list(scope.publish), "sub": list(scope.subscribe)})


def _plain_json(text: bytes) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


@settings(max_examples=examples(1500, 15_000))
@given(scope_values())
@example(_der_utf8string(b'{"pub":["devices/x/#"],"sub":[]}', "der")).via("a scope")
@example(_der_utf8string(b'{"pub":[],"pub":["#"],"sub":[]}', "der")).via("a member twice")
@example(_der_utf8string(b'{"pub":[{"a":1,"a":2}],"sub":[]}', "der")).via("a member twice, nested")
@example(_der_utf8string(b'{"pub":["a/#/b"],"sub":[]}', "der")).via("not a filter")
@example(_der_utf8string(b'{"pub":[],"sub":[]}', "long")).via("non-minimal length")
@example(_der_utf8string(b"x" * 200, "der")).via("long form length")
@example(b"\x0c").via("no length")
def test_certificate_scopes_get_the_embedded_brokers_answer(world: World, der: bytes) -> None:
    plugin, ref = world.harness.scope_value(der), reference_scope(der)
    context = f"scope value {der!r}: plugin {plugin}, reference {ref}"
    try:
        body = scope_of_value_text(der)
    except InvalidCertificate:
        body = None
    if body is not None and not strict_json(body):
        assert plugin[0] == "refused", f"JSON the plugin does not read: it must refuse; {context}"
        return
    if ref[1].endswith("has a member twice") and plugin[1].endswith("is not JSON") and body is not None:
        assert not _plain_json(body), context
        return
    if plugin[0] == ref[0] == "accepted":
        assert json.loads(plugin[1]) == json.loads(ref[1]), context
        return
    assert plugin == ref, context


def scope_of_value_text(der: bytes) -> bytes:
    """The UTF-8 text inside a well-formed DER UTF8String (InvalidCertificate when it is not one)."""
    return broker.certificates._text_of_utf8string(der).encode("utf-8")  # the reference's own unwrapping


def _device_certificate(
    device_id: str,
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
    not_after: datetime,
    names: int = 1,
    serial: int | None = None,
) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, device_id)] * names
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test device CA")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number() if serial is None else serial)
        .not_valid_before(datetime.fromtimestamp(BASE_NOW - 3600, UTC))
        .not_valid_after(not_after)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


_GOOD_SCOPE = _der_utf8string(f'{{"pub":["devices/{DEVICE}/#"],"sub":["devices/{DEVICE}/#"]}}'.encode(), "der")


def reference_certificate(
    auth: Authenticator, der: bytes, username: str | None, client_id: str, now: float
) -> tuple[str, str, acl.Grant | None]:
    """The embedded broker's answer to a CONNECT over this certificate: (outcome, reason, grant)."""
    with frozen_time(now):
        try:
            grant = auth.authenticate_certificate(client_id=client_id, username=username, certificate=der)
        except ConnectRefused as exc:
            return "refused", exc.reason, None
    return "accepted", "", grant


@settings(max_examples=examples(150, 1500))
@given(
    cn=st.sampled_from([DEVICE, REVOKED, OTHER_DEVICE, "dev_short", "device", DEVICE.upper()]),
    names=st.sampled_from([1, 1, 1, 2]),
    username=st.sampled_from([None, DEVICE, REVOKED, OTHER_DEVICE, "provision"]),
    same_client_id=st.booleans(),
    scope=st.one_of(st.just(_GOOD_SCOPE), st.just(None), scope_values()),
    expiry=st.sampled_from([-1, 0, 1, 3600]),
    serial=st.sampled_from([None, None, LISTED_SERIAL, UPPER_SERIAL, OTHER_SERIAL]),
)
def test_certificate_connects_get_the_embedded_brokers_answer(
    world: World,
    cn: str,
    names: int,
    username: str | None,
    same_client_id: bool,
    scope: bytes | None,
    expiry: int,
    serial: int | None,
) -> None:
    now = float(BASE_NOW)
    not_after = datetime.fromtimestamp(BASE_NOW + expiry, UTC)
    extensions = [] if scope is None else [(x509.UnrecognizedExtension(SCOPE_OID, scope), False)]
    der = _device_certificate(cn, extensions, not_after, names, serial)
    client_id = (username or cn) if same_client_id else OTHER_DEVICE + "x"
    plugin = world.harness.connect_certificate(der, username or "", client_id, now)
    outcome, reason, grant = reference_certificate(world.auth, der, username, client_id, now)
    context = (
        f"certificate {serial} for {cn} x{names}, {username}/{client_id}, scope {scope!r}: plugin {plugin}, "
        f"reference {outcome} {reason!r}"
    )
    if scope is not None and world.harness.scope_value(scope) != reference_scope(scope) and plugin.outcome == "refused":
        return  # a deliberate difference in reading the scope: the scope test above holds it to its rules
    assert (plugin.outcome, plugin.reason) == (outcome, reason), context
    if grant is not None:
        assert (plugin.device_id, plugin.not_after) == (cn, BASE_NOW + expiry), context
        assert plugin.scope_json is not None and plugin.denied_until is not None
        assert json.loads(plugin.scope_json) == {"pub": list(grant.publish), "sub": list(grant.subscribe)}, context
        assert plugin.serial == grant.certificate_serial, context
        assert not now < plugin.denied_until, context


def test_a_certificate_whose_serial_is_listed_is_refused_by_both(world: World) -> None:
    """DEVICE's older credentials list LISTED_SERIAL (BN_bn2hex "0F00BA12", Python "f00ba12"): refused; another
    serial, or one listed only in upper case, is accepted. REVOKED's certificates are all refused."""
    now = float(BASE_NOW)
    not_after = datetime.fromtimestamp(BASE_NOW + 3600, UTC)
    scope = [(x509.UnrecognizedExtension(SCOPE_OID, _GOOD_SCOPE), False)]
    for device, serial, expected in [
        (DEVICE, LISTED_SERIAL, "refused"),
        (DEVICE, UPPER_SERIAL, "accepted"),
        (DEVICE, OTHER_SERIAL, "accepted"),
        (DEVICE, None, "accepted"),
        (OTHER_DEVICE, OTHER_SERIAL, "accepted"),  # listed, but its entry has expired
        (REVOKED, OTHER_SERIAL, "refused"),
    ]:
        der = _device_certificate(device, scope, not_after, serial=serial)
        plugin = world.harness.connect_certificate(der, device, device, now)
        outcome, reason, grant = reference_certificate(world.auth, der, device, device, now)
        expected_reason = "device is revoked" if expected == "refused" else ""
        assert (plugin.outcome, plugin.reason) == (outcome, reason) == (expected, expected_reason), (device, serial)
        if grant is not None:
            assert plugin.serial == grant.certificate_serial, (device, serial)
            assert serial is None or plugin.serial == format(serial, "x"), (device, serial)


# --- the denylist: files, older credentials, live sessions -------------------------------------------------

UNTILS = st.one_of(st.integers(-2, 2).map(lambda d: BASE_NOW + d), st.sampled_from([0, 2**62, -(2**62)]))
# Not whole numbers for broker/denylist.py. No 1.0: cJSON cannot tell it from 1 (see the module doc).
NOT_WHOLE: list[Any] = [1.5, -0.5, True, False, "1", "", None, [], {}, [1]]
SERIAL_TEXTS = [format(LISTED_SERIAL, "x"), format(LISTED_SERIAL, "08x"), format(UPPER_SERIAL, "X"), "", "é"]


@st.composite
def older_entries(draw: st.DrawFn) -> Any:
    """An older_credentials entry: well formed, or with one member wrong, missing or extra; or not an object."""
    entry: dict[str, Any] = {"generation": draw(st.integers(0, 3)), "until": draw(UNTILS)}
    if draw(st.booleans()):
        entry["certificates"] = draw(st.lists(st.sampled_from(SERIAL_TEXTS), max_size=3))
    if _one_in(3, draw):
        name = draw(st.sampled_from(["generation", "until", "certificates", "note"]))
        wrong = st.sampled_from([*NOT_WHOLE, -1, BASE_NOW, "abc", [None], ["a", 2], {"a": "b"}, [["a"]]])
        _edit(entry, name, draw(_member(wrong)))
    if _one_in(15, draw):
        return draw(st.sampled_from([None, [], "x", 1, True]))
    return entry


@st.composite
def denylist_documents(draw: st.DrawFn) -> bytes:
    """A v2 denylist: "devices", and "older_credentials" present, absent or not an object."""
    ids = st.sampled_from([DEVICE, OTHER_DEVICE, "dev_x"])
    document: dict[str, Any] = {"devices": draw(st.dictionaries(ids, UNTILS, max_size=2))}
    older = draw(st.dictionaries(ids, older_entries(), max_size=2))
    form = draw(st.sampled_from(["present", "present", "present", "absent", "wrong"]))
    if form == "present":
        document["older_credentials"] = older
    elif form == "wrong":
        document["older_credentials"] = draw(st.sampled_from([None, [], [older], "x", 0]))
    return json.dumps(document).encode()


def _raw(text: str) -> bytes:
    """A document json.dumps never writes (a member twice, say): D is DEVICE, N a time ahead of any now."""
    return text.replace("D", DEVICE).replace("N", str(BASE_NOW + 100)).encode()


DENYLISTS = st.one_of(
    st.dictionaries(st.sampled_from([DEVICE, OTHER_DEVICE, "dev_x"]), UNTILS, max_size=3).map(
        lambda devices: json.dumps({"devices": devices}).encode()
    ),
    denylist_documents(),
    st.sampled_from(
        [
            b'{"devices": {"%s": 1.5}}' % DEVICE.encode(),
            b'{"devices": {"%s": true}}' % DEVICE.encode(),
            b'{"devices": {"%s": "%d"}}' % (DEVICE.encode(), BASE_NOW + 100),
            b'{"devices": []}',
            b"{}",
            b"garbage",
            b'{"devices": {}} x',
            _raw('{"devices": {"D": 1e400}}'),  # infinity: no whole number (the plugin took it)
            _raw('{"devices": {"D": "x", "D": N}}'),  # the last of a repeated name counts (the plugin read all)
            _raw('{"devices": {"D": N, "D": "x"}}'),
            _raw('{"devices": {}, "older_credentials": {"D": {"generation": "x", "generation": 3, "until": N}}}'),
            _raw('{"devices": {}, "older_credentials": {"D": {"generation": 3, "until": N}, "D": 5}}'),
            _raw('{"devices": {}, "older_credentials": {"D": 5, "D": {"generation": 3, "until": N}}}'),
            _raw('{"devices": {}, "older_credentials": {"D": {"generation": 3, "until": N, "certificates": null}}}'),
            _raw('{"devices": {}, "older_credentials": {"D": {"generation": 1e400, "until": N}}}'),
            _raw('{"devices": {}, "older_credentials": {"D": {"generation": -0, "until": N}}}'),
            _raw('{"devices": {}, "older_credentials": {"D": {"until": N}}}'),
            _raw('{"devices": {}, "older_credentials": {"D": {"generation": 3}}}'),
            _raw('{"devices": {}, "older_credentials": {"D": {}}}'),
            _raw('{"devices": {}, "older_credentials": null}'),
            _raw('{"older_credentials": {}}'),
        ]
    ),
    st.none(),
)


def _files(folder: Path, harness: PluginHarness, denylist: bytes | None) -> Authenticator:
    """A JWKS (k1) and this denylist, a new plugin on them, and the embedded broker's Authenticator."""
    jwks_file, denylist_file = folder / "jwks.json", folder / "denylist.json"
    replace_file(jwks_file, json.dumps({"keys": [_good_jwk(KEYS.k1, K1)]}).encode())
    replace_file(denylist_file, denylist)
    harness.configure(jwks_file=jwks_file, denylist_file=denylist_file, audience=AUDIENCE, issuer=ISSUER)
    return Authenticator(
        AuthSettings(jwks_file=jwks_file, bridge_secret_file=folder / "none", denylist_file=denylist_file)
    )


_FAR = datetime.fromtimestamp(BASE_NOW + 10**7, UTC)
_SCOPED = [(x509.UnrecognizedExtension(SCOPE_OID, _GOOD_SCOPE), False)]
# DEVICE's certificates, by serial: one the generated files may list (in its two spellings), one never listed.
CERTIFICATES = {serial: _device_certificate(DEVICE, _SCOPED, _FAR, serial=serial) for serial in (LISTED_SERIAL, 7)}


@settings(max_examples=examples(200, 2000))
@given(document=DENYLISTS, micros=st.sampled_from([0, 500_000]), gen=st.sampled_from([None, 0, 1, 2, 3, 4]))
def test_denylist_files_refuse_the_same_credentials(
    files_harness: tuple[PluginHarness, Path], document: bytes | None, micros: int, gen: int | None
) -> None:
    """A denylist revoking DEVICE, then the generated one: a CONNECT of DEVICE's, with a token of generation
    `gen` or a certificate, gets the same answer on both sides (still refused when the new file cannot be
    parsed: a corrupt denylist must not un-revoke anyone)."""
    harness, folder = files_harness
    auth = _files(folder, harness, json.dumps({"devices": {DEVICE: BASE_NOW + 10**6}}).encode())
    now = exact_now(BASE_NOW, micros)
    token = good_token(now, gen=gen)
    for step in ("revoked", "generated"):
        if step == "generated":
            replace_file(folder / "denylist.json", document)
        plugin = harness.connect(DEVICE, DEVICE, token.encode(), now)
        ref = reference_connect(auth, DEVICE, DEVICE, token, now)
        assert (plugin.outcome, plugin.reason) == (ref.outcome, ref.reason), (step, document, plugin, ref)
        for der in CERTIFICATES.values():
            by_certificate = harness.connect_certificate(der, DEVICE, DEVICE, now)
            outcome, reason, _grant = reference_certificate(auth, der, DEVICE, DEVICE, now)
            assert (by_certificate.outcome, by_certificate.reason) == (outcome, reason), (step, document)
        if step == "revoked":
            assert plugin.reason == "device is revoked"


@settings(max_examples=examples(40, 400))
@given(documents=st.lists(DENYLISTS, min_size=1, max_size=3))
def test_live_sessions_are_judged_again_when_the_denylist_changes(
    files_harness: tuple[PluginHarness, Path], documents: list[bytes | None]
) -> None:
    """Sessions let in under an empty denylist (tokens of each generation, certificates), then each generated
    file in turn: every session's ACL check (the files re-read first, as on the broker's tick) says what the
    embedded broker's `is_revoked` says, and its denied_until agrees."""
    harness, folder = files_harness
    auth = _files(folder, harness, b'{"devices": {}}')
    now = BASE_NOW
    sessions: list[tuple[int, acl.Grant]] = []
    for gen in (None, 0, 1, 2, 3):
        token = good_token(now, gen=gen)
        plugin = harness.connect(DEVICE, DEVICE, token.encode(), now, keep=True)
        ref = reference_connect(auth, DEVICE, DEVICE, token, now)
        assert plugin.session is not None and ref.grant is not None, (plugin, ref)
        sessions.append((plugin.session, ref.grant))
    for der in CERTIFICATES.values():
        by_certificate = harness.connect_certificate(der, DEVICE, DEVICE, now, keep=True)
        _outcome, _reason, grant = reference_certificate(auth, der, DEVICE, DEVICE, now)
        assert by_certificate.session is not None and grant is not None, by_certificate
        sessions.append((by_certificate.session, grant))
    topic = f"devices/{DEVICE}/x"
    for document in documents:
        replace_file(folder / "denylist.json", document)
        for session, grant in sessions:
            allowed, denied_until = harness.session_acl(session, access="write", topic=topic, now=now)
            with frozen_time(now):
                refused = auth.is_revoked(grant, now)
            context = (document, grant.generation, grant.certificate_serial, allowed, denied_until)
            assert allowed is (not refused and grant.permits(acl.Access.PUBLISH, topic, now)), context
            assert (now < denied_until) is refused, context
    for session, _grant in sessions:
        harness.disconnect(session)


@pytest.mark.parametrize("document", [b"garbage", b'{"devices": {}, "older_credentials": []}'])
def test_a_denylist_never_read_refuses_nothing(files_harness: tuple[PluginHarness, Path], document: bytes) -> None:
    """A denylist file that was never valid: no last good content to keep, so nothing is refused, on both sides
    (and the plugin's empty tables are looked up without harm)."""
    harness, folder = files_harness
    auth = _files(folder, harness, document)
    now = float(BASE_NOW)
    token = good_token(now, gen=None)
    plugin = harness.connect(DEVICE, DEVICE, token.encode(), now)
    assert (plugin.outcome, plugin.denied_until) == ("accepted", 0)
    assert reference_connect(auth, DEVICE, DEVICE, token, now).outcome == "accepted"
    for der in CERTIFICATES.values():
        assert harness.connect_certificate(der, DEVICE, DEVICE, now).outcome == "accepted"
        assert reference_certificate(auth, der, DEVICE, DEVICE, now)[0] == "accepted"
