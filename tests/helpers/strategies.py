"""Hypothesis strategies for hostile input: claims, token refreshes, topics, admin CLI arguments.

Every strategy here produces input that MUST be refused, each paired with the documented answer it
must get (`Hostile.code`), so a property can insist on the exact code instead of "some error". Valid
claims are never generated: a generated claim that succeeded would be a test bug, not a finding.

Profiles: `short` (default, `make test`: a few hundred examples in all, derandomized so the gate is
repeatable) and `long` (`make test-long`, HYPOTHESIS_PROFILE=long: more than 10,000 examples across
tests/test_hostile_input.py, random, so every long run explores new input).
"""

import base64
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from provwire import crypto
from provwire.errors import ErrorCode

settings.register_profile(
    "short",
    deadline=None,  # two shared cores: wall-clock deadlines would only measure the neighbours
    database=None,  # no .hypothesis/ directory in the repository; failures print a reproduction blob
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("long", parent=settings.get_profile("short"), derandomize=False)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "short")
settings.load_profile(PROFILE)


def examples(short: int, long: int) -> int:
    """This test's share of the profile's examples."""
    return long if PROFILE == "long" else short


@dataclass(frozen=True)
class Hostile:
    """A payload and the answer it must get; `why` names the mutation in failure reports."""

    payload: bytes
    code: ErrorCode
    why: str
    field: str | None = None  # for validation_error: a field the errors must name ("" = the payload)
    reason: str = "validation_error"  # the `reason` of the rejection event ops get


VALIDATION = ErrorCode.VALIDATION_ERROR
DENIED = ErrorCode.PERMISSION_DENIED

# --- text --------------------------------------------------------------------------------------

# Characters that break naive code: NUL, controls, bidi overrides, zero-width and joiner, BOM, line and
# paragraph separators, lone surrogates, the last code point, DEL, NBSP, combining marks, JSON and MQTT
# metacharacters.
EDGE_CHARS = (
    "\x00",
    "\x1b",
    "\n",
    "\t",
    "\x7f",
    "\xa0",
    "\u202e",
    "\u2066",
    "\u200b",
    "\u200d",
    "\ufeff",
    "\u2028",
    "\u2029",
    "\ud800",
    "\udfff",
    "\U0010ffff",
    "\U0001d54f",
    "e\u0301",
    '"',
    "\\",
    "+",
    "#",
    "/",
    "%",
    "'",
)
NON_PRINTABLE = st.one_of(
    st.sampled_from([c for c in EDGE_CHARS if len(c) == 1 and not c.isprintable()]),
    st.characters(categories=["Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Zs"], exclude_characters=" "),
)
REQUEST_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"


def edge_text(min_size: int = 0, max_size: int = 24, surrogates: bool = True) -> st.SearchStrategy[str]:
    """Any text, heavy on the characters above (lone surrogates unless told otherwise)."""
    edges = EDGE_CHARS if surrogates else tuple(c for c in EDGE_CHARS if c not in ("\ud800", "\udfff"))
    pieces = st.one_of(st.sampled_from(edges), st.characters(), st.characters(codec="ascii"))
    return st.lists(pieces, min_size=min_size, max_size=max_size).map("".join)


def printable_text(min_size: int, max_size: int) -> st.SearchStrategy[str]:
    """Valid, printable text in any script (what a field accepts)."""
    return st.text(
        st.characters(exclude_categories=["Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"]).filter(str.isprintable),
        min_size=min_size,
        max_size=max_size,
    )


