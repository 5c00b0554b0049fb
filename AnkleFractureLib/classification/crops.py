"""Dataset case -> classifier crop, with an on-disk cache.

Training and evaluation need the syndesmosis crop of every case. A crop costs a registration
(~0.3-1 s) plus reading the CT, so crops are computed once per case and cached as
``CACHE_DIR/<kind>/<id>-<key>.npz`` (float16 channels (3, nz, ny, nx) + JSON info), the key
hashing the case's files (path, size, mtime), the crop kind and the template's box, so an
edited case or another template recomputes.

Which bone masks: the case's own segmentation when the dataset has one (ground truth or a
clinician's corrected one), otherwise the segmentation model's prediction; with
``model_masks=True`` the model's prediction for every case (training adds these crops of the
labelled cases, because the pipeline classifies the model's masks: a classifier trained on
reference masks alone scored 82.5 % on the model's masks against 99.5 % on its own). The side
comes from the record when known, else from automatic side detection.

Kinds: ``"registered"`` (the pipeline's input: mirrored + ICP-registered syndesmosis crop,
CT + tibia + fibula) and ``"raw"`` (the control: an axis-aligned same-size box centred on the
bone, CT only, no segmentation, registration or mirroring).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from AnkleFractureLib.dataset.layout import CLASSES, CaseRecord, Dataset
from AnkleFractureLib.errors import AnkleFractureError, CancelledError, InputError
from AnkleFractureLib.geometry.volume import Volume

CACHE_VERSION = 1
ProgressCallback = Callable[[float, str], None]


@dataclass
class CropSet:
    """Crops of a dataset's cases.

    Attributes:
        ids: Case ids (dataset order), only the cases that could be cropped.
        x: float16 (N, 3, nz, ny, nx) crop channels (CT [0, 1], tibia, fibula).
        y: int64 (N,) class index into :data:`CLASSES`, -1 = unlabelled.
        info: Per case: side, registration RMS (mm), coverage, mask source.
        failed: {case id: reason} of cases that could not be cropped (skipped).
    """

    ids: List[str]
    x: np.ndarray
    y: np.ndarray
    info: List[Dict[str, Any]] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Sequence[int]) -> "CropSet":
        idx = np.asarray(index, dtype=np.int64)
        return CropSet([self.ids[i] for i in idx], self.x[idx], self.y[idx],
                       [self.info[i] for i in idx] if self.info else [], dict(self.failed))

    def concat(self, other: "CropSet", suffix: str = "") -> "CropSet":
        """This set followed by ``other`` (whose ids get ``suffix``)."""
        if len(other) == 0:
            return self
        return CropSet(self.ids + [i + suffix for i in other.ids],
                       np.concatenate([self.x, other.x]), np.concatenate([self.y, other.y]),
                       list(self.info) + list(other.info), {**self.failed, **other.failed})

    @property
    def labelled(self) -> np.ndarray:
        """Indices of the cases with a Weber class."""
        return np.flatnonzero(self.y >= 0)


def crop_case(ct: Volume, label: Optional[Volume], kind: str = "registered",
              template: Any = None, side: str = "auto") -> Tuple[np.ndarray, Dict[str, Any]]:
    """The crop channels of one CT.

    Args:
        ct: CT (HU).
        label: Label map on the CT's grid (1 tibia, 2 fibula); required for "registered".
        kind: "registered" or "raw".
        template: Template (shipped one when None).
        side: "auto", "left" or "right".

    Returns:
        (float32 (3, nz, ny, nx) channels, info {"side", "rms_mm", "coverage", "kind"}).

    Raises:
        InputError: Registration impossible (no bone, side unknown, ...).
    """
    from AnkleFractureLib.crop.syndesmosis import crop_raw_ct, crop_syndesmosis
    from AnkleFractureLib.registration.register import register_to_template
    from AnkleFractureLib.registration.template import load_template

    if kind == "raw":
        crop = crop_raw_ct(ct)
        return crop.channels.astype(np.float32), {"kind": "raw", "side": None, "rms_mm": None,
                                                   "coverage": float(crop.coverage)}
    if kind != "registered":
        raise ValueError(f"crop kind must be 'registered' or 'raw', got {kind!r}")
    if label is None:
        raise InputError(ct.meta.get("source"), "a registered crop needs the bone segmentation")
    template = load_template() if template is None else template
    reg = register_to_template(label, template, side=side, ct=ct)
    crop = crop_syndesmosis(ct, label, reg.patient_to_template, template)
    return crop.channels.astype(np.float32), {"kind": "registered", "side": reg.side,
                                              "rms_mm": round(float(reg.rms_mm), 4),
                                              "coverage": float(crop.coverage)}


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _model_key(model_dir: Path) -> str:
    """A segmentation model folder's identity: its weights' sha256 (the path when missing)."""
    from AnkleFractureLib.segmentation.model_io import WEIGHTS_FILE, sha256_file

    weights = model_dir / WEIGHTS_FILE
    return sha256_file(weights) if weights.is_file() else str(model_dir)


def _shipped_seg_key() -> Optional[str]:
    from AnkleFractureLib.errors import AnkleFractureError
    from AnkleFractureLib.segmentation.inference import default_model_dir

    try:
        return _model_key(Path(default_model_dir()))
    except AnkleFractureError:
        return None


def _template_key(template: Any) -> str:
    if template is None:
        from AnkleFractureLib.registration.template import load_template

        template = load_template()
    return json.dumps(template.box.to_json(), sort_keys=True)


def cache_key(dataset: Dataset, record: CaseRecord, kind: str, template_key: str,
              seg_model_key: Optional[str] = None) -> str:
    """Hex key of a case's crop: its files, the kind, the template box and, for a case whose
    masks come from a segmentation model, that model (``seg_model_key``)."""
    seg = dataset.path(record.segmentation)
    parts = {"version": CACHE_VERSION, "kind": kind,
             "image": _file_key(dataset.path(record.image)),
             "label": _file_key(seg) if seg is not None and kind == "registered" else None,
             "side": record.side, "template": template_key}
    if seg is None and kind == "registered" and seg_model_key is not None:
        parts["seg_model"] = seg_model_key  # absent for the shipped model: old keys stay valid
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _save_npz(path: Path, channels: np.ndarray, info: Dict[str, Any]) -> None:
    from AnkleFractureLib.io import atomic_output

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, channels=channels.astype(np.float16),
                     info=np.frombuffer(json.dumps(info).encode(), dtype=np.uint8))


def _load_npz(path: Path) -> Optional[Tuple[np.ndarray, Dict[str, Any]]]:
    try:
        with np.load(path) as z:
            return z["channels"], json.loads(bytes(z["info"]).decode())
    except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt, not fatal
        return None


def _compute(args: Tuple[str, Dict[str, Any], str, Optional[str], str, Optional[str]]
             ) -> Tuple[str, Optional[str]]:
    """Worker: compute one case's crop and write its cache file; (id, error or None)."""
    root, rec_json, kind, template_dir, out, seg_model_dir = args
    import dataclasses

    from AnkleFractureLib.io import read_image
    from AnkleFractureLib.registration.template import load_template

    ds = Dataset.load(root)
    record = ds.get(rec_json["id"])
    if rec_json.get("model_masks"):
        record = dataclasses.replace(record, segmentation=None)
    try:
        ct = read_image(ds.path(record.image))
        label = None
        source = None
        if kind == "registered":
            if record.segmentation is not None:
                label = read_image(ds.path(record.segmentation))
                source = "dataset"
            else:
                from AnkleFractureLib.segmentation.inference import segment_ct

                label = segment_ct(ct, seg_model_dir)
                source = "model"
        template = load_template(template_dir) if template_dir else None
        channels, info = crop_case(ct, label, kind, template, side=record.side or "auto")
        info["masks"] = source
        _save_npz(Path(out), channels, info)
        return record.id, None
    except AnkleFractureError as exc:
        return record.id, str(exc)


