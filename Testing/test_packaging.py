"""Packaging checks for the Slicer extension: CMake lists, extension description, resources.

These read files only (no Slicer, no CMake, no network) and run in well under a second. They
catch the mistakes a Slicer build would only reveal on the factory: a module script missing
from MODULE_PYTHON_SCRIPTS (so absent from the installed extension), a listed file that does
not exist (a CMake configure error), extension metadata out of step between CMakeLists.txt and
the .s4ext, a terminology without the bones' SNOMED codes, a pip requirement that would replace
Slicer's numpy/SimpleITK or pull torch outside the PyTorch extension, a wrong-sized icon.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO_ROOT / "AnkleFracture"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
TOP_CMAKE = REPO_ROOT / "CMakeLists.txt"
S4EXT = REPO_ROOT / "ankle_fracture.s4ext"
CATALOG_ENTRY = REPO_ROOT / "AnkleFracture.json"
TERMINOLOGY = REPO_ROOT / "Resources" / "Terminology" / "AnkleFracture.term.json"
REQUIREMENTS = REPO_ROOT / "Resources" / "requirements.txt"
ICON = REPO_ROOT / "Resources" / "Icons" / "AnkleFracture.png"
PYPROJECT = REPO_ROOT / "pyproject.toml"

RAW_URL_PREFIX = "https://raw.githubusercontent.com/AnkleFracture/SlicerAnkleFracture/main/"

# Keywords of Slicer's extension description file (Utilities/Templates/Extensions/
# extension_description.s4ext.in); "tier" is the newest and optional.
S4EXT_FIELDS = (
    "scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
    "category", "iconurl", "status", "description", "screenshoturls", "enabled",
)
S4EXT_NONEMPTY = (
    "scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "category",
    "iconurl", "description", "enabled",
)
EXTENSION_VARIABLES = (
    "HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS",
    "DEPENDS", "STATUS", "ENABLED",
)
# Never pip-installed by the module: torch comes from the PyTorch extension, numpy and
# SimpleITK ship with Slicer.
FORBIDDEN_REQUIREMENTS = ("torch", "numpy", "simpleitk")

SCT_TIBIA = "12611008"
SCT_FIBULA = "87342007"
SCT_ANATOMICAL_STRUCTURE = "123037004"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def strip_cmake_comments(text: str) -> str:
    """Remove CMake line comments (``# ...``) that are not inside double-quoted arguments.

    Args:
        text: CMake source.

    Returns:
        The source with every comment replaced by nothing (line breaks kept).
    """
    out_lines = []
    for line in text.splitlines():
        in_quotes = False
        cut = len(line)
        for i, ch in enumerate(line):
            if ch == '"' and (i == 0 or line[i - 1] != "\\"):
                in_quotes = not in_quotes
            elif ch == "#" and not in_quotes:
                cut = i
                break
        out_lines.append(line[:cut])
    return "\n".join(out_lines)


def cmake_set_values(text: str) -> dict[str, list[str]]:
    """Collect the arguments of every ``set(NAME ...)`` call.

    Args:
        text: CMake source (comments are stripped here).

    Returns:
        Variable name -> list of its arguments, quotes removed (the last ``set`` wins).
    """
    values: dict[str, list[str]] = {}
    source = strip_cmake_comments(text)
    # Arguments are quoted strings (which may hold parentheses) or unquoted words.
    call = r'\bset\s*\(\s*([A-Za-z0-9_]+)((?:\s+(?:"[^"]*"|[^\s"()]+))*)\s*\)'
    for match in re.finditer(call, source):
        tokens = re.findall(r'"[^"]*"|[^\s"]+', match.group(2))
        values[match.group(1)] = [t[1:-1] if t.startswith('"') else t for t in tokens]
    return values


def module_cmake_lists() -> tuple[list[str], list[str]]:
    """Parse AnkleFracture/CMakeLists.txt.

    Returns:
        (MODULE_PYTHON_SCRIPTS, MODULE_PYTHON_RESOURCES) with ``${MODULE_NAME}`` expanded, as
        paths relative to AnkleFracture/.
    """
    values = cmake_set_values(MODULE_CMAKE.read_text(encoding="utf-8"))
    assert values.get("MODULE_NAME") == ["AnkleFracture"], "set(MODULE_NAME AnkleFracture) missing"
    name = values["MODULE_NAME"][0]

    def expand(items: list[str]) -> list[str]:
        return [item.replace("${MODULE_NAME}", name) for item in items]

    assert "MODULE_PYTHON_SCRIPTS" in values, "set(MODULE_PYTHON_SCRIPTS ...) missing"
    assert "MODULE_PYTHON_RESOURCES" in values, "set(MODULE_PYTHON_RESOURCES ...) missing"
    return expand(values["MODULE_PYTHON_SCRIPTS"]), expand(values["MODULE_PYTHON_RESOURCES"])


def parse_s4ext(path: Path) -> dict[str, str]:
    """Parse a Slicer extension description file.

    Args:
        path: The .s4ext file.

    Returns:
        Keyword -> value (the rest of the line after the first token, stripped; may be empty).
    """
    fields: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, _, value = stripped.partition(" ")
        fields[key] = value.strip()
    return fields


def walk_json(node: Any) -> Iterator[dict[str, Any]]:
    """Yield every JSON object nested in ``node`` (depth first, ``node`` included).

    Args:
        node: Parsed JSON value.

    Yields:
        Each dict found.
    """
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk_json(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk_json(value)


def requirement_lines(path: Path) -> list[str]:
    """Non-comment, non-blank lines of a pip requirements file (inline comments removed).

    Args:
        path: The requirements file.

    Returns:
        The requirement strings.
    """
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def pyproject_dependencies() -> list[Requirement]:
    """The ``[project] dependencies`` of pyproject.toml (parsed without needing tomllib).

    Returns:
        The requirements, in file order.
    """
    text = PYPROJECT.read_text(encoding="utf-8")
    match = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.S | re.M)
    assert match, "no dependencies = [...] in pyproject.toml"
    return [Requirement(s) for s in re.findall(r'"([^"]+)"', match.group(1))]


# --------------------------------------------------------------------------------------------
# (a) Module CMakeLists lists every script
# --------------------------------------------------------------------------------------------


def test_module_scripts_listed_exist() -> None:
    """Every file in MODULE_PYTHON_SCRIPTS/RESOURCES exists (else CMake configure fails)."""
    scripts, resources = module_cmake_lists()
    assert "AnkleFracture.py" in scripts
    missing = [f for f in scripts + resources if not (MODULE_DIR / f).is_file()]
    assert not missing, f"listed in AnkleFracture/CMakeLists.txt but missing: {missing}"


def test_every_module_python_file_is_listed() -> None:
    """Every .py under AnkleFracture/ is in MODULE_PYTHON_SCRIPTS (else it is not installed)."""
    scripts, _ = module_cmake_lists()
    on_disk = sorted(
        p.relative_to(MODULE_DIR).as_posix()
        for p in MODULE_DIR.rglob("*.py")
        if "__pycache__" not in p.parts
    )
    assert on_disk, "no .py files under AnkleFracture/"
    unlisted = [f for f in on_disk if f not in scripts]
    assert not unlisted, f"not in MODULE_PYTHON_SCRIPTS of AnkleFracture/CMakeLists.txt: {unlisted}"
    assert len(scripts) == len(set(scripts)), "duplicate entries in MODULE_PYTHON_SCRIPTS"


def test_module_cmake_uses_scripted_module_macro() -> None:
    """The module is built with slicerMacroBuildScriptedModule and registers its unittest."""
    text = strip_cmake_comments(MODULE_CMAKE.read_text(encoding="utf-8"))
    assert re.search(r"slicerMacroBuildScriptedModule\s*\(.*?NAME\s+\$\{MODULE_NAME\}", text, re.S)
    assert "WITH_GENERIC_TESTS" in text
    assert re.search(r"slicer_add_python_unittest\s*\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)", text)


# --------------------------------------------------------------------------------------------
# (b) Extension description file
# --------------------------------------------------------------------------------------------


def test_s4ext_has_every_field() -> None:
    """The .s4ext has every keyword of Slicer's template, the mandatory ones non-empty."""
    fields = parse_s4ext(S4EXT)
    missing = [k for k in S4EXT_FIELDS if k not in fields]
    assert not missing, f"missing s4ext fields: {missing}"
    empty = [k for k in S4EXT_NONEMPTY if not fields[k]]
    assert not empty, f"empty s4ext fields: {empty}"
    assert fields["scm"] == "git"
    assert fields["enabled"] in {"0", "1"}
    assert "PyTorch" in fields["depends"].split()
    assert fields["iconurl"].endswith(".png")
    assert "\n" not in fields["description"]


def test_s4ext_matches_cmake_metadata() -> None:
    """The .s4ext and the EXTENSION_* variables of CMakeLists.txt agree."""
    fields = parse_s4ext(S4EXT)
    values = cmake_set_values(TOP_CMAKE.read_text(encoding="utf-8"))

    def cmake(name: str) -> str:
        return " ".join(values[f"EXTENSION_{name}"])

    assert fields["homepage"] == cmake("HOMEPAGE")
    assert fields["category"] == cmake("CATEGORY")
    assert fields["iconurl"] == cmake("ICONURL")
    assert fields["screenshoturls"].split() == cmake("SCREENSHOTURLS").split()
    assert fields["depends"].split() == cmake("DEPENDS").split()
    assert fields["status"] == cmake("STATUS")
    assert fields["enabled"] == cmake("ENABLED")
    assert fields["homepage"].rstrip("/") in fields["scmurl"]


def test_icon_url_points_at_the_icon_file() -> None:
    """The icon URL names the icon committed in this repository."""
    url = parse_s4ext(S4EXT)["iconurl"]
    assert url.startswith(RAW_URL_PREFIX)
    assert (REPO_ROOT / url[len(RAW_URL_PREFIX):]).resolve() == ICON.resolve()


# --------------------------------------------------------------------------------------------
# (c) Top-level CMakeLists
# --------------------------------------------------------------------------------------------


def test_top_cmake_sets_extension_metadata() -> None:
    """Every EXTENSION_* variable is set to a non-empty value; DEPENDS has PyTorch."""
    values = cmake_set_values(TOP_CMAKE.read_text(encoding="utf-8"))
    missing = [
        v for v in EXTENSION_VARIABLES if not " ".join(values.get(f"EXTENSION_{v}", [])).strip()
    ]
    assert not missing, f"EXTENSION_* not set in CMakeLists.txt: {missing}"
    assert "PyTorch" in " ".join(values["EXTENSION_DEPENDS"]).split()
    assert " ".join(values["EXTENSION_ENABLED"]) in {"0", "1"}


def test_top_cmake_adds_module_and_installs_library() -> None:
    """add_subdirectory(AnkleFracture) is active and the library/resources are installed."""
    text = strip_cmake_comments(TOP_CMAKE.read_text(encoding="utf-8"))
    assert re.search(r"^\s*add_subdirectory\s*\(\s*AnkleFracture\s*\)", text, re.M)
    call = re.search(r"ctkMacroCompilePythonScript\s*\((.*?)\)\s*$", text, re.S | re.M)
    assert call, "ctkMacroCompilePythonScript(...) missing"
    args = call.group(1)
    assert re.search(r"TARGET_NAME\s+AnkleFractureLib\b", args)
    assert "Slicer_QTSCRIPTEDMODULES_LIB_DIR" in args
    assert "Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR" in args
    assert "NO_INSTALL_SUBDIR" in args
    assert "AnkleFractureLib/*.py" in text and "Resources/*" in text
    assert "find_package(Slicer REQUIRED)" in text
    for variable in (
        "Slicer_USE_FILE", "Slicer_EXTENSION_GENERATE_CONFIG", "Slicer_EXTENSION_CPACK"
    ):
        assert f"include(${{{variable}}})" in text


# --------------------------------------------------------------------------------------------
# (d) Terminology
# --------------------------------------------------------------------------------------------


def test_terminology_has_tibia_and_fibula() -> None:
    """The terminology parses, is named as Slicer names its contexts (the name the segments'
    tags use: Testing/test_slicer_terminology.py) and codes tibia/fibula in SNOMED CT."""
    doc = json.loads(TERMINOLOGY.read_text(encoding="utf-8"))
    assert doc["SegmentationCategoryTypeContextName"] == (
        "Segmentation category and type - AnkleFracture")
    categories = doc["SegmentationCodes"]["Category"]
    anatomical = [c for c in categories if c["CodeValue"] == SCT_ANATOMICAL_STRUCTURE]
    assert len(anatomical) == 1 and anatomical[0]["CodingSchemeDesignator"] == "SCT"

    coded = {
        (d.get("CodingSchemeDesignator"), d.get("CodeValue")): d
        for d in walk_json(doc)
        if "CodeValue" in d
    }
    for code, meaning in ((SCT_TIBIA, "Tibia"), (SCT_FIBULA, "Fibula")):
        assert ("SCT", code) in coded, f"no SCT {code} ({meaning}) in the terminology"
        entry = coded[("SCT", code)]
        assert entry["CodeMeaning"] == meaning
        assert entry["3dSlicerLabel"]
        rgb = entry["recommendedDisplayRGBValue"]
        assert len(rgb) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in rgb)
    types = {t["CodeValue"] for t in anatomical[0]["Type"]}
    assert {SCT_TIBIA, SCT_FIBULA} <= types


