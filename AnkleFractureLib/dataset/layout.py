"""The project's dataset layout.

A dataset is a folder::

    DATASET/
      dataset.json            # the index (below); rewritten atomically, never half-written
      images/<id>.nii.gz      # CT in HU, any grid (the Volume's own geometry, LPS)
      labels/<id>.nii.gz      # optional uint8 label map on the image's grid: 0 background,
                              # 1 tibia, 2 fibula (fracture fragments carry their bone's label)
      fracture_lines/<id>.nii.gz  # optional uint8 mask on the image's grid: 1 on the fibular
                              # fracture line a reader drew (what ``train-fracture`` learns)

``dataset.json``::

    {
      "format_version": 1,
      "name": "...", "description": "...",
      "labels": {"background": 0, "tibia": 1, "fibula": 2},
      "classes": ["none", "A", "B", "C"],
      "cases": [
        {"id": "phantom_0000", "image": "images/phantom_0000.nii.gz",
         "segmentation": "labels/phantom_0000.nii.gz" | null,
         "fracture_line": "fracture_lines/phantom_0000.nii.gz" | null,   # optional
         "weber": "none" | "A" | "B" | "C" | null,      # null = unlabelled for classification
         "side": "left" | "right" | null,
         "source": "phantom" | "slicer-export" | ...,
         "meta": {...}}                                   # optional, free-form
      ]
    }

Paths are relative to the dataset folder. A case without ``segmentation`` is unlabelled for
segmentation training; a case without ``weber`` is unlabelled for classification (semi-supervised
training uses it). ``fracture_line`` is the annotated fibular fracture line of a real case (a
"Fibula fracture" segment exported from Slicer): phantoms carry the exact fracture surface in
``meta["fracture"]`` instead, and the localiser's training reads whichever a case has.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

from AnkleFractureLib.errors import InputError
from AnkleFractureLib.geometry.volume import Volume

FORMAT_VERSION = 1
#: Label values of the segmentation maps.
LABELS: Dict[str, int] = {"background": 0, "tibia": 1, "fibula": 2}
#: Danis-Weber classes in the classifier's output order.
CLASSES = ("none", "A", "B", "C")
SIDES = ("left", "right")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def file_key(path: "os.PathLike[str] | str") -> str:
    """A file's identity for cache keys: resolved path, size and modification time (ns).

    A case file written again (a dataset regenerated in place) gets another key, so a cache of
    crops or prepared arrays never serves what was made from the old file.
    """
    st = os.stat(path)
    return f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"


def true_fracture_height(meta: Optional[Dict[str, Any]]) -> Optional[float]:
    """A phantom case's true fibular fracture height (mm above the plafond along the tibial
    long axis, negative below), or None for a case without one.

    Measured from the true plafond (``meta["plafond_anatomical"]``, the real-shape family's
    warped joint) when the meta holds it: datasets written before the phantom measured the
    height that way hold the height above the anatomy frame's origin in
    ``meta["fracture"]["height_mm"]``, up to ~6 mm off; newer ones hold the same value as this.

    Example:
        >>> true_fracture_height({"fracture": {"height_mm": 40.0,
        ...     "centre_anatomical": [-20.0, 30.0, 40.0]}, "plafond_anatomical": [2.0, 0.0, -1.5]})
        41.5
        >>> true_fracture_height({"fracture": {"height_mm": -8.0}}), true_fracture_height({})
        (-8.0, None)
    """
    frac = (meta or {}).get("fracture")
    if not frac or frac.get("height_mm") is None:
        return None
    plafond, centre = (meta or {}).get("plafond_anatomical"), frac.get("centre_anatomical")
    if plafond is not None and centre is not None:
        return round(float(centre[2]) - float(plafond[2]), 3)
    return float(frac["height_mm"])


@dataclass
class CaseRecord:
    """One entry of ``dataset.json`` (paths relative to the dataset folder)."""

    id: str
    image: str
    segmentation: Optional[str] = None
    weber: Optional[str] = None
    side: Optional[str] = None
    source: str = "unknown"
    meta: Dict[str, Any] = field(default_factory=dict)
    fracture_line: Optional[str] = None

    def validate(self, where: str) -> None:
        """Raise InputError (naming ``where``) when a field is not allowed."""
        if not isinstance(self.id, str) or not _ID_RE.match(self.id):
            raise InputError(where, f"case id {self.id!r} must be 1-128 characters of letters, "
                                    "digits, '_', '-' or '.'")
        if self.weber is not None and self.weber not in CLASSES:
            raise InputError(where, f"case {self.id}: weber must be one of {list(CLASSES)} or null, "
                                    f"got {self.weber!r}")
        if self.side is not None and self.side not in SIDES:
            raise InputError(where, f"case {self.id}: side must be 'left', 'right' or null, "
                                    f"got {self.side!r}")


class Dataset:
    """A dataset folder in the project layout.

    Example:
        >>> import tempfile
        >>> ds = Dataset.create(tempfile.mkdtemp(), name="demo")
        >>> ct = Volume(np.full((4, 4, 4), -1000, np.int16))
        >>> ds.add_case("c1", ct, weber="A", side="left", source="doc").id
        'c1'
        >>> len(Dataset.load(ds.root).cases)
        1
    """

    def __init__(self, root: Path, name: str = "", description: str = "",
                 cases: Optional[List[CaseRecord]] = None) -> None:
        self.root = Path(root)
        self.name = name
        self.description = description
        self.cases: List[CaseRecord] = list(cases or [])

    # ------------------------------------------------------------------ open / create
    @property
    def index_path(self) -> Path:
        return self.root / "dataset.json"

    @classmethod
    def create(cls, root: "os.PathLike[str] | str", name: str = "", description: str = "",
               exist_ok: bool = True) -> "Dataset":
        """Open ``root`` if it already holds a dataset (when ``exist_ok``), else start a new one."""
        root = Path(root)
        if (root / "dataset.json").exists():
            if not exist_ok:
                raise InputError(root, "a dataset already exists here")
            return cls.load(root)
        ds = cls(root, name=name, description=description)
        ds.save()
        return ds

    @classmethod
    def load(cls, root: "os.PathLike[str] | str") -> "Dataset":
        """Read and validate ``root/dataset.json``."""
        root = Path(root)
        index = root / "dataset.json"
        if not root.exists():
            raise InputError(root, "dataset folder does not exist")
        if not index.is_file():
            raise InputError(root, "not a dataset: dataset.json is missing")
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(index, f"cannot read dataset index ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
            raise InputError(index, "dataset index must be an object with a 'cases' list")
        labels = data.get("labels", LABELS)
        if labels != LABELS:
            raise InputError(index, f"labels must be {LABELS}, got {labels}")
        classes = data.get("classes", list(CLASSES))
        if list(classes) != list(CLASSES):
            raise InputError(index, f"classes must be {list(CLASSES)}, got {classes}")
        cases = []
        known = set()
        for raw in data["cases"]:
            if not isinstance(raw, dict) or "id" not in raw or "image" not in raw:
                raise InputError(index, f"every case needs 'id' and 'image', got {raw!r}")
            rec = CaseRecord(id=raw["id"], image=raw["image"], segmentation=raw.get("segmentation"),
                             weber=raw.get("weber"), side=raw.get("side"),
                             source=raw.get("source", "unknown"), meta=raw.get("meta") or {},
                             fracture_line=raw.get("fracture_line"))
            rec.validate(str(index))
            if rec.id in known:
                raise InputError(index, f"case id {rec.id!r} appears twice")
            known.add(rec.id)
            cases.append(rec)
        return cls(root, name=data.get("name", ""), description=data.get("description", ""),
                   cases=cases)

    def to_json(self) -> Dict[str, Any]:
        """The dataset.json content as a dict."""
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "description": self.description,
            "labels": dict(LABELS),
            "classes": list(CLASSES),
            "cases": [asdict(c) for c in self.cases],
        }

    def save(self) -> None:
        """Write dataset.json atomically (a crash never leaves it half-written)."""
        from AnkleFractureLib.io import atomic_write_json

        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.index_path, self.to_json())

    # ------------------------------------------------------------------ cases
    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[CaseRecord]:
        return iter(self.cases)

    def get(self, case_id: str) -> Optional[CaseRecord]:
        """The case with this id, or None."""
        for c in self.cases:
            if c.id == case_id:
                return c
        return None

    def path(self, relative: Optional[str]) -> Optional[Path]:
        """Absolute path of a case file given relative to the dataset folder."""
        return None if relative is None else self.root / relative

    def add_case(self, case_id: str, image: Volume, label: Optional[Volume] = None,
                 weber: Optional[str] = None, side: Optional[str] = None,
                 source: str = "unknown", meta: Optional[Dict[str, Any]] = None,
                 save: bool = True, fracture_line: Optional[Volume] = None) -> CaseRecord:
        """Write a case's files and add it to the index, or update it when the id exists.

        Args:
            case_id: Unique id (letters, digits, ``_ - .``).
            image: CT Volume (HU).
            label: Optional uint8 label map on exactly the image's grid (0/1/2).
            weber: Danis-Weber class or None (unlabelled).
            side: "left", "right" or None.
            source: Where the case came from (e.g. "phantom", "slicer-export").
            meta: Extra JSON-serialisable information.
            save: Rewrite dataset.json now (set False when adding many, then call :meth:`save`).
            fracture_line: Optional mask on exactly the image's grid, non-zero on the
                annotated fibular fracture line (stored as 0/1).

        Returns:
            The stored record.

        Raises:
            InputError: A bad id, class or side, or a label map / fracture line off the
                image's grid or with other values (nothing is written then).
        """
        from AnkleFractureLib.io import write_image

        rec = CaseRecord(id=case_id, image=f"images/{case_id}.nii.gz",
                         segmentation=None if label is None else f"labels/{case_id}.nii.gz",
                         weber=weber, side=side, source=source, meta=dict(meta or {}),
                         fracture_line=(None if fracture_line is None
                                        else f"fracture_lines/{case_id}.nii.gz"))
        rec.validate(str(self.index_path))
        if label is not None:
            if not label.same_geometry(image, atol=1e-4):
                raise InputError(case_id, "the label map is not on the image's grid")
            values = np.unique(label.array)
            if not set(values.tolist()) <= set(LABELS.values()):
                raise InputError(case_id, f"label values must be 0, 1 or 2, got {values.tolist()}")
        if fracture_line is not None and not fracture_line.same_geometry(image, atol=1e-4):
            raise InputError(case_id, "the fracture line mask is not on the image's grid")
        if label is not None:
            write_image(label.with_array(label.array.astype(np.uint8)), self.root / rec.segmentation)
        if fracture_line is not None:
            write_image(fracture_line.with_array((np.asarray(fracture_line.array) > 0)
                                                 .astype(np.uint8)), self.root / rec.fracture_line)
        write_image(image, self.root / rec.image)
        existing = self.get(case_id)
        if existing is not None:
            self.cases[self.cases.index(existing)] = rec
            for kind in ("segmentation", "fracture_line"):  # files the new record no longer has
                if getattr(existing, kind) and getattr(rec, kind) is None:
                    old = self.root / getattr(existing, kind)
                    if old.exists():
                        old.unlink()
        else:
            self.cases.append(rec)
        if save:
            self.save()
        return rec

    def counts(self) -> Dict[str, int]:
        """Number of cases: total, with segmentation, with a Weber class, unlabelled, per class."""
        out = {"cases": len(self.cases),
               "segmented": sum(c.segmentation is not None for c in self.cases),
               "classified": sum(c.weber is not None for c in self.cases),
               "fracture_lines": sum(c.fracture_line is not None for c in self.cases)}
        out["unlabelled"] = out["cases"] - out["classified"]
        for k in CLASSES:
            out[f"weber_{k}"] = sum(c.weber == k for c in self.cases)
        return out
