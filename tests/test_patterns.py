"""Exclude-pattern semantics of docker CLI 20.10 (moby pkg/fileutils v20.10.24, Go 1.19).

Tables below are our own statements of fact. Rows marked "observed" were checked
against a private dockerd/docker CLI 20.10.24 (Debian build, go1.19.8) with
``docker build -o type=local`` and a ``FROM scratch`` / ``COPY . /`` Dockerfile.
"""

from __future__ import annotations

import os
import time

import pytest

from reference.patterns import (
    PatternError,
    PatternMatcher,
    go_clean,
    go_filepath_match,
    go_regexp_source,
    go_trim_space,
    matches,
    parse_dockerignore,
)

ERROR = "error"
NON_UTF8_NAME = os.fsdecode(b"a\xff")  # what os.listdir returns for that byte

# ---------------------------------------------------------------------------
# Single pattern against one path (NewPatternMatcher + Matches).

SINGLE_PATTERN_FACTS = [
    # "**" and friends
    ("**", "notes", True),
    ("**", "notes/", True),
    ("**/", "notes", True),  # cleaned to "**"
    ("**", "/", True),
    ("**", "lib/notes", True),
    ("**/**", "lib/notes", True),
    ("**/**", "lib/notes/", True),
    ("lib/**", "lib/notes", True),
    ("lib/**", "lib/sub/notes/", True),
    ("lib/**", "lib", False),
    ("**/sub/*", "lib/sub/notes", True),
    ("**/sub/**", "lib/sub/deeper/notes", True),
    ("**notes", "notes", True),
    ("**notes", "lib/notes", True),
    ("**notes", "lib/x/notes", True),
    ("**/notes", "lib/x/notes", True),
    ("**/notes*", "lib/x/notes.md", True),
    ("**/notes*md", "lib/x/notes.md", True),
    ("**/notes*.md*", "lib/x/notes.md", True),
    ("**/**/*.md", "lib/x/notes.md", True),
    ("**/**/*.mdx", "lib/x/notes.md", False),
    ("**/*.md", "notes.md", True),
    ("**/**/*.md", "notes.md", True),
    ("q**/*.md", "q/notes.md", True),
    ("q**/*.md", "q/r/notes.md", True),
    ("q**/*.md", "q/r/s/notes.md", True),
    ("a**b", "ab", True),
    ("a**b", "a/x/b", True),
    ("**/a/b", "a/b", True),
    ("**/a/b", "x/a/b", True),
    ("**/a/b", "x/y/a/b", True),
    ("**/.env", ".env", True),
    ("**/.env", "my.env", False),
    ("**", "a\nb", False),  # Go's '.' does not match a newline
    ("*", "a\nb", True),
    # "*" and "?" stop at "/"
    ("q/*.md", "q/r/notes.md", False),
    ("q/*.md", "q/notes.md", True),
    ("q/*.md**", "q/notes.md", True),
    ("*.md", "lib/notes.md", False),
    ("v1?2", "v1x2", True),
    ("v1?2", "v12", False),
    ("v1?2", "v1/2", False),
    # classes are Go regexp classes
    ("x[m-o]y", "xy", False),
    ("x[m-o]y", "xny", True),
    ("x[m-o]y", "xly", False),
    ("x[^m-o]y", "xzy", True),
    ("x[^m-o]y", "x/y", True),  # a negated class does match "/"
    ("a[!b]", "a!", True),  # "!" is not negation
    ("a[!b]", "ab", True),
    ("a[!b]", "ac", False),
    ("a[[:digit:]]", "a1", True),
    ("a[[:digit:]]", "ab", False),
    ("a[[:space:]]b", "a\vb", True),
    ("[]a]", "]", ERROR),  # rejected by the filepath.Match syntax check
    # regexp specials that fileutils escapes
    (".*", ".hidden", True),
    (".*", "hidden", False),
    ("v1.2", "v1x2", False),
    ("v1.2", "v1.2", True),
    ("$HOME", "$HOME", True),
    # backslash escapes the next character
    ("x\\*y", "x*y", True),
    ("x\\*y", "xzy", False),
    ("x\\\\", "x\\", True),
    ("x\\?", "x?", True),
    ("x\\?", "xy", False),
    # parent directories: a pattern with n components is also tried on the first n
    # components of the path's directory
    ("lib", "lib/x/y", True),
    ("lib/x", "lib/x/y/z", True),
    ("l*", "lib/x", True),
    ("l*/x", "lib/x/y", True),
    ("x", "lib/x", False),
    ("*/x", "lib/x", True),
    ("*/x", "a/b/x", False),
    ("lib/x", "lib", False),
]


