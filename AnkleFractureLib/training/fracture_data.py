"""Training and evaluation crops of the fracture localiser, built as a user's scan is.

For every case of a dataset: read the CT, take its bone masks (the dataset's, or the shipped
segmentation model's as ``ankle-fracture run`` does), register to the template with the side
detected (never the dataset's side), crop the syndesmosis box, and draw the phantom's fracture
line on the crop grid (:func:`AnkleFractureLib.fracture.targets.fracture_line_target`).
One ``<id>.<masks>.<inputs>.v<version>.npz`` per case in a cache folder (``<masks>`` is
"dataset", or "model-<the first 12 hex digits of the segmentation weights' sha256>-pp<the
post-processing version>", so that a new segmentation model or rule never gets crops made with
the old one's masks; ``<inputs>`` is 12 hex digits over the case's files and the template's
content, so that a dataset regenerated in place, or another template, never gets the old
crops):

* ``channels``: float16 (13, nz, ny, nx), the crop's arrays in the order of
  :data:`~AnkleFractureLib.crop.syndesmosis.ALL_CHANNELS` (CT [0, 1], tibia, fibula, the CT in
  the bone window, that min-pooled over each voxel, and its 8 sub-voxel samples), numpy
  (z, y, x); files written before the later arrays existed hold 4 or 5 and get the rest when
  a training reads them (:func:`add_min_pooled`);
* ``target``: uint8 (nz, ny, nx), the fracture line (all zero for "none");
* ``patient_to_template``: 4x4 float64; ``info``: JSON text (weber, true height, side, ...).

A case without ``meta["fracture"]`` information (not a phantom) gets no target and is kept
only for evaluation of the classes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from AnkleFractureLib.dataset.layout import (CaseRecord, Dataset, file_key,
                                             true_fracture_height)
from AnkleFractureLib.errors import AnkleFractureError

#: Version of the crop + target code; part of every cache file name's key. 2: registered as
#: ``run`` does (anchored on the plafond found on the labels; a scan with both legs cropped on
#: the dataset's side, as a user answers that refusal). 3: segmentation post-processing rule 5
#: (casts), the plafond estimate from the lowest full tibial cross-section, and the fit on the
#: distal 200 mm above it. 4: tibia surface points more than 25 mm below that plafond left out
#: of the fit (``registration.register.TIBIA_BELOW_JOINT_MM``). 5: the bone-window CT stored
#: as a fourth channel.
FRACTURE_DATA_VERSION = 5
MASK_SOURCES = ("dataset", "model")


def shifted_box_template(template: Any, shift_mm: float) -> Any:
    """The template with its syndesmosis box moved ``shift_mm`` up its long axis (template mm;
    same size, axes and grid spacing), or ``template`` itself for 0.

    The box moved up by the height a localiser's taller crop adds
    (``plans.json inference.extend_top_mm``) is that crop's upper window, voxel for voxel: the
    crops an upper-window network is trained on.
    """
    import dataclasses

    if not shift_mm:
        return template
    box = template.box
    return dataclasses.replace(template, box=dataclasses.replace(
        box, centre=box.centre + box.axes[:, 2] * float(shift_mm)))


def crop_one(ds: Dataset, record: CaseRecord, masks: str, template: Any,
             seg_model: Any = None, shift_mm: float = 0.0
             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Dict[str, Any]]:
    """Crop one case and draw its target.

    Args:
        ds: The dataset.
        record: The case.
        masks: "dataset" (the dataset's label map) or "model" (``seg_model`` predicts it).
        template: The registration template.
        seg_model: A loaded :class:`~AnkleFractureLib.segmentation.inference.SegmentationModel`
            (masks="model").
        shift_mm: Crop the template's box moved this far up (:func:`shifted_box_template`);
            the registration is the template's own either way.

    Returns:
        (channels float16 (13, z, y, x) as :data:`~AnkleFractureLib.crop.syndesmosis.ALL_CHANNELS`,
        target uint8 (z, y, x), patient_to_template 4x4, info).

    Raises:
        AnkleFractureError: Unreadable CT, no masks, registration impossible.
    """
    from AnkleFractureLib.crop.syndesmosis import (ALL_CHANNELS, crop_syndesmosis,
                                                   min_pooled_bone, sub_sampled_bone)
    from AnkleFractureLib.fracture.targets import annotated_line_target, fracture_line_target
    from AnkleFractureLib.io import read_image
    from AnkleFractureLib.registration.leg import register_as_run

    ct = read_image(ds.path(record.image))
    if masks == "dataset":
        if record.segmentation is None:
            raise AnkleFractureError(f"{record.id}: no segmentation in the dataset")
        label = read_image(ds.path(record.segmentation))
    else:
        label = seg_model.predict(ct)
    label, reg = register_as_run(ct, label, template, record.side)  # as `run` registers
    crop = crop_syndesmosis(ct, label, reg.patient_to_template,
                            shifted_box_template(template, shift_mm))
    crop.ct_bone_min = min_pooled_bone(ct, crop)
    crop.ct_bone_sub = sub_sampled_bone(ct, crop)
    meta = record.meta or {}
    target = np.zeros(crop.grid.shape, np.uint8)
    line_source = None
    if record.fracture_line is not None:  # a reader's annotation wins over anything else
        line = read_image(ds.path(record.fracture_line))
        if not line.same_geometry(ct, atol=1e-4):
            raise AnkleFractureError(f"{record.id}: the fracture line mask "
                                     f"{record.fracture_line} is not on the CT's grid")
        target = annotated_line_target(line, crop.grid, reg.patient_to_template,
                                       crop.channels[2])
        line_source = "annotated"
    elif meta.get("anatomy_to_patient") is not None:
        target = fracture_line_target(meta.get("fracture"), meta["anatomy_to_patient"],
                                      crop.grid, reg.patient_to_template, crop.channels[2])
        line_source = "phantom"
    info = {"id": record.id, "weber": record.weber, "masks": masks, "side": reg.side,
            "side_dataset": record.side, "rms_mm": round(float(reg.rms_mm), 3),
            "scale": round(float(reg.scale), 4), "coverage": round(float(crop.coverage), 4),
            "height_true_mm": true_fracture_height(meta), "family": meta.get("family", "analytic"),
            "fracture_style": meta.get("fracture_style", "classic"),
            "fracture_lps": ((meta.get("fracture") or {}).get("centre_lps")),
            "target_voxels": int(target.sum()), "line_source": line_source,
            "box_shift_mm": float(shift_mm), "version": FRACTURE_DATA_VERSION}
    return crop.stacked(ALL_CHANNELS).astype(np.float16), target, reg.patient_to_template, info


def _save(path: Path, channels: np.ndarray, target: np.ndarray, p2t: np.ndarray,
          info: Dict[str, Any]) -> None:
    # One temporary name per process: two processes filling one cache never share it.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, channels=channels, target=target, patient_to_template=p2t,
                        info=np.array(json.dumps(info)))
    os.replace(tmp, path)


def load_crop_file(path: "os.PathLike[str] | str") -> Dict[str, Any]:
    """One cache file as {"channels", "target", "patient_to_template", "info"}."""
    with np.load(path) as z:
        return {"channels": z["channels"], "target": z["target"],
                "patient_to_template": z["patient_to_template"],
                "info": json.loads(str(z["info"]))}


def add_min_pooled(ds: Dataset, record: CaseRecord, path: Path, template: Any) -> bool:
    """Give a cache file written before ``ct_bone_min`` or the sub-voxel arrays existed the
    arrays of :data:`~AnkleFractureLib.crop.syndesmosis.ALL_CHANNELS` it lacks, from the CT and
    the file's own registration (no segmentation or registration is run again).

    Returns:
        Whether the file was rewritten (False: it already had them all).
    """
    from types import SimpleNamespace

    from AnkleFractureLib.crop.syndesmosis import (ALL_CHANNELS, min_pooled_bone,
                                                   sub_sampled_bone)
    from AnkleFractureLib.io import read_image
    from AnkleFractureLib.training.fracture_train import crop_grid

    d = load_crop_file(path)
    have = d["channels"].shape[0]
    if have >= len(ALL_CHANNELS):
        return False
    shift = float(d["info"].get("box_shift_mm") or 0.0)
    crop = SimpleNamespace(grid=crop_grid(shifted_box_template(template, shift)),
                           patient_to_template=d["patient_to_template"])
    ct = read_image(ds.path(record.image))
    extra = []
    if have <= ALL_CHANNELS.index("ct_bone_min"):
        extra.append(min_pooled_bone(ct, crop)[None])
    extra.append(sub_sampled_bone(ct, crop))
    channels = np.concatenate([d["channels"]] + [e.astype(np.float16) for e in extra])
    _save(path, channels, d["target"], d["patient_to_template"], d["info"])
    return True


def _worker_add_min_pooled(root: str, record: CaseRecord, path: Path, template: Any) -> bool:
    return add_min_pooled(Dataset.load(root), record, path, template)


def _seg_model_tag(seg_model_dir: Optional[str]) -> str:
    """First 12 hex digits of the segmentation weights' sha256 and the post-processing version
    (``<sha>-pp<version>``): crops made with model masks are cached per model and
    post-processing, so a new model or rule never gets the old one's crops."""
    from AnkleFractureLib.segmentation.inference import default_model_dir
    from AnkleFractureLib.segmentation.model_io import sha256_file
    from AnkleFractureLib.segmentation.postprocess import POSTPROCESS_VERSION

    folder = Path(seg_model_dir) if seg_model_dir is not None else default_model_dir()
    return f"{sha256_file(folder / 'model.pt')[:12]}-pp{POSTPROCESS_VERSION}"


def _inputs_key(ds: Dataset, record: CaseRecord, template_content: str) -> str:
    """12 hex digits over a case's image and label files (path, size, modification time) and
    the template's content key: what, besides the code and the masks, shapes its crop."""
    import hashlib

    label = ds.path(record.segmentation)
    parts = [file_key(ds.path(record.image)), file_key(label) if label is not None else "",
             template_content]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


#: What a crop worker process holds (see :func:`_init_crop_worker`).
_WORKER: Dict[str, Any] = {}


def _init_crop_worker(root: str, masks: str, template: Any, seg_model_dir: Optional[str],
                      n_workers: int, shift_mm: float = 0.0) -> None:
    """Process-pool initializer: the dataset, the template and the segmentation model loaded
    once per worker, the CPU threads shared out."""
    from AnkleFractureLib.parallel import share_threads

    share_threads(n_workers)
    seg = None
    if masks == "model":
        from AnkleFractureLib.segmentation.inference import SegmentationModel

        seg = SegmentationModel.load(seg_model_dir)
    _WORKER.update(ds=Dataset.load(root), masks=masks, template=template, seg=seg,
                   shift_mm=shift_mm)


def _crop_to_file(ds: Dataset, record: CaseRecord, masks: str, template: Any, seg: Any,
                  path: Path, shift_mm: float = 0.0) -> Optional[str]:
    """Crop one case into ``path``; the error message when it cannot be cropped."""
    try:
        _save(path, *crop_one(ds, record, masks, template, seg, shift_mm))
    except AnkleFractureError as exc:
        return str(exc)
    return None


def _worker_crop(record: CaseRecord, path: Path) -> Optional[str]:
    w = _WORKER
    return _crop_to_file(w["ds"], record, w["masks"], w["template"], w["seg"], path,
                         w["shift_mm"])


def _crop_errors(ds: Dataset, todo: List[Tuple[CaseRecord, Path]], masks: str, template: Any,
                 seg_model_dir: Optional[str], workers: int, shift_mm: float = 0.0
                 ) -> Iterator[Optional[str]]:
    """The error (or None) of each case of ``todo`` once its crop is written, in order: here,
    or in ``workers`` spawned processes that each load the segmentation model once."""
    if workers <= 1 or len(todo) <= 1:
        seg = None
        if masks == "model" and todo:
            from AnkleFractureLib.segmentation.inference import SegmentationModel

            seg = SegmentationModel.load(seg_model_dir)
        for record, path in todo:
            yield _crop_to_file(ds, record, masks, template, seg, path, shift_mm)
        return
    from AnkleFractureLib.parallel import in_processes

    n = min(workers, len(todo))
    yield from in_processes(_worker_crop, todo, n, initializer=_init_crop_worker,
                            initargs=(str(ds.root), masks, template, seg_model_dir, n,
                                      shift_mm))


def build_fracture_crops(dataset: "os.PathLike[str] | str", cache_dir: "os.PathLike[str] | str",
                         masks: str = "dataset", template: Any = None,
                         seg_model_dir: Optional[str] = None,
                         progress: Optional[Callable[[float, str], None]] = None,
                         workers: int = 1, shift_mm: float = 0.0,
                         channels: Tuple[str, ...] = ()
                         ) -> Tuple[List[Path], Dict[str, str]]:
    """Crop every case of a dataset into ``cache_dir`` (existing files are reused).

    Args:
        dataset: Dataset folder.
        cache_dir: Cache folder (created).
        masks: "dataset" or "model" (:data:`MASK_SOURCES`).
        template: Template (the shipped default when None).
        seg_model_dir: Segmentation model for masks="model" (shipped when None).
        progress: Called with (fraction, message).
        workers: Cases cropped at once, each worker a spawned process with its own
            segmentation model and 1/N of the CPU threads; the files are the same for any N.
        shift_mm: Crop the box moved this far up (:func:`shifted_box_template`; the cache
            files then carry ``up<mm>`` in their names).
        channels: The crop arrays the training reads; with ``ct_bone_min`` or a sub-voxel
            array, reused files written before they existed get them (:func:`add_min_pooled`).

    Returns:
        (paths of the cache files, {case id: error} for the cases that could not be cropped).

    Raises:
        ValueError: Unknown ``masks`` or ``workers`` below 1.
    """
    from AnkleFractureLib.classification.crops import template_content_key
    from AnkleFractureLib.registration.template import load_template

    if masks not in MASK_SOURCES:
        raise ValueError(f"masks must be one of {MASK_SOURCES}, got {masks!r}")
    if int(workers) < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    ds = Dataset.load(dataset)
    template = load_template() if template is None else template
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    records = list(ds.cases)
    tag = masks if masks == "dataset" else f"model-{_seg_model_tag(seg_model_dir)}"
    if shift_mm:
        tag += f".up{float(shift_mm):g}"
    content = template_content_key(template.meta["path"])
    paths = {r.id: cache / f"{r.id}.{tag}.{_inputs_key(ds, r, content)}"
                           f".v{FRACTURE_DATA_VERSION}.npz" for r in records}
    todo = [(r, paths[r.id]) for r in records if not paths[r.id].exists()]
    failed: Dict[str, str] = {}
    errors = _crop_errors(ds, todo, masks, template, seg_model_dir, int(workers),
                          float(shift_mm))
    for k, ((record, _), error) in enumerate(zip(todo, errors)):
        if error is not None:
            failed[record.id] = error
        if progress is not None:
            progress((k + 1) / len(todo), f"cropped {record.id} ({masks} masks)")
    if any(c == "ct_bone_min" or c.startswith("ct_bone_sub") for c in channels):
        _add_min_pooled_all(ds, [(r, paths[r.id]) for r in records if paths[r.id].exists()],
                            template, int(workers))
    return [paths[r.id] for r in records if r.id not in failed], failed


def _add_min_pooled_all(ds: Dataset, items: List[Tuple[CaseRecord, Path]], template: Any,
                        workers: int) -> None:
    """:func:`add_min_pooled` on every listed file, here or in ``workers`` processes."""
    if workers <= 1 or len(items) <= 1:
        for record, path in items:
            add_min_pooled(ds, record, path, template)
        return
    from AnkleFractureLib.parallel import in_processes

    tasks = [(str(ds.root), record, path, template) for record, path in items]
    for _ in in_processes(_worker_add_min_pooled, tasks, min(workers, len(tasks))):
        pass
