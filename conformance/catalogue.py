"""The requirement catalogue: rules parsed from ``SPEC.md`` next to this module.

Each rule in SPEC.md is a level-4 heading ``#### <ID> (<LEVEL>; <roles>; <generations>)`` followed by its text
and optional ``Upstream:``, ``Observed:`` and ``Known deviations:`` lines. Tests refer to rules by ID, so the parser
is strict: anything that looks like a rule heading but does not parse is an error, never silently skipped.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from dataclasses import dataclass

__all__ = [
    "GENERATIONS",
    "LEVELS",
    "ROLES",
    "CatalogueError",
    "Requirement",
    "load_catalogue",
    "parse_catalogue",
    "requirement_ids_for_level",
]

LEVELS = ("MUST", "SHOULD", "MAY")
ROLES = ("client", "daemon", "sender", "receiver")
GENERATIONS = ("n-1", "n", "n+1", "all")

ID_PATTERN = re.compile(r"^[A-Z][A-Z0-9]*(-[A-Z0-9]+)*-\d+$")

_HEADING = re.compile(r"^(?P<hashes>#{1,6})\s+(?P<title>.*?)\s*$")
_RULE_HEADING = re.compile(r"^####\s+(?P<id>\S+)\s+\((?P<attributes>[^()]*)\)\s*$")
_TRAILER = re.compile(r"^(?P<key>Upstream|Observed|Known deviations):\s*(?P<value>.*)$")
# A sentence ends at . ! or ? followed by white space and something that can start a sentence, or by the end.
_FIRST_SENTENCE = re.compile(r"^(.+?[.!?])(?=\s+[A-Z`\"'(*]|\s*$)", re.DOTALL)

_TRAILER_FIELDS = {"Upstream": "upstream", "Observed": "observed", "Known deviations": "known_deviations"}


class CatalogueError(ValueError):
    """SPEC.md (or a string given to the parser) does not follow the catalogue format."""


@dataclass(frozen=True, slots=True)
class Requirement:
    id: str
    level: str
    roles: tuple[str, ...]
    generations: tuple[str, ...]
    title: str
    text: str
    upstream: str | None
    known_deviations: str | None
    section: str
    subsection: str | None = None
    observed: str | None = None
    line: int = 0

    def binds(self, role: str) -> bool:
        """Whether the rule constrains the given role."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        return role in self.roles

    def applies_to(self, generation: str) -> bool:
        """Whether the rule holds in the given protocol generation (``n-1``, ``n`` or ``n+1``)."""
        if generation not in ("n-1", "n", "n+1"):
            raise ValueError(f"unknown generation {generation!r}; expected 'n-1', 'n' or 'n+1'")
        return "all" in self.generations or generation in self.generations


@dataclass
class _RuleDraft:
    """A rule being collected line by line."""

    id: str
    level: str
    roles: tuple[str, ...]
    generations: tuple[str, ...]
    section: str
    subsection: str | None
    line: int
    paragraphs: list[list[str]]
    trailers: dict[str, list[str]]
    current_trailer: str | None = None


def _fail(source: str, line_number: int, problem: str) -> CatalogueError:
    return CatalogueError(f"{source}:{line_number}: {problem}")


def _split_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(","))


def _parse_rule_heading(line: str, source: str, line_number: int) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
    expected = "expected '#### <ID> (<MUST|SHOULD|MAY>; <roles>; <generations>)'"
    match = _RULE_HEADING.match(line)
    if match is None:
        raise _fail(source, line_number, f"malformed rule heading {line.strip()!r}: {expected}")
    rule_id = match["id"]
    if ID_PATTERN.match(rule_id) is None:
        raise _fail(
            source,
            line_number,
            f"malformed requirement ID {rule_id!r}: IDs are upper-case words joined by '-' ending in a number, "
            f"such as 'DIFFCOPY-ORDER-1'",
        )
    attributes = [part.strip() for part in match["attributes"].split(";")]
    if len(attributes) != 3:
        raise _fail(
            source, line_number, f"rule {rule_id}: heading has {len(attributes)} ';'-separated fields, {expected}"
        )
    level, raw_roles, raw_generations = attributes
    if level not in LEVELS:
        expected_levels = ", ".join(LEVELS)
        raise _fail(source, line_number, f"rule {rule_id}: unknown level {level!r}; expected one of {expected_levels}")

    roles = _split_list(raw_roles)
    for role in roles:
        if role not in ROLES:
            problem = f"rule {rule_id}: unknown role {role!r}; expected some of {', '.join(ROLES)}"
            raise _fail(source, line_number, problem)
    if len(set(roles)) != len(roles):
        raise _fail(source, line_number, f"rule {rule_id}: a role is listed twice in {raw_roles!r}")

    generations = _split_list(raw_generations)
    for generation in generations:
        if generation not in GENERATIONS:
            raise _fail(
                source,
                line_number,
                f"rule {rule_id}: unknown generation {generation!r}; expected some of {', '.join(GENERATIONS)}",
            )
    if len(set(generations)) != len(generations):
        raise _fail(source, line_number, f"rule {rule_id}: a generation is listed twice in {raw_generations!r}")
    if "all" in generations and len(generations) > 1:
        raise _fail(source, line_number, f"rule {rule_id}: generation 'all' cannot be combined with others")
    return rule_id, level, roles, generations