# --------------------------------------------------------------------------------------------
# (e) pip requirements
# --------------------------------------------------------------------------------------------


def test_requirements_are_valid_and_safe() -> None:
    """Each line is a PEP 508 requirement; none names torch, numpy or SimpleITK."""
    lines = requirement_lines(REQUIREMENTS)
    assert lines, "Resources/requirements.txt lists no requirement"
    for line in lines:
        req = Requirement(line)  # raises InvalidRequirement on a bad line
        assert canonicalize_name(req.name) not in FORBIDDEN_REQUIREMENTS, line
        for forbidden in FORBIDDEN_REQUIREMENTS:
            assert forbidden not in line.lower(), f"{line!r} mentions {forbidden}"


def test_requirements_match_pyproject() -> None:
    """requirements.txt is pyproject.toml's dependencies minus torch, numpy and SimpleITK."""
    expected = {
        canonicalize_name(r.name): str(r.specifier)
        for r in pyproject_dependencies()
        if canonicalize_name(r.name) not in FORBIDDEN_REQUIREMENTS
    }
    actual = {}
    for line in requirement_lines(REQUIREMENTS):
        req = Requirement(line)
        actual[canonicalize_name(req.name)] = str(req.specifier)
    assert actual == expected


# --------------------------------------------------------------------------------------------
# (f) Icon
# --------------------------------------------------------------------------------------------


