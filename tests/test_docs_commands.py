"""Every command README.md and docs/*.md name exists in the CLI: the docs and the CLI cannot drift.

A *mention* is the program name `provbridge` (or `provbridge-sim`, the simulator's own entry point,
device_sim/cli.py) standing as a word of its own and followed by white space, in a fenced code block,
an inline code span or plain prose. The words after it are walked down the argparse tree that
`bridge.cli.main.build_parser` (`device_sim.cli.build_parser`) builds:

* a word that is a subcommand of the current parser descends into it;
* where the current parser has subcommands and the next word is none of them, that is drift: the
  test of that command (e.g. `provbridge device destroy`) fails and says in which file and line;
* the words end at the first token that is not a lowercase command-like word: an option `--x`, a
  placeholder (`ID`, `NAME`), `|`, `[`, punctuation, the end of the code span, and in a code block two
  spaces (the description column of the README's command table) or ` #` (a shell comment).

In code, after the words, `|` followed by a word (outside brackets) names an alternative to the last
word (`provbridge key list [--tenant T] | revoke KEY_ID`), a word after a command that takes no
positional argument is drift too, and every `--option` must be an option of the command it follows.

In prose "provbridge" is also the product's name: "provbridge's", "provbridge," and the few English
words of PROSE_WORDS after it are the product, not a command. Any other lowercase word after it must
be a command, so drift is caught rather than excused. "provbridge v1 …" starts the protocol's
byte-string labels (HKDF info, refresh MAC), never a command.

Prose also names commands without the program: "an operator must destroy the device" names
`provbridge device destroy`. Sentences of that one form (operator, modal verb, verb, a noun the CLI
administers) are checked as that command.

Each distinct command then runs with `--help` in this process, through the CLI's own `main` (as the
other CLI tests do), and must exit 0 with a usage line that names it.
"""

import argparse
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bridge.cli import main as cli
from device_sim import cli as sim_cli

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "provbridge": cli.build_parser,
    "provbridge-sim": sim_cli.build_parser,
}
MAINS: dict[str, Callable[[list[str]], int]] = {"provbridge": cli.main, "provbridge-sim": sim_cli.main}

# English words that may follow the product name in prose ("provbridge checks the key", "# provbridge
# wire protocol"). Keep it small and literal: every other lowercase word after "provbridge" in prose
# must be a command. A subcommand always wins over this list. `test_every_prose_word_is_used` keeps it
# from growing stale.
PROSE_WORDS = frozenset(
    {
        "bridge",  # PROTOCOL.md: "the provbridge bridge and a device"
        "checks",  # README: "provbridge checks the key against its template"
        "configures",  # README: "provbridge configures it and mirrors each token"
        "itself",  # BENCHMARKS.md: "… provbridge itself."
        "must",  # PROTOCOL.md: "a broker used with provbridge must accept longer ids"
        "promises",  # RELIABILITY.md: "what provbridge promises when things go wrong"
        "reaches",  # BENCHMARKS.md: "the share of the … ceiling provbridge reaches"
        "reliability",  # RELIABILITY.md title
        "security",  # SECURITY.md title
        "turns",  # BENCHMARKS.md: "how fast provbridge turns claims into …"
        "wire",  # PROTOCOL.md title
    }
)
# "provbridge v1 …": the protocol's labels (PROTOCOL.md §9.2, §10.1, §15), in code and prose alike.
LABEL_WORDS = frozenset({"v1"})

PROGRAM = re.compile(r"(?<![\w.-])(provbridge(?:-sim)?)(?![\w./-])")
WORD = re.compile(r"[a-z][a-z0-9-]*")
OPTION = re.compile(r"[\[(]*(--[a-z0-9][a-z0-9-]*)")
TRAILING = ".,;:!?)\"'"
FENCE = re.compile(r" {0,3}(```|~~~)")
# An inline code span: single backticks, within one paragraph (no blank line inside).
SPAN = re.compile(r"(?<!`)`(?!`)((?:[^`\n]|\n(?![ \t]*\n))+?)`(?!`)")
BLOCK_END_OF_COMMAND = re.compile(r" {2,}| #|\t")
CONTINUATION = re.compile(r"\s+(?=\[?--)")  # an indented line that goes on with options
# "an operator must destroy the device" -> provbridge device destroy
OPERATOR_ACTION = re.compile(
    r"\b[Oo]perators?\s+(?:must|can|may|should|will|has\s+to|have\s+to|needs?\s+to)\s+(?:first\s+)?"
    r"([a-z]+)\s+(?:the|a|an|its|that|this|their)\s+(device|provisioning\s+key|key|tenant|ops\s+user)s?\b"
)
NOUN_COMMANDS = {
    "device": "device",
    "provisioning key": "key",
    "key": "key",
    "tenant": "tenant",
    "ops user": "ops-user",
}


@dataclass(frozen=True)
class Mention:
    where: str  # file:line
    kind: str  # "code block", "code span", "prose"
    program: str
    tokens: tuple[str, ...]  # what follows the program name, split on white space