def _first_sentence(text: str) -> str:
    first_paragraph = text.split("\n\n", 1)[0]
    match = _FIRST_SENTENCE.match(first_paragraph)
    return match.group(1) if match else first_paragraph


def _finish(draft: _RuleDraft, source: str) -> Requirement:
    paragraphs = [" ".join(lines) for lines in draft.paragraphs if lines]
    if not paragraphs:
        raise _fail(source, draft.line, f"rule {draft.id} has no text")
    text = "\n\n".join(paragraphs)
    trailers = {_TRAILER_FIELDS[key]: " ".join(lines) for key, lines in draft.trailers.items()}
    return Requirement(
        id=draft.id,
        level=draft.level,
        roles=draft.roles,
        generations=draft.generations,
        title=_first_sentence(text),
        text=text,
        upstream=trailers.get("upstream"),
        known_deviations=trailers.get("known_deviations"),
        section=draft.section,
        subsection=draft.subsection,
        observed=trailers.get("observed"),
        line=draft.line,
    )


def parse_catalogue(markdown: str, source: str = "<string>") -> dict[str, Requirement]:
    """Parse catalogue markdown into requirements keyed by ID, in document order.

    Raises CatalogueError, naming ``source`` and the line, for a malformed rule heading, an unknown level, role or
    generation, a duplicate ID, a rule outside any ``##`` section, an empty rule, or text after the trailer lines.
    """
    requirements: dict[str, Requirement] = {}
    section: str | None = None
    subsection: str | None = None
    draft: _RuleDraft | None = None
    in_code_fence = False

    def close_draft() -> None:
        nonlocal draft
        if draft is not None:
            requirement = _finish(draft, source)
            requirements[requirement.id] = requirement
            draft = None

    for line_number, raw_line in enumerate(markdown.splitlines(), start=1):
        line = raw_line.rstrip()
        if line.lstrip().startswith("```"):
            in_code_fence = not in_code_fence
        heading = None if in_code_fence else _HEADING.match(line)

        if heading is not None:
            close_draft()
            depth = len(heading["hashes"])
            if depth == 2:
                section, subsection = heading["title"], None
            elif depth == 3:
                if section is None:
                    raise _fail(source, line_number, "'###' heading before any '##' section")
                subsection = heading["title"]
            elif depth >= 4:
                if depth > 4:
                    raise _fail(source, line_number, f"unexpected heading level {depth} in {line.strip()!r}")
                rule_id, level, roles, generations = _parse_rule_heading(line, source, line_number)
                if section is None:
                    raise _fail(source, line_number, f"rule {rule_id} is not inside any '##' section")
                if rule_id in requirements:
                    first = requirements[rule_id].line
                    problem = f"duplicate requirement ID {rule_id} (first defined on line {first})"
                    raise _fail(source, line_number, problem)
                draft = _RuleDraft(
                    id=rule_id,
                    level=level,
                    roles=roles,
                    generations=generations,
                    section=section,
                    subsection=subsection,
                    line=line_number,
                    paragraphs=[[]],
                    trailers={},
                )
            continue

        if draft is None:
            continue  # prose, tables and lists between rules are informative

        stripped = line.strip()
        trailer = _TRAILER.match(stripped)
        if trailer is not None:
            key = trailer["key"]
            if key in draft.trailers:
                raise _fail(source, line_number, f"rule {draft.id} has more than one '{key}:' line")
            draft.trailers[key] = [trailer["value"]] if trailer["value"] else []
            draft.current_trailer = key
        elif not stripped:
            if draft.current_trailer is None:
                draft.paragraphs.append([])
            draft.current_trailer = None
        elif draft.current_trailer is not None:
            draft.trailers[draft.current_trailer].append(stripped)  # continuation of a wrapped trailer line
        elif draft.trailers:
            raise _fail(
                source,
                line_number,
                f"rule {draft.id}: text after its Upstream/Observed/Known deviations lines; put the text first",
            )
        else:
            draft.paragraphs[-1].append(stripped)

    close_draft()
    return requirements


@functools.cache
def _load() -> tuple[Requirement, ...]:
    spec = importlib.resources.files(__package__ or "conformance").joinpath("SPEC.md")
    return tuple(parse_catalogue(spec.read_text(encoding="utf-8"), source=str(spec)).values())


def load_catalogue() -> dict[str, Requirement]:
    """All requirements of SPEC.md keyed by ID, in document order (parsed once, a fresh dict per call)."""
    return {requirement.id: requirement for requirement in _load()}


def requirement_ids_for_level(level: str) -> tuple[str, ...]:
    """IDs of the requirements of one level (MUST, SHOULD or MAY), in document order."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; expected one of {', '.join(LEVELS)}")
    return tuple(requirement.id for requirement in _load() if requirement.level == level)


def catalogue_as_json() -> list[dict]:
    """The catalogue as plain data, for tools that do not read Markdown."""
    import dataclasses

    return [dataclasses.asdict(req) for req in load_catalogue().values()]


if __name__ == "__main__":  # python -m conformance.catalogue > requirements.json
    import json as _json

    print(_json.dumps(catalogue_as_json(), indent=2, ensure_ascii=False))
