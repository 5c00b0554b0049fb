#!/usr/bin/env python
"""Merge dataset folders into one by symbolic links (no copies), for training on several.

Usage:
    python scripts/merge_datasets.py DATASET [DATASET ...] --out MERGED [--twice DATASET ...]

Every case of every input keeps its id (ids must be unique across the inputs), its files are
linked as MERGED/images/<file> and MERGED/labels/<file> to the originals, and its record
(class, side, phantom meta) is copied into MERGED/dataset.json. The training caches key cases by
the resolved file path, so a merged dataset reuses the inputs' cached preparations.

``--twice DATASET`` lists each case of that input a second time as ``<id>_predseg`` with no
label map, so that ``train-cls --no-model-masks`` crops it once with its reference masks and
once with the segmentation model's masks (what the pipeline classifies), while the other inputs
are cropped with their reference masks only (the segmentation of every case costs ~10 s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from AnkleFractureLib.io.atomic import atomic_write_json  # noqa: E402


def merge(inputs: list, out: Path, twice: tuple = ()) -> int:
    """Write ``out``; returns the number of cases. Raises SystemExit on a clash.

    ``twice``: inputs (among ``inputs``) whose cases are listed again as ``<id>_predseg``
    without a label map.
    """
    index, cases, seen = None, [], {}
    twice_paths = {Path(p).resolve() for p in twice}
    for folder in map(Path, inputs):
        data = json.loads((folder / "dataset.json").read_text())
        index = index or {k: v for k, v in data.items() if k != "cases"}
        for case in data["cases"]:
            if case["id"] in seen:
                raise SystemExit(f"case id {case['id']} is in both {seen[case['id']]} and {folder}")
            seen[case["id"]] = folder
            for key in ("image", "segmentation"):
                if not case.get(key):
                    continue
                link = out / case[key]
                link.parent.mkdir(parents=True, exist_ok=True)
                if not os.path.lexists(link):
                    os.symlink((folder / case[key]).resolve(), link)
            cases.append(case)
            if folder.resolve() in twice_paths:
                cases.append(dict(case, id=case["id"] + "_predseg", segmentation=None))
    index["description"] = (index.get("description", "") + " Merged from "
                            + ", ".join(str(Path(p)) for p in inputs) + " (files linked).")
    index["cases"] = cases
    atomic_write_json(out / "dataset.json", index)
    return len(cases)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("datasets", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--twice", nargs="*", default=[], metavar="DATASET",
                    help="inputs whose cases are listed again as <id>_predseg without a label "
                         "map (cropped with the segmentation model's masks)")
    args = ap.parse_args()
    unknown = {Path(p).resolve() for p in args.twice} - {Path(p).resolve() for p in args.datasets}
    if unknown:
        raise SystemExit(f"--twice names folders that are not inputs: {sorted(map(str, unknown))}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{out}: {merge(args.datasets, out, tuple(args.twice))} cases")


if __name__ == "__main__":
    main()