@pytest.mark.parametrize("pattern,path,expected", SINGLE_PATTERN_FACTS)
def test_single_pattern(pattern, path, expected):
    if expected == ERROR:
        with pytest.raises(PatternError):
            PatternMatcher([pattern]).matches(path)
    else:
        assert PatternMatcher([pattern]).matches(path) is expected


# Shell-style cases run through fileutils.Matches (which cleans the path and never
# excludes "."). Note the parent-directory rule: "a*" matches "ab/c".
MATCHES_FUNCTION_FACTS = [
    ("abc", "abc", True),
    ("*", "abc", True),
    ("*c", "abc", True),
    ("a*", "a", True),
    ("a*", "abc", True),
    ("a*", "ab/c", True),
    ("a*/b", "abc/b", True),
    ("a*/b", "a/c/b", False),
    ("p*q*r*/s", "pxqxrx/s", True),
    ("p*q*r*/s", "pxqxrxxx/s", True),
    ("p*q*r*/s", "pxqxr/xxx/s", False),
    ("p*q*r*/s", "pxqxrxxx/sss", False),
    ("m*n?o*z", "mnxnnxonxozz", True),
    ("m*n?o*z", "mnxnnxonxozy", False),
    ("xy[z]", "xyz", True),
    ("xy[y-z]", "xyz", True),
    ("xy[a-c]", "xyz", False),
    ("xy[^z]", "xyz", False),
    ("xy[^y-z]", "xyz", False),
    ("xy[^a-c]", "xyz", True),
    ("k?m", "k\u263am", True),
    ("k[^k]m", "k\u263am", True),
    ("k???m", "k\u263am", False),
    ("[a-\u03b6]*", "\u03b1", True),
    ("*[a-\u03b6]", "A", False),
    ("k?m", "k/m", False),
    ("k*m", "k/m", False),
    ("[\\]k]", "]", True),
    ("[\\-]", "-", True),
    ("[k\\-]", "k", True),
    ("[k\\-]", "-", True),
    ("[k\\-]", "z", False),
    ("[\\-k]", "-", True),
    ("[\\-k]", "a", False),
    ("*k", "kkk", True),
    ("*.go", ".", False),  # the root is never excluded
    ("anything", "./anything/", True),  # the path is cleaned first
    # filepath.Match syntax errors, reported by NewPatternMatcher
    ("[]k]", "]", ERROR),
    ("[-]", "-", ERROR),
    ("[k-]", "k", ERROR),
    ("[-k]", "k", ERROR),
    ("\\", "k", ERROR),
    ("[a-b-c]", "a", ERROR),
    ("[", "a", ERROR),
    ("[^", "a", ERROR),
    ("[^bc", "a", ERROR),
    ("k[", "k", ERROR),
    ("k[", "kb", ERROR),
]


@pytest.mark.parametrize("pattern,path,expected", MATCHES_FUNCTION_FACTS)
def test_matches_function(pattern, path, expected):
    if expected == ERROR:
        with pytest.raises(PatternError):
            matches(path, [pattern])
    else:
        assert matches(path, [pattern]) is expected


# ---------------------------------------------------------------------------
# Several patterns: the last matching one decides.

ORDER_FACTS = [
    (["*.go"], "main.go", True),
    (["!main.go", "*.go"], "main.go", True),
    (["*.go", "!main.go"], "main.go", False),
    (["*.go", "!main.go"], "util.go", True),
    (["docs", "!docs/README.md"], "docs/README.md", False),
    (["docs/", "!docs/README.md"], "docs/README.md", False),
    (["docs/*", "!docs/README.md"], "docs/README.md", False),
    (["docs", "!docs/README.md"], "docs/other.md", True),
    (["docs", "!docs/sub"], "docs/sub/deep/file", False),  # the exception matches a parent
    (["docs", "!docs/sub", "docs/sub/deep"], "docs/sub/deep/file", True),
    (["a", "!a", "a/x.md"], "a/x.md", True),
    (["a", "!a", "a/x.md"], "a/y.md", False),
    ([], "/any/path/there", False),
    (["", "  ", "\t"], "x", False),
]


