"""The module's shape: tiers in order, each section's banner true to its code.

``metal_guard.py`` is one file whose order is its architecture. Every section opens with
a banner::

    # =============================================================================
    # 1.2 Locks — what the section is for.
    #
    # (why, briefly)
    #
    # Provides: _FileLock, LockUnsupported
    # Uses: prelude, storage
    # =============================================================================

The number's first digit is the tier (0 prelude … 6 command line). This test parses the
module and fails when a section uses a module-level name defined in a later section, or
in an earlier section its "Uses" line does not list, when a public name a section
defines is missing from its "Provides" line, or when a section grows past its budget.
"""

from __future__ import annotations

import ast
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import REPO

SOURCE = Path(REPO, "metal_guard.py").read_text(encoding="utf-8")
RULE = "# " + "=" * 77
TIERS = ["prelude", "storage", "MLX access", "knowledge", "policies", "runtime", "command line"]
MAX_SECTION_LINES = 600
BANNER_TITLE = re.compile(r"^# (\d)\.(\d+) (.+?) — ")


@dataclass
class Section:
    number: tuple[int, int]
    title: str
    start: int  # first line (1-based) of the banner
    end: int = 0  # last line of the section
    provides: list[str] = field(default_factory=list)
    uses: list[str] = field(default_factory=list)
    defined: set[str] = field(default_factory=set)
    used: dict[str, int] = field(default_factory=dict)  # name → first line


def _sections() -> list[Section]:
    lines = SOURCE.splitlines()
    sections: list[Section] = []
    i = 0
    while i < len(lines):
        if lines[i] == RULE and i + 1 < len(lines) and BANNER_TITLE.match(lines[i + 1]):
            match = BANNER_TITLE.match(lines[i + 1])
            assert match is not None
            section = Section((int(match[1]), int(match[2])), match[3], i + 1)
            j = i + 1
            while lines[j] != RULE:
                text = lines[j]
                for key, target in (("# Provides:", section.provides), ("# Uses:", section.uses)):
                    if text.startswith(key):
                        # a list may continue on following lines that start with "#   "
                        chunk = text[len(key) :]
                        while lines[j + 1].startswith("#   "):
                            j += 1
                            chunk += "," + lines[j][1:]
                        target += [w.strip() for w in chunk.split(",") if w.strip()]
                j += 1
            sections.append(section)
            i = j
        i += 1
    for this, following in itertools.pairwise(sections):
        this.end = following.start - 1
    if sections:
        sections[-1].end = len(lines)
    return sections


def _section_of(sections: list[Section], line: int) -> Section | None:
    for section in sections:
        if section.start <= line <= section.end:
            return section
    return None  # the module header (docstring, imports, __all__): part of the prelude


def _assigned_names(node: ast.stmt) -> set[str]:
    names: set[str] = set()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        names.add(node.name)
    elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            names |= {
                n.id
                for n in ast.walk(target)
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
            }
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
        names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    elif isinstance(node, (ast.If, ast.Try)):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                names |= _assigned_names(child)
    return names


def _local_names(func: ast.AST) -> set[str]:
    """Names a function binds itself (arguments, assignments, local imports)."""
    bound: set[str] = set()
    declared_global: set[str] = set()
    for sub in ast.walk(func):
        if isinstance(sub, ast.arg):
            bound.add(sub.arg)
        elif isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
            bound.add(sub.id)
        elif isinstance(sub, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in sub.names}
        elif isinstance(sub, (ast.Global, ast.Nonlocal)):
            declared_global |= set(sub.names)
        elif isinstance(sub, ast.ExceptHandler) and sub.name:
            bound.add(sub.name)
    return bound - declared_global


def _module_name_uses(
    node: ast.AST, local: frozenset[str] = frozenset()
) -> Iterator[tuple[str, int]]:
    """(name, line) of every use of a module-level name inside ``node``."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        local = local | _local_names(node)
    if isinstance(node, ast.Name) and node.id not in local:
        yield node.id, node.lineno
    for child in ast.iter_child_nodes(node):
        yield from _module_name_uses(child, local)


@pytest.fixture(scope="module")
def sections() -> list[Section]:
    found = _sections()
    tree = ast.parse(SOURCE)
    header: set[str] = set()
    for node in tree.body:
        section = _section_of(found, node.lineno)
        names = _assigned_names(node)
        (header if section is None else section.defined).update(names)
    owner = {name: s for s in found for name in s.defined}
    for node in tree.body:
        section = _section_of(found, node.lineno)
        if section is None:
            continue
        for name, line in _module_name_uses(node):
            if name in owner and owner[name] is not section:
                section.used.setdefault(name, line)
    return found


def test_sections_exist_in_tier_order(sections: list[Section]) -> None:
    assert sections, "no section banners found"
    numbers = [s.number for s in sections]
    assert numbers == sorted(numbers), numbers
    assert len(set(numbers)) == len(numbers), "two sections share a number"
    tiers = {s.number[0] for s in sections}
    assert tiers == set(range(len(TIERS))), f"every tier has a section: {sorted(tiers)}"
    assert sections[-1].number[0] == 6


def test_every_section_says_what_it_provides_and_uses(sections: list[Section]) -> None:
    for section in sections:
        assert section.provides, f"{section.title}: no 'Provides:' line"
        assert section.uses or section.number == (0, 1), f"{section.title}: no 'Uses:' line"


def _names_of(section: Section) -> set[str]:
    """What a "Uses" entry may say for a section: its title, or its tier's name."""
    return {section.title.lower(), TIERS[section.number[0]].lower()}