def with_char(text: st.SearchStrategy[str], char: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """`text` with one character of `char` inserted somewhere."""

    @st.composite
    def insert(draw: st.DrawFn) -> str:
        base, c = draw(text), draw(char)
        at = draw(st.integers(0, len(base)))
        return base[:at] + c + base[at:]

    return insert()


def request_ids() -> st.SearchStrategy[str]:
    return st.text(REQUEST_ID_ALPHABET, min_size=8, max_size=64)


INVALID_REQUEST_IDS = st.one_of(
    st.text(REQUEST_ID_ALPHABET, max_size=7),
    st.text(REQUEST_ID_ALPHABET, min_size=65, max_size=120),
    with_char(st.text(REQUEST_ID_ALPHABET, min_size=8, max_size=60), st.sampled_from(" +#/\x00é\u200b")),
)


# --- JSON --------------------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=10**400) | st.integers(max_value=-(2**63)),
    st.floats(),  # NaN and the infinities included: Python writes them, but they are not JSON (RFC 8259)
    edge_text(),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(edge_text(max_size=12), kids, max_size=5),
    max_leaves=24,
)
# JSON every parser reads (no lone surrogates): where the test expects a member-level error.
CLEAN_JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), edge_text(surrogates=False)),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(edge_text(max_size=10, surrogates=False), kids, max_size=4)
    ),
    max_leaves=12,
)
NOT_STRINGS = st.one_of(
    st.booleans(),
    st.integers(),
    st.floats(),
    st.lists(SCALARS, max_size=3),
    st.dictionaries(edge_text(max_size=8), SCALARS, max_size=3),
)
NOT_OBJECTS = st.one_of(st.booleans(), st.integers(), st.floats(), edge_text(), st.lists(SCALARS, max_size=3))


def with_non_json_number(good: bytes) -> st.SearchStrategy[bytes]:
    """`good` (a JSON object) with NaN, Infinity or -Infinity as a member's value, top-level or nested: what
    Python's json.dumps writes for such floats and lenient parsers read, but not JSON."""
    literal = st.sampled_from([b"NaN", b"Infinity", b"-Infinity"])
    name = edge_text(1, 12, surrogates=False).map(lambda n: json.dumps(n).encode())
    member = st.one_of(
        st.tuples(name, literal).map(lambda m: m[0] + b": " + m[1]),
        literal.map(lambda lit: b'"hardware": {"cpu_cores": ' + lit + b"}"),  # where a number belongs
    )
    return member.map(lambda m: good[:-1] + b", " + m + b"}")


