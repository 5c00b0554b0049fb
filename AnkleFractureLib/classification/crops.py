"""Dataset case -> classifier crop, with an on-disk cache.

Training and evaluation need the syndesmosis crop of every case. A crop costs a registration
(~0.3-1 s) plus reading the CT, so crops are computed once per case and cached as
``CACHE_DIR/<kind>/<id>-<key>.npz`` (float16 channels (3, nz, ny, nx) + JSON info). The key
(:func:`cache_key`) hashes everything the crop depends on, so a change to any of them
recomputes instead of silently serving an old crop:

* the case's files (path, size, mtime of the CT and, when used, its label map);
* the crop kind and the template's syndesmosis box;
* the template's content (sha256 of every file in the template folder in use, see
  :func:`template_content_key`), whichever template that is;
* for masks made by a segmentation model: that model's sha256 (weights + plans.json), the
  shipped model's too;
* the side policy (``"detect"`` or ``"dataset"``, and the dataset's side under ``"dataset"``);
* :data:`CROP_CODE_VERSION`, the version of the crop/registration code.

**Bump** :data:`CROP_CODE_VERSION` **by hand** in the same commit as any change that alters a
crop: ``crop/`` (syndesmosis crop), ``registration/`` (ICP, side detection, template loading),
:func:`crop_case`, or the segmentation post-processing that makes the model's masks.

Which bone masks: the case's own segmentation when the dataset has one (ground truth or a
clinician's corrected one), otherwise the segmentation model's prediction; with
``model_masks=True`` the model's prediction for every case (training adds these crops of the
labelled cases, because the pipeline classifies the model's masks: a classifier trained on
reference masks alone scored lower on the model's masks than on its own).

Which side (``side`` of :func:`load_crops`): ``"detect"`` (default; evaluation) registers with
automatic side detection exactly as ``ankle-fracture run`` does, never the dataset's side, so a
wrongly detected side gives the crop a user would get (a scan refused because both legs are
in view is then cropped on the dataset's side, as a user answers that refusal by giving the
side); ``"dataset"`` (training) uses the
dataset's side when the record has one (labelled training data legitimately knows it), else
detection. Every crop's info records the side used, the dataset's side and whether they match.

Who computes: missing crops are computed in ``workers`` spawned processes. Registration and
cropping run on the CPU; only a case without a label map needs the segmentation model, which
each worker runs on its own device (:func:`worker_devices`: GPUs dealt out round-robin, the CPU
without one), so N workers do not all load the model on GPU 0. Under ``torchrun``,
:func:`load_crops_once` has rank 0 build the cache behind a barrier and the other ranks read it.

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

from AnkleFractureLib.dataset.layout import CLASSES, CaseRecord, Dataset, file_key
from AnkleFractureLib.errors import AnkleFractureError, CancelledError, InputError
from AnkleFractureLib.geometry.volume import Volume
from AnkleFractureLib.segmentation.postprocess import POSTPROCESS_VERSION

#: Version of the cache file layout and key scheme.
CACHE_VERSION = 2
#: Version of the code that makes a crop (crop/, registration/, crop_case, the segmentation
#: post-processing). Bump it by hand whenever that code changes what a crop holds: every cached
#: crop is then recomputed (it is part of :func:`cache_key`).
#: 4: the fit anchored on the plafond found on the labels, and a both-legs scan cropped on the
#: dataset's leg after detection refuses it, both as ``run`` / ``evaluate-fracture`` do.
#: 5: segmentation post-processing rule 5 (large isolated pieces without cortex, such as a
#: cast, removed), the plafond estimate started at the lowest full tibial cross-section, and
#: the fit on the distal 200 mm above it (whole-leg scans).
#: 6: tibia surface points more than 25 mm below the plafond found on the labels left out of
#: the fit (a talus labelled tibia no longer pulls it along the shaft).
#: 7: the model's masks lose the voxels far from the registered template's bones
#: (:mod:`~AnkleFractureLib.registration.shape_prior`), as ``run`` does.
#: 8: when the prior removes 1 ml or more, the leg registered again on the cleaned labels and
#: that fit kept unless the checks refuse it or its RMS is worse
#: (:func:`~AnkleFractureLib.registration.shape_prior.prior_and_refit`, ``run``'s own code).
#: (Later changes of the segmentation post-processing are keyed by its own
#: ``POSTPROCESS_VERSION``, for model-mask crops only.)
CROP_CODE_VERSION = 8
#: Side policies of :func:`load_crops`: automatic detection as ``run`` does, or the dataset's.
SIDE_POLICIES = ("detect", "dataset")
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
        meta: What the crops depend on (:func:`crop_key_parts`: code version, template and
            segmentation model sha256, side policy).
    """

    ids: List[str]
    x: np.ndarray
    y: np.ndarray
    info: List[Dict[str, Any]] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Sequence[int]) -> "CropSet":
        idx = np.asarray(index, dtype=np.int64)
        return CropSet([self.ids[i] for i in idx], self.x[idx], self.y[idx],
                       [self.info[i] for i in idx] if self.info else [], dict(self.failed),
                       dict(self.meta))

    def concat(self, other: "CropSet", suffix: str = "") -> "CropSet":
        """This set followed by ``other`` (whose ids get ``suffix``)."""
        if len(other) == 0:
            return self
        return CropSet(self.ids + [i + suffix for i in other.ids],
                       np.concatenate([self.x, other.x]), np.concatenate([self.y, other.y]),
                       list(self.info) + list(other.info), {**self.failed, **other.failed},
                       dict(self.meta))

    @property
    def labelled(self) -> np.ndarray:
        """Indices of the cases with a Weber class."""
        return np.flatnonzero(self.y >= 0)