@pytest.mark.parametrize("patterns,path,expected", ORDER_FACTS)
def test_pattern_order(patterns, path, expected):
    assert matches(path, patterns) is expected


def test_matcher_cleans_and_flags_patterns():
    matcher = PatternMatcher(["docs", "config", "", "  !docs/README.md  ", "./x/../y/"])
    assert [p.cleaned for p in matcher.patterns] == ["docs", "config", "docs/README.md", "y"]
    assert [p.exclusion for p in matcher.patterns] == [False, False, True, False]
    assert matcher.exclusions is True
    assert PatternMatcher(["docs", "config"]).exclusions is False


@pytest.mark.parametrize("pattern", ["!", "  !  ", "!/"])
def test_lone_exclamation_is_an_error(pattern):
    with pytest.raises(PatternError, match="illegal exclusion pattern"):
        PatternMatcher([pattern])


def test_exclusion_is_not_recleaned_after_bang():
    # NewPatternMatcher cleans "!./a" as a whole, so the pattern left is "./a".
    matcher = PatternMatcher(["!./a"])
    assert matcher.patterns[0].cleaned == "./a"
    assert matcher.matches("a") is False


def test_regexp_errors_surface_on_match_not_construction():
    matcher = PatternMatcher(["ok", "c++"])  # passes the filepath.Match check
    with pytest.raises(PatternError, match="nested repetition"):
        matcher.matches("anything")
    with pytest.raises(PatternError):
        matcher.matches("ok")  # every call reports it, whichever pattern would match


# ---------------------------------------------------------------------------
# Characters fileutils passes straight into the Go regexp.

REGEXP_PASSTHROUGH_FACTS = [
    ("a{2}", "aa", True),  # observed
    ("a{2}", "a{2}", False),  # observed
    ("a{2}", "a", False),  # observed
    ("(ab)+", "abab", True),  # observed
    ("(ab)+", "aab", False),  # observed
    ("+foo", "foo", True),  # observed: '+' repeats the leading ^
    ("+foo", "xfoo", False),  # observed
    ("\\x41", "A", True),  # observed
    ("\\x41", "B", False),  # observed
    ("foo|bar", "foozle", True),  # observed: "^foo|bar$"
    ("foo|bar", "crowbar", True),  # observed
    ("foo|bar", "baz", False),  # observed
    ("a*\\", "ab$", True),  # observed: the trailing "\" escapes the final "$"
    ("a*\\", "a$", True),  # observed
    ("a*\\", "ab", False),  # observed
    ("x\\pL", "x\u00e9", True),  # observed
    ("x\\pL", "x1", False),  # observed
    ("a?", NON_UTF8_NAME, True),  # observed: an invalid byte is one character
    ("a\ufffd", NON_UTF8_NAME, True),  # observed: ... and that character is U+FFFD
    ("a[^0-9]", "ab", True),  # observed
    ("a[^0-9]", "a1", False),  # observed
    ("x{,2}", "x{,2}", True),  # Go: not a repeat, so literal braces
    ("x{,2}", "xx", False),
    ("x{01}", "x{01}", True),  # leading zero: literal
    ("x{2,}", "xxx", True),
    ("x{1,2}y", "xxy", True),
    ("x{1,2}y", "xxxy", False),
    ("a\\z", "a", True),
    ("x\\b", "x", True),
    ("x\\bb", "xb", False),
    ("v\\d", "v7", True),
    ("v\\d", "v\u0663", False),  # Go's \d is ASCII only
    ("a\\sb", "a b", True),
    ("a\\sb", "a\vb", False),  # Go's \s has no \v
    ("a\\Wb", "a-b", True),
    ("a\\0", "a\x00", True),
    ("a\\101", "aA", True),  # octal
    ("a\\x{263a}", "a\u263a", True),
    ("a\\Q.*", "a\\.[^/]*$tail", True),  # \Q...: the rest is literal, the end anchor too
    ("a\\Q.*", "a.x", False),
    ("\ufefffoo", "foo", True),  # text/scanner drops a leading BOM
    ("a^b", "a^b", False),  # '^' is an anchor, so this never matches
    ("c++", "c++", ERROR),  # observed: build fails "failed to match excludepatterns"
    ("\\path\\to", "path", ERROR),  # observed: "\p" followed by "a" is an invalid class
    ("(", "x", ERROR),
    (")", "x", ERROR),
    ("x{1001}", "x", ERROR),
    ("(x{100}){100}", "x", ERROR),
    ("x{2}{3}", "x", ERROR),
    ("x+{2}", "x", ERROR),
    ("a\\C", "a", ERROR),
    ("a\\8", "a", ERROR),
    ("a\\é", "a", ERROR),  # non-ASCII escapes are invalid
    ("a\\xZZ", "a", ERROR),
    ("[[:nope:]]", "a", ERROR),
    ("[b-a]", "a", ERROR),
]


