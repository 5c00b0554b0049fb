"""Draw a figure of the AnkleFracture module panel, outside Slicer.

This is a picture of the panel for the docs (``docs/slicer_panel.png``), not a
screenshot of Slicer: it reads the real ``Resources/UI/AnkleFracture.ui``,
swaps the Slicer/CTK widgets for plain Qt look-alikes (qMRMLWidget -> QWidget,
qMRMLNodeComboBox -> QComboBox with a plausible node name,
ctkCollapsibleButton -> QGroupBox titled with its text, ctkSliderWidget ->
QSlider plus a spin box, ctkPathLineEdit -> QLineEdit plus a browse button),
loads it with PySide6's QUiLoader on the offscreen platform, fills the results
with a demo answer, shows every section expanded and saves ``widget.grab()``.

PySide6 is not a dependency of the project; it lives in a throwaway venv::

    python3 -m venv /tmp/pyside_venv
    /tmp/pyside_venv/bin/pip install PySide6-Essentials
    /tmp/pyside_venv/bin/python scripts/panel_figure.py [--out PATH] [--width 420]

Offscreen Qt needs at least one font that fontconfig finds (on Debian/Ubuntu:
``apt-get install fonts-dejavu-core``); without one the text comes out blank.
"""

from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

REPO = Path(__file__).resolve().parent.parent
UI_PATH = REPO / "Resources" / "UI" / "AnkleFracture.ui"
DEFAULT_OUT = REPO / "docs" / "slicer_panel.png"

# Plausible node names shown in the node selectors.
NODE_NAMES = {
    "inputVolumeSelector": "Ankle CT",
    "outputSegmentationSelector": "Ankle bones",
}

# The demo answer shown in the Results section.
DEMO_PROBABILITIES = {"None": 0.02, "A": 0.03, "B": 0.91, "C": 0.04}
DEMO_TEXT = {
    "predictionLabel": "Weber B (91 %)",
    "uncertaintyLabel": "confident (entropy 0.41)",
    "warningsLabel": "No warnings.",
    "statusLabel": "Done in 6.2 s",
    "deviceStatusLabel": "CPU (no CUDA GPU found)",
    "datasetCountsLabel": "12 cases: 9 with segmentation, 7 with a Weber class, 5 unlabelled",
    "trainingStatusLabel": "No training run yet.",
}

# Properties of the Slicer/CTK classes that the plain Qt stand-ins lack.
_NODE_COMBO_ONLY = {
    "nodeTypes", "showChildNodeTypes", "noneEnabled", "addEnabled", "removeEnabled",
    "renameEnabled", "editEnabled", "baseName", "noneDisplay", "showHidden",
}


def _prop(tag: str, name: str, value: str, stdset: bool = True) -> ET.Element:
    prop = ET.Element("property", {"name": name} if stdset else {"name": name, "stdset": "0"})
    ET.SubElement(prop, tag).text = value
    return prop


def _props(widget: ET.Element) -> dict[str, ET.Element]:
    return {p.get("name"): p for p in widget.findall("property")}


def _string_value(prop: ET.Element | None) -> str:
    if prop is None:
        return ""
    child = prop.find("string")
    return (child.text or "") if child is not None else ""


def _number_value(prop: ET.Element | None, default: float) -> float:
    if prop is None:
        return default
    for child in prop:
        if child.text:
            return float(child.text)
    return default


def _hbox(name: str, *widgets: ET.Element) -> ET.Element:
    layout = ET.Element("layout", {"class": "QHBoxLayout", "name": name})
    for margin in ("leftMargin", "topMargin", "rightMargin", "bottomMargin"):
        layout.append(_prop("number", margin, "0"))
    for widget in widgets:
        ET.SubElement(layout, "item").append(widget)
    return layout


def _replace_node_combo(widget: ET.Element) -> None:
    widget.set("class", "QComboBox")
    for prop in list(widget.findall("property")):
        if prop.get("name") in _NODE_COMBO_ONLY:
            widget.remove(prop)
    item = ET.SubElement(widget, "item")
    item.append(_prop("string", "text", NODE_NAMES.get(widget.get("name"), "Node")))


def _replace_collapsible(widget: ET.Element) -> None:
    widget.set("class", "QGroupBox")
    props = _props(widget)
    if "collapsed" in props:
        widget.remove(props["collapsed"])
    if "text" in props:
        props["text"].set("name", "title")


