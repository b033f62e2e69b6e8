"""Hardware-id patterns: RE2 syntax, matched in time linear in the hardware id whatever the admin wrote.

Every claim with a key that has a pattern is matched against it in the claim worker, so a slow match
stalls every claim behind it. Python's `re` backtracks: `([A-Z0-9]+-?)+` against `"A" * 27 + "!"` takes
seconds and each extra character doubles that, so any holder of such a key (every device of a batch)
could stop a factory's provisioning. RE2 (google-re2) guarantees linear time; it refuses what needs
backtracking (backreferences, look-around), and such patterns are refused when a key is created.

Patterns made before RE2 were Python `re` patterns; `differences` finds the ones RE2 reads otherwise
(for `provbridge doctor`).
"""

import functools
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import re2

from bridge.errors import InvalidPattern

MAX_PATTERN_LENGTH = 1024
# RE2's default budget per compiled pattern; a pattern needing more is refused, not truncated.
MAX_PATTERN_MEMORY = 8 << 20


def _options() -> Any:
    options = re2.Options()
    options.max_mem = MAX_PATTERN_MEMORY
    options.log_errors = False  # a refused pattern becomes our error message, not a line on stderr
    return options


_OPTIONS = _options()
# Braces RE2 reads as literal text where Perl and Python repeat: {,n}, and counts too large to parse.
_LITERAL_REPEAT = re.compile(r"(?<!\\)\{(?:,[0-9]+|[0-9]{10,}(?:,[0-9]*)?|[0-9]+,[0-9]{10,})\}")


@functools.lru_cache(maxsize=256)  # keys are few and their patterns fixed: compile each once per process
def compile_pattern(pattern: str) -> Any:
    """The compiled pattern (re2's, untyped), or InvalidPattern saying why RE2 cannot run it."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise InvalidPattern(f"hardware id pattern is longer than {MAX_PATTERN_LENGTH} characters")
    braces = _LITERAL_REPEAT.search(pattern)
    if braces is not None:
        raise InvalidPattern(
            f"hardware id pattern: RE2 would read {braces[0]!r} as literal text, not as a repetition; it repeats"
            " x{n}, x{n,} and x{n,m} with n and m at most 1000 (write {0,m} for {,m})"
        )
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise InvalidPattern(
            f"hardware id pattern is not one the linear-time engine (RE2 syntax) can run: {reason}"
            " (backreferences and look-around are not supported; see docs/SECURITY.md)"
        ) from exc


def fullmatch(pattern: str, hardware_id: str) -> bool:
    """Whether the whole hardware id matches. Raises InvalidPattern for a pattern RE2 refuses."""
    return bool(compile_pattern(pattern).fullmatch(hardware_id) is not None)


# --- patterns stored before RE2: where the two engines disagree -------------------------------------

# Characters a witness is built from: ASCII first, then non-ASCII ones on which Python's Unicode-aware
# \d \w \s and case folding differ from RE2's ASCII classes.
_ASCII = [chr(c) for c in range(0x21, 0x7F)] + [" "]
_NON_ASCII = ["é", "ß", "٣", "Ω", "\u2003", "\u212a", "ſ", "İ"]
MAX_WITNESS_LENGTH = 64
_CATEGORIES: dict[str, Callable[[str], bool]] = {
    "CATEGORY_DIGIT": str.isdecimal,
    "CATEGORY_SPACE": str.isspace,
    "CATEGORY_WORD": lambda ch: ch.isalnum() or ch == "_",
}
# Which witnesses to build: (non-ASCII characters, one more repeat, the last branch of each alternation).
_CHOICES: list[tuple[bool, bool, bool]] = [
    (a, b, c) for a in (False, True) for b in (False, True) for c in (False, True)
]


def _in_category(name: str, ch: str) -> bool:
    if name.startswith("CATEGORY_NOT_"):
        return not _CATEGORIES["CATEGORY_" + name.removeprefix("CATEGORY_NOT_")](ch)
    test = _CATEGORIES.get(name)
    return test(ch) if test is not None else False


def _accepts(op: str, av: Any, ch: str) -> bool:
    """Whether one character-matching node of Python's parse tree accepts `ch` (case as written)."""
    if op == "LITERAL":
        return ord(ch) == int(av)
    if op == "NOT_LITERAL":
        return ord(ch) != int(av)
    if op == "ANY":
        return ch != "\n"
    if op == "IN":
        negate = any(str(item_op) == "NEGATE" for item_op, _ in av)
        hit = False
        for item_op, item in av:
            name = str(item_op)
            if name == "LITERAL":
                hit |= ord(ch) == item
            elif name == "RANGE":
                hit |= item[0] <= ord(ch) <= item[1]
            elif name == "CATEGORY":
                hit |= _in_category(str(item), ch)
        return hit != negate
    return False


