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
from collections.abc import Callable, Iterable
from typing import Any

import re2

from bridge.errors import InvalidPattern, PatternNotFollowed

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
_LITERAL_REPEAT = re.compile(r"\{(?:,[0-9]+|[0-9]{10,}(?:,[0-9]*)?|[0-9]+,[0-9]{10,})\}")


def _literal_repeat(pattern: str) -> str | None:
    """The first brace group outside a character class and not escaped that RE2 reads as literal text."""
    i, in_class = 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 2  # an escape: whatever follows is not syntax
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
            i += 1
            i += pattern.startswith("^", i)
            i += pattern.startswith("]", i)  # a "]" first in a class is a member, not its end
            continue
        elif ch == "{" and (braces := _LITERAL_REPEAT.match(pattern, i)) is not None:
            return braces[0]
        i += 1
    return None


@functools.lru_cache(maxsize=256)  # keys are few and their patterns fixed: compile each once per process
def compile_pattern(pattern: str) -> Any:
    """The compiled pattern (re2's, untyped), or InvalidPattern saying why RE2 cannot run it."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise InvalidPattern(f"hardware id pattern is longer than {MAX_PATTERN_LENGTH} characters")
    braces = _literal_repeat(pattern)
    if braces is not None:
        raise InvalidPattern(
            f"hardware id pattern: RE2 would read {braces!r} as literal text, not as a repetition; it repeats"
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
# What probes put in a witness's place: a few ASCII characters of each kind, then the non-ASCII ones.
_PROBE_CHARACTERS = ["a", "Z", "0", "9", "-", "_", ".", " ", "!", "{", "}", ",", "[", "]", ":", *_NON_ASCII]
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
                raise PatternNotFollowed(op)
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
            raise PatternNotFollowed(op)
    return "".join(out)


def _witnesses_of(pattern: str) -> list[str]:
    """A few strings built from Python's parse tree of the pattern, most of which Python's `re` matches.

    Only parsed here, never matched: Python's matcher may backtrack for ever on an admin's pattern.
    """
    try:
        with warnings.catch_warnings():  # "possible nested set" and the like: the pattern is the admin's, not ours
            warnings.simplefilter("ignore")
            parsed = re._parser.parse(pattern)  # type: ignore[attr-defined]
    except (re.error, OverflowError, RecursionError, AttributeError):
        return []
    found: list[str] = []
    for choice in _CHOICES:
        try:
            text = _witnesses(parsed.data, choice)
        except (PatternNotFollowed, RecursionError):
            return found
        if text not in found and 0 < len(text) <= MAX_WITNESS_LENGTH:
            found.append(text)
    return found


def probes(pattern: str) -> list[str]:
    """Strings on which to ask both engines: the witnesses, and each with one character replaced by one
    of `_PROBE_CHARACTERS` or left out, so that a class, a category or a repetition that the engines
    read otherwise shows on one side or the other."""
    out: dict[str, None] = {}
    for witness in _witnesses_of(pattern):
        out[witness] = None
        for i in range(len(witness)):
            out[witness[:i] + witness[i + 1 :]] = None
            for ch in _PROBE_CHARACTERS:
                out[witness[:i] + ch + witness[i + 1 :]] = None
    out.pop("", None)
    return list(out)


# Asks Python's `re` whether the pattern fully matches each text; None when it could not say in time.
PythonMatcher = Callable[[str, list[str]], list[bool] | None]


def differences(pattern: str, python_matches: PythonMatcher, known_matches: Iterable[str] = ()) -> list[str]:
    """Why RE2 reads a pattern stored for Python's `re` otherwise: [] when no difference was found.

    `known_matches` are hardware ids Python's `re` matched (the devices the key created): each one RE2 does
    not match is a device whose re-claim would now be refused. Beyond those, both engines are asked about
    `probes(pattern)`, in both directions: a string Python matched that RE2 does not (a device refused now),
    and one Python refused that RE2 matches (an allow-list that lets more in). `python_matches` runs
    Python's matcher where it cannot stall the caller (see doctor). A difference found is a difference;
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
    texts = probes(pattern)
    before = python_matches(pattern, texts)
    if before is None:
        found.append(
            "Python's re did not answer in time on strings built from it (it backtracks), so it cannot be compared"
        )
        return found
    now = [compiled.fullmatch(text) is not None for text in texts]
    refused = next((t for t, b, n in zip(texts, before, now, strict=True) if b and not n), None)
    admitted = next((t for t, b, n in zip(texts, before, now, strict=True) if n and not b), None)
    if refused is not None:
        found.append(f"{refused!r} matched before and no longer does")
    if admitted is not None:
        found.append(f"{admitted!r} did not match before and now does")
    return found
