"""A Dockerfile parser for the subset this daemon builds.

Lines, continuations, comments and parser directives follow BuildKit's
``frontend/dockerfile/parser``; words and ``$VAR``/``${VAR}`` expansion follow
its ``shell`` lexer.  Supported instructions: ``FROM scratch``, ``COPY``
(several sources, ``--chown``), ``WORKDIR``, ``ENV``, ``LABEL``, ``ARG``.
Everything else fails with a clear "unsupported instruction" error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

SUPPORTED = ("FROM", "COPY", "WORKDIR", "ENV", "LABEL", "ARG")
KNOWN = SUPPORTED + ("RUN", "CMD", "ENTRYPOINT", "EXPOSE", "USER", "VOLUME", "ADD", "ONBUILD",
                     "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER")
_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")
_NAME_CHARS = re.compile(r"[A-Za-z0-9_]")


class DockerfileError(Exception):
    """A Dockerfile this daemon cannot build; the text names the line."""


@dataclass
class Instruction:
    command: str  # upper case
    rest: str  # everything after the command word, continuation lines joined
    line: int  # 1-based line of the command word
    original: str
    flags: dict[str, str] = field(default_factory=dict)
    json_args: list[str] | None = None  # the exec (JSON array) form, if used

    def fail(self, message: str) -> DockerfileError:
        return DockerfileError(f"Dockerfile line {self.line}: {message}")


@dataclass
class Stage:
    base: str
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    escape: str
    global_args: list[Instruction]
    stages: list[Stage]

    def target(self, name: str | None) -> Stage:
        if not self.stages:
            raise DockerfileError("the Dockerfile has no FROM instruction")
        if not name:
            return self.stages[-1]
        for stage in self.stages:
            if stage.name and stage.name.lower() == name.lower():
                return stage
        raise DockerfileError(f"target stage {name} could not be found")


def parse(text: str) -> Dockerfile:
    lines = text.replace("\r\n", "\n").split("\n")
    escape = "\\"
    index = 0
    # parser directives: only at the very top, before any other line
    while index < len(lines):
        match = _DIRECTIVE.match(lines[index])
        if not match:
            break
        key, value = match.group(1).lower(), match.group(2)
        if key == "escape":
            if value not in ("\\", "`"):
                raise DockerfileError(f"invalid escape token {value!r} does not match ` or \\")
            escape = value
        index += 1
    instructions = _logical_lines(lines, index, escape)
    global_args: list[Instruction] = []
    stages: list[Stage] = []
    for inst in instructions:
        if inst.command == "FROM":
            _split_flags(inst)
            words = inst.rest.split()
            if len(words) not in (1, 3) or (len(words) == 3 and words[1].lower() != "as"):
                raise inst.fail("FROM requires either one or three arguments")
            stages.append(Stage(words[0], words[2] if len(words) == 3 else None, inst.line))
        elif not stages:
            if inst.command != "ARG":
                raise inst.fail(f"{inst.command} before the first FROM (only ARG may come first)")
            global_args.append(inst)
        else:
            stages[-1].instructions.append(inst)
    return Dockerfile(escape, global_args, stages)


def _logical_lines(lines: list[str], start: int, escape: str) -> list[Instruction]:
    out: list[Instruction] = []
    pending: list[str] = []
    first_line = 0
    for number in range(start, len(lines)):
        raw = lines[number]
        stripped = raw.strip()
        if pending and (not stripped or stripped.startswith("#")):
            continue  # comments and empty lines inside a continuation are dropped
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if not pending:
            first_line = number + 1
        body = raw.rstrip()
        if body.endswith(escape):
            pending.append(body[: -len(escape)].lstrip() if pending else body[: -len(escape)])
            continue
        pending.append(body.lstrip() if pending else body)
        out.append(_instruction(" ".join(p for p in pending), first_line))
        pending = []
    if pending:
        out.append(_instruction(" ".join(pending), first_line))
    return out


def _instruction(text: str, line: int) -> Instruction:
    text = text.strip()
    parts = text.split(None, 1)
    command = parts[0].upper()
    rest = parts[1].strip() if len(parts) > 1 else ""
    if command not in KNOWN:
        raise DockerfileError(f"Dockerfile line {line}: unknown instruction: {parts[0]}")
    return Instruction(command, rest, line, text)


def _split_flags(inst: Instruction) -> None:
    """Take leading ``--name=value`` flags off ``inst.rest``."""
    rest = inst.rest
    while rest.startswith("--"):
        word, _, tail = rest.partition(" ")
        name, eq, value = word[2:].partition("=")
        if not name:
            break
        inst.flags[name.lower()] = value if eq else "true"
        rest = tail.lstrip()
    inst.rest = rest
    if rest.startswith("["):
        try:
            value = json.loads(rest)
        except ValueError:
            value = None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            inst.json_args = value


def prepare(inst: Instruction) -> Instruction:
    """Split flags and the JSON form for instructions that have them."""
    if inst.command in ("COPY",) and not inst.flags and inst.json_args is None:
        _split_flags(inst)
    return inst


# -- words and expansion (BuildKit's shell lexer, reduced) ----------------------------


class ShellLex:
    def __init__(self, escape: str = "\\"):
        self.escape = escape

    def word(self, text: str, env: dict[str, str]) -> str:
        """One word: quotes removed, variables expanded, no splitting."""
        words = self._process(text, env, split=False)
        return words[0] if words else ""

    def words(self, text: str, env: dict[str, str]) -> list[str]:
        """Split on unquoted whitespace, then process each word."""
        return self._process(text, env, split=True)

    def _process(self, text: str, env: dict[str, str], split: bool) -> list[str]:
        words: list[str] = []
        current: list[str] = []
        in_word = False
        i = 0
        n = len(text)
        esc = self.escape
        while i < n:
            ch = text[i]
            if split and ch in " \t\n":
                if in_word:
                    words.append("".join(current))
                    current, in_word = [], False
                i += 1
                continue
            in_word = True
            if ch == esc:
                if i + 1 < n:
                    current.append(text[i + 1])
                    i += 2
                else:
                    current.append(ch)
                    i += 1
            elif ch == "'":
                end = text.find("'", i + 1)
                if end < 0:
                    raise DockerfileError("unexpected end of statement while looking for matching single-quote")
                current.append(text[i + 1 : end])
                i = end + 1
            elif ch == '"':
                i += 1
                while True:
                    if i >= n:
                        raise DockerfileError("unexpected end of statement while looking for matching double-quote")
                    c = text[i]
                    if c == '"':
                        i += 1
                        break
                    if c == esc and i + 1 < n and text[i + 1] in ('"', "$", esc):
                        current.append(text[i + 1])
                        i += 2
                    elif c == "$":
                        value, i = self._variable(text, i, env)
                        current.append(value)
                    else:
                        current.append(c)
                        i += 1
            elif ch == "$":
                value, i = self._variable(text, i, env)
                current.append(value)
            else:
                current.append(ch)
                i += 1
        if in_word or not split:
            words.append("".join(current))
        return words

    def _variable(self, text: str, i: int, env: dict[str, str]) -> tuple[str, int]:
        """Expand the variable at ``text[i] == '$'``; returns (value, next index)."""
        n = len(text)
        if i + 1 >= n:
            return "$", i + 1
        if text[i + 1] == "{":
            end = i + 2
            while end < n and _NAME_CHARS.match(text[end]):
                end += 1
            name = text[i + 2 : end]
            if not name:
                raise DockerfileError("missing variable name in ${}")
            if end < n and text[end] == "}":
                return env.get(name, ""), end + 1
            if end + 1 < n and text[end] == ":" and text[end + 1] in "-+":
                modifier = text[end + 1]
                close = _matching_brace(text, end + 2)
                if close < 0:
                    raise DockerfileError("missing '}' in variable expansion")
                word = self.word(text[end + 2 : close], env)
                value = env.get(name, "")
                if modifier == "-":
                    return (value if value else word), close + 1
                return (word if value else ""), close + 1
            raise DockerfileError(f"unsupported modifier in ${{{name}...}}")
        end = i + 1
        while end < n and _NAME_CHARS.match(text[end]):
            end += 1
        if end == i + 1:
            return "$", i + 1
        return env.get(text[i + 1 : end], ""), end


def _matching_brace(text: str, start: int) -> int:
    depth = 0
    for pos in range(start, len(text)):
        if text[pos] == "{":
            depth += 1
        elif text[pos] == "}":
            if depth == 0:
                return pos
            depth -= 1
    return -1


def key_value_pairs(inst: Instruction, lex: ShellLex, env: dict[str, str]) -> list[tuple[str, str]]:
    """``ENV``/``LABEL`` arguments: ``k=v k2="v 2"``, or the legacy ``ENV k v w``."""
    words = raw_words(inst.rest, lex.escape)
    if not words or "=" not in words[0]:
        parts = inst.rest.split(None, 1)
        if len(parts) < 2:
            raise inst.fail(f"{inst.command} requires at least one argument" if not parts else
                            f"{inst.command} must have two arguments")
        return [(lex.word(parts[0], env), lex.word(parts[1], env))]
    # split raw text first so that the key is never expanded into a '='
    pairs = []
    for raw in words:
        key, eq, value = raw.partition("=")
        if not eq:
            raise inst.fail(f"{inst.command} names can not be blank" if not key else
                            f"{inst.command} {raw!r}: expected key=value")
        key = lex.word(key, env)
        if not key:
            raise inst.fail(f"{inst.command} names can not be blank")
        pairs.append((key, lex.word(value, env)))
    return pairs


def raw_words(text: str, escape: str) -> list[str]:
    """Split on unquoted whitespace keeping quotes and escapes (processed later)."""
    words, current, quote = [], [], None
    i = 0
    while i < len(text):
        ch = text[i]
        if quote is None and ch in " \t\n":
            if current:
                words.append("".join(current))
                current = []
            i += 1
            continue
        if ch == escape and quote != "'" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if ch in "'\"":
            if quote is None:
                quote = ch
            elif quote == ch:
                quote = None
        current.append(ch)
        i += 1
    if current:
        words.append("".join(current))
    return words