def encode(value: Any, ascii_only: bool = True) -> bytes:
    """JSON as a device might send it: lone surrogates become `\\ud800` escapes, or raw (CESU) bytes."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


# --- public keys that are not P-256 device keys -------------------------------------------------


def _point(curve: ec.EllipticCurve, compressed: bool = False) -> bytes:
    key = ec.generate_private_key(curve).public_key()
    form = serialization.PublicFormat.CompressedPoint if compressed else serialization.PublicFormat.UncompressedPoint
    return key.public_bytes(serialization.Encoding.X962, form)


_P = 2**256 - 2**224 + 2**192 + 2**96 - 1  # the P-256 field prime


def bad_public_keys() -> list[tuple[str, bytes]]:
    """(what, raw bytes) of points the bridge must refuse; computed once (key generation is not free)."""
    p256 = _point(ec.SECP256R1())
    return [
        ("point at infinity (SEC1 0x00)", b"\x00"),
        ("all-zero uncompressed", b"\x04" + bytes(64)),
        ("off the curve", p256[:-1] + bytes([p256[-1] ^ 1])),
        ("x = p", b"\x04" + _P.to_bytes(32, "big") + p256[33:]),
        ("compressed P-256", _point(ec.SECP256R1(), compressed=True)),
        ("hybrid 0x06 prefix", b"\x06" + p256[1:]),
        ("P-384 uncompressed", _point(ec.SECP384R1())),
        ("P-384 compressed", _point(ec.SECP384R1(), compressed=True)),
        ("secp256k1 uncompressed", _point(ec.SECP256K1())),
        ("secp256k1 compressed", _point(ec.SECP256K1(), compressed=True)),
        ("P-521 uncompressed", _point(ec.SECP521R1())),
        ("empty", b""),
        ("65 bytes without the 0x04 prefix", b"\x05" + p256[1:]),
        ("64 bytes: the prefix missing", p256[1:]),
        ("66 bytes: one extra", p256 + b"\x00"),
    ]


BAD_KEYS = bad_public_keys()


def bad_public_key_texts(valid_key_b64: str) -> st.SearchStrategy[Any]:
    """`public_key` values that are not a canonical base64 P-256 point."""
    raw = crypto.b64decode(valid_key_b64)
    return st.one_of(
        st.sampled_from([crypto.b64encode(data) for _, data in BAD_KEYS]),
        st.binary(max_size=100).filter(lambda b: len(b) != 65).map(crypto.b64encode),
        st.binary(min_size=64, max_size=64).map(lambda b: crypto.b64encode(b"\x04" + b)),  # off-curve (p ~ 1)
        st.sampled_from(
            [
                base64.urlsafe_b64encode(raw).decode(),  # the wrong alphabet (when it differs)
                valid_key_b64.rstrip("="),  # padding dropped
                valid_key_b64[:44] + "\n" + valid_key_b64[44:],  # a line break
                " " + valid_key_b64,
                valid_key_b64[:-2] + "9=",  # non-zero unused bits: not canonical
                valid_key_b64 + "AAAA",
                valid_key_b64.encode().hex(),
            ]
        ).filter(lambda text: text != valid_key_b64),
        with_char(st.just(valid_key_b64), st.sampled_from(EDGE_CHARS)),
        edge_text(1, 40),
        st.text("A", min_size=257, max_size=400),  # over 256 characters
        st.just(""),
        NOT_STRINGS,
        st.none(),
    )


# --- claims ------------------------------------------------------------------------------------

CLAIM_MEMBERS = {
    "request_id",
    "provision_key",
    "hardware_id",
    "public_key",
    "device_name",
    "cloud_key_id",
    "hardware",
    "network",
    "agent_version",
}
HARDWARE_MEMBERS = {"board_model", "cpu_cores", "ram_mb", "os", "arch", "kernel"}
NETWORK_MEMBERS = {"hostname", "ip", "mac", "connection_type"}


def unknown_member(known: set[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        edge_text(0, 12), st.sampled_from(["Request_ID", "request_id ", "colour", "__proto__", ""])
    ).filter(lambda name: name not in known)


def _short_text_invalid(max_len: int, required: bool, printable: bool = True) -> st.SearchStrategy[Any]:
    """Values a text field with 1..max_len characters refuses (None only when the field is required)."""
    options = [NOT_STRINGS, st.just(""), st.text("x", min_size=max_len + 1, max_size=max_len + 40)]
    if printable:
        options.append(with_char(printable_text(0, max_len - 1), NON_PRINTABLE))
    if required:
        options.append(st.none())
    return st.one_of(*options)


def _int_invalid(low: int, high: int) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.integers(max_value=low - 1),
        st.integers(min_value=high + 1),
        st.integers(low, high).map(str),  # a number written as a string
        st.integers(low, high).map(float),  # 2.0 is not 2 in this protocol
        st.booleans(),
        st.floats(allow_nan=True).filter(lambda f: not f.is_integer()),
        edge_text(),
        st.lists(SCALARS, max_size=3),
    )


HARDWARE_INVALID: dict[str, st.SearchStrategy[Any]] = {
    "board_model": _short_text_invalid(128, False),
    "os": _short_text_invalid(128, False),
    "arch": _short_text_invalid(128, False),
    "kernel": _short_text_invalid(128, False),
    "cpu_cores": _int_invalid(1, 65536),
    "ram_mb": _int_invalid(0, 1 << 40),
}
NETWORK_INVALID: dict[str, st.SearchStrategy[Any]] = {
    "hostname": _short_text_invalid(128, False),
    "ip": st.one_of(NOT_STRINGS, st.text("1", min_size=65, max_size=80), with_char(st.just("10.0.0.1"), NON_PRINTABLE)),
    "mac": st.one_of(NOT_STRINGS, st.text("a", min_size=65, max_size=80)),
    "connection_type": st.one_of(NOT_STRINGS, st.text("w", min_size=33, max_size=50)),
}


def claim_field_invalid(valid_key_b64: str) -> dict[str, st.SearchStrategy[Any]]:
    """For each claim member: values that make the claim invalid on that member."""
    ok_id = request_ids()
    return {
        "request_id": st.one_of(NOT_STRINGS, st.none(), INVALID_REQUEST_IDS),
        "provision_key": _short_text_invalid(256, True),
        "hardware_id": st.one_of(
            _short_text_invalid(128, True), with_char(printable_text(0, 100), st.sampled_from("+#/"))
        ),
        "public_key": bad_public_key_texts(valid_key_b64),
        "device_name": _short_text_invalid(128, False),
        "cloud_key_id": st.one_of(
            NOT_STRINGS,
            st.text("0123456789ABCDEF", min_size=16, max_size=16).filter(lambda s: s != s.lower()),
            st.text("0123456789abcdef", max_size=15),
            st.text("0123456789abcdef", min_size=17, max_size=40),
            with_char(st.text("0123456789abcdef", min_size=15, max_size=15), st.sampled_from("g \x00é")),
        ),
        "hardware": st.one_of(
            NOT_OBJECTS,
            st.sampled_from(sorted(HARDWARE_INVALID)).flatmap(
                lambda name: HARDWARE_INVALID[name].map(lambda v: {name: v})
            ),
            unknown_member(HARDWARE_MEMBERS).map(lambda name: {name: 1}),
        ),
        "network": st.one_of(
            NOT_OBJECTS,
            st.sampled_from(sorted(NETWORK_INVALID)).flatmap(
                lambda name: NETWORK_INVALID[name].map(lambda v: {name: v})
            ),
            unknown_member(NETWORK_MEMBERS).map(lambda name: {name: "x"}),
        ),
        "agent_version": _short_text_invalid(64, False),
        "_ok_request_id": ok_id,  # not a member: what the other strategies use for a valid request_id
    }


def _duplicated(document: dict[str, Any], path: tuple[str, ...], value: Any) -> bytes:
    """The document's JSON with member `path` written a second time (with `value`) in its object."""
    *parents, name = path
    target = document
    for parent in parents:
        target = target[parent]
    marker = "\x00DUPLICATE\x00"
    target[marker] = None
    text = json.dumps(document)
    del target[marker]
    encoded_marker = json.dumps(marker)
    return text.replace(f"{encoded_marker}: null", f"{json.dumps(name)}: {json.dumps(value)}").encode()


