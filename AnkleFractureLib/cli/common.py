"""Pieces shared by the sub-commands: argument checks and the text rendering of an answer."""

from __future__ import annotations

from pathlib import Path
import argparse
from typing import Any, Dict, List, Optional


def preload_models_code(pipeline: bool = False) -> Any:
    """Import torch, the inference networks and matplotlib (and with ``pipeline`` the
    pipeline's own modules, SciPy among them: about 0.8 s) in a background thread while the
    caller works.

    A fresh ``ankle-fracture run`` spends about 1.6 s importing torch and 0.55 s importing
    matplotlib; reading a compressed CT spends most of its time in ITK's C++ code with the GIL
    released, so the two overlap. The networks are the plain-torch twins of
    :mod:`AnkleFractureLib.networks`: MONAI itself, whose package ``__init__`` imports every
    submodule (~1.4 s more, ~2 s alone), is not imported at inference. matplotlib (needed only
    for the report) is imported here rather than while the networks run: an import beside the
    pipeline holds the GIL against its many small steps and slowed the run by ~1.5 s, three
    times the import itself. The caller ``join()``s the thread before it imports the pipeline
    itself, so that no module is ever imported by two threads at once (Python breaks a
    cross-thread import-lock cycle by handing one thread a partially initialised module: seen
    once under load when MONAI was imported here).

    Returns:
        The started (daemon) thread.
    """
    import threading

    def _load() -> None:
        try:
            if pipeline:
                import AnkleFractureLib.pipeline.pipeline  # noqa: F401
            import torch  # noqa: F401
            import AnkleFractureLib.networks  # noqa: F401
            from matplotlib.backends import backend_agg  # noqa: F401
            from matplotlib import figure  # noqa: F401
        except Exception:  # noqa: BLE001 - the main thread's own import reports any problem
            pass

    thread = threading.Thread(target=_load, name="preload-models-code", daemon=True)
    thread.start()
    return thread


def check_out_dir(path: str) -> Path:
    """``--out`` as a Path; refuses a path that is an existing file (InputError)."""
    from AnkleFractureLib.errors import InputError

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(out, "--out must be a folder, but a file of that name exists")
    return out


def check_tta(tta: Optional[int]) -> None:
    """``--tta`` must be None (the model's default) or >= 0 (InputError)."""
    from AnkleFractureLib.errors import InputError

    if tta is not None and tta < 0:
        raise InputError(None, f"--tta must be >= 0, got {tta}")


def add_pipeline_options(p: "argparse.ArgumentParser", side_help: str) -> None:
    """The options every whole-pipeline command shares (``run``, ``batch``):
    --side, --device, --tta, --seg-model, --cls-model, --fracture-model, --template,
    --no-shape-prior, --pdf."""
    p.add_argument("--side", choices=["auto", "left", "right"], default="auto", help=side_help)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto (default: CUDA when available), cpu or cuda")
    p.add_argument("--tta", type=int, default=None, metavar="N",
                   help="test-time augmentations for the uncertainty (default: the model's; "
                        "0 = a single pass)")
    p.add_argument("--seg-model", metavar="DIR",
                   help="segmentation model folder (default: the shipped model)")
    p.add_argument("--cls-model", metavar="DIR",
                   help="classifier folder (default: the shipped model)")
    p.add_argument("--fracture-model", metavar="DIR",
                   help="fracture localiser folder (default: the shipped model)")
    p.add_argument("--template", metavar="DIR", help="template folder (default: the shipped one)")
    p.add_argument("--no-shape-prior", dest="shape_prior", action="store_false",
                   help="keep labels that lie far from the registered healthy template's tibia "
                        "and fibula (by default they are taken out after the registration, "
                        "with a note: foot bones the network called tibia or fibula)")
    p.add_argument("--pdf", action="store_true", help="also write the report as report.pdf")


def pipeline_options(args: "argparse.Namespace") -> "Any":
    """The :class:`~AnkleFractureLib.pipeline.pipeline.PipelineOptions` of those options."""
    from AnkleFractureLib.pipeline.pipeline import PipelineOptions

    return PipelineOptions(side=args.side, device=args.device, tta=args.tta,
                           seg_model_dir=args.seg_model, cls_model_dir=args.cls_model,
                           fracture_model_dir=args.fracture_model, template_dir=args.template,
                           shape_prior=getattr(args, "shape_prior", True))


def bar_chart(probabilities: Dict[str, float], prediction: str, width: int = 30) -> List[str]:
    """One text line per class: name, percentage and a bar of ``#`` (prediction marked).

    Example:
        >>> print("\\n".join(bar_chart({"none": 0.1, "A": 0.9}, "A", width=10)))
          none  10.0% |#         |
          A     90.0% |######### |  <- prediction
    """
    lines = []
    for name, p in probabilities.items():
        filled = int(round(p * width))
        mark = "  <- prediction" if name == prediction else ""
        lines.append(f"  {name:<4} {100.0 * p:5.1f}% |{'#' * filled}{' ' * (width - filled)}|"
                     f"{mark}")
    return lines


def prediction_line(probabilities: Dict[str, float], prediction: str) -> str:
    """'prediction: Weber B (97.1%)' or 'prediction: no fracture (99.0%)'."""
    p = 100.0 * probabilities[prediction]
    return (f"prediction: Weber {prediction} ({p:.1f}%)" if prediction != "none"
            else f"prediction: no fracture ({p:.1f}%)")
