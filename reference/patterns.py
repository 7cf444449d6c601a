""".dockerignore parsing and exclude-pattern matching as docker CLI 20.10 applies them.

Sources of truth (read, not copied):

* ``parse_dockerignore`` follows buildkit's ``frontend/dockerfile/dockerignore.ReadAll``
  (the daemon's dockerfile frontend parses the file and sends the result as
  ``exclude-patterns`` metadata).
* ``PatternMatcher`` follows moby ``pkg/fileutils`` at v20.10.24 (identical to the copy
  vendored in docker/cli v20.10.24, which is what walks the context). Each pattern is
  turned into a *Go regexp* source string and matched with Go ``regexp`` semantics.
  Characters other than ``* ? . $ \\`` are passed through to the regexp unchanged, so
  ``+ ( ) | { } [ ] ^`` keep their regexp meaning (``a+b`` matches ``aab``, ``c++`` is an
  error). ``_GoRegexp`` re-implements the RE2 syntax rules Go applies (including its
  errors) and emits an equivalent Python ``re`` pattern.
* ``go_filepath_match`` follows Go 1.19 ``path/filepath.Match`` (the CLI binary in
  Debian's docker.io 20.10.24 is built with go1.19.8). fsutil uses it for include
  patterns and for wildcards in follow paths; NewPatternMatcher uses it for its
  syntax check.

Paths and patterns are ``str``; bytes that are not valid UTF-8 are expected to be
decoded with ``surrogateescape`` (as ``os.fsdecode`` does). Go sees such a byte as
U+FFFD, so we do the same before regexp matching.

Known gaps: ``\\p{Script}`` Unicode script classes raise ``PatternError`` (Go accepts
them; Python's ``re`` has no script data). Unicode general categories (``\\pL``) come
from Python's ``unicodedata`` (Unicode 14 rather than Go 1.19's Unicode 13). Go's
"expression too large" limit is not reproduced; its nesting limit (a parse tree at
most 1000 high, Go 1.19.2 and later) is, approximately: nested groups and
repetitions are counted.  Nothing here recurses on a pattern's nesting (patterns
come from the peer: the daemon sends them as ``exclude-patterns``).
"""

from __future__ import annotations

import re
import sys
import threading
import unicodedata
from functools import lru_cache

__all__ = [
    "PatternError",
    "Pattern",
    "PatternMatcher",
    "parse_dockerignore",
    "matches",
    "go_clean",
    "go_dir",
    "go_join",
    "go_trim_space",
    "go_filepath_match",
    "go_regexp_source",
]


class PatternError(ValueError):
    """A pattern that the Go code would reject (the CLI then fails the transfer)."""


# ---------------------------------------------------------------------------
# Small Go stdlib equivalents (Unix flavour: separator is "/").

# unicode.IsSpace: Latin-1 spaces plus the White_Space property. Python's
# str.isspace() differs (it also accepts U+001C..U+001F), so spell it out.
_GO_SPACE = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
)
_GO_SPACE_CHARS = "".join(sorted(_GO_SPACE))


def go_trim_space(text: str) -> str:
    """strings.TrimSpace."""
    return text.strip(_GO_SPACE_CHARS)


_NEEDS_CLEANING = re.compile(r"//|/$|(?:^|/)\.\.?(?:/|$)")


def go_clean(path: str) -> str:
    """path/filepath.Clean (lexical, Unix)."""
    if path == "":
        return "."
    if path[0] != "/" and not _NEEDS_CLEANING.search(path):
        return path  # already clean: the common case for walker paths
    rooted = path.startswith("/")
    parts: list[str] = []
    for comp in path.split("/"):
        if comp == "" or comp == ".":
            continue
        if comp == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            continue
        parts.append(comp)
    cleaned = "/".join(parts)
    if rooted:
        return "/" + cleaned
    return cleaned or "."


def go_join(*elems: str) -> str:
    """path/filepath.Join: skip leading empty elements, join the rest, Clean."""
    for i, elem in enumerate(elems):
        if elem != "":
            return go_clean("/".join(elems[i:]))
    return ""


def go_dir(path: str) -> str:
    """path/filepath.Dir."""
    return go_clean(path[: path.rfind("/") + 1])


_SURROGATES = re.compile("[\ud800-\udfff]")


