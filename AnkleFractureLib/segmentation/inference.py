"""Tibia/fibula segmentation of a CT with a trained model (CPU or GPU).

The inference path, all inside :meth:`SegmentationModel.predict`:

1. crop the CT to its bone region, reorient to canonical axes, resample to the model spacing and
   window the HU (:func:`AnkleFractureLib.segmentation.preprocess.prepare_ct`);
2. sliding-window inference (Gaussian-weighted overlapping patches, fp16/bf16 autocast on CUDA),
   with a progress callback and a cancel hook called between patches;
3. the tibia and fibula probabilities (float32, model grid, a few MB) are resampled linearly onto
   the CT's own grid inside the bone region only, and the label is their argmax with the
   background: sub-voxel boundaries without ever holding a full-resolution multi-class array;
4. post-processing (specks removed, fragments given their parent bone's label, no swap);
5. the labels are pasted into a uint8 array with exactly the CT's geometry.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import numpy as np

from AnkleFractureLib.errors import CancelledError, InputError
from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.segmentation.plans import SegPlans
from AnkleFractureLib.segmentation.preprocess import prepare_ct

ProgressCallback = Callable[[float, str], None]
CancelCheck = Callable[[], bool]

#: Folder of the shipped default model under Resources/.
DEFAULT_MODEL = ("Models", "segmentation")
#: Fraction of each patch's size shared with its neighbour in the sliding window.
OVERLAP = 0.25


def default_model_dir() -> Path:
    """The shipped segmentation model folder (Resources/Models/segmentation)."""
    from AnkleFractureLib.resources import resource_path

    return resource_path(*DEFAULT_MODEL)


def resolve_device(device: str = "auto") -> "Any":
    """``torch.device`` for "auto" (CUDA when available, else CPU), "cpu" or "cuda[:N]"."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError(None, f"device {device!r} was requested but no CUDA GPU is available; "
                               "use --device cpu or auto")
    if str(device) not in ("cpu",) and not str(device).startswith("cuda"):
        raise InputError(None, f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def _window_count(shape, patch, overlap: float) -> int:
    """Number of sliding-window patches for ``shape`` (for progress reporting)."""
    n = 1
    for size, roi in zip(shape, patch):
        if size <= roi:
            continue
        step = max(int(roi * (1 - overlap)), 1)
        n *= math.ceil((size - roi) / step) + 1
    return n


class SegmentationModel:
    """A loaded segmentation network with its plans, ready to segment CTs.

    Example:
        >>> model = SegmentationModel.load(device="cpu")           # doctest: +SKIP
        >>> labels = model.predict(read_image("ct.nii.gz"))         # doctest: +SKIP
    """

    def __init__(self, network: "Any", plans: SegPlans, device: "Any",
                 model_dir: Optional[Path] = None) -> None:
        self.network = network
        self.plans = plans
        self.device = device
        self.model_dir = model_dir

    @classmethod
    def load(cls, model_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
             device: str = "auto") -> "SegmentationModel":
        """Load a model folder (plans.json + model.pt); the shipped default when None."""
        folder = Path(model_dir) if model_dir is not None else default_model_dir()
        if not folder.is_dir():
            raise InputError(folder, "segmentation model folder not found"
                             + ("" if model_dir is not None else
                                " (the shipped default model is missing from Resources/Models)"))
        from AnkleFractureLib.segmentation.model_io import load_model

        dev = resolve_device(device)
        network, plans = load_model(folder, dev)
        return cls(network, plans, dev, folder)

    def predict(self, ct: Volume, progress: Optional[ProgressCallback] = None,
                should_cancel: Optional[CancelCheck] = None, postprocess: bool = True) -> Volume:
        """Segment the tibia (1) and fibula (2) of ``ct``.

        Args:
            ct: CT in HU, any grid and direction.
            progress: Called with (fraction in [0, 1], message).
            should_cancel: Polled between patches; returning True raises CancelledError.
            postprocess: Remove specks, relabel fragments to their parent bone, prevent swaps.

        Returns:
            uint8 label map with exactly the CT's geometry (0 background, 1 tibia, 2 fibula).
            ``meta["segmentation"]`` holds timings (s), the bone region and the
            post-processing report.
        """
        def report(fraction: float, message: str) -> None:
            if progress is not None:
                progress(min(max(fraction, 0.0), 1.0), message)

        def check_cancel() -> None:
            if should_cancel is not None and should_cancel():
                raise CancelledError("segmentation cancelled")

        timings: Dict[str, float] = {}
        t0 = time.perf_counter()
        report(0.0, "preparing the CT")
        check_cancel()
        model_input = prepare_ct(ct, self.plans)
        timings["prepare_s"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        probs = self._sliding_window(model_input.image.array, report, check_cancel)
        timings["network_s"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        report(0.85, "mapping back to the CT grid")
        check_cancel()
        roi_labels = self._labels_on_roi(probs, model_input)
        timings["resample_s"] = time.perf_counter() - t2

        post_report: Dict[str, Any] = {}
        if postprocess:
            t3 = time.perf_counter()
            report(0.93, "post-processing")
            from AnkleFractureLib.segmentation.postprocess import clean_labels

            roi = model_input.roi_volume
            roi_labels, post_report = clean_labels(roi_labels, roi.spacing, ct_hu=roi.array,
                                                   superior_zyx=roi.superior_zyx())
            timings["postprocess_s"] = time.perf_counter() - t3

        out = np.zeros(ct.shape, dtype=np.uint8)
        out[model_input.roi] = roi_labels
        timings["total_s"] = time.perf_counter() - t0
        meta = dict(ct.meta)
        meta.update({"source": None, "modality": "label", "segmentation": {
            "model_dir": str(self.model_dir) if self.model_dir else None,
            "device": str(self.device),
            "roi_zyx": [[s.start, s.stop] for s in model_input.roi],
            "model_grid_zyx": list(model_input.image.shape),
            "timings": {k: round(v, 4) for k, v in timings.items()},
            "postprocess": post_report,
        }})
        report(1.0, "segmentation done")
        return ct.with_array(out, meta=meta)

    # ------------------------------------------------------------------------------ helpers
    def _sliding_window(self, image: np.ndarray, report: Callable[[float, str], None],
                        check_cancel: Callable[[], None]) -> np.ndarray:
        """Softmax probabilities (3, z, y, x) float32 on the model grid."""
        import torch
        # The plain-torch twin of MONAI's (same windows, same gaussian blend): no MONAI import.
        from AnkleFractureLib.networks import sliding_window_inference

        patch = tuple(int(p) for p in self.plans.window_size)
        total = _window_count(image.shape, patch, OVERLAP)
        done = [0]
        cuda = self.device.type == "cuda"
        sw_batch = 4 if cuda else 1

        def predictor(batch: "torch.Tensor") -> "torch.Tensor":
            check_cancel()
            if cuda:
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
                with torch.autocast("cuda", dtype=dtype):
                    out = self.network(batch)
                out = out.float()
            else:
                out = self.network(batch)
            done[0] += batch.shape[0]
            report(0.15 + 0.7 * min(done[0] / max(total, 1), 1.0),
                   f"network: patch {min(done[0], total)}/{total}")
            return out

        x = torch.from_numpy(np.ascontiguousarray(image))[None, None].to(self.device)
        with torch.inference_mode():
            logits = sliding_window_inference(x, roi_size=patch, sw_batch_size=sw_batch,
                                              predictor=predictor, overlap=OVERLAP,
                                              mode="gaussian", padding_mode="constant", cval=0.0)
            probs = torch.softmax(logits.float(), dim=1)[0]
        return probs.cpu().numpy()

    @staticmethod
    def _labels_on_roi(probs: np.ndarray, model_input: Any) -> np.ndarray:
        """Labels on the CT's ROI grid: the class that wins in the trilinear upsampling of the
        tibia and fibula probabilities (exact, since the model grid tiles the canonical ROI;
        computed only at the bones' surfaces, :mod:`.upsample`), then the exact inverse axis
        permutation."""
        from AnkleFractureLib.segmentation.upsample import upsample_labels

        labels = upsample_labels(probs[1], probs[2], tuple(model_input.canonical_shape))
        canonical = Volume(labels, (1.0, 1.0, 1.0))
        return model_input.orientation.undo(canonical).array


def segment_ct(ct: Volume, model_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
               device: str = "auto", progress: Optional[ProgressCallback] = None,
               should_cancel: Optional[CancelCheck] = None) -> Volume:
    """Segment ``ct`` with the model in ``model_dir`` (the shipped default when None)."""
    return SegmentationModel.load(model_dir, device).predict(ct, progress, should_cancel)
