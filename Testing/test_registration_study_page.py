"""docs/registration_study/README.md is the rendering of the JSON files beside it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "docs" / "registration_study"


def test_page_is_the_rendering_of_the_committed_files(tmp_path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from plafond_local_refit_study import write_page
    finally:
        sys.path.pop(0)
    for path in FOLDER.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
        data = json.loads(path.read_text())
        assert data["before"]["n"] == len(data["cases"]) > 0
    text = write_page(tmp_path).read_text().replace(tmp_path.as_posix(), "docs/registration_study")
    assert (FOLDER / "README.md").read_text() == text, \
        "stale: python scripts/plafond_local_refit_study.py --page docs/registration_study"
