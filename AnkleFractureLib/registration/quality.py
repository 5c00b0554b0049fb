"""When a registration cannot be used at all: the refusal limits of the registration checks.

The pipeline's checks (:func:`AnkleFractureLib.pipeline.checks.check_registration`) turn a
registration into findings, warnings and refusals, for the report. The two refusals are
decided here, below the pipeline, so that the code that registers a case for training crops
(:func:`AnkleFractureLib.registration.shape_prior.prior_and_refit`, called by
``crop_case``) refuses exactly what ``run`` refuses:

* a surface RMS distance above :data:`REFUSE_RMS_MM` (the fit failed);
* the template's plafond mapped into the patient farther than :data:`REFUSE_JOINT_MM` from
  the plafond found on the labels (a fit that slid along the shaft: a cylinder fits anywhere
  along itself, so the RMS cannot see it).

Points are (x, y, z) patient LPS mm.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

#: Surface RMS distance (mm) above which the registration failed.
REFUSE_RMS_MM = 6.0
#: Distance (mm) between the plafond found on the labels and the template's plafond mapped by
#: the registration above which the fit misplaces the joint: 15 mm moves a Weber B level
#: (0-25 mm above the joint) into the C range.
REFUSE_JOINT_MM = 15.0


def mapped_plafond(registration: Any, template: Any = None) -> np.ndarray:
    """The template's plafond (the template origin when ``template`` is None) mapped into the
    patient by ``registration`` (LPS mm, (3,))."""
    plafond = (np.zeros(3) if template is None
               else np.asarray(template.plafond, dtype=float).reshape(3))
    t2p = np.linalg.inv(np.asarray(registration.patient_to_template, dtype=float))
    return t2p[:3, :3] @ plafond + t2p[:3, 3]


def rms_refused(rms_mm: float) -> bool:
    """Whether a fit with this surface RMS (mm) failed (not finite, or above
    :data:`REFUSE_RMS_MM`)."""
    return not np.isfinite(rms_mm) or rms_mm > REFUSE_RMS_MM


def refused(registration: Any, found_plafond: Optional[np.ndarray], template: Any = None
            ) -> bool:
    """Whether the pipeline's checks refuse ``registration``.

    Args:
        registration: The :class:`~AnkleFractureLib.registration.register.Registration`.
        found_plafond: The plafond found on the registered labels (LPS mm; see
            :func:`~AnkleFractureLib.registration.leg.estimate_plafond`), or None when none
            was found (then only the RMS decides).
        template: The template registered to.

    Example:
        >>> from types import SimpleNamespace
        >>> import numpy as np
        >>> shift = np.eye(4); shift[2, 3] = -20.0  # patient z + 20 mm = template z
        >>> reg = SimpleNamespace(rms_mm=1.0, patient_to_template=shift)
        >>> refused(reg, np.array([0.0, 0.0, 20.0])), refused(reg, np.zeros(3))
        (False, True)
    """
    if rms_refused(float(registration.rms_mm)):
        return True
    if found_plafond is None:
        return False
    miss = float(np.linalg.norm(mapped_plafond(registration, template) - found_plafond))
    return miss > REFUSE_JOINT_MM