def _as_go_text(text: str) -> str:
    """What Go's UTF-8 decoding sees: every undecodable byte is U+FFFD."""
    if text.isascii():
        return text
    return _SURROGATES.sub("\ufffd", text)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------
# .dockerignore parsing (ReadAll)

_MAX_LINE = 64 * 1024 - 1  # bufio.Scanner's buffer limit minus the '\n'
_UTF8_BOM = b"\xef\xbb\xbf"


def parse_dockerignore(data: bytes) -> list[str]:
    """Return the exclude patterns a 20.10 daemon derives from a .dockerignore file.

    Lines are split on LF with one trailing CR dropped. A line is a comment only if
    ``#`` is its very first byte (before trimming). Each pattern is trimmed, a leading
    ``!`` is kept aside, the rest is Clean-ed and loses one leading ``/``.
    """
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # a final newline does not start another line
    patterns: list[str] = []
    for index, raw in enumerate(lines):
        if len(raw) > _MAX_LINE:  # counted before the CR is dropped, as bufio does
            raise PatternError("Error reading .dockerignore: bufio.Scanner: token too long")
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if index == 0 and raw.startswith(_UTF8_BOM):
            raw = raw[len(_UTF8_BOM):]
        if raw.startswith(b"#"):
            continue
        pattern = go_trim_space(raw.decode("utf-8", "surrogateescape"))
        if pattern == "":
            continue
        invert = pattern.startswith("!")
        if invert:
            pattern = go_trim_space(pattern[1:])
        if pattern:
            pattern = go_clean(pattern)
            if len(pattern) > 1 and pattern.startswith("/"):
                pattern = pattern[1:]
        patterns.append("!" + pattern if invert else pattern)
    return patterns


# ---------------------------------------------------------------------------
# Go path/filepath.Match (Go 1.16+ semantics: a chunk is fully syntax-checked even
# after it failed to match; later chunks are only checked if reached).


class _BadPattern(Exception):
    pass


def _decode_rune(data: bytes, pos: int) -> tuple[int, int]:
    """utf8.DecodeRune: (rune, width); invalid input gives (0xFFFD, 1)."""
    first = data[pos]
    if first < 0x80:
        return first, 1
    for width in (2, 3, 4):
        chunk = data[pos : pos + width]
        if len(chunk) < width:
            break
        try:
            decoded = chunk.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if len(decoded) == 1:
            return ord(decoded), width
    return 0xFFFD, 1


def _class_char(chunk: bytes, pos: int) -> tuple[int, int]:
    """One possibly-escaped class character (getEsc); returns (rune, new pos)."""
    if pos >= len(chunk) or chunk[pos] in b"-]":
        raise _BadPattern
    if chunk[pos] == 0x5C:  # backslash
        pos += 1
        if pos >= len(chunk):
            raise _BadPattern
    rune, width = _decode_rune(chunk, pos)
    if rune == 0xFFFD and width == 1:
        raise _BadPattern
    pos += width
    if pos >= len(chunk):
        raise _BadPattern  # class never closed
    return rune, pos


def _match_chunk(chunk: bytes, name: bytes) -> bytes | None:
    """Match a star-free chunk at the start of name; return the rest or None."""
    failed = False
    pos = 0
    npos = 0
    while pos < len(chunk):
        if not failed and npos >= len(name):
            failed = True
        ch = chunk[pos]
        if ch == 0x5B:  # '['
            rune = 0
            if not failed:
                rune, width = _decode_rune(name, npos)
                npos += width
            pos += 1
            negated = pos < len(chunk) and chunk[pos] == 0x5E  # '^'
            if negated:
                pos += 1
            in_class = False
            nranges = 0
            while True:
                if pos < len(chunk) and chunk[pos] == 0x5D and nranges > 0:  # ']'
                    pos += 1
                    break
                lo, pos = _class_char(chunk, pos)
                hi = lo
                if chunk[pos] == 0x2D:  # '-'
                    hi, pos = _class_char(chunk, pos + 1)
                if lo <= rune <= hi:
                    in_class = True
                nranges += 1
            if in_class == negated:
                failed = True
        elif ch == 0x3F:  # '?'
            if not failed:
                if name[npos] == 0x2F:
                    failed = True
                npos += _decode_rune(name, npos)[1]
            pos += 1
        else:
            if ch == 0x5C:  # backslash escapes the next byte
                pos += 1
                if pos >= len(chunk):
                    raise _BadPattern
            if not failed:
                if chunk[pos] != name[npos]:
                    failed = True
                npos += 1
            pos += 1
    if failed:
        return None
    return name[npos:]