@pytest.mark.parametrize("pattern,path,expected", REGEXP_PASSTHROUGH_FACTS)
def test_regexp_passthrough(pattern, path, expected):
    if expected == ERROR:
        with pytest.raises(PatternError):
            PatternMatcher([pattern]).matches(path)
    else:
        assert PatternMatcher([pattern]).matches(path) is expected


def test_unicode_script_classes_are_a_known_gap():
    # dockerd 20.10.24 accepts "x\p{Greek}" (observed: it excluded "xα", kept "xa").
    # Python's re has no script data, so we refuse rather than guess.
    with pytest.raises(PatternError, match="not supported"):
        PatternMatcher(["x\\p{Greek}"]).matches("xa")


@pytest.mark.parametrize(
    "pattern,source",
    [
        ("*.txt", "^[^/]*\\.txt$"),
        ("**/x", "^(.*/)?x$"),
        ("a/**", "^a/.*$"),
        ("a?$", "^a[^/]\\$$"),
        ("a\\", "^a\\$"),
        ("\ufeffb", "^b$"),
    ],
)
def test_regexp_source(pattern, source):
    assert go_regexp_source(pattern) == source


# ---------------------------------------------------------------------------
# .dockerignore parsing (ReadAll)

PARSE_FACTS = [
    (b"", []),
    (b"a\nb\n", ["a", "b"]),
    (b"a\r\nb\r\n", ["a", "b"]),  # observed: CRLF files work
    (b"x\r", ["x"]),
    (b"a\n\n\n", ["a"]),
    (b"# c\n #not a comment\n\tx \n", ["#not a comment", "x"]),  # observed
    (b"keep # trailing\n", ["keep # trailing"]),  # observed: no inline comments
    (b"\xef\xbb\xbfkeep\nb.txt\n", ["keep", "b.txt"]),  # observed
    (b"\xef\xbb\xbf# c\nfoo", ["foo"]),
    (b"foo\n\xef\xbb\xbfbar", ["foo", "\ufeffbar"]),  # only the first line loses a BOM
    (b"/abs\n!/abs/keep\n/\n", ["abs", "!abs/keep", "/"]),
    (b"/a/\nsrc/lib/\n", ["a", "src/lib"]),  # observed
    (b"! spaced \n", ["!spaced"]),  # observed with "! a/keep.txt"
    (b"!\n", ["!"]),
    (b"a/../b/./c//\n", ["b/c"]),
    (b"src/../a\n", ["a"]),  # observed
    (b"../x\n", ["../x"]),
    (b"//x\n", ["x"]),
    (b".\n", ["."]),  # observed: excludes nothing
    (b"\x1cfoo\n", ["\x1cfoo"]),  # Go's TrimSpace keeps U+001C (Python's strip would not)
    ("\u00a0keep\u00a0\n".encode(), ["keep"]),  # observed: NBSP is trimmed
    (b"line\rwith\rcr\n", ["line\rwith\rcr"]),
    (b"caf\xe9\n", ["caf\udce9"]),
    (b"a" * 65535 + b"\nkeep\n", ["a" * 65535, "keep"]),  # observed
    (b"keep\n" + b"a" * 65535, ["keep", "a" * 65535]),  # observed
]


@pytest.mark.parametrize("data,expected", PARSE_FACTS, ids=range(len(PARSE_FACTS)))
def test_parse_dockerignore(data, expected):
    assert parse_dockerignore(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"a" * 65536 + b"\n",  # observed: "bufio.Scanner: token too long"
        b"a" * 65535 + b"\r\n",  # observed: the CR counts
        b"keep\n" + b"a" * 65536,  # observed
    ],
)
def test_parse_dockerignore_line_too_long(data):
    with pytest.raises(PatternError, match="token too long"):
        parse_dockerignore(data)