def hostile_claims(
    base: dict[str, Any], refusals: dict[str, tuple[ErrorCode, str, dict[str, Any]]]
) -> dict[str, st.SearchStrategy[Hostile]]:
    """Claims derived from the valid `base`, each broken in a documented way, by kind of breakage
    (tests run each kind, so that a short run still covers every one).

    `refusals`: why -> (the answer, the event's reason, members replacing base's) for claims valid in form
    that the bridge must refuse: a revoked, expired or exhausted key, a revoked device, a known hardware id
    with another public key. Without a `hardware_id` of its own, such a claim gets a new, odd but valid one.
    """
    invalid = claim_field_invalid(base["public_key"])

    @st.composite
    def one_field(draw: st.DrawFn, name: str) -> Hostile:
        claim = dict(base, request_id=draw(invalid["_ok_request_id"]))
        claim[name] = draw(invalid[name])
        return Hostile(encode(claim, draw(st.booleans())), VALIDATION, f"invalid {name}", name)

    @st.composite
    def missing(draw: st.DrawFn) -> Hostile:
        name = draw(st.sampled_from(["request_id", "provision_key", "hardware_id", "public_key"]))
        claim = {k: v for k, v in base.items() if k != name}
        return Hostile(encode(claim), VALIDATION, f"missing {name}", name)

    @st.composite
    def unknown(draw: st.DrawFn) -> Hostile:
        name = draw(unknown_member(CLAIM_MEMBERS))
        claim = dict(base, **{name: draw(JSON_VALUES)})
        return Hostile(encode(claim, draw(st.booleans())), VALIDATION, f"unknown member {name!r}")

    @st.composite
    def duplicate(draw: st.DrawFn) -> Hostile:
        claim = json.loads(json.dumps(base))
        path = draw(
            st.sampled_from(
                [(n,) for n in sorted(base)]
                + [("hardware", n) for n in sorted(base["hardware"])]
                + [("network", n) for n in sorted(base["network"])]
            )
        )
        original: Any = claim
        for part in path:
            original = original[part]
        value = draw(st.one_of(st.just(original), CLEAN_JSON_VALUES))  # an identical copy is refused too
        return Hostile(_duplicated(claim, path, value), VALIDATION, f"duplicate {'.'.join(path)}", ".".join(path))

    @st.composite
    def whole_payload(draw: st.DrawFn) -> Hostile:
        good = encode(dict(base, request_id=draw(invalid["_ok_request_id"])))
        payload = draw(
            st.one_of(
                st.integers(0, len(good) - 1).map(lambda n: good[:n]),  # truncated
                st.just(b"\xef\xbb\xbf" + good),  # a byte order mark
                st.sampled_from(["utf-16", "utf-16-be", "utf-32"]).map(lambda enc: good.decode().encode(enc)),
                st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80"]).map(
                    lambda bad: good.replace(b'"request_id": "', b'"request_id": "' + bad, 1)
                ),
                st.sampled_from([b"x", b"}", b",", b"{}", b"\x00"]).map(lambda tail: good + tail),
                NOT_OBJECTS.map(encode),
                st.just(b"null"),
                st.sampled_from([b"", b" ", b"\n", b"\x00"]),
                st.integers(300, 8000).map(lambda n: b'{"hardware": ' + b"[" * n + b"]" * n + b"}"),
                st.integers(16385 - len(good), 40000).map(lambda n: good[:-1] + b', "x": "' + b"a" * n + b'"}'),
                st.binary(max_size=300).filter(lambda b: not b.strip().startswith(b"{")),
                with_non_json_number(good),
            )
        )
        return Hostile(payload, VALIDATION, "not a JSON object", "")

    @st.composite
    def random_json(draw: st.DrawFn) -> Hostile:
        document = draw(st.one_of(JSON_VALUES, st.dictionaries(edge_text(0, 14), JSON_VALUES, max_size=8)))
        return Hostile(encode(document, draw(st.booleans())), VALIDATION, "random JSON")

    known_keys = {members.get("provision_key") for _, _, members in refusals.values()} | {base["provision_key"]}

    @st.composite
    def refused(draw: st.DrawFn, why: str) -> Hostile:
        code, reason, members = refusals.get(why, (DENIED, "unknown_key", {}))
        claim = dict(
            base,
            request_id=draw(invalid["_ok_request_id"]),
            # Odd but valid text: it reaches the key checks, the ECDH and the event.
            hardware_id=draw(printable_text(1, 128).filter(lambda h: not any(c in h for c in "+#/"))),
            device_name=draw(st.none() | printable_text(1, 128)),
        )
        if why == "unknown key":
            claim["provision_key"] = draw(printable_text(1, 256).filter(lambda k: k not in known_keys))
        claim.update(members)
        field = "cloud_key_id" if reason == "unknown_cloud_key" else None
        return Hostile(encode(claim, draw(st.booleans())), code, f"refused: {why}", field, reason)

    kinds = {f"invalid {name}": one_field(name) for name in sorted(CLAIM_MEMBERS)}
    kinds |= {"missing member": missing(), "unknown member": unknown(), "duplicate member": duplicate()}
    kinds |= {"not a JSON object": whole_payload(), "random JSON": random_json()}
    return kinds | {f"refused: {why}": refused(why) for why in [*refusals, "unknown key"]}