def test_icon_is_128_png() -> None:
    """The icon is a 128x128 PNG, as Slicer's extension catalog expects."""
    with Image.open(ICON) as image:
        assert image.format == "PNG"
        assert image.size == (128, 128)


@pytest.mark.parametrize("name", ["Icons", "Terminology", "Models", "Templates"])
def test_resource_folders_exist(name: str) -> None:
    """The shared resource folders the installed module expects are in Resources/.

    Args:
        name: Sub-folder of Resources/.
    """
    assert (REPO_ROOT / "Resources" / name).is_dir()


# --------------------------------------------------------------------------------------------
# (g) Extensions catalog entry (the JSON file the Slicer ExtensionsIndex has used since 2024)
# --------------------------------------------------------------------------------------------

CATALOG_SCHEMA_URL = ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                      "slicer-extension-catalog-entry-schema-v1.0.1.json#")
# The fields of that schema (Slicer/Slicer Schemas/slicer-extension-catalog-entry-schema-
# v1.0.1.json), copied here so the test needs no network and no jsonschema: the required
# ones, each property's JSON type, and the allowed values. additionalProperties is false.
CATALOG_REQUIRED = ("$schema", "category", "scm_url")
CATALOG_TYPES = {
    "$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
    "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int,
}
CATALOG_ENUMS = {"scm_type": {"git", "local"}, "tier": {1, 3, 5}}