def load_crops(dataset: Dataset, cache_dir: "os.PathLike[str] | str", kind: str = "registered",
               template_dir: "os.PathLike[str] | str | None" = None, workers: int = 1,
               progress: Optional[ProgressCallback] = None,
               should_cancel: Optional[Callable[[], bool]] = None,
               ids: Optional[Sequence[str]] = None,
               seg_model_dir: "os.PathLike[str] | str | None" = None,
               model_masks: bool = False) -> CropSet:
    """Crops of every case of a dataset, computed once and cached.

    Args:
        dataset: The dataset.
        cache_dir: Cache folder (crops go to ``cache_dir/<kind>/``).
        kind: "registered" or "raw".
        template_dir: Template folder (the shipped template when None).
        workers: Processes computing missing crops in parallel.
        progress: Callback (fraction, message).
        should_cancel: Polled between cases; CancelledError when it returns True.
        ids: Only these cases (default: all).
        seg_model_dir: Segmentation model that segments the cases without a label map (the
            shipped one when None); use the model the pipeline will run with.
        model_masks: Use the segmentation model's masks for every case, also those with a
            label map ("registered" crops only; cached like an unlabelled case's crop).

    Returns:
        The :class:`CropSet` (cases that failed are listed in ``failed`` and left out).
    """
    from AnkleFractureLib.registration.template import load_template

    if kind not in ("registered", "raw"):
        raise ValueError(f"crop kind must be 'registered' or 'raw', got {kind!r}")
    records = [r for r in dataset if ids is None or r.id in set(ids)]
    if not records:
        raise InputError(dataset.root, "the dataset has no cases")
    if model_masks and kind == "registered":
        import dataclasses

        # Keys and jobs as for a case without a label map: the same crop, cached once.
        records = [dataclasses.replace(r, segmentation=None) for r in records]
    forced = bool(model_masks and kind == "registered")
    tkey = _template_key(load_template(template_dir) if template_dir else None)
    folder = Path(cache_dir) / kind
    seg_dir = None if seg_model_dir is None else str(Path(seg_model_dir).resolve())
    mkey = None if seg_dir is None else _model_key(Path(seg_dir))
    if mkey is not None and mkey == _shipped_seg_key():
        mkey = None  # the shipped model named explicitly: the same crops as the default
    paths = {r.id: folder / f"{r.id}-{cache_key(dataset, r, kind, tkey, mkey)}.npz"
             for r in records}
    missing = [r for r in records if not paths[r.id].is_file()]
    failed: Dict[str, str] = {}
    done = len(records) - len(missing)

    def report(message: str) -> None:
        if progress is not None:
            progress(done / len(records), message)

    report(f"{done}/{len(records)} crops cached")
    jobs = [(str(dataset.root), {"id": r.id, "model_masks": forced}, kind,
             None if template_dir is None else str(template_dir), str(paths[r.id]), seg_dir)
            for r in missing]
    if jobs and workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # "spawn", not the Linux default "fork": a process that already ran torch (e.g.
        # evaluate-cls, which loads the classifier first) holds OpenMP thread-pool locks that a
        # forked child inherits locked, and the child's segmentation then hangs for ever.
        with ProcessPoolExecutor(max_workers=workers,
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            for case_id, err in pool.map(_compute, jobs, chunksize=2):
                if err:
                    failed[case_id] = err
                done += 1
                report(f"cropped {case_id}")
                if should_cancel is not None and should_cancel():
                    pool.shutdown(cancel_futures=True)
                    raise CancelledError("cropping cancelled")
    else:
        for job in jobs:
            if should_cancel is not None and should_cancel():
                raise CancelledError("cropping cancelled")
            case_id, err = _compute(job)
            if err:
                failed[case_id] = err
            done += 1
            report(f"cropped {case_id}")

    out_ids, xs, ys, infos = [], [], [], []
    for r in records:
        if r.id in failed:
            continue
        loaded = _load_npz(paths[r.id])
        if loaded is None:  # damaged entry: recompute in process
            case_id, err = _compute((str(dataset.root), {"id": r.id, "model_masks": forced},
                                     kind,
                                     None if template_dir is None else str(template_dir),
                                     str(paths[r.id]), seg_dir))
            loaded = None if err else _load_npz(paths[r.id])
            if loaded is None:
                failed[r.id] = err or "unreadable crop cache entry"
                continue
        channels, info = loaded
        out_ids.append(r.id)
        xs.append(channels)
        ys.append(CLASSES.index(r.weber) if r.weber is not None else -1)
        infos.append(info)
    if not xs:
        raise InputError(dataset.root, "no case could be cropped: "
                         + "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:3]))
    return CropSet(out_ids, np.stack(xs).astype(np.float16), np.asarray(ys, np.int64), infos,
                   failed)
