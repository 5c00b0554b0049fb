"""Save and load a fracture localiser folder (``plans.json`` + ``model.pt``).

The weight format (float16, weights-only unpickling) is the project's; see
:mod:`AnkleFractureLib.segmentation.model_io`.

Example:
    >>> import tempfile
    >>> plans = default_plans(features=[4, 4, 8, 8, 8, 4])
    >>> folder = tempfile.mkdtemp()
    >>> _ = save_localiser(folder, build_localiser(plans["network"]), plans)
    >>> net, loaded = load_localiser(folder)
    >>> loaded["network"]["features"], net.training
    ([4, 4, 8, 8, 8, 4], False)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from AnkleFractureLib.errors import InputError, PathLike
from AnkleFractureLib.fracture.network import DEFAULT_NETWORK, MeanProbability, build_localiser
from AnkleFractureLib.fracture.window import WINDOW_YX
from AnkleFractureLib.io import atomic_torch_save, atomic_write_json
from AnkleFractureLib.segmentation.model_io import (FORMAT_VERSION, PLANS_FILE, WEIGHTS_FILE,
                                                    _half_state_dict, build_with_weights,
                                                    folder_sha256, read_weights, unwrap)

KIND = "fracture_localiser"


#: The crop arrays a localiser reads unless told otherwise (plans.json ``channels``): the three
#: crop channels, as the shipped localiser does (adding the bone-window CT, "ct_bone", found
#: more hairlines but marked intact real-shape fibulae: docs/fracture/experiments/v9_bone_window).
DEFAULT_CHANNELS = ("ct", "tibia", "fibula")


def default_plans(features: Optional[Sequence[int]] = None,
                  channels: Sequence[str] = DEFAULT_CHANNELS) -> Dict[str, Any]:
    """plans.json of a new localiser: network, window (y, x voxels), the crop arrays it reads
    (names of :data:`~AnkleFractureLib.crop.syndesmosis.ALL_CHANNELS`), decision thresholds."""
    from AnkleFractureLib.fracture.localise import DEFAULT_DECISION

    net = dict(DEFAULT_NETWORK)
    if features is not None:
        net["features"] = [int(f) for f in features]
    net["in_channels"] = len(channels)
    return {"kind": KIND, "format_version": 1, "network": net, "window_yx": list(WINDOW_YX),
            "crop": "registered", "channels": list(channels),
            "decision": dict(DEFAULT_DECISION)}


def check_channels(plans: Dict[str, Any], plans_path: PathLike) -> None:
    """Raise :class:`InputError` (naming ``plans_path``) unless the plans' ``channels`` are
    known crop arrays, as many as the network's ``in_channels``."""
    from AnkleFractureLib.crop.syndesmosis import ALL_CHANNELS

    names = plans.get("channels", ["ct", "tibia", "fibula"])
    n_in = int((plans.get("network") or {}).get("in_channels", DEFAULT_NETWORK["in_channels"]))
    if not isinstance(names, list) or any(n not in ALL_CHANNELS for n in names) \
            or len(names) != n_in:
        raise InputError(plans_path, f"the localiser's channels must be {n_in} names of "
                                     f"{list(ALL_CHANNELS)}, got {names!r}")


def save_localiser(model_dir: PathLike, network: torch.nn.Module, plans: Dict[str, Any],
                   extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``plans.json`` and ``model.pt`` atomically; returns the weights' path."""
    folder = Path(model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    payload: Dict[str, Any] = dict(extra or {})
    payload["state_dict"] = _half_state_dict(unwrap(network))
    payload["format_version"] = FORMAT_VERSION
    payload["kind"] = KIND
    atomic_write_json(folder / PLANS_FILE, {k: v for k, v in plans.items()
                                            if not k.startswith("_")})
    weights = folder / WEIGHTS_FILE
    atomic_torch_save(payload, weights)
    return weights


def load_localiser(model_dir: PathLike, device: Union[str, torch.device] = "cpu"
                   ) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Network (eval mode) and plans (with ``_sha256``, see ``folder_sha256``, and
    ``_plans_sha256``, the SHA-256 of plans.json: its decision rule) from a folder.

    A plans.json that lists ``members`` (weight files beside model.pt) loads an ensemble:
    :class:`~AnkleFractureLib.fracture.network.MeanProbability` of model.pt and the members.

    Raises:
        InputError: The folder or a file is missing or damaged, or not a localiser.
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise InputError(folder, "fracture localiser folder does not exist")
    plans_path = folder / PLANS_FILE
    try:
        plans = json.loads(plans_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(plans_path, f"cannot read the localiser plans: {exc}") from None
    if not isinstance(plans, dict) or plans.get("kind") != KIND:
        raise InputError(plans_path, "not a fracture localiser's plans.json")
    check_channels(plans, plans_path)
    weights_path = folder / WEIGHTS_FILE
    payload = read_weights(weights_path)
    if payload.get("kind") != KIND:
        raise InputError(weights_path, f"not a fracture localiser (kind {payload.get('kind')!r})")
    network = build_with_weights(build_localiser, plans["network"], payload, plans_path,
                                 weights_path, device)
    members = plans.get("members") or []
    if members:
        network = MeanProbability([network] + [_member(folder, m, plans, device)
                                                for m in members]).eval()
    plans["_sha256"] = folder_sha256(folder)
    plans["_plans_sha256"] = hashlib.sha256(plans_path.read_bytes()).hexdigest()
    return network, plans


def load_upper_network(folder: PathLike, plans: Dict[str, Any],
                       device: Union[str, torch.device] = "cpu"
                       ) -> Optional[Tuple[torch.nn.Module, List[str]]]:
    """The upper-window network of a localiser folder and the crop arrays it reads, or None.

    plans.json ``inference.upper_window`` is ``true`` (the windows above the box are read by
    the localiser's own network) or ``{"file": weights beside model.pt, "network": its config
    (default: the plans' own), "channels": its crop arrays (default: the plans' own)}``: a
    network trained on the box moved up (train-fracture --crop-shift-mm).

    Raises:
        InputError: A missing or damaged weights file, or a bad entry (naming plans.json).
    """
    entry = (plans.get("inference") or {}).get("upper_window")
    if not isinstance(entry, dict):
        return None
    folder = Path(folder)
    names = entry.get("channels") or plans.get("channels", list(DEFAULT_CHANNELS))
    net_cfg = entry.get("network") or plans["network"]
    check_channels({"channels": names, "network": net_cfg}, folder / PLANS_FILE)
    return _member(folder, entry, plans, device), list(names)


def _member(folder: Path, entry: Any, plans: Dict[str, Any],
            device: Union[str, torch.device]) -> torch.nn.Module:
    """One more network of an ensemble (plans.json ``members``: {"file": weights beside
    model.pt, "network": optional config (default: the plans' own)})."""
    plans_path = folder / PLANS_FILE
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
            or Path(entry["file"]).is_absolute() or ".." in Path(entry["file"]).parts:
        raise InputError(plans_path, f"an ensemble member must be {{\"file\": a weights file "
                                     f"in the model folder}}, got {entry!r}")
    path = folder / entry["file"]
    payload = read_weights(path)
    if payload.get("kind") != KIND:
        raise InputError(path, f"not a fracture localiser (kind {payload.get('kind')!r})")
    return build_with_weights(build_localiser, entry.get("network") or plans["network"],
                              payload, plans_path, path, device)