def _scan_chunk(pattern: bytes) -> tuple[bool, bytes, bytes]:
    """Split off leading stars and the following star-free chunk."""
    star = False
    while pattern[:1] == b"*":
        pattern = pattern[1:]
        star = True
    in_range = False
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == 0x5C:
            if i + 1 < len(pattern):
                i += 1
        elif ch == 0x5B:
            in_range = True
        elif ch == 0x5D:
            in_range = False
        elif ch == 0x2A and not in_range:
            break
        i += 1
    return star, pattern[:i], pattern[i:]


def _filepath_match_bytes(pattern: bytes, name: bytes) -> bool:
    while pattern:
        star, chunk, pattern = _scan_chunk(pattern)
        if star and not chunk:
            return b"/" not in name  # trailing star
        rest = _match_chunk(chunk, name)
        if rest is not None and (not rest or pattern):
            name = rest
            continue
        if star:
            # Skip 1..n bytes (not runes!) of name, never across a separator.
            skipped = False
            for i in range(len(name)):
                if name[i] == 0x2F:
                    break
                rest = _match_chunk(chunk, name[i + 1 :])
                if rest is not None:
                    if not pattern and rest:
                        continue
                    name = rest
                    skipped = True
                    break
            if skipped:
                continue
        return False
    return not name


def go_filepath_match(pattern: str, name: str) -> bool:
    """path/filepath.Match; raises PatternError where Go returns ErrBadPattern."""
    try:
        return _filepath_match_bytes(_utf8(pattern), _utf8(name))
    except _BadPattern:
        raise PatternError(f"syntax error in pattern: {pattern!r}") from None


# ---------------------------------------------------------------------------
# fileutils: pattern -> Go regexp source


def go_regexp_source(pattern: str) -> str:
    """The regexp source string fileutils builds for a cleaned pattern."""
    chars = _as_go_text(pattern)
    if chars.startswith("\ufeff"):
        chars = chars[1:]  # text/scanner skips a BOM as the first character
    out = ["^"]
    i, n = 0, len(chars)
    while i < n:
        ch = chars[i]
        i += 1
        if ch == "*":
            if i < n and chars[i] == "*":
                i += 1
                if i < n and chars[i] == "/":
                    i += 1  # "**/" behaves like "**"
                out.append(".*" if i >= n else "(.*/)?")
            else:
                out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch in ".$":
            out.append("\\" + ch)
        elif ch == "\\":
            if i < n:
                out.append("\\" + chars[i])
                i += 1
            else:
                out.append("\\")  # combines with the final '$' into a literal "$"
        else:
            out.append(ch)
    out.append("$")
    return "".join(out)


# ---------------------------------------------------------------------------
# Go regexp (RE2 syntax, Perl flags) -> Python re

_MAX_RUNE = 0x10FFFF


def _ranges(*pairs: str) -> tuple[tuple[int, int], ...]:
    return tuple((ord(p[0]), ord(p[-1])) for p in pairs)


# Go's \d \s \w and [:name:] classes are ASCII-only.
_PERL_GROUPS = {
    "d": _ranges("09"),
    "s": _ranges("\t\n", "\f\r", " "),
    "w": _ranges("09", "AZ", "__", "az"),
}
_POSIX_GROUPS = {
    "alnum": _ranges("09", "AZ", "az"),
    "alpha": _ranges("AZ", "az"),
    "ascii": ((0, 0x7F),),
    "blank": _ranges("\t", " "),
    "cntrl": ((0, 0x1F), (0x7F, 0x7F)),
    "digit": _ranges("09"),
    "graph": _ranges("!~"),
    "lower": _ranges("az"),
    "print": _ranges(" ~"),
    "punct": _ranges("!/", ":@", "[`", "{~"),
    "space": _ranges("\t\r", " "),
    "upper": _ranges("AZ"),
    "word": _ranges("09", "AZ", "__", "az"),
    "xdigit": _ranges("09", "AF", "af"),
}
# Go's unicode.Categories keys (no "Cn": Go has no table for unassigned code points).
_GO_CATEGORIES = frozenset(
    "C Cc Cf Co Cs L Ll Lm Lo Lt Lu M Mc Me Mn N Nd Nl No "
    "P Pc Pd Pe Pf Pi Po Ps S Sc Sk Sm So Z Zl Zp Zs".split()
)