def crop_case(ct: Volume, label: Optional[Volume], kind: str = "registered",
              template: Any = None, side: str = "auto", both_legs_side: Optional[str] = None,
              shape_prior: bool = False) -> Tuple[np.ndarray, Dict[str, Any]]:
    """The crop channels of one CT, registered as ``ankle-fracture run`` registers it.

    The fit is anchored on the plafond found on the labels, as in the pipeline
    (:func:`~AnkleFractureLib.registration.leg.register_as_run`).

    Args:
        ct: CT (HU).
        label: Label map on the CT's grid (1 tibia, 2 fibula); required for "registered".
        kind: "registered" or "raw".
        template: Template (shipped one when None).
        side: "auto", "left" or "right".
        both_legs_side: With ``side="auto"``, the side to register when detection refuses
            the scan because both legs are in view (that leg's labels alone, as a user answers
            the refusal); None: the refusal stands.
        shape_prior: ``label`` is the segmentation model's: after the registration, the voxels
            far from the template's bones leave it, as ``run`` does
            (:mod:`~AnkleFractureLib.registration.shape_prior`; never a reference map).

    Returns:
        (float32 (3, nz, ny, nx) channels, info {"side", "rms_mm", "coverage", "kind"}).

    Raises:
        InputError: Registration impossible (no bone, side unknown, ...).
    """
    from AnkleFractureLib.crop.syndesmosis import crop_raw_ct, crop_syndesmosis
    from AnkleFractureLib.registration.leg import estimate_plafond, register_as_run, select_leg
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
    if side == "auto":
        label, reg = register_as_run(ct, label, template, both_legs_side)
    else:  # a given side: that leg alone when both are in view, as the pipeline does
        label, _ = select_leg(label, side)
        reg = register_to_template(label, template, side=side, ct=ct,
                                   plafond_hint=estimate_plafond(label))
    if shape_prior:
        label, reg = _prior_and_refit(ct, label, reg, template)
    crop = crop_syndesmosis(ct, label, reg.patient_to_template, template)
    return crop.channels.astype(np.float32), {
        "kind": "registered", "side": reg.side, "rms_mm": round(float(reg.rms_mm), 4),
        "coverage": float(crop.coverage),
        "side_confidence": round(float(reg.side_confidence), 4)}


#: The last template's distance maps (template, TemplateDistances): every crop of a training
#: set is made against one template, and building them costs about 0.1 s.
_DISTANCES: Dict[str, Any] = {}


def _template_distances(template: Any) -> Any:
    """The template's :class:`~AnkleFractureLib.registration.shape_prior.TemplateDistances`,
    built once per template object."""
    from AnkleFractureLib.registration.shape_prior import TemplateDistances

    if _DISTANCES.get("template") is not template:
        _DISTANCES.update(template=template, distances=TemplateDistances(template))
    return _DISTANCES["distances"]