# --- token refreshes ----------------------------------------------------------------------------


def hostile_refreshes(
    base: dict[str, Any],
    mac_for: Callable[[str, str, int], str],
    now: int,
    skew: int,
    denied: dict[str, dict[str, Any]],
) -> dict[str, st.SearchStrategy[Hostile]]:
    """Token refreshes derived from the valid `base`, each refused in a documented way, by kind.

    `mac_for(device_id, request_id, timestamp)` gives the genuine MAC (so a refusal is for the stated
    reason, not a bad MAC); `denied`: the event's reason -> members replacing base's, for refusals the
    fixture prepared (a revoked device, a request id already used).
    """
    ok_id = request_ids()
    invalid: dict[str, st.SearchStrategy[Any]] = {
        "request_id": st.one_of(NOT_STRINGS, st.none(), INVALID_REQUEST_IDS),
        "device_id": st.one_of(
            NOT_STRINGS,
            st.none(),
            st.just(base["device_id"].upper()),
            st.from_regex(r"dev_[a-z2-7]{0,25}|dev_[a-z2-7]{27,40}", fullmatch=True),
            with_char(st.just(base["device_id"]), st.sampled_from(EDGE_CHARS)),
            edge_text(),
        ),
        "timestamp": _int_invalid(0, 1 << 40),
        "mac": st.one_of(
            NOT_STRINGS,
            st.none(),
            st.binary(min_size=31, max_size=31).map(crypto.b64encode)
            | st.binary(min_size=33, max_size=33).map(crypto.b64encode),
            st.sampled_from(
                [base["mac"][:-1] + "!", base["mac"].rstrip("="), " " + base["mac"]]
                + [urlsafe for urlsafe in [base["mac"].replace("+", "-").replace("/", "_")] if urlsafe != base["mac"]]
            ),
            edge_text(44, 44),
            st.text("A", min_size=45, max_size=60),
        ),
    }

    @st.composite
    def one_field(draw: st.DrawFn, name: str) -> Hostile:
        request = dict(base, request_id=draw(ok_id))
        request[name] = draw(invalid[name])
        return Hostile(encode(request, draw(st.booleans())), VALIDATION, f"invalid {name}", name)

    @st.composite
    def missing(draw: st.DrawFn) -> Hostile:
        request = dict(base, request_id=draw(ok_id))
        name = draw(st.sampled_from(sorted(request)))
        del request[name]
        return Hostile(encode(request), VALIDATION, f"missing {name}", name)

    @st.composite
    def unknown(draw: st.DrawFn) -> Hostile:
        request = dict(base, request_id=draw(ok_id))
        name = draw(unknown_member(set(base)))
        request[name] = draw(JSON_VALUES)
        return Hostile(encode(request, draw(st.booleans())), VALIDATION, f"unknown member {name!r}")

    @st.composite
    def duplicate(draw: st.DrawFn) -> Hostile:
        request = dict(base, request_id=draw(ok_id))
        name = draw(st.sampled_from(sorted(request)))
        value = draw(st.one_of(st.just(request[name]), CLEAN_JSON_VALUES))
        return Hostile(_duplicated(request, (name,), value), VALIDATION, f"duplicate {name}", name)

    @st.composite
    def not_an_object(draw: st.DrawFn) -> Hostile:
        good = encode(dict(base, request_id=draw(ok_id)))
        payload = draw(
            st.one_of(
                st.integers(0, len(good) - 1).map(lambda n: good[:n]),
                st.just(b"\xef\xbb\xbf" + good),
                st.integers(1025 - len(good), 5000).map(lambda n: good[:-1] + b', "x": "' + b"a" * n + b'"}'),
                NOT_OBJECTS.map(encode),
                st.binary(max_size=200).filter(lambda b: not b.strip().startswith(b"{")),
                with_non_json_number(good),
            )
        )
        return Hostile(payload, VALIDATION, "not a JSON object", "")

    @st.composite
    def refused(draw: st.DrawFn, why: str) -> Hostile:
        request = dict(base, request_id=draw(ok_id))
        if why == "unknown_device":
            request["device_id"] = draw(st.from_regex(r"dev_[a-z2-7]{26}", fullmatch=True))
        elif why == "stale_timestamp":
            request["timestamp"] = draw(st.integers(0, now - skew - 1) | st.integers(now + skew + 1, 1 << 40))
        elif why != "bad_mac":
            request.update(denied[why])
        if why == "bad_mac":
            request["mac"] = draw(st.binary(min_size=32, max_size=32).map(crypto.b64encode))
        else:
            request["mac"] = mac_for(request["device_id"], request["request_id"], request["timestamp"])
        return Hostile(encode(request), DENIED, f"refused: {why}", reason=why)

    kinds = {f"invalid {name}": one_field(name) for name in sorted(invalid)}
    kinds |= {"missing member": missing(), "unknown member": unknown(), "duplicate member": duplicate()}
    kinds |= {"not a JSON object": not_an_object()}
    return kinds | {
        f"refused: {why}": refused(why) for why in ["unknown_device", "bad_mac", "stale_timestamp", *denied]
    }


