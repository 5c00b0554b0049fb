"""The classifier's model card is generated from the JSON artefacts committed beside it: the
committed card is what the writer makes of them, its numbers match the metrics files, the notes
hold no hand-typed figure, and a metrics file from before side detection says so."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT, load_script

MODEL = REPO_ROOT / "Resources" / "Models" / "classification"
pytestmark = pytest.mark.skipif(not (MODEL / "model.pt").is_file(),
                                reason="no shipped classification model")


def _writer():
    return load_script("write_cls_model_card")


def _notes() -> dict:
    return json.loads((MODEL / "model_card.notes.json").read_text())


def _history_available() -> bool:
    commits = set(re.findall(r"@([0-9a-f]{7,40}):", json.dumps(_notes())))
    return all(subprocess.run(["git", "-C", str(REPO_ROOT), "cat-file", "-e", f"{c}^{{commit}}"],
                              capture_output=True).returncode == 0 for c in commits)


@pytest.mark.skipif(not _history_available(), reason="git history of the notes' commits absent")
def test_committed_card_is_the_writers_output(tmp_path):
    _writer().write_card(MODEL, out_dir=tmp_path)
    for name in ("model_card.md", "model_card.json"):
        assert (tmp_path / name).read_text() == (MODEL / name).read_text(), (
            f"{name} is stale: run python scripts/write_cls_model_card.py {MODEL}")


def _sections(md: str) -> dict:
    """{metrics file: section text} of the card's evaluation sections."""
    parts = re.split(r"^### .*\(`([^`]+\.json)`\)$", md, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _pct(v):
    return f"{100 * v:.1f}"


def test_card_numbers_match_the_metrics_files():
    md = (MODEL / "model_card.md").read_text()
    sections = _sections(md)
    files = [e["file"] for e in _notes()["evaluations"]]
    assert sorted(sections) == sorted(files)
    for name in files:
        m = json.loads((MODEL / name).read_text())
        text = sections[name]
        head = re.search(r"(\d+) cases, 4-class accuracy \*\*([\d.]+) %\*\*, macro AUROC "
                         r"(\d\.\d+), ECE (\d\.\d+), Brier (\d\.\d+)", text)
        assert head, name
        assert int(head[1]) == m["n"] and head[2] == _pct(m["accuracy"])
        assert head[3] == f"{m['macro']['auroc']:.3f}" and head[4] == f"{m['ece']:.3f}"
        assert head[5] == f"{m['brier']:.3f}"
        for cls, c in m["per_class"].items():
            row = re.search(rf"^\| {re.escape(cls)} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| "
                            r"([\d.]+) \| (\d+) \|$", text, flags=re.M)
            assert row, (name, cls)
            assert row.groups() == (_pct(c["sensitivity"]), _pct(c["specificity"]),
                                    _pct(c["precision"]), f"{c['auroc']:.3f}",
                                    str(c["support"]))
        matrix = re.findall(r"^\| (?:none|A|B|C) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$", text,
                            flags=re.M)
        assert [[int(v) for v in r] for r in matrix] == m["confusion_matrix"]
        if m.get("unsure"):
            u = m["unsure"]
            assert (f"{u['n_unsure']} of {m['n']} cases flagged; accuracy "
                    f"{_pct(u['accuracy_confident'])} %") in text
        # A file without a crop_key predates side detection: the card says so, with the
        # command that re-measures it.
        spec = next(e for e in _notes()["evaluations"] if e["file"] == name)
        if "crop_key" not in m:
            assert "Predates automatic side detection" in text and spec["remeasure"] in text
    card = json.loads((MODEL / "model_card.json").read_text())
    assert card["test_metrics"]["accuracy"] == json.loads((MODEL / files[0]).read_text())[
        "accuracy"]


def test_notes_hold_no_hand_typed_figures():
    writer = _writer()
    notes = _notes()
    texts = [notes["title"], notes["intended_use"], notes.get("training_note", "")]
    texts += notes.get("notes", []) + [e["description"] for e in notes["evaluations"]]
    for text in texts:
        bare = writer.PLACEHOLDER.sub("X", text)
        assert not re.search(r"\d\s*%|\d\.\d", bare), text  # a percentage or a decimal figure
        assert "{" not in bare, f"unresolved placeholder in: {text}"


def test_placeholders_render_from_the_artefacts(tmp_path):
    writer = _writer()
    (tmp_path / "m.json").write_text(json.dumps({"accuracy": 0.975, "per_case": [1, 2],
                                                 "macro": {"auroc": 0.99912}}))
    art = writer.Artefacts(tmp_path, REPO_ROOT, "")
    out = writer.render("{m.json:accuracy:pct} % of {m.json:per_case:len}, "
                        "AUROC {m.json:macro.auroc:f3}", art)
    assert out == "97.5 % of 2, AUROC 0.999"
