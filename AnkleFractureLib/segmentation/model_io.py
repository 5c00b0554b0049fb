"""Save and load a segmentation model folder.

A model folder holds everything inference needs::

    MODEL_DIR/plans.json   # SegPlans.to_json(): spacing, HU window, patch size, network
    MODEL_DIR/model.pt     # {"state_dict": float16 weights, "format_version": 1, "epoch": int, ...}

Weights are stored as float16 (half the size; the network's outputs change far less than the
argmax needs) and cast back to float32 on loading. Training adds ``training_log.csv``,
``training.json`` and a resume ``checkpoint.pt`` next to them; inference ignores those.

Example:
    >>> import tempfile
    >>> from AnkleFractureLib.segmentation.network import build_network
    >>> from AnkleFractureLib.segmentation.plans import SegPlans
    >>> plans = SegPlans(network={"architecture": "unet", "spatial_dims": 3, "in_channels": 1,
    ...                           "out_channels": 3, "channels": [4, 8], "strides": [2],
    ...                           "num_res_units": 1})
    >>> folder = tempfile.mkdtemp()
    >>> _ = save_model(folder, build_network(plans.network), plans, {"epoch": 3})
    >>> net, loaded = load_model(folder)
    >>> loaded == plans, net.training
    (True, False)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from AnkleFractureLib.errors import InputError
from AnkleFractureLib.io import atomic_torch_save, atomic_write_json
from AnkleFractureLib.segmentation.network import build_network
from AnkleFractureLib.segmentation.plans import SegPlans

FORMAT_VERSION = 1
PLANS_FILE = "plans.json"
WEIGHTS_FILE = "model.pt"
#: Largest finite float16 value; weights beyond it are kept as float32.
_FP16_MAX = 65504.0

PathLike = Union[str, "os.PathLike[str]"]


def _half_state_dict(network: torch.nn.Module) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in network.state_dict().items():
        t = value.detach().to("cpu")
        # float16 only where it is lossless in range; a (rare) huge value stays float32.
        if t.is_floating_point() and (t.numel() == 0 or float(t.abs().max()) <= _FP16_MAX):
            t = t.to(torch.float16)
        out[key] = t.clone()
    return out


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The bare network inside a DistributedDataParallel / DataParallel wrapper."""
    return getattr(network, "module", network)


def save_model(model_dir: PathLike, network: torch.nn.Module, plans: SegPlans,
               extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``plans.json`` and ``model.pt`` (float16 weights) into ``model_dir`` atomically.

    Args:
        model_dir: The model folder (created).
        network: The network (a DDP wrapper is unwrapped).
        plans: Its plans.
        extra: More plain-data entries for ``model.pt`` (e.g. {"epoch": 12, "val_dice": 0.93});
            "epoch" defaults to 0; "state_dict" and "format_version" cannot be overridden.

    Returns:
        The path of ``model.pt``.
    """
    folder = Path(model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    payload: Dict[str, Any] = {"epoch": 0}
    payload.update(extra or {})
    payload["epoch"] = int(payload["epoch"])
    payload["state_dict"] = _half_state_dict(unwrap(network))
    payload["format_version"] = FORMAT_VERSION
    atomic_write_json(folder / PLANS_FILE, plans.to_json())
    weights = folder / WEIGHTS_FILE
    atomic_torch_save(payload, weights)
    return weights


def read_weights(path: PathLike) -> Dict[str, Any]:
    """Read a ``model.pt`` payload (weights-only unpickling: no code runs from the file).

    Raises:
        InputError: Missing, unreadable or not a model file of a known format version.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "model weights (model.pt) not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        detail = (str(exc).splitlines() or [""])[0][:200]
        raise InputError(path, "cannot read model weights (corrupt or not a model.pt): "
                               f"{type(exc).__name__}: {detail}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        raise InputError(path, "not a model file: expected a dict with a 'state_dict'")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(path, f"unsupported model format_version {version!r} "
                               f"(this library reads up to {FORMAT_VERSION})")
    return payload


def load_model(model_dir: PathLike, device: Union[str, torch.device] = "cpu"
               ) -> Tuple[torch.nn.Module, SegPlans]:
    """Build the network from ``plans.json``, load ``model.pt`` (as float32), eval mode.

    Args:
        model_dir: The model folder.
        device: Where to put the network.

    Returns:
        (network in eval mode on ``device``, plans).

    Raises:
        InputError: The folder or a file is missing or corrupt, or the weights do not fit the
            network the plans describe (the message names the file).
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise InputError(folder, "model folder does not exist")
    plans_path = folder / PLANS_FILE
    plans = SegPlans.load(plans_path)
    weights_path = folder / WEIGHTS_FILE
    payload = read_weights(weights_path)
    network = build_with_weights(build_network, plans.network, payload, plans_path, weights_path,
                                 device)
    return network, plans


def build_with_weights(factory: Any, config: Dict[str, Any], payload: Dict[str, Any],
                       plans_path: Path, weights_path: Path,
                       device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
    """Build ``factory(config)``, load ``payload["state_dict"]`` as float32, eval mode.

    Shared by every model folder (segmentation, classification): the errors name the file
    at fault (plans.json for a network that cannot be built, model.pt for weights that do not
    fit it).
    """
    try:
        network = factory(config)
    except Exception as exc:  # noqa: BLE001 - any bad network config is the plans' fault
        raise InputError(plans_path, f"cannot build the network described in plans.json: {exc}"
                         ) from None
    state = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
             for k, v in payload["state_dict"].items()}
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).splitlines()[:3]
        raise InputError(weights_path, "the weights do not fit the network in "
                                       f"{plans_path.name}: {' '.join(first)[:400]}") from None
    network.to(device)
    network.eval()
    return network


def sha256_file(path: PathLike) -> str:
    """SHA-256 hex digest of a file (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_sha256(folder: PathLike) -> Optional[str]:
    """The identity of a model folder's weights: the SHA-256 of ``model.pt``, or, when its
    plans.json lists ensemble ``members`` or an upper-window network
    (``inference.upper_window: {"file": ...}``, a fracture localiser's; weight files beside
    it), the SHA-256 of the newline-joined hex digests of ``model.pt``, each member in order
    and the upper-window network. None without ``model.pt`` or with a member missing."""
    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        return None
    try:
        plans = json.loads((folder / PLANS_FILE).read_text())
        members = list(plans.get("members") or [])
        upper = (plans.get("inference") or {}).get("upper_window")
        if isinstance(upper, dict):
            members.append(upper)
    except (OSError, ValueError, AttributeError):
        members = []
    if not members:
        return sha256_file(weights)
    try:
        digests = [sha256_file(weights)] + [sha256_file(folder / str(m["file"]))
                                            for m in members]
    except (OSError, KeyError, TypeError):  # a member missing: loading names it, not this
        return None
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()
