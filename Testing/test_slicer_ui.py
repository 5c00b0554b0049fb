"""Static checks of the Slicer panel: the .ui, the module file and the parameter node agree.

The module file imports Qt and the Slicer application, so it is read here as source (ast),
not imported.
"""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
UI_FILE = ROOT / "Resources" / "UI" / "AnkleFracture.ui"
MODULE_FILE = ROOT / "AnkleFracture" / "AnkleFracture.py"
SLICER_PACKAGE = ROOT / "AnkleFracture" / "AnkleFractureSlicer"

#: Which widget classes can show which parameter types (Slicer's parameterNodeWrapper
#: connectors: guiConnectors.py).
WIDGETS_FOR_TYPE = {
    "str+Choice": {"QComboBox"},
    "str": {"QLineEdit", "QTextEdit"},
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider"},
    "float": {"ctkSliderWidget", "QDoubleSpinBox"},
    "pathlib.Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox"},
}


def _ui() -> Tuple[Dict[str, str], Dict[str, str], Dict[str, ET.Element]]:
    """(objectName -> class, SlicerParameterName -> objectName, objectName -> element)."""
    tree = ET.parse(UI_FILE)
    classes, params, elements = {}, {}, {}
    for widget in tree.iter("widget"):
        name = widget.get("name")
        classes[name] = widget.get("class")
        elements[name] = widget
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                params[prop.findtext("string")] = name
    return classes, params, elements


def _module_ast() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


def _parameter_fields() -> Dict[str, Tuple[str, ast.AST]]:
    """Field name -> (kind, default node) of the parameter node class."""
    cls = next(n for n in _module_ast().body
               if isinstance(n, ast.ClassDef) and n.name == "AnkleFractureParameterNode")
    fields = {}
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            text = ast.unparse(stmt.annotation)
            if text.startswith("vtkMRML"):
                kind = "node"
            elif text.startswith("Annotated[str, Choice"):
                kind = "str+Choice"
            elif text.startswith("Annotated["):
                kind = text[len("Annotated["):].split(",")[0]
            else:
                kind = text
            fields[stmt.target.id] = (kind, stmt)
    return fields


def _ui_names_used() -> List[Tuple[int, str]]:
    used = []
    for node in ast.walk(_module_ast()):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            used.append((node.lineno, node.attr))
    return used


def test_ui_is_well_formed_and_rooted_in_a_mrml_widget():
    root = ET.parse(UI_FILE).getroot()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "AnkleFracture"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    classes, _, _ = _ui()
    custom = {c for c in classes.values() if c.startswith(("qMRML", "ctk"))}
    assert custom <= declared, f"custom widgets not declared: {custom - declared}"
    # Every node combo box gets the scene (otherwise it stays empty in Slicer).
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    combos = {n for n, c in classes.items() if c == "qMRMLNodeComboBox"}
    assert combos and combos <= receivers


def test_every_widget_the_module_names_exists_in_the_ui():
    classes, _, _ = _ui()
    missing = [(line, name) for line, name in _ui_names_used() if name not in classes]
    assert not missing, f"AnkleFracture.py uses widgets the .ui lacks: {missing}"
    assert len(_ui_names_used()) > 20  # the parse found the widget uses


def test_every_parameter_name_is_a_parameter_with_a_matching_widget():
    classes, params, _ = _ui()
    fields = _parameter_fields()
    assert set(params) <= set(fields), f"unknown parameters in the .ui: {set(params) - set(fields)}"
    for param, widget in params.items():
        kind = fields[param][0]
        allowed = WIDGETS_FOR_TYPE.get(kind)
        assert allowed is not None, f"{param}: unsupported parameter type {kind}"
        assert classes[widget] in allowed, f"{param} ({kind}) bound to a {classes[widget]}"
    # Result nodes are set by the code, every other parameter has a widget.
    result_nodes = {"outputTransform", "templateSegmentation", "syndesmosisRoi",
                    "gradcamVolume", "resultTable"}
    assert set(fields) - set(params) == result_nodes


def _ui_property(element: ET.Element, name: str):
    for prop in element.findall("property"):
        if prop.get("name") == name:
            child = list(prop)[0]
            return child.tag, child.text
    return None


def test_combo_boxes_list_the_choices_in_order_and_defaults_match():
    """parameterNodeWrapper refills a combo box from its Choice: the .ui must agree."""
    _, params, elements = _ui()
    fields = _parameter_fields()
    for param, widget in params.items():
        kind, stmt = fields[param]
        element = elements[widget]
        if kind == "str+Choice":
            choices = ast.literal_eval(stmt.annotation.slice.elts[1].args[0])
            items = [i.find("property/string").text for i in element.findall("item")]
            assert items == choices, f"{widget} items {items} != choices {choices}"
        if stmt.value is not None and kind in ("int", "float"):
            default = ast.literal_eval(stmt.value)
            tag_value = _ui_property(element, "value")
            assert tag_value is not None and float(tag_value[1]) == pytest.approx(default), (
                f"{widget}: .ui value {tag_value} != parameter default {default}")


@pytest.mark.parametrize("path", sorted(SLICER_PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_slicer_package_never_imports_qt(path: Path):
    """The logic package runs without the application (slicer-core): no Qt, CTK or widgets."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
            assert name.split(".")[0] not in {"qt", "ctk", "PythonQt"}, f"{path.name}: {name}"
            assert not name.startswith("slicer.ScriptedLoadableModule")


def test_module_file_keeps_heavy_imports_inside_methods():
    """torch, MONAI and the library's models load on first use, not when Slicer starts."""
    heavy = {"torch", "monai", "AnkleFractureLib", "AnkleFractureSlicer"}
    for node in _module_ast().body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""])
            for name in names:
                assert name.split(".")[0] not in heavy, f"top-level import of {name}"


@pytest.mark.parametrize("path", [MODULE_FILE, *sorted(SLICER_PACKAGE.glob("*.py"))],
                         ids=lambda p: p.name)
def test_module_code_is_python_3_9(path: Path):
    """Slicer 5.6 ships Python 3.9: no newer syntax in the module's files."""
    ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))


def test_cleanup_stops_and_disconnects_the_poll_timer():
    """The widget's poll QTimer must not outlive the widget (module reload, Slicer exit)."""
    widget = next(n for n in _module_ast().body
                  if isinstance(n, ast.ClassDef) and n.name == "AnkleFractureWidget")
    methods = {f.name: f for f in widget.body if isinstance(f, ast.FunctionDef)}

    def timer_calls(func: ast.FunctionDef) -> Dict[str, List[ast.Call]]:
        calls: Dict[str, List[ast.Call]] = {}
        for node in ast.walk(func):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and ast.unparse(node.func.value) == "self._timer"):
                calls.setdefault(node.func.attr, []).append(node)
        return calls

    made = timer_calls(methods["setup"])
    assert made.get("connect"), "setup no longer connects the poll timer: update this test"
    signal, slot = (ast.unparse(a) for a in made["connect"][0].args)
    cleanup = timer_calls(methods["cleanup"])
    assert cleanup.get("stop"), "cleanup() does not stop the poll timer"
    assert [tuple(ast.unparse(a) for a in c.args) for c in cleanup.get("disconnect", [])] == [
        (signal, slot)], "cleanup() does not disconnect the poll timer's signal"
    # And drops it, so nothing can start it again.
    assert any(isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "self._timer"
               and isinstance(n.value, ast.Constant) and n.value.value is None
               for n in ast.walk(methods["cleanup"]))
