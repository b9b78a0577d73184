"""Section 3.6: version advisories and the PEP 440 subset matcher.

The matcher is compared with ``packaging.specifiers.SpecifierSet(spec, prereleases=True)``
on a generated table of (spec, version) pairs (``packaging`` is in the test extra); the
library itself never imports it.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Any

import pytest

import metal_guard as mg
from helpers import run_python

# The original metal-guard's 13 entries (package, spec, issue, severity), plus SPEC-2 §7's.
ORIGINAL = [
    ("mlx-lm", "==0.31.2", "ml-explore/mlx-lm#1128", "high"),
    ("mlx-lm", "==0.31.2", "ml-explore/mlx-lm#1139", "high"),
    ("mlx-lm", "==0.31.2", "ml-explore/mlx-lm#1081", "medium"),
    ("mlx", "<0.31.2", "ml-explore/mlx#3348", "info"),
    ("mlx-vlm", "<0.4.5", "Blaizzy/mlx-vlm#967", "critical"),
    ("mlx-vlm", "==0.4.4", "Blaizzy/mlx-vlm#1016", "high"),
    ("mlx-vlm", "==0.4.4", "Blaizzy/mlx-vlm#1011", "high"),
    ("mlx-vlm", "==0.4.4", "Blaizzy/mlx-vlm#943", "critical"),
    ("mlx", "<=0.31.1", "ml-explore/mlx#3384", "critical"),
    ("mlx-lm", ">=0.31.0,<=0.31.2", "ml-explore/mlx-lm#897", "high"),
    ("mlx-vlm", "==0.4.4", "Blaizzy/mlx-vlm#999", "high"),
    ("mlx", "<=0.31.2", "ml-explore/mlx#3350", "high"),
    ("mlx", "<=0.31.2", "ml-explore/mlx#3390", "high"),
]
ADDED = [("mlx", "==0.31.2", "ml-explore/mlx#3450", "critical")]
KEYS = {"issue", "severity", "title", "url", "symptom", "mitigation"}


def issues(found: list[dict[str, Any]]) -> list[str]:
    return [a["issue"] for a in found]


# -- the table ----------------------------------------------------------------------------


def test_the_table_holds_the_original_entries_and_the_new_ones_in_order() -> None:
    rows = [(p, s, a["issue"], a["severity"]) for p, s, a in mg._VERSION_ADVISORIES]
    assert rows == ORIGINAL + ADDED


@pytest.mark.parametrize("entry", mg._VERSION_ADVISORIES, ids=lambda e: e[2]["issue"])
def test_every_shipped_entry_parses_and_is_complete(entry: tuple[str, str, dict[str, str]]) -> None:
    package, spec, advisory = entry
    assert mg._parse_spec(spec)  # at least one clause, no ValueError
    assert KEYS <= set(advisory) <= KEYS | {"scope"}
    assert advisory["severity"] in mg._SEVERITY_ORDER
    repo, number = advisory["issue"].split("#")
    assert repo in ("ml-explore/mlx", "ml-explore/mlx-lm", "Blaizzy/mlx-vlm")
    assert repo.split("/")[1] == package
    assert advisory["url"] == f"https://github.com/{repo}/issues/{number}"
    assert package in ("mlx", "mlx-lm", "mlx-vlm")
    for key in KEYS - {"issue", "severity", "url"}:
        assert len(advisory[key]) > 20, key


def test_scoped_entries() -> None:
    scopes = {a["issue"]: a.get("scope") for _, _, a in mg._VERSION_ADVISORIES}
    assert scopes["ml-explore/mlx-lm#897"] == "mlx_lm.server"
    assert scopes["Blaizzy/mlx-vlm#999"] == "mlx_vlm.server"
    assert "gemma-4-26b-a4b-it-4bit" in (scopes["Blaizzy/mlx-vlm#943"] or "")
    assert sum(s is not None for s in scopes.values()) == 3


# -- check_version_advisories ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("packages", "expected"),
    [
        (
            {"mlx-lm": "0.31.2"},
            [
                "ml-explore/mlx-lm#1128",
                "ml-explore/mlx-lm#1139",
                "ml-explore/mlx-lm#1081",
                "ml-explore/mlx-lm#897",
            ],
        ),
        ({"mlx-lm": "0.31.0"}, ["ml-explore/mlx-lm#897"]),
        ({"mlx-lm": "0.31.2.post1"}, []),  # a post-release is above <=0.31.2
        ({"mlx-lm": "0.31.3"}, []),
        (
            {"mlx": "0.31.2"},
            ["ml-explore/mlx#3350", "ml-explore/mlx#3390", "ml-explore/mlx#3450"],
        ),
        (
            {"mlx": "0.31.1"},
            [
                "ml-explore/mlx#3348",
                "ml-explore/mlx#3384",
                "ml-explore/mlx#3350",
                "ml-explore/mlx#3390",
            ],
        ),
        # a release candidate of 0.31.2: inside <=0.31.2, but not <0.31.2 (PEP 440) nor ==0.31.2
        ({"mlx": "0.31.2rc1"}, ["ml-explore/mlx#3350", "ml-explore/mlx#3390"]),
        ({"mlx": "0.32.4"}, []),
        (
            {"mlx-vlm": "0.4.4"},
            [
                "Blaizzy/mlx-vlm#967",
                "Blaizzy/mlx-vlm#1016",
                "Blaizzy/mlx-vlm#1011",
                "Blaizzy/mlx-vlm#943",
                "Blaizzy/mlx-vlm#999",
            ],
        ),
        ({"mlx-vlm": "0.4.5"}, []),
        ({"mlx-vlm": "0.4.5.dev1"}, []),  # a dev build of 0.4.5 is a pre-release of 0.4.5
        ({"mlx-vlm": "0.4.4.post1"}, ["Blaizzy/mlx-vlm#967"]),
        (
            {"MLX_LM": "0.31.0", "Mlx.Vlm": "0.4.3"},
            ["Blaizzy/mlx-vlm#967", "ml-explore/mlx-lm#897"],
        ),
        ({}, []),
        ({"transformers": "4.0"}, []),
    ],
)
def test_given_versions(packages: dict[str, str], expected: list[str]) -> None:
    assert issues(mg.check_version_advisories(packages=packages)) == expected


def test_results_carry_the_advisory_and_the_match() -> None:
    (first, *_) = mg.check_version_advisories(packages={"mlx-lm": "0.31.2"})
    assert first["package"] == "mlx-lm"
    assert first["installed_version"] == "0.31.2"
    assert first["affected_spec"] == "==0.31.2"
    assert first["issue"] == "ml-explore/mlx-lm#1128" and first["severity"] == "high"
    assert "think_start_id" in first["title"]
    assert "install_upstream_defensive_patches" in first["mitigation"]
    (server,) = [
        a for a in mg.check_version_advisories(packages={"mlx-lm": "0.31.1"}) if a.get("scope")
    ]
    assert server["scope"] == "mlx_lm.server" and server["affected_spec"] == ">=0.31.0,<=0.31.2"
    (segv,) = [
        a
        for a in mg.check_version_advisories(packages={"mlx": "0.31.2"})
        if a["issue"] == "ml-explore/mlx#3450"
    ]
    assert "clear_cache" in segv["title"] and "SIGSEGV" in segv["title"]


def test_results_are_copies() -> None:
    found = mg.check_version_advisories(packages={"mlx-lm": "0.31.2"})
    found[0]["title"] = "changed"
    found[0]["url"] = ""
    again = mg.check_version_advisories(packages={"mlx-lm": "0.31.2"})
    assert again[0]["title"] != "changed" and again[0]["url"].startswith("https://")


@pytest.mark.parametrize("version", ["banana", "", "0.31.2 beta", "1.0+", "0.31.2-foo"])
def test_a_version_that_is_not_pep_440_is_skipped(version: str) -> None:
    assert mg.check_version_advisories(packages={"mlx-lm": version, "mlx": "0.31.1"}) == (
        mg.check_version_advisories(packages={"mlx": "0.31.1"})
    )


@pytest.mark.parametrize("packages", [["mlx"], "mlx==0.31.2", 3])
def test_packages_must_be_a_mapping(packages: Any) -> None:
    with pytest.raises(TypeError, match="packages must be a dict"):
        mg.check_version_advisories(packages=packages)


def test_installed_versions_come_from_package_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def fake(name: str) -> str | None:
        asked.append(name)
        return {"mlx": "0.31.2", "mlx-lm": "0.31.2"}.get(name)

    monkeypatch.setattr(mg, "_installed_version", fake)
    found = mg.check_version_advisories()
    assert issues(found) == [
        "ml-explore/mlx-lm#1128",
        "ml-explore/mlx-lm#1139",
        "ml-explore/mlx-lm#1081",
        "ml-explore/mlx-lm#897",
        "ml-explore/mlx#3350",
        "ml-explore/mlx#3390",
        "ml-explore/mlx#3450",
    ]
    assert sorted(asked) == ["mlx", "mlx-lm", "mlx-vlm"]  # each package looked up once


def test_installed_version_reads_real_metadata(tmp_path: Path) -> None:
    """A ``.dist-info`` folder on ``sys.path`` is what ``importlib.metadata`` reads."""
    dist = tmp_path / "mlx_vlm-0.4.4.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mlx-vlm\nVersion: 0.4.4\n")
    code = (
        "import sys, metal_guard as mg\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "found = [a['issue'] for a in mg.check_version_advisories() if a['package'] == 'mlx-vlm']\n"
        "print(mg._installed_version('mlx-vlm'), ','.join(found))\n"
        "print('mlx.core' in sys.modules, 'mlx_vlm' in sys.modules)\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first == (
        "0.4.4 Blaizzy/mlx-vlm#967,Blaizzy/mlx-vlm#1016,Blaizzy/mlx-vlm#1011,"
        "Blaizzy/mlx-vlm#943,Blaizzy/mlx-vlm#999"
    )
    assert second == "False False"  # metadata only: nothing imported


def test_installed_version_of_a_missing_distribution_is_none() -> None:
    assert mg._installed_version("surely-not-installed-metal-guard-test") is None


# -- the matcher, by hand (independent of packaging) ----------------------------------------


@pytest.mark.parametrize(
    ("spec", "version", "expected"),
    [
        ("==0.31.2", "0.31.2", True),
        ("==0.31.2", "0.31.2.0", True),
        ("==0.31", "0.31.0", True),
        ("==0.31.2", "0.31.2+local.7", True),  # no local label in the spec: ignored
        ("==0.31.2+abc", "0.31.2", False),
        ("==0.31.2+abc", "0.31.2+abc", True),
        ("==0.31.2", "v0.31.2", True),
        ("==0.31.2rc1", "0.31.2RC1", True),
        ("==0.31.2rc1", "0.31.2-rc.1", True),
        ("==0.31.2.post1", "0.31.2-1", True),
        ("==1!0.31.2", "0.31.2", False),
        ("!=0.31.2", "0.31.3", True),
        ("<0.31.2", "0.31.2rc1", False),  # <V excludes pre-releases of V itself
        ("<0.31.2", "0.31.2.dev1", False),
        ("<0.31.2", "0.31.1.post3", True),
        ("<0.31.2rc2", "0.31.2rc1", True),
        ("<0.31.2.post1", "0.31.2rc1", True),  # a pre-release of 0.31.2, not of 0.31.2.post1
        ("<0.31.2.post1", "0.31.2.post1.dev0", False),
        ("<=0.31.2", "0.31.2rc1", True),
        ("<=0.31.2", "0.31.2.post1", False),
        ("<=0.31.2", "0.31.2+local", True),
        (">0.31.2", "0.31.2.post1", False),  # >V excludes post-releases of V itself
        (">0.31.2", "0.31.2+local", False),
        (">0.31.2", "0.31.3.dev0", True),
        (">0.31.2.post1", "0.31.2.post2", True),
        (">0.31.2.post1", "0.31.2.post1+local", False),
        (">0.31.2rc1", "0.31.2.post1", True),  # a post-release of 0.31.2, not of 0.31.2rc1
        (">0.31.2rc1", "0.31.2rc1.post1", False),
        (">0.31.2.dev3", "0.31.2.dev3+local", False),
        (">=0.31.2", "0.31.2rc1", False),
        (">=0.31.2rc1", "0.31.2rc1", True),
        ("~=0.31.2", "0.31.9", True),
        ("~=0.31.2", "0.32.0", False),
        ("~=0.31.2", "0.31.1", False),
        ("~=0.31", "0.99", True),
        ("~=0.31", "1.0", False),
        ("~=2.2.post3", "2.9", True),
        ("~=1.4.5a4", "1.4.5", True),
        ("~=1.4.5a4", "1.5.0", False),
        ("==0.31.*", "0.31.5rc1", True),
        ("==0.31.*", "0.32", False),
        ("!=0.31.*", "0.31.0", False),
        ("==0.31.0.*", "0.31", True),
        (">=0.31.0, <=0.31.2", "0.31.1", True),
        (">=0.31.0,<=0.31.2,", "0.31.3", False),
        ("", "1.0", True),
        (" ", "0.0.dev0", True),
    ],
)
def test_matcher_by_hand(spec: str, version: str, expected: bool) -> None:
    assert mg._spec_matches(spec, version) is expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("~=1", "at least two release numbers"),
        ("<1.0+local", "local version"),
        ("===1.0", "arbitrary equality"),
        (">=1.0.*", ".* prefix"),
        ("==1.0rc1.*", ".* prefix"),
        ("=>1.0", "not a version specifier"),
        ("1.0", "not a version specifier"),
        ("==1.0,abc", "not a version specifier"),
        ("==banana", "not a PEP 440 version"),
    ],
)
def test_invalid_specs_raise(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mg._spec_matches(spec, "1.0")


def test_ordering_of_pre_post_dev_and_local() -> None:
    ordered = [
        "1.0.dev0",
        "1.0a1.dev1",
        "1.0a1",
        "1.0a2.post1",
        "1.0b1",
        "1.0rc1.dev0",
        "1.0rc1",
        "1.0",
        "1.0+abc",
        "1.0+abc.5",
        "1.0+5",
        "1.0.post1.dev1",
        "1.0.post1",
        "1.0.1",
        "1!0.1",
    ]
    keys = [mg._version_key(mg._parse_version(v)) for v in ordered]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)


# -- agreement with packaging on a generated table ----------------------------------------

SPEC_VERSIONS = [
    "0.31",
    "0.31.0",
    "0.31.1",
    "0.31.2",
    "0.31.2rc1",
    "0.31.2b2",
    "0.31.2.post1",
    "0.31.2.dev3",
    "0.31.2a1.dev1",
    "0.31.2.post1.dev2",
    "1!0.31.2",
    "0.4.4",
]
OPERATORS = ["==", "!=", "<", "<=", ">", ">=", "~="]
EXTRA_SPECS = [
    "==0.31.*",
    "!=0.31.*",
    "==0.*",
    "==0.31.2.*",
    "==0.31.2+abc.1",
    "!=0.31.2+abc.1",
    ">=0.31.0,<=0.31.2",
    ">=0.31.2rc1,<0.32",
    "~=0.31.1,!=0.31.2",
    "<0.4.5",
    "~=0.31.2rc1",
    "~=1!0.31.2",
    "==1!0.31.*",
    ">0.31.2rc1.post1",
    "<0.31.2.post1.dev3",
    "",
]
CANDIDATES = [
    "0.30.9",
    "0.31",
    "0.31.0",
    "0.31.1",
    "0.31.1.post1",
    "0.31.2",
    "0.31.2.0",
    "0.31.2a1",
    "0.31.2a1.dev1",
    "0.31.2b2",
    "0.31.2rc1",
    "0.31.2rc1.post1",
    "0.31.2rc2.dev1",
    "0.31.2.dev0",
    "0.31.2.dev3",
    "0.31.2.post1",
    "0.31.2.post1.dev2",
    "0.31.2.post2",
    "0.31.2+abc.1",
    "0.31.2+abc.2",
    "0.31.2+1",
    "0.31.3",
    "0.31.3.dev0",
    "0.32.0rc1",
    "0.32",
    "1.0",
    "1!0.1",
    "1!0.31.2",
    "0.31.2-1",
    "0.31.2_rc1",
    "v0.31.2",
    "0.31.2.RC1",
    "0.4.4",
    "0.4.5.dev1",
    "0.31.2.post1+abc",
    "0.31.2rc1+abc",
    "0.31.2.dev3+x.1",
    "0.31.2.dev4",
    "0.31.2.post1.dev3",
]
TABLE = [
    (spec, version)
    for spec, version in itertools.product(
        [op + v for op, v in itertools.product(OPERATORS, SPEC_VERSIONS)] + EXTRA_SPECS,
        CANDIDATES,
    )
]


def test_the_generated_table_is_large_enough() -> None:
    assert len(TABLE) >= 500
    pre = [v for v in CANDIDATES if any(t in v.lower() for t in ("a", "b", "rc"))]
    assert pre and [v for v in CANDIDATES if "post" in v] and [v for v in CANDIDATES if "dev" in v]
    assert any(spec.startswith("~=") for spec, _ in TABLE)


def _packaging_specifiers() -> Any:
    """``packaging.specifiers`` of a release that reads PEP 440's exclusive comparisons as we do.

    Releases before 26 decided ``<V.postN`` and ``>V`` for pre-release ``V`` by comparing
    base versions (``<1.0.post1`` refused ``1.0a1``); 26 follows PEP 440's text (a
    pre-release of ``V`` itself), and so does the library.
    """
    specifiers = pytest.importorskip(
        "packaging.specifiers",
        reason="packaging is not installed here; the comparison needs it (pip install packaging)",
    )
    import packaging

    major = int(packaging.__version__.split(".")[0])
    if major < 26:
        pytest.skip(f"packaging {packaging.__version__} predates the PEP 440 reading of 26+")
    return specifiers


def test_matcher_agrees_with_packaging_on_the_generated_table() -> None:
    specifiers = _packaging_specifiers()
    mismatches = []
    for spec, version in TABLE:
        try:
            want: object = specifiers.SpecifierSet(spec, prereleases=True).contains(version)
        except specifiers.InvalidSpecifier:
            want = ValueError
        try:
            got: object = mg._spec_matches(spec, version)
        except ValueError:
            got = ValueError
        if got != want:
            mismatches.append((spec, version, got, want))
    assert mismatches == []


def test_matcher_agrees_with_packaging_on_every_shipped_entry() -> None:
    specifiers = _packaging_specifiers()
    for _, spec, _ in mg._VERSION_ADVISORIES:
        reference = specifiers.SpecifierSet(spec, prereleases=True)
        for version in CANDIDATES:
            assert mg._spec_matches(spec, version) is reference.contains(version), (spec, version)


def test_the_library_never_imports_packaging() -> None:
    code = (
        "import sys, metal_guard as mg\n"
        "mg.check_version_advisories(packages={'mlx': '0.31.2rc1', 'mlx-lm': '0.31.2'})\n"
        "mg.check_version_advisories()\n"
        "print('packaging' in sys.modules)\n"
    )
    # the cwd keeps the repository's packaging/ folder off sys.path
    out = run_python(code, cwd=os.path.dirname(sys.executable))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
