"""Registration stage: side detection, mirroring and ICP to the healthy template.

Modules, in the order the stage runs:

* :mod:`.side`: left or right from the anatomy (the fibula is lateral to the tibia);
* :mod:`.surface`: bone surface points of a label map (LPS mm);
* :mod:`.icp`: trimmed, label-aware similarity ICP (KD-trees, several starts);
* :mod:`.template`: the healthy right-ankle template and its syndesmosis box;
* :mod:`.register`: the whole stage, ``patient_to_template = icp @ mirror``;
* :mod:`.shape_prior`: labels far from the registered template's bones leave the labels;
* :mod:`.transform_io`: ``transform.json`` and the ITK ``transform.tfm``.
"""

from AnkleFractureLib.registration.register import (
    MIRROR_X,
    Registration,
    register_to_template,
)
from AnkleFractureLib.registration.side import SideDetection, detect_side
from AnkleFractureLib.registration.template import SyndesmosisBox, Template, load_template

__all__ = [
    "MIRROR_X",
    "Registration",
    "register_to_template",
    "SideDetection",
    "detect_side",
    "SyndesmosisBox",
    "Template",
    "load_template",
]