def _prior_and_refit(ct: Volume, label: Volume, reg: Any, template: Any) -> Tuple[Volume, Any]:
    """The shape prior and, when it removed enough, the registration made again on the
    cleaned labels, refused as ``run``'s checks refuse (the fit's side kept)."""
    import dataclasses

    from AnkleFractureLib.registration.leg import estimate_plafond
    from AnkleFractureLib.registration.quality import refused
    from AnkleFractureLib.registration.register import register_to_template
    from AnkleFractureLib.registration.shape_prior import prior_and_refit

    plafond: Dict[str, Any] = {}

    def register(cleaned: Volume) -> Any:
        plafond["found"] = estimate_plafond(cleaned)
        refit = register_to_template(cleaned, template, side=reg.side, ct=ct,
                                     plafond_hint=plafond["found"])
        # The side was detected once, as run's refit reuses its detection.
        return dataclasses.replace(refit, side_confidence=reg.side_confidence,
                                   side_reason=reg.side_reason)

    outcome = prior_and_refit(label, reg, template=template,
                              distances=_template_distances(template), register=register,
                              accept=lambda refit, _: not refused(refit, plafond["found"],
                                                                  template))
    return outcome.label, outcome.registration



def _sha256_files(files: Sequence[Path], root: Path) -> str:
    """sha256 over the relative names and bytes of ``files`` (in the order given)."""
    from AnkleFractureLib.segmentation.model_io import sha256_file

    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(sha256_file(f).encode() + b"\0")
    return h.hexdigest()


def _model_key(model_dir: Path) -> str:
    """A segmentation model folder's identity: sha256 of its weights and plans.json (the
    resolved path when the weights are missing)."""
    from AnkleFractureLib.segmentation.model_io import WEIGHTS_FILE

    files = [model_dir / WEIGHTS_FILE, model_dir / "plans.json"]
    if not files[0].is_file():
        return str(model_dir.resolve())
    return _sha256_files([f for f in files if f.is_file()], model_dir)


def _shipped_seg_dir() -> Optional[Path]:
    """The shipped segmentation model folder, None when it cannot be found."""
    from AnkleFractureLib.segmentation.inference import default_model_dir

    try:
        return Path(default_model_dir()).resolve()
    except AnkleFractureError:
        return None


def template_content_key(template_dir: "os.PathLike[str] | str | None" = None) -> str:
    """sha256 of the template in use: every file of its folder, names and bytes.

    Args:
        template_dir: Template folder (or a name :func:`load_template` resolves); the shipped
            default when None. The folder is the one :func:`load_template` actually loads, so
            a changed default or edited template files give another key.

    Returns:
        64 hex digits.

    Raises:
        InputError: The template cannot be loaded.
    """
    from AnkleFractureLib.registration.template import load_template

    folder = Path(load_template(template_dir).meta["path"])
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    return _sha256_files(files, folder)


def _template_key(template_dir: "os.PathLike[str] | str | None",
                  content: Optional[str] = None) -> str:
    """The template part of the cache key: its content hash (``content``, computed when None)
    and its syndesmosis box."""
    from AnkleFractureLib.registration.template import load_template

    box = load_template(template_dir).box.to_json()
    content = template_content_key(template_dir) if content is None else content
    return json.dumps({"content": content, "box": box}, sort_keys=True)


def cache_key(dataset: Dataset, record: CaseRecord, kind: str, template_key: str,
              seg_model_key: Optional[str] = None, side: str = "detect") -> str:
    """Hex key of a case's crop.

    Args:
        dataset: The dataset.
        record: The case (``segmentation`` None: masks from the segmentation model).
        kind: "registered" or "raw".
        template_key: The template's content + box (:func:`_template_key`).
        seg_model_key: The segmentation model's sha256 (used, with the post-processing's
            ``POSTPROCESS_VERSION``, for a case without a label map).
        side: Side policy, one of :data:`SIDE_POLICIES`.

    Returns:
        20 hex digits over the case's files, the kind, the template, the model (for model
        masks), the side policy (with the dataset's side under "dataset") and
        :data:`CACHE_VERSION` / :data:`CROP_CODE_VERSION`.
    """
    if side not in SIDE_POLICIES:
        raise ValueError(f"side policy must be one of {SIDE_POLICIES}, got {side!r}")
    seg = dataset.path(record.segmentation)
    registered = kind == "registered"
    parts = {"version": CACHE_VERSION, "code": CROP_CODE_VERSION, "kind": kind,
             "image": file_key(dataset.path(record.image)),
             "label": file_key(seg) if seg is not None and registered else None,
             "template": template_key,
             "seg_model": ([seg_model_key, POSTPROCESS_VERSION] if seg is None and registered
                           else None),
             "side": ([side, record.side if side == "dataset" else None] if registered
                      else None)}
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