def _negate(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    next_lo = 0
    for lo, hi in _normalise(ranges):
        if next_lo <= lo - 1:
            out.append((next_lo, lo - 1))
        next_lo = hi + 1
    if next_lo <= _MAX_RUNE:
        out.append((next_lo, _MAX_RUNE))
    return out


def _normalise(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            if hi > merged[-1][1]:
                merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return merged


@lru_cache(maxsize=None)
def _category_ranges(name: str) -> tuple[tuple[int, int], ...]:
    """Code point ranges of a general category (or category group) from unicodedata."""
    wanted = {"C": ("Cc", "Cf", "Co", "Cs")}.get(name)
    out: list[tuple[int, int]] = []
    start = None
    for cp in range(_MAX_RUNE + 1):
        cat = unicodedata.category(chr(cp))
        hit = cat in wanted if wanted else (cat == name or (len(name) == 1 and cat[0] == name))
        if hit and start is None:
            start = cp
        elif not hit and start is not None:
            out.append((start, cp - 1))
            start = None
    if start is not None:
        out.append((start, _MAX_RUNE))
    return tuple(out)


class _Node:
    """Parsed Go regexp node; ``kind`` is one of the _K* strings below."""

    __slots__ = ("kind", "value", "subs", "rmin", "rmax", "greedy", "counted")

    def __init__(self, kind, value=None, subs=(), rmin=0, rmax=0, greedy=True, counted=False):
        self.kind = kind
        self.value = value
        self.subs = list(subs)
        self.rmin = rmin
        self.rmax = rmax
        self.greedy = greedy
        self.counted = counted


_KLIT, _KCLASS, _KANY, _KBEGIN, _KEND = "lit", "class", "any", "begin", "end"
_KWORDB, _KNWORDB, _KCAT, _KALT, _KGROUP, _KREP = "wb", "nwb", "cat", "alt", "group", "rep"


#: Go's regexp/syntax maxHeight: a parse tree higher than this is "expression nests too deeply".
_MAX_HEIGHT = 1000
# fileutils' ^...$ puts the pattern two levels down in Go's tree.
_MAX_NESTING = _MAX_HEIGHT - 2


def _repeat_is_valid(node: _Node, budget: int) -> bool:
    """Go rejects nested counted repeats whose product exceeds 1000."""
    todo = [(node, budget)]
    while todo:
        node, budget = todo.pop()
        if node.kind == _KREP and node.counted:
            most = node.rmax
            if most == 0:
                continue
            if most < 0:
                most = node.rmin
            if most > budget:
                return False
            if most > 0:
                budget //= most
        todo.extend((sub, budget) for sub in node.subs)
    return True


def _nesting(node: _Node) -> int:
    """Nested groups and repetitions on the deepest path of the tree."""
    deepest = 0
    todo = [(node, 0)]
    while todo:
        node, depth = todo.pop()
        if node.kind in (_KGROUP, _KREP):
            depth += 1
            deepest = max(deepest, depth)
        todo.extend((sub, depth) for sub in node.subs)
    return deepest


class _GoRegexp:
    """Parse a Go regexp source with Go's rules and render it for Python's re."""

    def __init__(self, source: str):
        self.src = source
        self.pos = 0

    def _error(self, what: str) -> PatternError:
        return PatternError(f"error parsing regexp: {what}: `{self.src}`")

    # -- escapes ------------------------------------------------------------

    def _parse_escape(self) -> int:
        """Single-character escape at self.pos (which is at the backslash)."""
        src = self.src
        self.pos += 1
        if self.pos >= len(src):
            raise self._error("trailing backslash at end of expression")
        c = src[self.pos]
        self.pos += 1
        if c < "\x80" and not c.isalnum():
            return ord(c)
        if c in "1234567" and not (self.pos < len(src) and "0" <= src[self.pos] <= "7"):
            raise self._error("invalid escape sequence")  # backreferences unsupported
        if c in "01234567":
            value = ord(c) - 48
            for _ in range(2):
                if self.pos < len(src) and "0" <= src[self.pos] <= "7":
                    value = value * 8 + ord(src[self.pos]) - 48
                    self.pos += 1
                else:
                    break
            return value
        if c == "x":
            return self._parse_hex()
        simple = {"a": 7, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11}
        if c in simple:
            return simple[c]
        raise self._error("invalid escape sequence")

    def _parse_hex(self) -> int:
        src = self.src
        if self.pos >= len(src):
            raise self._error("invalid escape sequence")
        c = src[self.pos]
        self.pos += 1
        if c == "{":
            value, digits = 0, 0
            while True:
                if self.pos >= len(src):
                    raise self._error("invalid escape sequence")
                c = src[self.pos]
                self.pos += 1
                if c == "}":
                    break
                if c not in "0123456789abcdefABCDEF":
                    raise self._error("invalid escape sequence")
                value = value * 16 + int(c, 16)
                if value > _MAX_RUNE:
                    raise self._error("invalid escape sequence")
                digits += 1
            if digits == 0:
                raise self._error("invalid escape sequence")
            return value
        second = src[self.pos] if self.pos < len(src) else ""
        self.pos += 1 if second else 0
        if c in "0123456789abcdefABCDEF" and second and second in "0123456789abcdefABCDEF":
            return int(c + second, 16)
        raise self._error("invalid escape sequence")

    def _unicode_class(self) -> list[tuple[int, int]] | None:
        """\\pX, \\p{Name}, \\PX, \\p{^Name} at self.pos, or None if not one."""
        src = self.src
        if not src.startswith(("\\p", "\\P"), self.pos):
            return None
        negate = src[self.pos + 1] == "P"
        start = self.pos + 2
        if start < len(src) and src[start] == "{":
            end = src.find("}", start)
            if end < 0:
                raise self._error("invalid character class range")
            name = src[start + 1 : end]
            self.pos = end + 1
        else:
            name = src[start : start + 1]
            self.pos = start + 1
        if name.startswith("^"):
            negate = not negate
            name = name[1:]
        if name == "Any":
            ranges = [(0, _MAX_RUNE)]
        elif name in _GO_CATEGORIES:
            ranges = list(_category_ranges(name))
        elif len(name) > 1 and name[:1].isupper() and name.replace("_", "").isalpha():
            raise PatternError(
                f"\\p{{{name}}} (a Unicode script, or an invalid class) is not supported: `{src}`"
            )
        else:
            raise self._error("invalid character class range")
        return _negate(ranges) if negate else ranges

    def _perl_class(self) -> list[tuple[int, int]] | None:
        src = self.src
        if self.pos + 1 >= len(src) or src[self.pos] != "\\":
            return None
        letter = src[self.pos + 1]
        base = _PERL_GROUPS.get(letter.lower())
        if base is None or letter not in "dDsSwW":
            return None
        self.pos += 2
        return _negate(list(base)) if letter.isupper() else list(base)

    # -- character classes --------------------------------------------------

    def _class_char(self) -> int:
        if self.pos >= len(self.src):
            raise self._error("missing closing ]")
        if self.src[self.pos] == "\\":
            return self._parse_escape()
        c = self.src[self.pos]
        self.pos += 1
        return ord(c)

    def _parse_class(self) -> _Node:
        src = self.src
        self.pos += 1  # '['
        negated = self.pos < len(src) and src[self.pos] == "^"
        if negated:
            self.pos += 1
        ranges: list[tuple[int, int]] = []
        first = True  # ']' is literal in first position
        while self.pos >= len(src) or src[self.pos] != "]" or first:
            first = False
            if src.startswith("[:", self.pos) and len(src) - self.pos > 2:
                end = src.find(":]", self.pos + 2)
                if end >= 0:
                    name = src[self.pos + 2 : end]
                    invert = name.startswith("^")
                    group = _POSIX_GROUPS.get(name[1:] if invert else name)
                    if group is None:
                        raise self._error("invalid character class range")
                    ranges += _negate(list(group)) if invert else group
                    self.pos = end + 2
                    continue
            found = self._unicode_class()
            if found is None:
                found = self._perl_class()
            if found is not None:
                ranges += found
                continue
            lo = self._class_char()
            hi = lo
            if src.startswith("-", self.pos) and self.pos + 1 < len(src) and src[self.pos + 1] != "]":
                self.pos += 1
                hi = self._class_char()
                if hi < lo:
                    raise self._error("invalid character class range")
            ranges.append((lo, hi))
        self.pos += 1  # ']'
        return _Node(_KCLASS, _negate(ranges) if negated else _normalise(ranges))

    # -- repetition ----------------------------------------------------------

    def _parse_int(self) -> int | None:
        src = self.src
        start = self.pos
        if start >= len(src) or not "0" <= src[start] <= "9":
            return None
        if src[start] == "0" and start + 1 < len(src) and "0" <= src[start + 1] <= "9":
            return None  # leading zeros make the brace a literal
        end = start
        while end < len(src) and "0" <= src[end] <= "9":
            end += 1
        self.pos = end
        digits = src[start:end]
        return int(digits) if len(digits) <= 8 else -1

    def _parse_braces(self) -> tuple[int, int] | None:
        """{n}, {n,}, {n,m} at self.pos; None (position unchanged) if not one."""
        saved = self.pos
        self.pos += 1
        low = self._parse_int()
        result = None
        if low is not None and self.pos < len(self.src):
            if self.src[self.pos] != ",":
                high: int | None = low
            else:
                self.pos += 1
                if self.pos < len(self.src) and self.src[self.pos] == "}":
                    high = -1
                else:
                    high = self._parse_int()
                    if high is not None and high < 0:
                        low = -1
            if high is not None and self.pos < len(self.src) and self.src[self.pos] == "}":
                self.pos += 1
                result = (low, high)
        if result is None:
            self.pos = saved
        return result

    # -- main loop -------------------------------------------------------------

    def parse(self) -> _Node:
        src = self.src
        # Each frame is the list of finished alternatives plus the current concatenation.
        frames: list[tuple[list[list[_Node]], list[_Node]]] = [([], [])]
        last_was_repeat = False
        while self.pos < len(src):
            c = src[self.pos]
            is_repeat = False
            alts, current = frames[-1]
            if c == "(":
                if src.startswith("(?", self.pos):
                    # fileutils always rewrites '?', so its output never has Perl groups.
                    raise PatternError(f"unsupported Perl group syntax: `{src}`")
                frames.append(([], []))
                self.pos += 1
            elif c == "|":
                alts.append(current)
                frames[-1] = (alts, [])
                self.pos += 1
            elif c == ")":
                if len(frames) == 1:
                    raise self._error("unexpected )")
                frames.pop()
                frames[-1][1].append(_Node(_KGROUP, subs=[_alternation(alts + [current])]))
                self.pos += 1
            elif c == "^":
                current.append(_Node(_KBEGIN))
                self.pos += 1
            elif c == "$":
                current.append(_Node(_KEND))
                self.pos += 1
            elif c == ".":
                current.append(_Node(_KANY))
                self.pos += 1
            elif c == "[":
                current.append(self._parse_class())
            elif c in "*+?":
                self.pos += 1
                low, high = {"*": (0, -1), "+": (1, -1), "?": (0, 1)}[c]
                self._repeat(current, low, high, False, last_was_repeat)
                is_repeat = True
            elif c == "{":
                braces = self._parse_braces()
                if braces is None:
                    current.append(_Node(_KLIT, ord("{")))
                    self.pos += 1
                else:
                    low, high = braces
                    if low < 0 or low > 1000 or high > 1000 or (high >= 0 and low > high):
                        raise self._error("invalid repeat count")
                    self._repeat(current, low, high, True, last_was_repeat)
                    is_repeat = True
            elif c == "\\":
                self._escape_atom(current)
            else:
                current.append(_Node(_KLIT, ord(c)))
                self.pos += 1
            last_was_repeat = is_repeat
        if len(frames) != 1:
            raise self._error("missing closing )")
        alts, current = frames[0]
        return _alternation(alts + [current])

    def _repeat(self, current: list[_Node], low: int, high: int, counted: bool, nested: bool) -> None:
        greedy = True
        if self.pos < len(self.src) and self.src[self.pos] == "?":
            self.pos += 1
            greedy = False
        if nested:
            raise self._error("invalid nested repetition operator")
        if not current:
            raise self._error("missing argument to repetition operator")
        node = _Node(_KREP, subs=[current.pop()], rmin=low, rmax=high, greedy=greedy, counted=counted)
        current.append(node)
        if counted and (low >= 2 or high >= 2) and not _repeat_is_valid(node, 1000):
            raise self._error("invalid repeat count")

    def _escape_atom(self, current: list[_Node]) -> None:
        src = self.src
        nxt = src[self.pos + 1] if self.pos + 1 < len(src) else ""
        simple = {"A": _KBEGIN, "z": _KEND, "b": _KWORDB, "B": _KNWORDB}
        if nxt in simple:
            current.append(_Node(simple[nxt]))
            self.pos += 2
            return
        if nxt == "C":
            raise self._error("invalid escape sequence")
        if nxt == "Q":
            end = src.find("\\E", self.pos + 2)
            literal = src[self.pos + 2 :] if end < 0 else src[self.pos + 2 : end]
            self.pos = len(src) if end < 0 else end + 2
            current.extend(_Node(_KLIT, ord(ch)) for ch in literal)
            return
        ranges = self._unicode_class()
        if ranges is None:
            ranges = self._perl_class()
        if ranges is not None:
            current.append(_Node(_KCLASS, _normalise(ranges)))
            return
        current.append(_Node(_KLIT, self._parse_escape()))


def _alternation(branches: list[list[_Node]]) -> _Node:
    cats = [_Node(_KCAT, subs=branch) for branch in branches]
    return cats[0] if len(cats) == 1 else _Node(_KALT, subs=cats)


def _py_char(cp: int) -> str:
    ch = chr(cp)
    if ch.isascii() and ch.isalnum():
        return ch
    return f"\\U{cp:08x}"


def _render_leaf(node: _Node) -> str | None:
    """The Python text of a node without children; None for one with children."""
    kind = node.kind
    if kind == _KLIT:
        return _py_char(node.value)
    if kind == _KCLASS:
        if not node.value:
            return "(?!)"
        ranges, caret = node.value, ""
        complement = _negate(ranges)
        if len(complement) < len(ranges):
            ranges, caret = complement, "^"  # e.g. [^/] instead of two huge ranges
        body = "".join(
            _py_char(lo) if lo == hi else f"{_py_char(lo)}-{_py_char(hi)}" for lo, hi in ranges
        )
        return f"[{caret}{body}]"
    if kind == _KANY:
        return "."  # Go's '.' without (?s) excludes only '\n', like Python's
    if kind == _KBEGIN:
        return r"\A"
    if kind == _KEND:
        return r"\Z"
    if kind == _KWORDB:
        return r"\b"
    if kind == _KNWORDB:
        return r"\B"
    return None


def _quantifier(node: _Node) -> str:
    low, high = node.rmin, node.rmax
    if high < 0:
        quant = {0: "*", 1: "+"}.get(low, f"{{{low},}}")
    elif (low, high) == (0, 1):
        quant = "?"
    elif low == high:
        quant = f"{{{low}}}"
    else:
        quant = f"{{{low},{high}}}"
    return quant + ("" if node.greedy else "?")


def _render(root: _Node) -> str:
    """The Python ``re`` source for a parsed Go regexp (post-order, with an explicit stack)."""
    done: dict[int, str] = {}  # id(node) -> its text
    todo = [(root, False)]
    while todo:
        node, children_done = todo.pop()
        leaf = _render_leaf(node)
        if leaf is not None:
            done[id(node)] = leaf
            continue
        if not children_done:
            todo.append((node, True))
            todo.extend((sub, False) for sub in node.subs)
            continue
        parts = [done.pop(id(sub)) for sub in node.subs]
        kind = node.kind
        if kind == _KCAT:
            text = "".join(parts)
        elif kind == _KALT:
            text = "(?:" + "|".join(parts) + ")"
        elif kind == _KGROUP:
            text = "(?:" + parts[0] + ")"
        else:  # repetition
            body = parts[0]
            if node.subs[0].kind not in (_KLIT, _KCLASS, _KANY):
                body = "(?:" + body + ")"  # anchors, groups and repeats need a group to be quantified
            text = body + _quantifier(node)
        done[id(node)] = text
    return done[id(root)]


# Python's re parses and compiles recursively (a few frames per nesting level): the
# recursion limit is raised for a pattern Go accepts, one compile at a time.
_COMPILE_LOCK = threading.Lock()


def _compile_nested(source: str, nesting: int) -> re.Pattern[str]:
    if nesting < 100:
        return re.compile(source, re.ASCII)
    with _COMPILE_LOCK:
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 200 + 6 * nesting))
        try:
            return re.compile(source, re.ASCII)
        finally:
            sys.setrecursionlimit(limit)