def test_catalog_entry_validates_against_the_schema_fields() -> None:
    """AnkleFracture.json: required fields present, no unknown field, every type and value
    allowed by the catalog-entry schema v1.0.1."""
    entry = json.loads(CATALOG_ENTRY.read_text(encoding="utf-8"))
    assert isinstance(entry, dict)
    missing = [k for k in CATALOG_REQUIRED if k not in entry]
    assert not missing, f"catalog entry lacks required fields {missing}"
    unknown = sorted(set(entry) - set(CATALOG_TYPES))
    assert not unknown, f"catalog entry has fields the schema does not allow: {unknown}"
    for key, value in entry.items():
        expected = CATALOG_TYPES[key]
        # JSON booleans are not integers, and integers are not booleans.
        ok = isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
        assert ok, f"{key}: {value!r} is not a {expected.__name__}"
        if key in CATALOG_ENUMS:
            assert value in CATALOG_ENUMS[key], f"{key}: {value!r} not in {CATALOG_ENUMS[key]}"
    assert all(isinstance(d, str) and d for d in entry["build_dependencies"])
    assert entry["$schema"] == CATALOG_SCHEMA_URL
    # The fields the ExtensionsIndex entries carry (beyond the required ones).
    for key in ("scm_revision", "build_dependencies", "tier"):
        assert key in entry, f"catalog entry lacks {key}"
    assert "PyTorch" in entry["build_dependencies"]
    assert CATALOG_ENTRY.parent == S4EXT.parent  # beside ankle_fracture.s4ext


def test_catalog_entry_matches_the_s4ext_and_cmake() -> None:
    """The JSON entry says what ankle_fracture.s4ext and CMakeLists.txt say."""
    entry = json.loads(CATALOG_ENTRY.read_text(encoding="utf-8"))
    fields = parse_s4ext(S4EXT)
    values = cmake_set_values(TOP_CMAKE.read_text(encoding="utf-8"))
    assert entry["scm_url"] == fields["scmurl"]
    assert entry["scm_revision"] == fields["scmrevision"]
    assert entry.get("scm_type", "git") == fields["scm"]
    assert entry["category"] == fields["category"] == " ".join(values["EXTENSION_CATEGORY"])
    assert entry["build_dependencies"] == fields["depends"].split()
    assert entry["build_dependencies"] == " ".join(values["EXTENSION_DEPENDS"]).split()
    assert entry.get("build_subdirectory", ".") == fields["build_subdirectory"]
    assert entry.get("enabled", True) == (fields["enabled"] == "1")
    assert entry["tier"] == int(fields["tier"])
    # The file is named after the extension (CMake's project name), as in the ExtensionsIndex.
    project = re.search(r"^\s*project\s*\(\s*(\w+)", TOP_CMAKE.read_text(encoding="utf-8"), re.M)
    assert project and CATALOG_ENTRY.stem == project.group(1)
