"""Benchmark: syndesmosis crop + classification + Grad-CAM + fracture localisation on CPU.

Usage: .venv/bin/python bench/classify.py [--runs 5] [--seed 4242] [--model DIR] [--tta N]
[--fracture-model DIR]

Generates one clinical-size phantom (512 x 512 x 300-400, ~0.35-0.45 mm, Weber C, left ankle;
not timed) and registers it once (registration has its own benchmark, bench/register.py), then
times, with the classifier loaded once (as in batch use and in Slicer):

* crop: the registered syndesmosis crop (3 x 96 x 48 x 64 at 1.5 mm);
* classify: the network on the crop, with the model's test-time augmentation (TTA) copies;
* gradcam: the heatmap of the predicted class (the shipped HiResCAM layers);
* to_ct: the heatmap mapped onto the CT's voxel lattice over the crop's box, as the pipeline
  stores it (``crop_to_ct_box``; before 2026-12-07 this step also pasted it into a full-size
  copy of the CT grid, 0.2 s on this case, which the pipeline never does);
* localise: the fracture localiser on the fibula window, the line measured (height in mm); the
  CT across every candidate line too (:mod:`AnkleFractureLib.fracture.line_density`) when the
  localiser's plans ask, as the pipeline does.

Goal: crop + classification + Grad-CAM + localisation <= 2 s on 2 CPU cores. Prints the median of several
runs per step, the total and the peak memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import peak_rss_mb, time_runs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--model", default=None, help="classifier folder (default: shipped)")
    parser.add_argument("--tta", type=int, default=None,
                        help="TTA copies (default: the model's plans)")
    parser.add_argument("--fracture-model", default=None,
                        help="fracture localiser folder (default: shipped)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from AnkleFractureLib.classification.inference import WeberClassifier
    from AnkleFractureLib.crop.syndesmosis import crop_syndesmosis, crop_to_ct_box
    from AnkleFractureLib.fracture.localise import FractureLocaliser
    from AnkleFractureLib.fracture.weber_height import measures_density
    from AnkleFractureLib.phantom import generate_case
    from AnkleFractureLib.registration import load_template, register_to_template

    t0 = time.perf_counter()
    case = generate_case(args.seed, weber="C", side="left", spacing="clinical")
    print(f"case: {case.ct.size} voxels (x, y, z) at "
          f"{tuple(round(s, 3) for s in case.ct.spacing)} mm, generated in "
          f"{time.perf_counter() - t0:.1f} s (not timed)")
    template = load_template()
    reg = register_to_template(case.label, template, side="left", ct=case.ct)
    t0 = time.perf_counter()
    clf = WeberClassifier.load(args.model, device="cpu")
    print(f"model: {clf.model_dir} loaded in {time.perf_counter() - t0:.2f} s (not timed); "
          f"TTA copies {clf.plans.tta if args.tta is None else args.tta}")
    loc = FractureLocaliser.load(args.fracture_model, device="cpu")
    state = {}

    def crop():
        state["crop"] = crop_syndesmosis(case.ct, case.label, reg.patient_to_template, template)

    def classify():
        state["res"] = clf.classify(state["crop"], tta=args.tta, gradcam=False)

    def gradcam():
        state["cam"] = clf.classify(state["crop"], tta=1, gradcam=True)

    def to_ct():
        crop_to_ct_box(state["cam"].gradcam, state["crop"], case.ct, clip=(0.0, 1.0))

    def localise():  # its own, taller crop when its plans ask (FractureLocaliser.crop_for)
        own = loc.crop_for(case.ct, case.label, reg.patient_to_template, template, state["crop"])
        # the CT across every line when the plans ask, as the pipeline reads it
        density = loc.density_for(case.ct, case.label, reg.patient_to_template, template.plafond)
        state["fracture"] = loc.locate(own, template.plafond, density=density)

    def whole():
        crop()
        res = clf.classify(state["crop"], tta=args.tta, gradcam=True)
        crop_to_ct_box(res.gradcam, state["crop"], case.ct, clip=(0.0, 1.0))
        localise()

    crop()
    classify()
    gradcam()
    one = {}
    for name, fn in (("crop", crop), ("classify", classify), ("gradcam (+1 forward)", gradcam),
                     ("to_ct", to_ct), ("localise", localise), ("whole", whole)):
        r = time_runs(fn, runs=args.runs)
        one[name] = r["median_s"]
        print(f"{name:22s} median {r['median_s']:.3f} s (min {r['min_s']:.3f}, max "
              f"{r['max_s']:.3f}, {r['runs']} runs), peak alloc {r['peak_alloc_mb']:.0f} MB")
    res = state["res"]
    print("prediction:", res.prediction, {k: round(v, 3) for k, v in res.probabilities.items()},
          "unsure" if res.uncertainty.get("unsure") else "confident")
    f = state["fracture"]
    print("fracture:", "found" if f.found else "not found", f"p={f.probability:.3f}",
          "" if f.height_mm is None else f"height {f.height_mm:+.1f} mm",
          f"(true {case.info['fracture']['height_mm']:+.1f} mm); CT across the lines "
          + ("measured" if measures_density(loc.decision) else "not measured (plans)"))
    verdict = "met" if one["whole"] <= 2.0 else "NOT met"
    print(f"crop + classification + Grad-CAM + to CT + localisation: {one['whole']:.2f} s "
          f"(goal <= 2 s: {verdict}); peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