@lru_cache(maxsize=4096)
def _compile_go_regexp(source: str) -> tuple[re.Pattern[str], bool]:
    """Compile a Go regexp source; returns (python regex, anchored at the start)."""
    tree = _GoRegexp(source).parse()
    nesting = _nesting(tree)
    if nesting > _MAX_NESTING:
        raise PatternError(f"error parsing regexp: expression nests too deeply: `{source}`")
    anchored = tree.kind == _KCAT and bool(tree.subs) and tree.subs[0].kind == _KBEGIN
    # re.ASCII: Go's \b and \B use ASCII word characters; nothing else we emit depends on it.
    return _compile_nested(_render(tree), nesting), anchored


# ---------------------------------------------------------------------------
# fileutils.PatternMatcher


class Pattern:
    """One compiled exclude pattern (fileutils.Pattern)."""

    __slots__ = ("cleaned", "exclusion", "dir_count", "_regex", "_error")

    def __init__(self, cleaned: str, exclusion: bool):
        self.cleaned = cleaned
        self.exclusion = exclusion
        self.dir_count = len(cleaned.split("/"))
        self._error: PatternError | None = None
        self._regex = None
        try:
            regex, anchored = _compile_go_regexp(go_regexp_source(cleaned))
            # MatchString searches anywhere; a leading ^ lets us use the cheaper match().
            self._regex = regex.match if anchored else regex.search
        except PatternError as exc:
            self._error = exc  # Go only reports this when a path is first matched

    def __repr__(self) -> str:
        return f"Pattern({'!' if self.exclusion else ''}{self.cleaned!r})"

    def match(self, path: str) -> bool:
        if self._error is not None:
            raise self._error
        return self._regex(path) is not None