def _side_info(info: Dict[str, Any], policy: str, dataset_side: Optional[str]) -> None:
    """Add the side policy, the dataset's side and whether the side used matches it."""
    info["side_policy"] = policy
    info["side_dataset"] = dataset_side
    used = info.get("side")
    info["side_match"] = None if used is None or dataset_side is None else used == dataset_side


def _compute(job: Dict[str, Any]) -> Tuple[str, Optional[str]]:
    """Worker: compute one case's crop and write its cache file.

    Args:
        job: {"root", "id", "model_masks", "kind", "template_dir", "out", "seg_model_dir",
            "side"} (see :func:`load_crops`).

    Returns:
        (case id, error message or None).
    """
    import dataclasses

    from AnkleFractureLib.io import read_image
    from AnkleFractureLib.registration.template import load_template

    ds = Dataset.load(job["root"])
    record = ds.get(job["id"])
    if job.get("model_masks"):
        record = dataclasses.replace(record, segmentation=None)
    kind = job["kind"]
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

                label = segment_ct(ct, job["seg_model_dir"], device=_worker_device())
                source = "model"
        template = load_template(job["template_dir"]) if job["template_dir"] else None
        # "detect": as `ankle-fracture run` (side auto), never the dataset's side.
        side = (record.side or "auto") if job["side"] == "dataset" else "auto"
        channels, info = crop_case(ct, label, kind, template, side=side,
                                   both_legs_side=record.side, shape_prior=source == "model")
        info["masks"] = source
        if kind == "registered":
            _side_info(info, job["side"], record.side)
        _save_npz(Path(job["out"]), channels, info)
        return record.id, None
    except AnkleFractureError as exc:
        return record.id, str(exc)


#: Device of this crop worker process (set by :func:`_init_worker`); None: "auto".
_WORKER_DEVICE: Optional[str] = None


def _worker_device() -> str:
    """The device this process segments on: its worker's share of the GPUs, else "auto"."""
    return _WORKER_DEVICE or "auto"


def _init_worker(devices: Any) -> None:
    """ProcessPoolExecutor initializer: take the next device off the shared queue."""
    global _WORKER_DEVICE
    _WORKER_DEVICE = devices.get()


