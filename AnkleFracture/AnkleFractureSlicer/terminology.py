"""Names, colours and SNOMED CT terminology of the segments the module creates.

The terminology comes from ``Resources/Terminology/AnkleFracture.term.json`` (Slicer's
segmentation category-and-type format); Slicer's Terminologies module loads that file so the
segments show "Tibia" / "Fibula" with their codes (SNOMED CT 12611008 / 87342007).

The segments' ``TerminologyEntry`` tag names that file's context,
:data:`CONTEXT_NAME` (the file's ``SegmentationCategoryTypeContextName``: the two must be equal,
or the tag resolves to nothing; ``Testing/test_slicer_terminology.py`` checks it). Slicer's
built-in "3D Slicer General Anatomy list" is not used: the versions of it we could read have
no tibia or fibula.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

TERMINOLOGY_FILE = ("Terminology", "AnkleFracture.term.json")
#: The term.json's SegmentationCategoryTypeContextName, as Slicer names its own contexts.
CONTEXT_NAME = "Segmentation category and type - AnkleFracture"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
#: Category of both bones: SNOMED CT "Anatomical structure".
CATEGORY = ("SCT", "123037004", "Anatomical Structure")


@dataclass(frozen=True)
class Bone:
    """One segment of the module's segmentation.

    Attributes:
        label: Value in the library's label maps (1 tibia, 2 fibula).
        name: Segment name.
        code: SNOMED CT code of the bone.
        color: Display colour (r, g, b) in 0..1.
    """

    label: int
    name: str
    code: str
    color: Tuple[float, float, float]

    def terminologyEntry(self) -> str:
        """Slicer's terminology entry string (the segment's ``TerminologyEntry`` tag)."""
        cat = "^".join(CATEGORY)
        typ = f"SCT^{self.code}^{self.name}"
        return f"{CONTEXT_NAME}~{cat}~{typ}~^^~{ANATOMIC_CONTEXT}~^^~^^"


#: The bones, in label order. Colours as in the term.json (recommendedDisplayRGBValue).
BONES: Tuple[Bone, ...] = (
    Bone(1, "Tibia", "12611008", (241 / 255, 214 / 255, 145 / 255)),
    Bone(2, "Fibula", "87342007", (216 / 255, 160 / 255, 110 / 255)),
)


def boneForSegmentName(name: str) -> Optional[Bone]:
    """The bone a segment belongs to by its name: "Tibia", "tibia fragment 2", "Fibula_tip"...

    A fracture fragment segmented apart keeps its parent bone's label, so any name that starts
    with the bone's name counts.

    Example:
        >>> boneForSegmentName("Fibula fragment").label, boneForSegmentName("Talus")
        (2, None)
    """
    lowered = name.strip().lower()
    for bone in BONES:
        if lowered.startswith(bone.name.lower()):
            return bone
    return None


def loadTerminologyColors(resources: Path) -> Dict[str, Tuple[float, float, float]]:
    """Colours by SNOMED code from the shipped term.json ({} when it cannot be read)."""
    path = Path(resources).joinpath(*TERMINOLOGY_FILE)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    colors: Dict[str, Tuple[float, float, float]] = {}
    categories: List[dict] = (data.get("SegmentationCodes") or {}).get("Category", [])
    for category in categories:
        for typ in category.get("Type", []):
            rgb = typ.get("recommendedDisplayRGBValue")
            if rgb and len(rgb) == 3:
                colors[str(typ.get("CodeValue"))] = tuple(float(v) / 255 for v in rgb)
    return colors
