"""The one schema of ``result.json``, and a small validator for it (no dependency).

Every command that analyses a CT writes its ``result.json`` through
:func:`~AnkleFractureLib.pipeline.pipeline.write_outputs` (``run``, ``classify``, each case
folder of ``batch`` and ``demo``, and the Slicer module's job in :mod:`.job`), so they share one
layout. :data:`RESULT_SCHEMA` declares it as a JSON Schema (draft 2020-12; only the keywords
listed below are used, so any JSON Schema validator accepts it too), and
:func:`result_problems` checks a parsed ``result.json`` against it and against the rules a
schema cannot say (a refused result has no Weber class, probabilities sum to 1, the warnings are
the warning findings).

Supported keywords: ``type`` (one name or a list), ``enum``, ``properties``, ``required``,
``additionalProperties`` (bool or a schema), ``items``, ``minItems``, ``maxItems``,
``minimum``, ``maximum``, ``pattern``. Object keywords apply to objects only, array keywords to
arrays only, as in JSON Schema.

Example:
    >>> result_problems({"refused": True})[:2]
    ['$: missing key probabilities', '$: missing key prediction']
    >>> validate(0.5, {"type": "number", "maximum": 0.4})
    ['$: 0.5 is above the maximum 0.4']
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Dict, List, Optional

from AnkleFractureLib.errors import InputError, PathLike

#: Version of the result.json layout described by :data:`RESULT_SCHEMA`.
SCHEMA_VERSION = 1

_CLASSES = ["none", "A", "B", "C"]
_STRINGS: Dict[str, Any] = {"type": "array", "items": {"type": "string"}}
_NUMBER: Dict[str, Any] = {"type": "number"}
_FRACTION: Dict[str, Any] = {"type": "number", "minimum": 0, "maximum": 1}
_VECTOR3: Dict[str, Any] = {"type": "array", "items": _NUMBER, "minItems": 3, "maxItems": 3}

_MODEL: Dict[str, Any] = {
    "type": "object",
    "required": ["dir", "sha256", "used"],
    "properties": {
        "dir": {"type": ["string", "null"]},
        "sha256": {"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$"},
        "plans_sha256": {"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$"},
        "used": {"type": "boolean"},
    },
    "additionalProperties": False,
}

_FINDING: Dict[str, Any] = {
    "type": "object",
    "required": ["level", "code", "message", "details"],
    "properties": {
        "level": {"enum": ["warning", "refusal", "info"]},  # info: a measurement only
        "code": {"type": "string", "pattern": "^[a-z0-9_]+$"},
        "message": {"type": "string"},
        "details": {"type": "object"},
    },
    "additionalProperties": False,
}

_REGISTRATION: Dict[str, Any] = {
    "type": ["object", "null"],
    "required": ["patient_to_template", "side", "mirrored", "rms_mm", "inlier_fraction",
                 "scale", "converged", "warnings"],
    "properties": {
        "patient_to_template": {"type": "array", "minItems": 4, "maxItems": 4,
                                "items": {"type": "array", "items": _NUMBER,
                                          "minItems": 4, "maxItems": 4}},
        "side": {"enum": ["left", "right"]},
        "mirrored": {"type": "boolean"},
        "rms_mm": {"type": "number", "minimum": 0},
        "inlier_fraction": _FRACTION,
        "scale": _NUMBER,
        "converged": {"type": "boolean"},
        "warnings": _STRINGS,
    },
}

_INPUT: Dict[str, Any] = {
    "type": "object",
    "required": ["ct", "format", "size_xyz", "spacing_mm", "origin_lps_mm", "direction",
                 "reader_warnings"],
    "properties": {
        "ct": {"type": ["string", "null"]},
        "seg": {"type": "string"},  # 'classify': the given segmentation
        "format": {"type": ["string", "null"]},
        "series_uid": {"type": ["string", "null"]},
        "size_xyz": {"type": "array", "items": {"type": "integer", "minimum": 1},
                     "minItems": 3, "maxItems": 3},
        "spacing_mm": _VECTOR3,
        "origin_lps_mm": _VECTOR3,
        "direction": {"type": "array", "items": _VECTOR3, "minItems": 3, "maxItems": 3},
        "reader_warnings": _STRINGS,
    },
    "additionalProperties": False,
}

#: How the heatmap was made and where its box lies on the CT (optional: older results lack it).
_GRADCAM: Dict[str, Any] = {
    "type": ["object", "null"],
    "required": ["method", "layers", "cell_mm", "ct_box"],
    "properties": {
        "method": {"enum": ["gradcam", "hirescam"]},
        "layers": _STRINGS,
        "cell_mm": {"type": ["array", "null"], "items": _NUMBER, "minItems": 3, "maxItems": 3},
        "ct_box": {"type": ["array", "null"], "minItems": 3, "maxItems": 3,
                   "items": {"type": "array", "items": {"type": "integer", "minimum": 0},
                             "minItems": 2, "maxItems": 2}},
        # The heatmap's maximum (patient LPS mm; optional: older results lack it).
        "peak_lps": _VECTOR3,
    },
    "additionalProperties": False,
}

#: The located fibular fracture (``fracture``; null when the localiser did not run).
_FRACTURE: Dict[str, Any] = {
    "type": ["object", "null"],
    "required": ["found", "probability", "height_mm", "center_lps", "extent"],
    "properties": {
        "found": {"type": "boolean"},
        "probability": _FRACTION,
        "height_mm": {"type": ["number", "null"]},
        "center_lps": {"type": ["array", "null"], "items": _NUMBER, "minItems": 3, "maxItems": 3},
        "extent": {"type": ["object", "null"],
                   "required": ["length_mm", "height_min_mm", "height_max_mm", "voxels"],
                   "additionalProperties": _NUMBER},
        "size_factor": {"type": "number", "minimum": 0},
        "ignored_voxels": {"type": "object",
                           "properties": {"scan_edge": {"type": "integer", "minimum": 0},
                                          "metal": {"type": "integer", "minimum": 0}},
                           "additionalProperties": False},
        "model": {"type": "object"},
        "candidates": {"type": "array", "items": {
            "type": "object",
            "required": ["voxels", "mass", "probability", "height_mm", "found"],
            "properties": {"voxels": {"type": "integer", "minimum": 0}, "mass": _NUMBER,
                           "probability": _FRACTION, "height_mm": _NUMBER,
                           "found": {"type": "boolean"}},
            # a measure of the CT across the line (band_hu, dip_hu) is null where the line
            # has too few points inside the fibula to be measured
            "additionalProperties": {"type": ["number", "null"]}}},
    },
    "additionalProperties": False,
}

#: The class the measured height gives and whether it agrees with the classifier.
_WEBER_FROM_HEIGHT: Dict[str, Any] = {
    "type": ["object", "null"],
    "required": ["height_class", "classifier_prediction", "agree", "reasons"],
    "properties": {
        "height_class": {"enum": ["A", "B", "C", None]},
        "classifier_prediction": {"enum": _CLASSES},
        "agree": {"type": "boolean"},
        "reasons": _STRINGS,
    },
    "additionalProperties": False,
}

#: JSON Schema of ``result.json`` (what :func:`~.pipeline.write_outputs` writes).
RESULT_SCHEMA: Dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": f"https://github.com/AnkleFracture/result.schema.json/v{SCHEMA_VERSION}",
    "title": "AnkleFracture result.json",
    "type": "object",
    "required": ["probabilities", "prediction", "uncertainty", "gradcam_class",
                 "withheld_reason", "side", "refused", "refused_stage", "refusal", "refusals",
                 "warnings", "findings", "registration", "crop_coverage", "bones_ml",
                 "timings_s", "models", "input", "version", "disclaimer", "files"],
    "properties": {
        "probabilities": {"type": ["object", "null"], "required": _CLASSES,
                          "properties": {c: _FRACTION for c in _CLASSES},
                          "additionalProperties": False},
        "prediction": {"enum": _CLASSES + [None]},
        "uncertainty": {"type": "object", "required": ["unsure", "reasons"],
                        "properties": {"unsure": {"type": "boolean"}, "reasons": _STRINGS}},
        "gradcam_class": {"enum": _CLASSES + [None]},
        "gradcam": _GRADCAM,
        "fracture": _FRACTURE,
        "weber_from_height": _WEBER_FROM_HEIGHT,
        "classifier_probabilities": {"type": ["object", "null"], "required": _CLASSES,
                                     "properties": {c: _FRACTION for c in _CLASSES},
                                     "additionalProperties": False},
        "withheld_reason": {"type": ["string", "null"]},
        "side": {"enum": ["left", "right", None]},
        "refused": {"type": "boolean"},
        "refused_stage": {"enum": ["input", "segment", "register", "crop", None]},
        "refusal": {"type": ["string", "null"]},
        "refusals": _STRINGS,
        "warnings": _STRINGS,
        "findings": {"type": "array", "items": _FINDING},
        "registration": _REGISTRATION,
        "crop_coverage": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "bones_ml": {"type": ["object", "null"], "additionalProperties": _NUMBER},
        "timings_s": {"type": "object", "required": ["total"],
                      "additionalProperties": {"type": "number", "minimum": 0}},
        "models": {"type": "object", "required": ["segmentation", "classification"],
                   "properties": {"segmentation": _MODEL, "classification": _MODEL,
                                  "fracture": _MODEL},
                   "additionalProperties": False},
        "input": _INPUT,
        "version": {"type": "string"},
        "disclaimer": {"type": "string"},
        "files": _STRINGS,
    },
    "additionalProperties": False,
}

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                         and math.isfinite(v)),
}


def validate(value: Any, schema: Dict[str, Any], where: str = "$") -> List[str]:
    """Problems of ``value`` against ``schema`` (the keywords of the module docstring).

    Args:
        value: Parsed JSON.
        schema: A JSON Schema using only the supported keywords.
        where: Path of ``value`` in the document, for the messages ("$" is the root).

    Returns:
        One message per problem ("$.input.size_xyz: ..."); empty when valid.
    """
    problems: List[str] = []
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_TYPES[name](value) for name in names):
            return [f"{where}: {_short(value)} is not of type {' or '.join(names)}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {_short(value)} is not one of {schema['enum']}")
    if _TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{where}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{where}: {value} is above the maximum {schema['maximum']}")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"],
                                                                         value):
        problems.append(f"{where}: {_short(value)} does not match {schema['pattern']}")
    if isinstance(value, list):
        problems += _validate_array(value, schema, where)
    if isinstance(value, dict):
        problems += _validate_object(value, schema, where)
    return problems


def _validate_array(value: List[Any], schema: Dict[str, Any], where: str) -> List[str]:
    problems: List[str] = []
    if "minItems" in schema and len(value) < schema["minItems"]:
        problems.append(f"{where}: {len(value)} items, fewer than {schema['minItems']}")
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        problems.append(f"{where}: {len(value)} items, more than {schema['maxItems']}")
    if "items" in schema:
        for i, item in enumerate(value):
            problems += validate(item, schema["items"], f"{where}[{i}]")
    return problems


def _validate_object(value: Dict[str, Any], schema: Dict[str, Any], where: str) -> List[str]:
    problems = [f"{where}: missing key {key}" for key in schema.get("required", [])
                if key not in value]
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in properties:
            problems += validate(item, properties[key], f"{where}.{key}")
        elif extra is False:
            problems.append(f"{where}: unexpected key {key}")
        elif isinstance(extra, dict):
            problems += validate(item, extra, f"{where}.{key}")
    return problems


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _consistency(data: Dict[str, Any]) -> List[str]:
    """The rules a schema cannot say (``data`` already matches the schema)."""
    problems: List[str] = []
    findings = data["findings"]
    refusal_messages = [f["message"] for f in findings if f["level"] == "refusal"]
    if data["refused"] != bool(refusal_messages) or sorted(data["refusals"]) != sorted(
            refusal_messages):
        problems.append("$.refused / $.refusals do not match the refusal findings")
    # write_outputs may add warnings of its own (a report that could not be drawn).
    if not {f["message"] for f in findings if f["level"] == "warning"} <= set(data["warnings"]):
        problems.append("$.warnings do not hold every warning finding")
    if data["refused"]:
        if data["prediction"] is not None or data["probabilities"] is not None:
            problems.append("$: a refused result must have no prediction and no probabilities")
        if not data["refusal"]:
            problems.append("$.refusal: a refused result must say why")
    elif data["refused_stage"] is not None:
        problems.append("$.refused_stage: set although the result is not refused")
    if (data["prediction"] is None) != (data["probabilities"] is None):
        problems.append("$: prediction and probabilities must be given together")
    if data["probabilities"] is not None:
        total = sum(data["probabilities"].values())
        if abs(total - 1.0) > 1e-6:
            problems.append(f"$.probabilities: sum {total:.8f}, not 1")
    elif data["withheld_reason"] is None:
        problems.append("$.withheld_reason: no Weber class given, but no reason either")
    return problems


def result_problems(data: Any) -> List[str]:
    """Every problem of a parsed ``result.json``: schema first, then consistency.

    Args:
        data: The parsed ``result.json``.

    Returns:
        Messages naming the JSON path and the problem; empty when the result is valid.
    """
    problems = validate(data, RESULT_SCHEMA)
    return problems or _consistency(data)


def check_result_file(path: PathLike) -> Dict[str, Any]:
    """Read and validate a ``result.json``.

    Args:
        path: The file.

    Returns:
        The parsed result.

    Raises:
        InputError: The file cannot be read or parsed, or does not match the schema (every
            problem is listed).
    """
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read result.json: {exc}") from None
    problems = result_problems(data)
    if problems:
        raise InputError(path, "not a valid result.json: " + "; ".join(problems))
    return data


def schema_json(indent: Optional[int] = 2) -> str:
    """:data:`RESULT_SCHEMA` as JSON text (e.g. to publish as ``result.schema.json``)."""
    return json.dumps(RESULT_SCHEMA, indent=indent)