@dataclass
class Command:
    program: str
    words: tuple[str, ...]
    options: set[str] = field(default_factory=set)
    where: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return " ".join((self.program, *self.words))


# --------------------------------------------------------------------------- finding the mentions


def _blank(text: str) -> str:
    return re.sub(r"[^\n]", " ", text)


def mentions_in(text: str, name: str) -> list[Mention]:
    """Every mention of a program in one markdown text, in code blocks, code spans and prose."""

    def where(offset: int) -> str:
        return f"{name}:{text.count(chr(10), 0, offset) + 1}"

    found: list[Mention] = []
    outside: list[str] = []  # the text with fenced blocks blanked, same offsets
    offset, fenced, extends = 0, False, False
    for line in text.splitlines(keepends=True):
        if FENCE.match(line):
            fenced, extends = not fenced, False
            outside.append(_blank(line))
        elif fenced:
            continued = CONTINUATION.match(line)
            if continued and extends:
                # An indented line of options under a command (the README's `key create`): its options.
                more = BLOCK_END_OF_COMMAND.split(line[continued.end() :].rstrip("\n"), maxsplit=1)[0].split()
                last = found.pop()
                found.append(Mention(last.where, last.kind, last.program, (*last.tokens, *more)))
            extends = bool(continued and extends)
            for m in PROGRAM.finditer(line):
                tail = line[m.end() :].rstrip("\n")
                if tail[:1] in ("", " "):
                    tokens = BLOCK_END_OF_COMMAND.split(tail[1:], maxsplit=1)[0].split()
                    found.append(Mention(where(offset + m.start()), "code block", m.group(1), tuple(tokens)))
                    extends = True
            outside.append(_blank(line))
        else:
            outside.append(line)
        offset += len(line)
    rest = "".join(outside)

    prose = list(rest)
    for span in SPAN.finditer(rest):
        content = span.group(1).replace("\n", " ")
        for m in PROGRAM.finditer(content):
            if content[m.end() : m.end() + 1] in ("", " "):
                tokens = content[m.end() :].split()
                found.append(Mention(where(span.start(1) + m.start()), "code span", m.group(1), tuple(tokens)))
        for i in range(span.start(), span.end()):
            if prose[i] != "\n":
                prose[i] = "\x00"  # neither a word nor white space: ends any prose command before it
    prose_text = "".join(prose)

    for m in PROGRAM.finditer(prose_text):
        paragraph = prose_text[m.end() :].split("\n\n", 1)[0]
        if paragraph[:1] in (" ", "\n"):
            found.append(Mention(where(m.start()), "prose", m.group(1), tuple(paragraph.split())))
    for m in OPERATOR_ACTION.finditer(prose_text):
        noun = " ".join(m.group(2).split())
        found.append(Mention(where(m.start()), "prose", "provbridge", (NOUN_COMMANDS[noun], m.group(1))))
    return found


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return None


def _takes_positionals(parser: argparse.ArgumentParser) -> bool:
    return any(not a.option_strings and not isinstance(a, argparse._SubParsersAction) for a in parser._actions)


def commands_of(mention: Mention) -> list[Command]:
    """The commands (with the options given them) one mention names; [] when it names none."""
    parser = PARSERS[mention.program]()
    tokens, words = mention.tokens, list[str]()
    i = 0
    while i < len(tokens):
        word = tokens[i].rstrip(TRAILING)
        if not WORD.fullmatch(word):
            break
        if not words and word in LABEL_WORDS:
            return []
        subcommands = _subcommands(parser)
        if subcommands is None:
            if mention.kind != "prose" and not _takes_positionals(parser):
                words.append(word)  # a word where the command takes none: drift
            break
        if word not in subcommands:
            if not words and mention.kind == "prose" and word in PROSE_WORDS:
                return []  # the product's name in a sentence
            words.append(word)  # drift: named, and its test fails
            return [Command(mention.program, tuple(words), where=[mention.where])]
        words.append(word)
        parser = subcommands[word]
        i += 1
        if word != tokens[i - 1]:
            break  # punctuation ended it: "… run `provbridge serve`." or "provbridge serve."
    if mention.kind == "prose":
        return [Command(mention.program, tuple(words), where=[mention.where])] if words else []

    named = [Command(mention.program, tuple(words), where=[mention.where])]
    depth = 0
    for j in range(i, len(tokens)):
        token = tokens[j]
        if token == "|" and depth == 0 and words and j + 1 < len(tokens) and WORD.fullmatch(tokens[j + 1]):
            named.append(Command(mention.program, (*words[:-1], tokens[j + 1]), where=[mention.where]))
            continue
        option = OPTION.match(token)
        if option:
            named[-1].options.add(option.group(1))
        depth += token.count("[") - token.count("]")
    return named


