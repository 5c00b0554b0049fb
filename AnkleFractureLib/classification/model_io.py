"""Save and load a classifier model folder.

A model folder holds everything inference needs::

    MODEL_DIR/plans.json   # ClsPlans.to_json(): crop kind, channels, network, temperature
    MODEL_DIR/model.pt     # {"state_dict": float16 weights, "format_version": 1, ...}

The weight file format (float16, weights-only unpickling) is the segmentation model's; see
:mod:`AnkleFractureLib.segmentation.model_io`. Training adds ``training.json``,
``training_log.csv`` and a resume ``checkpoint.pt``; inference ignores them.

Example:
    >>> import tempfile
    >>> plans = ClsPlans.make(widths=[4, 8, 8, 16])
    >>> folder = tempfile.mkdtemp()
    >>> _ = save_classifier(folder, build_classifier(plans.network), plans)
    >>> net, loaded = load_classifier(folder)
    >>> loaded == plans, net.training
    (True, False)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from AnkleFractureLib.classification.network import SEResNet, build_classifier
from AnkleFractureLib.classification.plans import ClsPlans
from AnkleFractureLib.errors import InputError, PathLike
from AnkleFractureLib.io import atomic_torch_save, atomic_write_json
from AnkleFractureLib.segmentation.model_io import (FORMAT_VERSION, PLANS_FILE, WEIGHTS_FILE,
                                                    _half_state_dict, build_with_weights,
                                                    read_weights, unwrap)

__all__ = ["save_classifier", "load_classifier", "PLANS_FILE", "WEIGHTS_FILE"]


def save_classifier(model_dir: PathLike, network: torch.nn.Module, plans: ClsPlans,
                    extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``plans.json`` and ``model.pt`` (float16 weights) into ``model_dir`` atomically.

    Args:
        model_dir: The model folder (created).
        network: The backbone (a DDP wrapper is unwrapped).
        plans: Its plans.
        extra: More plain-data entries for ``model.pt`` (e.g. {"epoch": 12}).

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
    payload["kind"] = "classifier"
    atomic_write_json(folder / PLANS_FILE, plans.to_json())
    weights = folder / WEIGHTS_FILE
    atomic_torch_save(payload, weights)
    return weights


def load_classifier(model_dir: PathLike, device: Union[str, torch.device] = "cpu"
                    ) -> Tuple[SEResNet, ClsPlans]:
    """Build the network from ``plans.json``, load ``model.pt`` (as float32), eval mode.

    Raises:
        InputError: The folder or a file is missing or corrupt, or the weights do not fit the
            network the plans describe (the message names the file).
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise InputError(folder, "classifier model folder does not exist")
    plans_path = folder / PLANS_FILE
    plans = ClsPlans.load(plans_path)
    weights_path = folder / WEIGHTS_FILE
    payload = read_weights(weights_path)
    if payload.get("kind", "classifier") != "classifier":
        raise InputError(weights_path, f"not a classifier (kind {payload.get('kind')!r})")
    network = build_with_weights(build_classifier, plans.network, payload, plans_path,
                                 weights_path, device)
    return network, plans
