"""Write phantom cases as a dataset in the project layout (:mod:`AnkleFractureLib.dataset`)."""

from __future__ import annotations

import os
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np

from AnkleFractureLib.dataset import CLASSES, Dataset
from AnkleFractureLib.errors import CancelledError

SPACING_MODES = ("fast", "clinical", "mixed")
#: Side of case i when the caller does not fix it: alternates within every block of four cases
#: and swaps between blocks, so each class gets both sides when classes cycle.
_SIDE_ORDER = ("right", "left")

ProgressCallback = Callable[[float, str], None]


def case_seed(seed: int, index: int) -> int:
    """The per-case seed of case ``index`` of a dataset generated with ``seed`` (32-bit)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def case_plan(n: int, seed: int, weber: Optional[str] = None, side: Optional[str] = None,
              spacing: str = "fast", family: str = "analytic") -> List[dict]:
    """The (id, seed, weber, side, spacing, family) of each of the ``n`` cases, not generated.

    Classes cycle none, A, B, C unless ``weber`` fixes one; sides alternate unless ``side`` fixes
    one; with ``spacing="mixed"`` every fifth case is clinical size, the rest fast. ``family``
    is "analytic", "vh" (real bone shapes; ids ``vh_<seed>_<i>``) or "mixed" (blocks of four
    cases alternate, so each family gets every class).

    Example:
        >>> [(c["weber"], c["side"]) for c in case_plan(4, seed=0)]
        [('none', 'right'), ('A', 'left'), ('B', 'right'), ('C', 'left')]
    """
    if n < 1:
        raise ValueError(f"the number of cases must be at least 1, got {n}")
    if weber is not None and weber not in CLASSES:
        raise ValueError(f"weber must be one of {list(CLASSES)}, got {weber!r}")
    if side is not None and side not in _SIDE_ORDER:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if spacing not in SPACING_MODES:
        raise ValueError(f"spacing must be one of {list(SPACING_MODES)}, got {spacing!r}")
    if family not in ("analytic", "vh", "mixed"):
        raise ValueError(f"family must be 'analytic', 'vh' or 'mixed', got {family!r}")
    plan = []
    for i in range(n):
        w = weber if weber is not None else CLASSES[i % len(CLASSES)]
        if side is not None:
            s = side
        elif weber is not None:
            s = _SIDE_ORDER[i % 2]
        else:
            s = _SIDE_ORDER[(i + i // len(CLASSES)) % 2]
        mode = spacing if spacing != "mixed" else ("clinical" if i % 5 == 4 else "fast")
        fam = family if family != "mixed" else ("analytic", "vh")[(i // 4) % 2]
        prefix = "phantom" if fam == "analytic" else "vh"
        plan.append({"id": f"{prefix}_{seed}_{i:04d}", "seed": case_seed(seed, i), "weber": w,
                     "side": s, "spacing": mode, "index": i, "family": fam})
    return plan


def _write_dicom(ct: Any, folder: Path, case_id: str) -> None:
    """The CT as a DICOM series in ``folder`` (replacing an earlier one)."""
    import shutil

    from AnkleFractureLib.io.dicom_write import write_dicom_series

    if folder.exists():
        shutil.rmtree(folder)
    write_dicom_series(ct, folder, patient_id=case_id, patient_name=f"Phantom^{case_id}",
                       description=f"AnkleFracture phantom {case_id}")


def _generate(item: Dict[str, Any], options: Dict[str, Any]) -> Any:
    """One planned case (a worker's task: module-level, so that ``spawn`` can pickle it)."""
    from AnkleFractureLib.phantom.generator import generate_case

    return generate_case(item["seed"], weber=item["weber"], side=item["side"],
                         spacing=item["spacing"], family=item["family"], **options)


def _generated(plan: List[Dict[str, Any]], options: Dict[str, Any], workers: int
               ) -> Iterator[Any]:
    """The generated cases in plan order: one at a time when asked for, or with ``workers`` > 1
    from a process pool that holds at most ``workers`` + 1 cases ahead (a clinical-size case
    is a few hundred MB). Closing the generator drops the queued cases."""
    if workers <= 1 or len(plan) <= 1:
        for item in plan:
            yield _generate(item, options)
        return
    from AnkleFractureLib.parallel import in_processes

    yield from in_processes(_generate, [(item, options) for item in plan],
                            min(workers, len(plan)), ahead=workers + 1)


def write_phantom_dataset(out: "os.PathLike[str] | str", n: int, seed: int,
                          weber: Optional[str] = None, side: Optional[str] = None,
                          spacing: str = "fast", preview: bool = False, dicom: bool = False,
                          progress: Optional[ProgressCallback] = None,
                          should_cancel: Optional[Callable[[], bool]] = None,
                          family: str = "analytic", fractures: str = "classic",
                          confounders: float = 0.0, forefoot: float = 0.0,
                          metal: Optional[float] = None, workers: int = 1,
                          cast: Optional[float] = None,
                          fracture_faces: str = "corticated") -> Dataset:
    """Generate ``n`` phantom cases into a dataset folder (added to it if it exists).

    Args:
        out: Dataset folder.
        n: Number of cases.
        seed: Dataset seed; case i uses :func:`case_seed` (seed, i). Same seed, same bytes.
        weber: Fix every case's class, or None to cycle the four classes (balanced).
        side: Fix every case's side, or None to alternate.
        spacing: "fast", "clinical" or "mixed" (see :func:`case_plan`).
        preview: Also write ``previews/<id>.png`` per case.
        dicom: Also write each CT as a DICOM series in ``dicom/<id>/`` (one file per slice;
            the images/ NIfTI stays the dataset's image). An existing series is replaced.
        progress: Called with (fraction done in [0, 1], message).
        should_cancel: Polled between cases; returning True raises CancelledError (the cases
            written so far stay in the index).
        family: Phantom family: "analytic", "vh" or "mixed" (see :func:`case_plan`).
        fractures: Fracture morphology: "classic", "varied", "heldout" or "calibration"
            (:mod:`AnkleFractureLib.phantom.fracture_styles`).
        confounders: Probability (0-1) that a case carries fracture mimics on intact bone (os
            subfibulare, healed fracture, nutrient canal, physeal scar;
            :mod:`AnkleFractureLib.phantom.confounders`), "none" and fractured cases alike.
            The case meta then lists them (``confounders``); 0 (default) leaves every case as
            before.
        forefoot: Probability (0-1) that a "vh" case whose foot is in view carries the
            forefoot bones (unlabelled; :mod:`AnkleFractureLib.phantom.forefoot`), recorded in
            the case meta (``forefoot``); analytic cases ignore it; 0 (default): as before.
        metal: Probability (0-1) that a "vh" case carries fixation hardware (a fibular plate
            with screws, or medial malleolar screws), recorded in the case meta
            (``metal_probability``; the hardware drawn is ``appearance["metal"]``); analytic
            cases ignore it; None (default): the usual rates, cases as before.
        cast: Probability (0-1) that a "vh" case wears a cast or splint (recorded in the case
            meta as ``cast_probability``; the kind drawn is ``appearance["cast"]``); analytic
            cases ignore it; None (default): 12 %, cases as before.
        fracture_faces: "raw" (acute fracture faces: cancellous bone up to the gap) or
            "corticated" (default, the earlier datasets' look); see
            :func:`~AnkleFractureLib.phantom.generator.generate_case`.
        workers: Cases generated at once, each in its own process (``spawn``); the files are
            written here, in plan order. Every case depends on its own seed alone, so the
            dataset is the same for any number of workers.

    Returns:
        The Dataset.

    Raises:
        ValueError: ``workers`` below 1.
        CancelledError: ``should_cancel`` returned True (the cases written so far stay).
    """
    from AnkleFractureLib.phantom.confounders import check_probability
    from AnkleFractureLib.phantom.generator import check_vh_options

    confounders = check_probability(confounders)  # before any case is written
    forefoot, metal, cast = check_vh_options(forefoot, metal, cast)
    from AnkleFractureLib.phantom.fractures import check_faces

    if int(workers) < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    plan = case_plan(n, seed, weber, side, spacing, family)
    ds = Dataset.create(out, name="AnkleFracture phantom",
                        description="Synthetic ankle CT phantoms (AnkleFractureLib.phantom); "
                                    "demonstration data, not patient data.")
    options = {"fractures": fractures, "confounders": confounders, "forefoot": forefoot,
               "metal": metal, "cast": cast, "fracture_faces": check_faces(fracture_faces)}
    with closing(_generated(plan, options, int(workers))) as cases:
        for k, item in enumerate(plan):
            if should_cancel is not None and should_cancel():
                ds.save()
                raise CancelledError(f"cancelled after {k} of {n} cases")
            if progress is not None:
                progress(k / n, f"case {item['id']} ({item['weber']}, {item['side']}, "
                                f"{item['spacing']})")
            _add_case(ds, item, next(cases), seed, preview, dicom)
    if progress is not None:
        progress(1.0, f"{n} cases written to {ds.root}")
    return ds


def _add_case(ds: Dataset, item: Dict[str, Any], case: Any, seed: int, preview: bool,
              dicom: bool) -> None:
    """Write one generated case into the dataset (and its preview and DICOM series)."""
    from AnkleFractureLib.phantom.preview import write_preview

    info = dict(case.info)
    info.setdefault("family", item["family"])
    info["dataset_seed"] = seed
    info["dataset_index"] = item["index"]
    info["size_xyz"] = list(case.ct.size)
    info["spacing_mm"] = [round(v, 4) for v in case.ct.spacing]
    ds.add_case(item["id"], case.ct, case.label, weber=item["weber"], side=item["side"],
                source="phantom", meta=info, save=False)
    if preview:
        Path(ds.root, "previews").mkdir(parents=True, exist_ok=True)
        write_preview(case, str(Path(ds.root, "previews", f"{item['id']}.png")))
    if dicom:
        _write_dicom(case.ct, Path(ds.root, "dicom", item["id"]), item["id"])
    # Save as we go, so an interrupted run leaves a consistent, usable dataset.
    ds.save()