def collect(mentions: Sequence[Mention]) -> dict[str, Command]:
    """The distinct commands the mentions name, each with every place and option the docs give it."""
    commands: dict[str, Command] = {}
    for mention in mentions:
        for command in commands_of(mention):
            known = commands.setdefault(command.name, Command(command.program, command.words))
            known.options |= command.options
            known.where += [w for w in command.where if w not in known.where]
    return commands


def problem(command: Command) -> str | None:
    """Why the CLI has no such command (or option), or None when it has."""
    parser = PARSERS[command.program]()
    for i, word in enumerate(command.words):
        subcommands = _subcommands(parser)
        if subcommands is None or word not in subcommands:
            at = " ".join((command.program, *command.words[:i]))
            choices = " | ".join(sorted(subcommands)) if subcommands else "no subcommands"
            return f"`{command.name}` does not exist (`{at}` has {choices})"
        parser = subcommands[word]
    known = {option for action in parser._actions for option in action.option_strings}
    unknown = sorted(command.options - known)
    if unknown:
        return f"`{command.name}` has no option {', '.join(unknown)}"
    return None


MENTIONS = [
    mention
    for path in DOC_FILES
    for mention in mentions_in(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
]
COMMANDS = collect(MENTIONS)


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_documented_command_exists_and_answers_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    command = COMMANDS[name]
    reason = problem(command)
    assert reason is None, f"{reason}; named at {', '.join(command.where)}"
    with pytest.raises(SystemExit) as exited:
        MAINS[command.program]([*command.words, "--help"])
    assert exited.value.code == 0, f"`{name} --help` exited {exited.value.code}"
    out = capsys.readouterr().out
    assert out.startswith((f"usage: {name} ", f"usage: {name}\n")), out[:200]


def test_the_docs_are_read_in_every_form() -> None:
    """The extraction is not blind: it finds the commands of the README table, spans and simulator lines."""
    kinds = {mention.kind for mention in MENTIONS}
    assert kinds == {"code block", "code span", "prose"}
    assert len(COMMANDS) >= 25
    for expected in (
        "provbridge key create",  # README code block
        "provbridge key revoke",  # README code block, as the alternative after `|`
        "provbridge ops-user delete",  # likewise
        "provbridge device revoke",  # code spans
        "provbridge keys rotate",
        "provbridge-sim",
    ):
        assert expected in COMMANDS, expected
    assert {"--processes"} <= COMMANDS["provbridge serve"].options
    assert {"--one-time", "--reclaim", "--code"} <= COMMANDS["provbridge key create"].options  # continued lines
    assert {"--key", "--devices", "--refresh", "--tls", "--ca-file"} <= COMMANDS["provbridge-sim"].options
    assert {"--san", "--force", "--new-ca"} <= COMMANDS["provbridge tls init"].options


def test_every_prose_word_is_used_and_none_is_a_command() -> None:
    root = _subcommands(cli.build_parser())
    assert root is not None and not PROSE_WORDS & set(root)
    used = {mention.tokens[0].rstrip(TRAILING) for mention in MENTIONS if mention.kind == "prose" and mention.tokens}
    assert used >= PROSE_WORDS, f"no longer in the docs, drop them: {sorted(PROSE_WORDS - used)}"


SAMPLE = """\
# provbridge checks

provbridge's CLI, and provbridge, the product. Run `provbridge device destroy ID`, then
`provbridge device revoke ID`; provbridge serve starts it, provbridge frobnicates it. An operator
must destroy the device or rotate the key. `info = "provbridge v1 device key"`, `provbridge-sim --turbo`.

```sh
provbridge tenant create NAME | list | purge NAME      --data-dir is not an option of `tenant`
provbridge key create --name N [--one-time | --max-uses N]
                      [--reclaim rotate] [--colour C]     an option on a continued line
PROVBRIDGE_DATA_DIR=x provbridge serve # --nothing here counts
.venv/bin/provbridge-sim run --key pk_...
{"iss":"provbridge","aud":"provbridge-mqtt"}
```
"""


def test_drift_is_caught_in_code_blocks_code_spans_and_prose() -> None:
    commands = collect(mentions_in(SAMPLE, "sample.md"))
    problems = {name: problem(command) for name, command in commands.items()}
    assert {name for name, reason in problems.items() if reason is not None} == {
        "provbridge device destroy",  # code span, and the operator's sentence
        "provbridge frobnicates",  # prose: not a command, not one of PROSE_WORDS
        "provbridge tenant purge",  # code block, an alternative after `|`
        "provbridge key create",  # --max-uses
        "provbridge-sim",  # --turbo
        "provbridge-sim run",  # the simulator takes no words
    }
    assert commands["provbridge device destroy"].where == ["sample.md:3", "sample.md:4"]
    assert "--colour, --max-uses" in (problems["provbridge key create"] or "")
    assert {name for name, reason in problems.items() if reason is None} == {
        "provbridge device revoke",
        "provbridge serve",  # prose, and the code block line with an environment variable before it
        "provbridge tenant create",
        "provbridge tenant list",
    }
