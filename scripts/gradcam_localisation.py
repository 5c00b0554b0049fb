"""How well does the Grad-CAM heatmap point at the fracture? A measurement on phantoms.

Usage: .venv/bin/python scripts/gradcam_localisation.py [--n 12] [--seed 8100]
                                                        [--layers layer2 layer3 layer4]
                                                        [--out docs/gradcam_localisation.json]

For ``--n`` fractured phantoms per class (A, B, C; sides alternate), with their reference
masks, the shipped classifier's Grad-CAM of the *true* class is computed at each ``--layers``
stage on the registered syndesmosis crop. The phantom knows where its fibular fracture is
(``info["fracture"]["centre_lps"]``); mapped into the crop (template mm) it is compared with:

* ``peak_mm``: distance from the heatmap's maximum to the fracture centre (mm);
* ``hit15``: the maximum lies within 15 mm of the fracture centre (the "pointing game");
* ``mass20``: share of the heatmap's total inside a 20 mm ball around the fracture centre,
  and ``mass20_uniform``: the same share for a flat map (the ball's share of the box), so
  ``mass20 / mass20_uniform`` > 1 means the map concentrates on the fracture.

``<layer>_fibula`` rows repeat the numbers with the map kept only within 4.5 mm of the fibula
mask: does the hottest part of the fibula sit at the fracture?

It prints a table per layer and class and writes the per-case numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _case_numbers(heat: np.ndarray, grid: Any, centre_t: np.ndarray) -> Dict[str, float]:
    """Peak distance, hit and mass share of one heatmap on the crop grid (z, y, x)."""
    kji = np.argwhere(np.ones(heat.shape, bool))
    pts = grid.index_to_physical(kji[:, ::-1].astype(float))
    d = np.linalg.norm(pts - centre_t[None, :], axis=1)
    flat = heat.reshape(-1).astype(np.float64)
    peak = int(np.argmax(flat))
    ball = d <= 20.0
    total = float(flat.sum())
    return {"peak_mm": float(d[peak]), "hit15": bool(d[peak] <= 15.0),
            "mass20": float(flat[ball].sum() / total) if total > 0 else 0.0,
            "mass20_uniform": float(ball.mean())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=12, help="phantoms per fracture class")
    parser.add_argument("--seed", type=int, default=8100, help="first phantom seed")
    parser.add_argument("--layers", nargs="+", default=["layer2", "layer3", "layer4"])
    parser.add_argument("--out", default="docs/gradcam_localisation.json")
    args = parser.parse_args()

    import torch
    from scipy.ndimage import binary_dilation

    from AnkleFractureLib.classification.gradcam import grad_cam
    from AnkleFractureLib.classification.inference import WeberClassifier
    from AnkleFractureLib.classification.plans import CLASSES
    from AnkleFractureLib.crop.syndesmosis import crop_syndesmosis
    from AnkleFractureLib.phantom import generate_case
    from AnkleFractureLib.registration.register import register_to_template
    from AnkleFractureLib.registration.template import load_template

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    clf = WeberClassifier.load(None, "cpu")
    template = load_template()
    rows: List[Dict[str, Any]] = []
    k = 0
    for weber in ("A", "B", "C"):
        for i in range(args.n):
            seed = args.seed + k
            side = "left" if k % 2 else "right"
            k += 1
            case = generate_case(seed, weber, side, spacing="fast")
            reg = register_to_template(case.label, template, side="auto", ct=case.ct)
            crop = crop_syndesmosis(case.ct, case.label, reg.patient_to_template, template)
            centre = np.append(np.asarray(case.info["fracture"]["centre_lps"], float), 1.0)
            centre_t = (reg.patient_to_template @ centre)[:3]
            x = clf.plans.prepare(crop.channels)
            with torch.no_grad():
                logits = clf.network(torch.from_numpy(x[None]).float())
            pred = CLASSES[int(logits.argmax())]
            row: Dict[str, Any] = {"seed": seed, "weber": weber, "side": side, "predicted": pred}
            for layer in args.layers:
                res = grad_cam(clf.network, x[None], target_class=CLASSES.index(weber),
                               layer=layer, output_shape=crop.channels.shape[1:])
                row[layer] = _case_numbers(res.heatmap, crop.grid, centre_t)
                # The same map kept only on and near the fibula (3 voxels = 4.5 mm): does the
                # hottest part *of the fibula* sit at the fracture?
                near = binary_dilation(crop.channels[2] > 0.5, iterations=3)
                row[f"{layer}_fibula"] = _case_numbers(res.heatmap * near, crop.grid, centre_t)
            rows.append(row)
            print(f"seed {seed} {weber} {side}: predicted {pred}; "
                  + "; ".join(f"{layer} peak {row[layer]['peak_mm']:.0f} mm"
                              for layer in args.layers), flush=True)

    print(f"\n{'layer':<15} {'class':<6} {'n':>3} {'peak mm (median)':>17} {'hit <=15 mm':>12} "
          f"{'mass in 20 mm / flat':>21}")
    summary: Dict[str, Any] = {}
    for layer in [m for layer in args.layers for m in (layer, f"{layer}_fibula")]:
        for weber in ("A", "B", "C", "all"):
            sel = [r for r in rows if weber in ("all", r["weber"])]
            peak = statistics.median(r[layer]["peak_mm"] for r in sel)
            hit = sum(r[layer]["hit15"] for r in sel) / len(sel)
            ratio = statistics.median(r[layer]["mass20"] / r[layer]["mass20_uniform"]
                                      for r in sel)
            summary[f"{layer}/{weber}"] = {"n": len(sel), "peak_mm_median": round(peak, 2),
                                           "hit15": round(hit, 3),
                                           "mass20_over_flat_median": round(ratio, 3)}
            print(f"{layer:<15} {weber:<6} {len(sel):>3} {peak:>17.1f} {100 * hit:>11.0f}% "
                  f"{ratio:>21.2f}")
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"command": " ".join(sys.argv), "summary": summary, "cases": rows}, fh,
                  indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