def test_dockerfile_dockerignore_style_content():
    data = (
        b"\xef\xbb\xbf# build outputs\r\n"
        b"**/node_modules\r\n"
        b"/dist/\r\n"
        b"*.log\r\n"
        b"!important.log\r\n"
        b"  # indented: a pattern, not a comment\r\n"
        b"\r\n"
        b"docs\r\n"
        b"!docs/README.md\r\n"
    )
    patterns = parse_dockerignore(data)
    assert patterns == [
        "**/node_modules",
        "dist",
        "*.log",
        "!important.log",
        "# indented: a pattern, not a comment",
        "docs",
        "!docs/README.md",
    ]
    matcher = PatternMatcher(patterns)
    assert matcher.matches("web/node_modules/react/index.js")
    assert matcher.matches("dist/app.js")
    assert matcher.matches("debug.log")
    assert not matcher.matches("important.log")
    assert not matcher.matches("sub/debug.log")  # "*.log" is anchored at the root
    assert not matcher.matches("docs/README.md")
    assert matcher.matches("docs/other.md")
    assert not matcher.matches("src/dist/x")


# ---------------------------------------------------------------------------
# Go helpers

@pytest.mark.parametrize(
    "path,cleaned",
    [
        ("", "."),
        ("a/", "a"),
        ("//a/./b/../c/", "/a/c"),
        ("../../a", "../../a"),
        ("a/../..", ".."),
        ("/..", "/"),
        ("./", "."),
        ("a//b", "a/b"),
        ("...", "..."),
        (".hidden/x", ".hidden/x"),
    ],
)
def test_go_clean(path, cleaned):
    assert go_clean(path) == cleaned


def test_go_trim_space_uses_go_whitespace():
    assert go_trim_space("\u2003\t x \u3000\x85") == "x"
    assert go_trim_space("\x1cx\x1f") == "\x1cx\x1f"
    assert go_trim_space("\ufeffx") == "\ufeffx"


FILEPATH_MATCH_FACTS = [
    ("abc", "abc", True),
    ("*", "", True),
    ("", "", True),
    ("", "a", False),
    ("a*", "ab/c", False),  # no parent-directory rule here
    ("*/b", "a/b", True),
    ("[^a-c]", "/", True),  # classes accept "/" ...
    ("?", "/", False),  # ... "?" does not
    ("*??", "\u20ac", True),  # "*" skips bytes, so "?" can eat half a character
    ("???", "\u20ac", False),
    ("[\\]a]", "]", True),
    ("x*[", "y", False),  # the unreached chunk is not syntax-checked
    ("x*[", "xa", ERROR),
    ("a[", "x", ERROR),  # a failed chunk is still checked to its end
    ("foo\\", ".", ERROR),
    ("[]", "a", ERROR),
]


@pytest.mark.parametrize("pattern,name,expected", FILEPATH_MATCH_FACTS)
def test_go_filepath_match(pattern, name, expected):
    if expected == ERROR:
        with pytest.raises(PatternError):
            go_filepath_match(pattern, name)
    else:
        assert go_filepath_match(pattern, name) is expected


# ---------------------------------------------------------------------------


def test_matcher_is_fast_enough_for_large_trees():
    patterns = parse_dockerignore(
        b"node_modules\n**/*.log\n*.tmp\n!important.log\nbuild/\n**/cache/**\nd1*/s2\n"
    )
    matcher = PatternMatcher(patterns)
    paths = [f"d{i}/s{j}/file{k}.txt" for i in range(50) for j in range(10) for k in range(10)]
    start = time.perf_counter()
    excluded = sum(matcher.matches(p) for p in paths)
    elapsed = time.perf_counter() - start
    assert excluded == 11 * 10  # d1 and d10..d19, subdirectory s2, ten files each
    assert elapsed < 1.0, elapsed


def test_docker_sdk_pattern_matcher_is_not_moby_exact():
    """docker-py's own matcher is not the 20.10 semantics, which is why we do not use it."""
    sdk_build = pytest.importorskip("docker.utils.build")
    differences = {
        # (patterns, path): what 20.10 does
        (("README",), "readme"): False,  # docker-py lower-cases both sides
        (("a[!b]",), "ab"): True,  # Go: "!" is literal in a class; docker-py negates
        (("a+b",), "aab"): True,  # Go passes "+" to the regexp; docker-py escapes it
        (("x\\*y",), "x*y"): True,  # docker-py has no escapes
    }
    for (patterns, path), moby in differences.items():
        assert PatternMatcher(list(patterns)).matches(path) is moby
        assert sdk_build.PatternMatcher(list(patterns)).matches(path) is not moby
