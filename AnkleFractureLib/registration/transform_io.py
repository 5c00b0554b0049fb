"""Saving and loading the registration: ``transform.json`` and an ITK ``transform.tfm``.

``transform.json`` holds ``patient_to_template``, a 4x4 row-major matrix that maps patient LPS
mm to template mm (it contains the x-mirror for a left ankle, so its determinant is then
negative), plus the side and the fit quality.

``transform.tfm`` is an ITK transform file (LPS, as every ITK file) holding
``template_to_patient``: ITK and Slicer read a transform file as the *resampling* transform
(from the fixed/parent space to the moving space), so Slicer's transform node built from this file
moves the patient's CT onto the template when applied (its "to parent" transform is
``patient_to_template``), and ITK resampling of the CT onto a template grid uses it as is.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

import numpy as np

from AnkleFractureLib.errors import InputError, PathLike
from AnkleFractureLib.io import atomic_output, atomic_write_json

REQUIRED_KEYS = ("patient_to_template", "side", "mirrored", "rms_mm", "inlier_fraction",
                 "iterations")


def check_matrix(matrix: Any, where: PathLike = None) -> np.ndarray:
    """A finite, invertible 4x4 affine matrix with last row (0, 0, 0, 1), or InputError."""
    from AnkleFractureLib.geometry.arrays import affine_matrix_problem

    problem = affine_matrix_problem(matrix)
    if problem:
        raise InputError(where, problem)
    return np.asarray(matrix, dtype=float)


def write_transform_json(data: Dict[str, Any], path: PathLike) -> None:
    """Write ``transform.json`` atomically; ``data`` must hold :data:`REQUIRED_KEYS`."""
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"transform data lacks {missing}")
    out = dict(data)
    out["patient_to_template"] = [[float(v) for v in row]
                                  for row in check_matrix(data["patient_to_template"])]
    atomic_write_json(path, out)


def read_transform_json(path: PathLike) -> Dict[str, Any]:
    """Read and check ``transform.json``; ``patient_to_template`` comes back as a 4x4 array."""
    spath = os.fspath(path)
    if not os.path.isfile(spath):
        raise InputError(spath, "transform file does not exist")
    try:
        with open(spath, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(spath, f"cannot read transform JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(spath, "transform JSON must be an object")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise InputError(spath, f"transform JSON lacks {missing}")
    if data["side"] not in ("left", "right"):
        raise InputError(spath, f"side must be 'left' or 'right', got {data['side']!r}")
    data["patient_to_template"] = check_matrix(data["patient_to_template"], spath)
    return data


def write_itk_transform(template_to_patient: np.ndarray, path: PathLike) -> None:
    """Write a 4x4 LPS matrix as an ITK AffineTransform file (``.tfm`` or ``.txt``), atomically."""
    import SimpleITK as sitk

    m = check_matrix(template_to_patient, path)
    t = sitk.AffineTransform(3)
    t.SetMatrix([float(v) for v in m[:3, :3].reshape(-1)])
    t.SetTranslation([float(v) for v in m[:3, 3]])
    with atomic_output(path) as tmp:
        sitk.WriteTransform(t, tmp)


def read_itk_transform(path: PathLike) -> np.ndarray:
    """Read an ITK affine/similarity/rigid transform file as a 4x4 LPS matrix."""
    import SimpleITK as sitk

    spath = os.fspath(path)
    if not os.path.isfile(spath):
        raise InputError(spath, "transform file does not exist")
    try:
        t = sitk.ReadTransform(spath)
    except RuntimeError:
        raise InputError(spath, "not a readable ITK transform file") from None
    if t.GetDimension() != 3:
        raise InputError(spath, f"expected a 3D transform, got {t.GetDimension()}D")
    try:
        a = sitk.AffineTransform(t)
    except (RuntimeError, TypeError):
        # Composite or other transform kinds: convert through a generic route.
        try:
            a = sitk.AffineTransform(t.Downcast())
        except Exception:
            raise InputError(spath, f"transform {t.GetName()} is not linear") from None
    m = np.eye(4)
    m[:3, :3] = np.asarray(a.GetMatrix()).reshape(3, 3)
    centre = np.asarray(a.GetCenter())
    # ITK: T(p) = A (p - c) + c + t
    m[:3, 3] = np.asarray(a.GetTranslation()) + centre - m[:3, :3] @ centre
    return m