class PatternMatcher:
    """fileutils.PatternMatcher: last matching pattern wins; '!' patterns re-include."""

    __slots__ = ("patterns", "exclusions", "_error", "_checks")

    def __init__(self, patterns):
        compiled: list[Pattern] = []
        has_exclusions = False
        for raw in patterns:
            text = go_trim_space(raw)
            if text == "":
                continue
            text = go_clean(text)
            exclusion = text.startswith("!")
            if exclusion:
                if len(text) == 1:
                    raise PatternError('illegal exclusion pattern: "!"')
                text = text[1:]
                has_exclusions = True
            go_filepath_match(text, ".")  # the same syntax check NewPatternMatcher does
            compiled.append(Pattern(text, exclusion))
        self.patterns: tuple[Pattern, ...] = tuple(compiled)
        self.exclusions: bool = has_exclusions
        # Matches() visits every pattern, so any regexp error surfaces on every call.
        self._error = next((p._error for p in compiled if p._error is not None), None)
        self._checks = tuple(
            (p._regex, p.dir_count, p.exclusion) for p in reversed(compiled) if p._error is None
        )

    def matches(self, path: str) -> bool:
        """True if the slash-separated relative path is excluded.

        A pattern also matches when it matches the leading directories of the path
        (as many components as the pattern has), which is how "dir" excludes
        "dir/file" without the walker having to skip "dir".
        """
        if self._error is not None:
            raise self._error
        checks = self._checks
        if not checks:
            return False
        if not path.isascii():
            path = _SURROGATES.sub("\ufffd", path)
        if path[:1] == "/" or _NEEDS_CLEANING.search(path):
            parent_dirs = go_dir(path).split("/")
            if parent_dirs == ["."]:
                parent_dirs = []
            prefix_of = lambda count: "/".join(parent_dirs[:count])  # noqa: E731
        else:
            # Clean path (what the walker passes): the parent's first n components
            # end right before the n-th slash.
            slashes = []
            cut = path.find("/")
            while cut >= 0:
                slashes.append(cut)
                cut = path.find("/", cut + 1)
            parent_dirs = slashes
            prefix_of = lambda count: path[: slashes[count - 1]]  # noqa: E731
        depth = len(parent_dirs)
        # The last matching pattern decides, so scan from the end and stop at the first hit.
        for regex, dir_count, exclusion in checks:
            if regex(path) is not None or (dir_count <= depth and regex(prefix_of(dir_count)) is not None):
                return not exclusion
        return False


def matches(path: str, patterns) -> bool:
    """fileutils.Matches: clean the path first; the context root is never excluded."""
    matcher = PatternMatcher(patterns)
    path = go_clean(path)
    if path == ".":
        return False
    return matcher.matches(path)