def _replace_slider(widget: ET.Element) -> None:
    """ctkSliderWidget -> QWidget holding a QSlider and a QDoubleSpinBox."""
    props = _props(widget)
    lo = _number_value(props.get("minimum"), 0.0)
    hi = _number_value(props.get("maximum"), 99.0)
    value = _number_value(props.get("value"), 0.0)
    step = _number_value(props.get("singleStep"), 1.0)
    decimals = int(_number_value(props.get("decimals"), 2))
    name = widget.get("name")
    ticks = max(1, round((hi - lo) / step))

    slider = ET.Element("widget", {"class": "QSlider", "name": name})
    slider.append(_prop("enum", "orientation", "Qt::Horizontal"))
    slider.append(_prop("number", "minimum", "0"))
    slider.append(_prop("number", "maximum", str(ticks)))
    slider.append(_prop("number", "value", str(round((value - lo) / step))))
    for keep in ("toolTip", "SlicerParameterName"):
        if keep in props:
            slider.append(props[keep])

    spin = ET.Element("widget", {"class": "QDoubleSpinBox", "name": f"{name}SpinBox"})
    spin.append(_prop("number", "decimals", str(decimals)))
    spin.append(_prop("double", "minimum", str(lo)))
    spin.append(_prop("double", "maximum", str(hi)))
    spin.append(_prop("double", "singleStep", str(step)))
    spin.append(_prop("double", "value", str(value)))

    for child in list(widget):
        widget.remove(child)
    widget.set("class", "QWidget")
    widget.set("name", f"{name}Container")
    widget.append(_hbox(f"{name}Layout", slider, spin))


def _replace_path_line_edit(widget: ET.Element) -> None:
    """ctkPathLineEdit -> QWidget holding a QLineEdit and a browse button."""
    props = _props(widget)
    name = widget.get("name")
    line = ET.Element("widget", {"class": "QLineEdit", "name": name})
    for keep in ("toolTip", "SlicerParameterName"):
        if keep in props:
            line.append(props[keep])
    button = ET.Element("widget", {"class": "QToolButton", "name": f"{name}BrowseButton"})
    button.append(_prop("string", "text", "..."))

    for child in list(widget):
        widget.remove(child)
    widget.set("class", "QWidget")
    widget.set("name", f"{name}Container")
    widget.append(_hbox(f"{name}Layout", line, button))


def plain_qt_ui(ui_path: Path) -> bytes:
    """The .ui with its Slicer/CTK widgets swapped for plain Qt ones."""
    tree = ET.parse(ui_path)
    root = tree.getroot()
    for widget in list(root.iter("widget")):
        cls = widget.get("class")
        if cls == "qMRMLWidget":
            widget.set("class", "QWidget")
        elif cls == "qMRMLNodeComboBox":
            _replace_node_combo(widget)
        elif cls == "ctkCollapsibleButton":
            _replace_collapsible(widget)
        elif cls == "ctkSliderWidget":
            _replace_slider(widget)
        elif cls == "ctkPathLineEdit":
            _replace_path_line_edit(widget)
        elif cls and not cls.startswith("Q"):
            raise SystemExit(f"panel_figure.py: no stand-in for custom class {cls}")
    # The scene connections and custom widget declarations mean nothing here.
    for tag in ("customwidgets", "connections"):
        for element in root.findall(tag):
            root.remove(element)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def fill_demo(panel) -> None:
    from PySide6.QtWidgets import QLabel, QLineEdit, QProgressBar

    for name, text in DEMO_TEXT.items():
        panel.findChild(QLabel, name).setText(text)
    for key, probability in DEMO_PROBABILITIES.items():
        panel.findChild(QProgressBar, f"probability{key}Bar").setValue(round(100 * probability))
    panel.findChild(QProgressBar, "progressBar").setValue(100)
    panel.findChild(QLineEdit, "datasetPathLineEdit").setText("~/AnkleDataset")


def render(out: Path, width: int) -> Path:
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication, QGroupBox

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setStyle("Fusion")

    data = QByteArray(plain_qt_ui(UI_PATH))
    buffer = QBuffer(data)
    buffer.open(QIODevice.ReadOnly)
    panel = QUiLoader().load(buffer)
    buffer.close()
    if panel is None:
        raise SystemExit(f"panel_figure.py: QUiLoader could not load {UI_PATH}")

    fill_demo(panel)
    panel.setFixedWidth(width)
    panel.layout().activate()
    height = panel.layout().totalHeightForWidth(width)
    if height <= 0:
        height = panel.sizeHint().height()
    panel.resize(width, height)
    panel.show()
    app.processEvents()
    # Drop the empty room the trailing spacer leaves below the last section.
    last = panel.findChild(QGroupBox, "advancedCollapsibleButton")
    bottom = last.geometry().bottom() + panel.layout().contentsMargins().bottom() + 1
    if bottom < height:
        panel.resize(width, bottom)
        app.processEvents()

    out.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(out)):
        raise SystemExit(f"panel_figure.py: could not write {out}")
    panel.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    parser.add_argument("--width", type=int, default=420, help="panel width in pixels")
    args = parser.parse_args(argv)
    print(render(args.out, args.width))
    return 0


if __name__ == "__main__":
    sys.exit(main())