def _gpu_count() -> int:
    """CUDA devices visible to this process (0 without torch or CUDA)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def worker_devices(workers: int, gpu_count: int) -> List[str]:
    """The device of each of ``workers`` crop worker processes.

    Only the segmentation of a case without a label map uses a device (registration and
    cropping run on the CPU). Without a GPU every worker segments on the CPU; with GPUs the
    workers are dealt out round-robin, so N workers do not all load the model on GPU 0.

    Example:
        >>> worker_devices(3, 2), worker_devices(2, 0)
        (['cuda:0', 'cuda:1', 'cuda:0'], ['cpu', 'cpu'])
    """
    if gpu_count <= 0:
        return ["cpu"] * workers
    return [f"cuda:{i % gpu_count}" for i in range(workers)]


def _run_jobs(jobs: List[Dict[str, Any]], workers: int, failed: Dict[str, str],
              report: Callable[[str], None],
              should_cancel: Optional[Callable[[], bool]]) -> None:
    """Compute the missing crops (in ``workers`` spawned processes when > 1, each on its own
    device from :func:`worker_devices`); errors go to ``failed``, ``report`` is called after
    each case."""
    if jobs and workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # "spawn", not the Linux default "fork": a process that already ran torch (e.g.
        # evaluate-cls, which loads the classifier first) holds OpenMP thread-pool locks that a
        # forked child inherits locked, and the child's segmentation then hangs for ever.
        mp = multiprocessing.get_context("spawn")
        devices = mp.Queue()
        for device in worker_devices(workers, _gpu_count()):
            devices.put(device)
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp, initializer=_init_worker,
                                 initargs=(devices,)) as pool:
            for case_id, err in pool.map(_compute, jobs, chunksize=2):
                if err:
                    failed[case_id] = err
                report(f"cropped {case_id}")
                if should_cancel is not None and should_cancel():
                    pool.shutdown(cancel_futures=True)
                    raise CancelledError("cropping cancelled")
        return
    for job in jobs:
        if should_cancel is not None and should_cancel():
            raise CancelledError("cropping cancelled")
        case_id, err = _compute(job)
        if err:
            failed[case_id] = err
        report(f"cropped {case_id}")


def crop_key_parts(kind: str = "registered",
                   template_dir: "os.PathLike[str] | str | None" = None,
                   seg_model_dir: "os.PathLike[str] | str | None" = None,
                   side: str = "detect") -> Dict[str, Any]:
    """What the crops of :func:`load_crops` depend on besides each case's files.

    Args:
        kind: "registered" or "raw".
        template_dir: Template folder (the shipped one when None).
        seg_model_dir: Segmentation model folder (the shipped one when None).
        side: Side policy (:data:`SIDE_POLICIES`).

    Returns:
        {"crop_code_version", "template_sha256", "seg_model_sha256" (None when no model can
        be found), "side_policy"}: recorded beside metrics so that a reader can tell which
        code, template and model made them.
    """
    seg_dir = Path(seg_model_dir).resolve() if seg_model_dir is not None else _shipped_seg_dir()
    return {"crop_code_version": CROP_CODE_VERSION,
            "template_sha256": template_content_key(template_dir),
            "seg_model_sha256": (_model_key(seg_dir) if seg_dir is not None and kind ==
                                 "registered" else None),
            "side_policy": side if kind == "registered" else None}


def load_crops(dataset: Dataset, cache_dir: "os.PathLike[str] | str", kind: str = "registered",
               template_dir: "os.PathLike[str] | str | None" = None, workers: int = 1,
               progress: Optional[ProgressCallback] = None,
               should_cancel: Optional[Callable[[], bool]] = None,
               ids: Optional[Sequence[str]] = None,
               seg_model_dir: "os.PathLike[str] | str | None" = None,
               model_masks: bool = False, side: str = "detect",
               cached_only: Optional[Dict[str, str]] = None) -> CropSet:
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
        side: "detect" (default: automatic side detection exactly as ``ankle-fracture run``,
            the dataset's side is only compared with it; for evaluation) or "dataset" (the
            record's side when known, else detection; for training on labelled data).
        cached_only: None: compute the missing crops. A dict (the ranks other than 0 in
            :func:`load_crops_once`): compute nothing; a case whose crop is not in the cache
            fails with the reason given here for it (rank 0's), else "not in the crop cache".

    Returns:
        The :class:`CropSet` (cases that failed are listed in ``failed`` and left out); its
        ``meta`` is :func:`crop_key_parts`.
    """
    if kind not in ("registered", "raw"):
        raise ValueError(f"crop kind must be 'registered' or 'raw', got {kind!r}")
    if side not in SIDE_POLICIES:
        raise ValueError(f"side policy must be one of {SIDE_POLICIES}, got {side!r}")
    records = [r for r in dataset if ids is None or r.id in set(ids)]
    if not records:
        raise InputError(dataset.root, "the dataset has no cases")
    forced = bool(model_masks and kind == "registered")
    if forced:
        import dataclasses

        # Keys and jobs as for a case without a label map: the same crop, cached once.
        records = [dataclasses.replace(r, segmentation=None) for r in records]
    meta = crop_key_parts(kind, template_dir, seg_model_dir, side)
    tkey = _template_key(template_dir, meta["template_sha256"])
    folder = Path(cache_dir) / kind
    seg_dir = None if seg_model_dir is None else str(Path(seg_model_dir).resolve())
    paths = {r.id: folder / f"{r.id}-"
             f"{cache_key(dataset, r, kind, tkey, meta['seg_model_sha256'], side)}.npz"
             for r in records}
    jobs = {r.id: {"root": str(dataset.root), "id": r.id, "model_masks": forced, "kind": kind,
                   "template_dir": None if template_dir is None else str(template_dir),
                   "out": str(paths[r.id]), "seg_model_dir": seg_dir, "side": side}
            for r in records}
    missing = [jobs[r.id] for r in records if not paths[r.id].is_file()]
    failed: Dict[str, str] = {}
    done = [len(records) - len(missing)]

    def report(message: str, step: int = 1) -> None:
        done[0] += step
        if progress is not None:
            progress(done[0] / len(records), message)

    report(f"{done[0]}/{len(records)} crops cached", 0)
    if cached_only is None:
        _run_jobs(missing, workers, failed, report, should_cancel)
    else:
        failed.update({job["id"]: cached_only.get(job["id"], "not in the crop cache")
                       for job in missing})
    out = _collect(records, paths, jobs, failed, compute=cached_only is None)
    if not len(out):
        raise InputError(dataset.root, "no case could be cropped: "
                         + "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:3]))
    out.meta = meta
    return out


def _collect(records: Sequence[CaseRecord], paths: Dict[str, Path],
             jobs: Dict[str, Dict[str, Any]], failed: Dict[str, str],
             compute: bool = True) -> CropSet:
    """Read the cached crops of ``records`` (a damaged entry is recomputed in process, or
    fails when ``compute`` is False)."""
    out_ids, xs, ys, infos = [], [], [], []
    for r in records:
        if r.id in failed:
            continue
        loaded = _load_npz(paths[r.id])
        if loaded is None:  # damaged entry: recompute in process
            _, err = _compute(jobs[r.id]) if compute else (None, "unreadable crop cache entry")
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
        return CropSet([], np.zeros((0,), np.float16), np.zeros((0,), np.int64), [], failed)
    return CropSet(out_ids, np.stack(xs).astype(np.float16), np.asarray(ys, np.int64), infos,
                   failed)


#: How long the other ranks wait for rank 0 to build the crop cache. Longer than the training
#: backend's default (10 min for NCCL): segmenting hundreds of unlabelled cases takes longer.
CACHE_BARRIER_TIMEOUT_S = 6 * 3600.0


def load_crops_once(dataset: Dataset, cache_dir: "os.PathLike[str] | str",
                    kind: str = "registered", *, rank: int = 0, world_size: int = 1,
                    **kwargs: Any) -> CropSet:
    """:func:`load_crops` in every process of a ``torchrun`` job, computing each crop once.

    Rank 0 loads the crops, computing the missing ones (with ``workers`` processes), while the
    other ranks wait at a barrier; then every other rank reads the crops rank 0 cached and
    computes none (a case rank 0 could not crop fails with rank 0's reason). Without a process
    group (one process) this is :func:`load_crops`.

    The barrier runs on a Gloo group of its own: on the CPU whatever the training backend, and
    with :data:`CACHE_BARRIER_TIMEOUT_S` instead of the backend's timeout. An error on rank 0
    is re-raised there and reported as an InputError on the other ranks, so none waits for
    ever.

    Args:
        dataset: The dataset.
        cache_dir: Cache folder (shared by the ranks: one machine, or a shared file system).
        kind: "registered" or "raw".
        rank: This process's global rank.
        world_size: Number of processes.
        **kwargs: The other arguments of :func:`load_crops` (``progress`` only matters on
            rank 0).

    Returns:
        The :class:`CropSet`, the same on every rank.

    Raises:
        InputError: As :func:`load_crops` (on rank 0), or rank 0 failed (on the others).
    """
    import torch.distributed as dist

    if world_size <= 1 or not dist.is_initialized():
        return load_crops(dataset, cache_dir, kind, **kwargs)
    from datetime import timedelta

    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=CACHE_BARRIER_TIMEOUT_S))
    try:
        built: Optional[CropSet] = None
        error: Optional[BaseException] = None
        if rank == 0:
            try:
                built = load_crops(dataset, cache_dir, kind, **kwargs)
            except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the others
                error = exc
        dist.barrier(group=group)
        # Rank 0's outcome: its error in words, or the reasons of the cases it could not crop.
        status: List[Any] = [None if error is None else f"{type(error).__name__}: {error}",
                             None if built is None else dict(built.failed)]
        dist.broadcast_object_list(status, src=0, group=group)
        if rank == 0:
            if error is not None:
                raise error
            assert built is not None
            return built
        if status[0] is not None:
            raise InputError(dataset.root, f"rank 0 could not build the crop cache: {status[0]}")
        kwargs.pop("workers", None)
        return load_crops(dataset, cache_dir, kind, cached_only=status[1], **kwargs)
    finally:
        dist.destroy_process_group(group)
