"""Static checks of the import rules: the library never imports Slicer/Qt/VTK, and lower
layers never import upper ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "AnkleFractureLib"
FORBIDDEN = {"slicer", "qt", "ctk", "vtk", "vtkmodules", "PythonQt"}
# Layer order, lowest first; a module may import only its own layer or lower ones.
LAYERS = [
    {"errors", "__init__", "resources", "parallel"},
    {"geometry"},
    {"io", "preprocessing"},
    {"dataset"},
    {"phantom"},
    {"networks"},
    {"segmentation", "registration", "crop", "classification", "fracture", "models"},
    {"training", "evaluation"},
    {"pipeline"},
    {"cli", "__main__"},
]


def _layer_of(top: str) -> int:
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"package AnkleFractureLib.{top} is not placed in a layer in {__file__}")


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


SOURCES = sorted(LIB.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(LIB)))
def test_no_slicer_imports_and_layers_respected(path: Path):
    rel = path.relative_to(LIB)
    own = _layer_of(Path(rel.parts[0]).stem)
    for lineno, name in _imports(path):
        top = name.split(".")[0]
        assert top not in FORBIDDEN, f"{rel}:{lineno} imports {name}"
        if top == "AnkleFractureLib" and name != "AnkleFractureLib":
            target = _layer_of(name.split(".")[1])
            assert target <= own, f"{rel}:{lineno} (layer {own}) imports upper layer {name}"