# --- topics ------------------------------------------------------------------------------------

CLIENT_IDS = st.text(REQUEST_ID_ALPHABET, min_size=1, max_size=64)  # [A-Za-z0-9._:-]{1,64}, as topics.CLIENT_ID_RE


def invalid_topics(prefix: str, kind: str) -> st.SearchStrategy[str]:
    """Topics a `kind` ("claim" or "token") handler must drop: no client id it could answer on."""
    bad_ids = st.one_of(
        st.just(""),
        st.text("a", min_size=65, max_size=100),
        with_char(CLIENT_IDS.map(lambda s: s[:63]), st.sampled_from((*EDGE_CHARS, " ", "é", "$"))),
        edge_text(1, 20).filter(lambda s: any(c not in REQUEST_ID_ALPHABET for c in s)),
    )
    other = "token" if kind == "claim" else "claim"
    return st.one_of(
        bad_ids.map(lambda cid: f"{prefix}/{kind}/{cid}"),
        CLIENT_IDS.map(lambda cid: f"{prefix}/{other}/{cid}"),  # another route's topic
        CLIENT_IDS.map(lambda cid: f"prov/v2/{kind}/{cid}"),
        CLIENT_IDS.map(lambda cid: f"{prefix}/{kind}/{cid}/extra"),
        st.sampled_from(["", "#", "+", f"{prefix}/{kind}", f"{prefix}/{kind}/", f"/{prefix}/{kind}/x", "\x00"]),
        edge_text(0, 30),
    )


