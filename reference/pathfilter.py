"""Per-entry include/exclude decision of the fsutil@0834f99 walker (no I/O).

The CLI serves a ``FileSync/DiffCopy`` by walking the synced directory in lexical
order. For every entry below the root the walker decides:

1. **Include patterns** (``include-patterns`` metadata plus the resolved
   ``followpaths``). Each pattern is compared with ``path/filepath.Match``. If the
   pattern has more components than the path, only its leading components are
   compared ("partial" match), so directories on the way to a deeper pattern are
   entered -- and a *file* whose name equals such a prefix is sent too. A directory
   matched by a whole pattern includes its entire subtree without further include
   checks. An entry that matches nothing is dropped; a directory is not entered.
2. **Exclude patterns** (``exclude-patterns``, i.e. the parsed .dockerignore), with
   ``reference.patterns.PatternMatcher``. An excluded file is dropped. An excluded
   directory is skipped with its subtree, unless some ``!`` pattern *literally*
   starts with ``<dir>/`` -- then the directory itself is still sent and the walk
   goes on below it (a wildcard exception such as ``!*/keep`` does not count).

``PathFilter.decide`` is a pure function of the path (memoising per directory), so it
can be used by any walker that visits parents before children and honours
``Decision.descend``. The root itself (".") is never passed in.
"""

from __future__ import annotations

from typing import NamedTuple

from .patterns import PatternMatcher, _filepath_match_bytes, _BadPattern, _utf8, go_clean

__all__ = ["Decision", "PathFilter", "dedupe_paths"]


class Decision(NamedTuple):
    include: bool  # send this entry's STAT
    descend: bool  # directories only: walk into it (False means skip the subtree)


INCLUDE_DIR = Decision(True, True)
INCLUDE_FILE = Decision(True, False)
SKIP = Decision(False, False)


def dedupe_paths(paths: list[str]) -> list[str] | None:
    """fsutil's dedupePaths: drop entries below the previously kept one.

    It expects sorted input but is also applied to unsorted lists; it only compares
    with the last kept entry, exactly as upstream. A "." anywhere means "no filter"
    and yields None.
    """
    out: list[str] = []
    last = ""  # upstream starts from "", so a leading absolute path is dropped as "below" it
    for path in paths:
        if path == ".":
            return None
        if path.startswith(last + "/"):
            continue
        out.append(path)
        last = path
    return out


class _IncludePattern:
    """One include pattern, split so partial (prefix) matches are cheap."""

    __slots__ = ("text", "separators", "prefixes", "literal")

    def __init__(self, text: str):
        self.text = _utf8(text)
        self.separators = text.count("/")
        parts = self.text.split(b"/")
        # prefixes[n] is the pattern cut to its first n+1 components.
        self.prefixes = [b"/".join(parts[: n + 1]) for n in range(len(parts))]
        self.literal = not any(ch in self.text for ch in b"*?[\\")

    def match(self, name: bytes, name_separators: int) -> tuple[bool, bool]:
        """fsutil matchPrefix: (matched, partial)."""
        partial = self.separators > name_separators
        pattern = self.prefixes[name_separators] if partial else self.text
        if self.literal:
            return pattern == name, partial
        try:
            return _filepath_match_bytes(pattern, name), partial
        except _BadPattern:
            return False, partial  # fsutil ignores Match errors


class PathFilter:
    """Decide, per walked entry, whether it is sent and whether its subtree is walked.

    ``include_patterns``: values of the ``include-patterns`` metadata key (None or empty:
    no include filter -- gRPC metadata cannot carry an empty list, so upstream sees nil).
    ``exclude_patterns``: values of ``exclude-patterns`` (raises PatternError at
    construction for a syntax error; a regexp error surfaces on the first ``decide``
    that reaches the matcher, like upstream).
    ``follow_paths_resolved``: result of ``reference.followlinks.resolve_follow_paths``
    (None or empty: nothing to add).
    """

    __slots__ = ("include_patterns", "_includes", "_matcher", "_covered", "_passthrough")

    def __init__(self, include_patterns=None, exclude_patterns=None, follow_paths_resolved=None):
        includes: list[str] | None = None
        if include_patterns:
            includes = [go_clean(p) for p in include_patterns]
        if follow_paths_resolved:
            includes = dedupe_paths((includes or []) + list(follow_paths_resolved))
        self.include_patterns: tuple[str, ...] | None = None if includes is None else tuple(includes)
        self._includes = None if includes is None else [_IncludePattern(p) for p in includes]
        matcher = PatternMatcher(exclude_patterns) if exclude_patterns else None
        self._matcher = matcher if matcher is not None and matcher.patterns else None
        # Directories wholly matched by an include pattern (or below one): True/False memo.
        self._covered: dict[str, bool] = {}
        self._passthrough = self._includes is None and self._matcher is None

    def decide(self, path: str, is_dir: bool) -> Decision:
        """Decision for a clean, slash-separated path relative to the root."""
        if self._passthrough:
            return INCLUDE_DIR if is_dir else INCLUDE_FILE
        if self._includes is not None:
            cut = path.rfind("/")
            if not (cut > 0 and self._is_covered(path[:cut])):
                matched, partial = self._match_includes(path)
                if not matched:
                    return SKIP
                if is_dir and not partial:
                    self._covered[path] = True
        matcher = self._matcher
        if matcher is not None and matcher.matches(path):
            if not is_dir or not matcher.exclusions:
                return SKIP
            dir_slash = path + "/"
            for pattern in matcher.patterns:
                if pattern.exclusion and (pattern.cleaned + "/").startswith(dir_slash):
                    return INCLUDE_DIR  # an exception lies below: send the dir, keep walking
            return SKIP
        return INCLUDE_DIR if is_dir else INCLUDE_FILE

    def _match_includes(self, path: str) -> tuple[bool, bool]:
        name = _utf8(path)
        separators = path.count("/")
        matched, partial = False, True
        for pattern in self._includes:
            ok, is_partial = pattern.match(name, separators)
            if ok:
                matched = True
                if not is_partial:
                    return True, False
        return matched, partial

    def _is_covered(self, directory: str) -> bool:
        """Whether the directory, or one of its ancestors, fully matched an include pattern.

        Ancestors are looked up towards the root until one is known, then decided
        back down (a loop: a tree may be thousands of levels deep)."""
        covered_memo = self._covered
        known = covered_memo.get(directory)
        if known is not None:
            return known
        unknown = [directory]
        covered = False
        cut = directory.rfind("/")
        while cut > 0:
            parent = directory[:cut]
            known = covered_memo.get(parent)
            if known is not None:
                covered = known
                break
            unknown.append(parent)
            cut = parent.rfind("/")
        for path in reversed(unknown):  # outermost first
            if not covered:
                matched, partial = self._match_includes(path)
                covered = matched and not partial
            covered_memo[path] = covered
        return covered