def test_sections_use_only_earlier_sections_they_declare(sections: list[Section]) -> None:
    owner = {name: s for s in sections for name in s.defined}
    problems = []
    for section in sections:
        declared = {u.lower() for u in section.uses}
        for name, line in sorted(section.used.items(), key=lambda item: item[1]):
            source = owner[name]
            if source.number > section.number:
                problems.append(
                    f"line {line}: {section.title} uses {name} from the later {source.title}"
                )
            elif not declared & _names_of(source):
                problems.append(
                    f"line {line}: {section.title} uses {name} from {source.title}, "
                    f"which its 'Uses:' line does not list"
                )
    assert not problems, "\n".join(problems)


def test_uses_lines_name_only_sections_that_are_used(sections: list[Section]) -> None:
    titles = {t for s in sections for t in _names_of(s)}
    owner = {name: s for s in sections for name in s.defined}
    stale = []
    for section in sections:
        used = {t for name in section.used for t in _names_of(owner[name])}
        for entry in section.uses:
            if entry == "nothing" and section.number == (0, 1):
                continue
            assert entry.lower() in titles, f"{section.title}: 'Uses: {entry}' names no section"
            if entry.lower() not in used:
                stale.append(f"{section.title}: 'Uses: {entry}' but uses nothing of it")
    assert not stale, "\n".join(stale)


def test_provides_lists_every_public_name(sections: list[Section]) -> None:
    for section in sections:
        public = {n for n in section.defined if not n.startswith("_")}
        missing = public - set(section.provides)
        assert not missing, f"{section.title} defines {sorted(missing)} but does not list them"
        unknown = {p for p in section.provides if p not in section.defined}
        assert not unknown, f"{section.title} lists {sorted(unknown)} but does not define them"


def test_sections_stay_readable(sections: list[Section]) -> None:
    for section in sections:
        size = section.end - section.start + 1
        assert size <= MAX_SECTION_LINES, f"{section.title} is {size} lines; split it"


def test_docstring_map_lists_the_sections_in_order(sections: list[Section]) -> None:
    doc = ast.get_docstring(ast.parse(SOURCE)) or ""
    positions = [doc.find(f"{s.number[0]}.{s.number[1]} {s.title}") for s in sections]
    assert -1 not in positions, [
        s.title for s, p in zip(sections, positions, strict=True) if p == -1
    ]
    assert positions == sorted(positions)


def test_all_groups_its_names_under_their_sections(sections: list[Section]) -> None:
    """``__all__``'s ``# x.y Title`` comments name the section that defines each name."""
    owner = {name: s for s in sections for name in s.defined}
    block = SOURCE[SOURCE.index("__all__ = [") : SOURCE.index("\n]\n", SOURCE.index("__all__ = ["))]
    heading, wrong = "", []
    for line in block.splitlines()[1:]:
        text = line.strip()
        if text.startswith("# "):
            heading = text[2:]
        elif text.startswith('"'):
            name = text.strip('",')
            section = owner.get(name)
            if section is None:  # the module header's own names (``__version__``)
                assert not heading, f"{name} is under '{heading}', defined before any section"
                continue
            expected = f"{section.number[0]}.{section.number[1]} {section.title}"
            if heading != expected:
                wrong.append(f"{name} is under '{heading}', defined in '{expected}'")
    assert not wrong, "\n".join(wrong)


def test_the_docs_name_sections_by_their_number_and_title(sections: list[Section]) -> None:
    """CONTRIBUTING.md's table lists every section in order; the API and isolation pages
    name only sections that exist, under their current numbers."""
    names = [f"{s.number[0]}.{s.number[1]} {s.title}" for s in sections]
    contributing = Path(REPO, "CONTRIBUTING.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\|[^|]*\| (\d\.\d+ [^|]+?) \| ", contributing, re.MULTILINE)
    assert rows == names
    for page in ("docs/api.md", "docs/isolation.md"):
        text = Path(REPO, page).read_text(encoding="utf-8")
        cited = re.findall(r"\b(\d\.\d+ [A-Z][\w-]*(?: [\w-]+)*(?: \([A-Z0-9]+\))?)", text)
        unknown = [c for c in cited if not any(c == n or c.startswith(n + " ") for n in names)]
        assert not unknown, f"{page} names sections that do not exist: {unknown}"