# --- the admin CLI -----------------------------------------------------------------------------

# Commands that act on the data dir and return (serve, broker, init, mosquitto-config, rotations and TLS
# issuance are left out: they run forever, or write outside it, or only spend time making keys).
CLI_COMMANDS: tuple[tuple[str, ...], ...] = (
    ("tenant", "create"),
    ("tenant", "list"),
    ("key", "create"),
    ("key", "list"),
    ("key", "revoke"),
    ("device", "list"),
    ("device", "show"),
    ("device", "revoke"),
    ("events",),
    ("ops-user", "create"),
    ("ops-user", "list"),
    ("ops-user", "delete"),
    ("cloud-key",),
    ("jwks",),
    ("keys", "list"),
    ("keys", "prune"),
    ("tls", "show"),
    ("doctor",),
    ("key",),
    ("frobnicate",),
    (),
)
CLI_OPTIONS = (
    "--tenant",
    "--name",
    "--profile",
    "--hardware-id-pattern",
    "--expires-in",
    "--expires-at",
    "--max-registrations",
    "--one-time",
    "--label",
    "--group",
    "--reclaim",
    "--code",
    "--limit",
    "--event",
    "--json",
    "--help",
    "--token",
    "--cloud",
    "-h",
    "--",
    "-",
)
CLI_VALUES = st.one_of(
    edge_text(0, 20),
    st.integers().map(str),
    st.integers(min_value=2**31 - 2, max_value=10**30).map(str),
    st.from_regex(r"-?[0-9]{1,14}[smhdwy]?", fullmatch=True),
    st.text("0123456789", min_size=4000, max_size=4400).map(lambda digits: digits + "d"),
    st.sampled_from(
        [
            "default",
            "rotate",
            "reject",
            "0",
            "-1",
            "1e3",
            "0x10",
            "١٢",  # Arabic-Indic digits: int() reads them
            "30d",
            "0s",
            "999999999d",
            "9999-12-31T23:59:59+00:00",
            "9999-12-31T23:59:59-23:59",
            "0001-01-01T00:00:00+23:59",
            "2030-02-30T00:00:00",
            "a{4294967296}",
            "(" * 400 + ")" * 400,
            "(?P<",
            "[",
            "site=",
            "=value",
            "a=b=c",
            "device.provisioned",
        ]
    ),
    st.text(REQUEST_ID_ALPHABET, min_size=1, max_size=70),
)


def cli_argvs(known: list[str]) -> st.SearchStrategy[list[str]]:
    """Arguments after the global options: a command, then options and values in any order.

    `known`: values that name real things in the data dir (tenants, key ids, device ids), so that
    commands also get as far as acting on them.
    """
    tokens = st.one_of(st.sampled_from(CLI_OPTIONS), CLI_VALUES, st.sampled_from(known))
    return st.tuples(st.sampled_from(CLI_COMMANDS), st.lists(tokens, max_size=8)).map(lambda t: [*t[0], *t[1]])