class _Unsupported(Exception):
    """A construct the witness builder does not follow (RE2 refuses nearly all of them anyway)."""


def _witnesses(nodes: Any, choice: tuple[bool, bool, bool]) -> str:
    """One string Python's pattern should match: (non-ASCII characters, one more repeat, last branch)."""
    non_ascii, more, last = choice
    out: list[str] = []
    for op_code, av in nodes:
        op = str(op_code)
        if op in ("LITERAL", "NOT_LITERAL", "ANY", "IN"):
            palette = (_NON_ASCII + _ASCII) if non_ascii else (_ASCII + _NON_ASCII)
            ch = next((c for c in palette if _accepts(op, av, c)), None)
            if ch is None:
                raise _Unsupported(op)
            out.append(ch)
        elif op == "SUBPATTERN":
            out.append(_witnesses(av[3], choice))
        elif op == "BRANCH":
            branches = av[1]
            out.append(_witnesses(branches[-1] if last else branches[0], choice))
        elif op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, body = av
            count = min(low + 1, high) if more else low
            out.append(_witnesses(body, choice) * count)
        elif op == "AT":
            continue  # anchors and boundaries: the full-match check below keeps only real witnesses
        else:
            raise _Unsupported(op)
    return "".join(out)


def _python_witnesses(pattern: str) -> Iterator[str]:
    """A few strings Python's `re` fully matches with this pattern, built from its parse tree."""
    try:
        with warnings.catch_warnings():  # "possible nested set" and the like: the pattern is the admin's, not ours
            warnings.simplefilter("ignore")
            parsed = re._parser.parse(pattern)  # type: ignore[attr-defined]
            compiled = re.compile(pattern)
    except (re.error, OverflowError, RecursionError, AttributeError):
        return
    seen: set[str] = set()
    for choice in _CHOICES:
        try:
            text = _witnesses(parsed.data, choice)
        except (_Unsupported, RecursionError):
            return
        # Short witnesses only: Python's backtracking is fast on strings that match, and these should.
        if text not in seen and 0 < len(text) <= MAX_WITNESS_LENGTH and compiled.fullmatch(text):
            seen.add(text)
            yield text


def differences(pattern: str, known_matches: Iterable[str] = ()) -> list[str]:
    """Why RE2 reads a pattern stored for Python's `re` otherwise: [] when no difference was found.

    `known_matches` are hardware ids Python's `re` matched (the devices the key created): each one RE2 does
    not match is a device whose re-claim would now be refused. Beyond those, a few strings are built from
    the pattern that Python matches (with ASCII and with non-ASCII characters, so that `\\d`, `\\w`, `\\s`
    and `{,n}` show their differences) and RE2 is asked the same; a difference found is a difference, but
    finding none proves no equivalence.
    """
    try:
        compiled = compile_pattern(pattern)
    except InvalidPattern as exc:
        return [str(exc)]
    found: list[str] = []
    lost = [hid for hid in known_matches if compiled.fullmatch(hid) is None]
    if lost:
        found.append(f"{len(lost)} of its devices' hardware ids no longer match, e.g. {lost[0]!r}")
    for witness in _python_witnesses(pattern):
        if compiled.fullmatch(witness) is None:
            found.append(f"{witness!r} matched before and no longer does")
            break
    return found
