"""How well does the Grad-CAM heatmap point at the fracture? A measurement on phantoms.

Usage:
    .venv/bin/python scripts/gradcam_localisation.py [--n 6] [--seed 8100]
        [--variants layer4 layer1 hirescam:layer1 ...] [--out docs/gradcam_localisation.json]
    .venv/bin/python scripts/gradcam_localisation.py --render docs/gradcam_localisation.json
        (writes docs/gradcam_localisation.md from the JSON, nothing else)

For ``--n`` fractured phantoms per class (A, B, C; sides alternate), with their reference
masks, the shipped classifier's heatmap of the *true* class is computed for each ``--variants``
entry on the registered syndesmosis crop. A variant is ``[method:]layer[+layer...]``: method
``gradcam`` (default) or ``hirescam``; several layers are combined by the geometric mean of
their maps (``classification/gradcam.py``). The phantom knows where its fibular fracture is
(``info["fracture"]["centre_lps"]``); mapped into the crop (template mm) it is compared with:

* ``peak_mm``: distance from the heatmap's maximum to the fracture centre (mm);
* ``hit15``: the maximum lies within 15 mm of the fracture centre (the "pointing game");
* ``mass20``: share of the heatmap's total inside a 20 mm ball around the fracture centre,
  and ``mass20_uniform``: the same share for a flat map (the ball's share of the box), so
  ``mass20 / mass20_uniform`` > 1 means the map concentrates on the fracture.

``<variant>_fibula`` rows repeat the numbers with the map kept only within 4.5 mm of the
fibula mask: does the hottest part of the fibula sit at the fracture?

``randomised_spearman`` (the sanity check of Adebayo et al. 2018): Spearman rank correlation
between each map and the same map from the network with every weight re-drawn at random; a
map that explains the trained model must change (a low correlation).
``randomised_head_spearman``: the same with the head alone (the linear classifier) re-drawn,
the first step of Adebayo et al.'s cascade: a map made mostly of early activations can stay
the same when the class weights change. The choice (:func:`best_fine_variant`) takes only
maps that pass both (median below :data:`SANITY_MAX_SPEARMAN` over all cases and each
class's).

It writes the per-case numbers, the summary and each variant's cell size (mm) as JSON, then
renders the Markdown page from that JSON (``--render`` does only the rendering).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_VARIANTS = ["layer4", "hirescam:layer4", "layer1", "hirescam:layer1", "layer2",
                    "layer1+layer4", "hirescam:layer1+layer4"]
#: Largest cell (mm) a shipped heatmap may have (issue 14 item 4).
MAX_CELL_MM = 6.0
#: The weight-randomisation sanity checks (Adebayo et al. 2018) recorded per map: every weight
#: re-drawn, and the head alone (the linear classifier; a map that barely changes when the
#: class weights do cannot be explaining the class).
RANDOMISATIONS = ("randomised_spearman", "randomised_head_spearman")
#: A map passes a sanity check when its median Spearman rank correlation with the randomised
#: network's map stays below this (Testing/test_gradcam.py asserts the same on the shipped one).
SANITY_MAX_SPEARMAN = 0.5


def parse_variant(variant: str) -> Tuple[str, Tuple[str, ...]]:
    """``"hirescam:layer1+layer4"`` -> ("hirescam", ("layer1", "layer4"))."""
    method, _, layers = variant.rpartition(":")
    return method or "gradcam", tuple(layers.split("+"))


def variant_name(method: str, layers: Sequence[str]) -> str:
    """Inverse of :func:`parse_variant` (the method is omitted for Grad-CAM)."""
    return ("" if method == "gradcam" else f"{method}:") + "+".join(layers)


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


def _one_case(clf: Any, template: Any, seed: int, weber: str, side: str,
              variants: Sequence[str], cells: Dict[str, List[float]],
              random_nets: Dict[str, Any]) -> Dict[str, Any]:
    """Generate, register and crop one phantom; every variant's numbers for it."""
    import torch
    from scipy.ndimage import binary_dilation

    from AnkleFractureLib.classification.gradcam import grad_cam, rank_correlation
    from AnkleFractureLib.classification.plans import CLASSES
    from AnkleFractureLib.crop.syndesmosis import crop_syndesmosis
    from AnkleFractureLib.phantom import generate_case
    from AnkleFractureLib.registration.register import register_to_template

    case = generate_case(seed, weber, side, spacing="fast")
    reg = register_to_template(case.label, template, side="auto", ct=case.ct)
    crop = crop_syndesmosis(case.ct, case.label, reg.patient_to_template, template)
    centre = np.append(np.asarray(case.info["fracture"]["centre_lps"], float), 1.0)
    centre_t = (reg.patient_to_template @ centre)[:3]
    x = clf.plans.prepare(crop.channels)
    with torch.no_grad():
        logits = clf.network(torch.from_numpy(x[None]).float())
    row: Dict[str, Any] = {"seed": seed, "weber": weber, "side": side,
                           "predicted": CLASSES[int(logits.argmax())]}
    # The same map kept only on and near the fibula (3 voxels = 4.5 mm): does the hottest
    # part *of the fibula* sit at the fracture?
    near = binary_dilation(crop.channels[2] > 0.5, iterations=3)
    spacing_zyx = tuple(float(s) for s in crop.grid.spacing[::-1])
    for variant in variants:
        method, layers = parse_variant(variant)
        res = grad_cam(clf.network, x[None], target_class=CLASSES.index(weber), layer=layers,
                       output_shape=crop.channels.shape[1:], method=method)
        cells[variant] = [round(v, 3) for v in res.cell_mm(spacing_zyx)]
        row[variant] = _case_numbers(res.heatmap, crop.grid, centre_t)
        row[f"{variant}_fibula"] = _case_numbers(res.heatmap * near, crop.grid, centre_t)
        for key, net in random_nets.items():
            rnd = grad_cam(net, x[None], target_class=CLASSES.index(weber), layer=layers,
                           output_shape=crop.channels.shape[1:], method=method)
            row[variant][key] = rank_correlation(res.heatmap, rnd.heatmap)
    return row


def _summary(rows: List[Dict[str, Any]], variants: Sequence[str]) -> Dict[str, Any]:
    """Median peak distance, hit rate and median mass ratio per variant (and _fibula) x class."""
    out: Dict[str, Any] = {}
    for key in [m for v in variants for m in (v, f"{v}_fibula")]:
        for weber in ("A", "B", "C", "all"):
            sel = [r for r in rows if weber in ("all", r["weber"])]
            out[f"{key}/{weber}"] = {
                "n": len(sel),
                "peak_mm_median": round(statistics.median(r[key]["peak_mm"] for r in sel), 2),
                "hit15": round(sum(r[key]["hit15"] for r in sel) / len(sel), 3),
                "mass20_over_flat_median": round(statistics.median(
                    r[key]["mass20"] / r[key]["mass20_uniform"] for r in sel), 3)}
            for test in RANDOMISATIONS:
                if test in sel[0][key]:
                    out[f"{key}/{weber}"][f"{test}_median"] = round(statistics.median(
                        r[key][test] for r in sel), 3)
    return out


def measure(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the measurement; the JSON document (command, provenance, cells, summary, cases)."""
    import hashlib

    import torch

    from AnkleFractureLib.classification import gradcam
    from AnkleFractureLib.classification.inference import WeberClassifier
    from AnkleFractureLib.registration.template import load_template

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 2)))
    clf = WeberClassifier.load(None, "cpu")
    template = load_template()
    shipped = variant_name(gradcam.SHIPPED_METHOD, gradcam.SHIPPED_LAYERS)
    if shipped not in args.variants:  # the page always reports the shipped map
        args.variants = list(args.variants) + [shipped]
    rows: List[Dict[str, Any]] = []
    cells: Dict[str, List[float]] = {}
    random_nets = {"randomised_spearman": gradcam.randomised_copy(clf.network),
                   "randomised_head_spearman": gradcam.randomised_copy(clf.network, 0, ("fc",))}
    for k, weber in enumerate(w for w in ("A", "B", "C") for _ in range(args.n)):
        seed, side = args.seed + k, ("left" if k % 2 else "right")
        rows.append(_one_case(clf, template, seed, weber, side, args.variants, cells,
                              random_nets))
        print(f"seed {seed} {weber} {side}: predicted {rows[-1]['predicted']}; "
              + "; ".join(f"{v} {rows[-1][v]['peak_mm']:.0f} mm" for v in args.variants),
              flush=True)
    weights = clf.model_dir / "model.pt"
    commit = args.commit or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
        cwd=os.path.dirname(os.path.abspath(__file__))).stdout
    return {"command": "scripts/gradcam_localisation.py " + " ".join(sys.argv[1:]),
            "commit": commit.strip(),
            "model_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "shipped": shipped,
            "variants": list(args.variants), "cell_mm": cells,
            "summary": _summary(rows, args.variants), "cases": rows}


def _row(summary: Dict[str, Any], key: str, field: str, fmt: str) -> str:
    return " / ".join(format(summary[f"{key}/{w}"][field], fmt) for w in ("A", "B", "C", "all"))


def _table(data: Dict[str, Any], suffix: str) -> List[str]:
    """Markdown table rows of every variant (``suffix`` "" or "_fibula")."""
    s = data["summary"]
    lines = ["| map (finest cell, mm) | peak, mm (A / B / C / all) | hit <= 15 mm, % | "
             "mass / flat |" + (" randomised weights: Spearman | randomised head: Spearman |"
                                if not suffix else ""),
             "| --- | ---: | ---: | ---: |" + (" ---: | ---: |" if not suffix else "")]
    for v in data["variants"]:
        cell = max(data["cell_mm"][v])
        tag = " **shipped**" if v == data["shipped"] else ""
        hits = " / ".join(format(100 * s[f"{v}{suffix}/{w}"]["hit15"], ".0f")
                          for w in ("A", "B", "C", "all"))
        line = (f"| `{v}` ({cell:g}){tag} | {_row(s, v + suffix, 'peak_mm_median', '.0f')} | "
                f"{hits} | {_row(s, v + suffix, 'mass20_over_flat_median', '.1f')} |")
        if not suffix:
            line += "".join(f" {_row(s, v, f'{t}_median', '.2f')} |"
                            if f"{t}_median" in s[f"{v}/all"] else " n/a |"
                            for t in RANDOMISATIONS)
        lines.append(line)
    return lines


def passes_sanity(data: Dict[str, Any], variant: str) -> bool:
    """Whether a map's median Spearman correlation with each recorded randomised network's
    map is below :data:`SANITY_MAX_SPEARMAN` over all cases and over the cases of each class
    (a map that ignores the head for every Weber B explains no Weber B; files without a
    check pass it)."""
    s = data["summary"]
    return all(s[f"{variant}/{w}"].get(f"{t}_median", 0.0) < SANITY_MAX_SPEARMAN
               for t in RANDOMISATIONS for w in ("A", "B", "C", "all"))


def best_fine_variant(data: Dict[str, Any]) -> Any:
    """The map with cells <= :data:`MAX_CELL_MM` that passes the sanity checks
    (:func:`passes_sanity`) whose maximum lies nearest the fracture (smallest median peak
    distance over all cases; ties: the higher hit rate), or None."""
    s = data["summary"]
    fine = [v for v in data["variants"]
            if max(data["cell_mm"][v]) <= MAX_CELL_MM and passes_sanity(data, v)]
    return min(fine, key=lambda v: (s[f"{v}/all"]["peak_mm_median"], -s[f"{v}/all"]["hit15"]),
               default=None)


def _findings(data: Dict[str, Any]) -> List[str]:
    """The page's conclusions, worded from the numbers in the JSON."""
    s, shipped = data["summary"], data["shipped"]
    best = best_fine_variant(data)
    old = "layer4" if "layer4" in data["variants"] else data["variants"][0]
    out = [f"- Shipped map: `{shipped}`, cells of {max(data['cell_mm'][shipped]):g} mm "
           f"(limit {MAX_CELL_MM:g} mm). Its maximum lies a median "
           f"{s[f'{shipped}/all']['peak_mm_median']:.0f} mm from the fracture centre "
           f"(previous `{old}` map, {max(data['cell_mm'][old]):g} mm cells: "
           f"{s[f'{old}/all']['peak_mm_median']:.0f} mm) and within 15 mm of it in "
           f"{100 * s[f'{shipped}/all']['hit15']:.0f} % of the cases "
           f"(`{old}`: {100 * s[f'{old}/all']['hit15']:.0f} %)."]
    failed = [v for v in data["variants"] if max(data["cell_mm"][v]) <= MAX_CELL_MM
              and not passes_sanity(data, v)]
    if best is not None:
        out.append(f"- Choice: of the maps with cells <= {MAX_CELL_MM:g} mm that pass the "
                   f"weight-randomisation checks (median Spearman below "
                   f"{SANITY_MAX_SPEARMAN:g}, over all cases and over each class's, with "
                   f"every weight and with the head alone re-drawn), `{best}` has the "
                   f"smallest median peak distance "
                   f"({s[f'{best}/all']['peak_mm_median']:.0f} mm)"
                   + (", and it is the shipped map." if best == shipped else
                      f"; the shipped map `{shipped}` is not it.")
                   + ("" if not failed else " Failing a check: " + ", ".join(
                       f"`{v}` ({s[f'{v}/all']['peak_mm_median']:.0f} mm)" for v in failed)
                      + "."))
    if "layer4" in data["variants"] and "hirescam:layer4" in data["variants"] and all(
            s[f"layer4/{w}"] == s[f"hirescam:layer4/{w}"] for w in ("A", "B", "C", "all")):
        out.append("- At `layer4` Grad-CAM and HiResCAM give the same numbers: before global "
                   "average pooling and a linear head the gradient is the same in every cell, "
                   "so the channel-mean weights of Grad-CAM are the exact ones.")
    rho = s[f"{shipped}/all"].get("randomised_spearman_median")
    if rho is not None:
        out.append(f"- Sanity check (Adebayo et al. 2018): with every weight randomised, the "
                   f"shipped map's Spearman rank correlation with the trained one is a median "
                   f"{rho:.2f}; the map depends on what the network learnt "
                   f"(`Testing/test_gradcam.py` asserts it on the shipped model).")
    hit = s[f"{shipped}/all"]["hit15"]
    out.append("- " + ("The heatmap is not a fracture locator: " if hit < 0.9 else
                       "The heatmap points at the fracture in most cases, but ")
               + "it shows where the network's evidence for the class lies, which includes the "
               "plafond and syndesmosis levels that define the Weber class. The fracture's "
               "position is reported by the fracture-localisation output (issue 14 item 2), "
               "not by this map.")
    out.append("- These phantoms are the analytic anatomy with their reference masks. Through "
               "the whole pipeline (the segmentation's masks, real-shape anatomy, the held-out "
               "fracture family) `evaluate-fracture` measures the shipped map's maximum "
               "(`result.json` `gradcam.peak_lps`) against the true fracture centre: "
               "[docs/fracture](fracture/README.md).")
    return out


def render_page(data: Dict[str, Any]) -> str:
    """The Markdown page of a measurement JSON (every number comes from ``data``)."""
    n = data["summary"][f"{data['variants'][0]}/all"]["n"]
    seeds = [c["seed"] for c in data["cases"]]
    right = sum(c["predicted"] == c["weber"] for c in data["cases"])
    lines = [
        "# Does the Grad-CAM point at the fracture? (measured on phantoms)", "",
        "Generated by `.venv/bin/python scripts/gradcam_localisation.py --render "
        "docs/gradcam_localisation.json` from [gradcam_localisation.json]"
        "(gradcam_localisation.json), which was measured by "
        f"`.venv/bin/python {data['command']}` (commit {data['commit']}, shipped classifier "
        f"sha256 {data['model_sha256'][:8]}...).", "",
        f"{n} fractured phantoms (seeds {min(seeds)}-{max(seeds)}, Weber A, B, C in equal "
        "numbers, sides alternating; never used in training), with their reference masks, "
        f"registered and cropped as the pipeline does; the classifier gets {right} of {n} "
        "right. For each, the heatmap of the true class is compared with the phantom's known "
        "fracture centre (mapped into the crop):", "",
        "- **peak**: distance (mm) from the heatmap's maximum to the fracture centre (median);",
        "- **hit**: the maximum lies within 15 mm of it (the \"pointing game\");",
        "- **mass / flat**: the share of the heatmap inside a 20 mm ball around the fracture, "
        "divided by that ball's share of the box (1 = no concentration on the fracture);",
        "- **randomised weights**: Spearman rank correlation between the map and the map of "
        "the same network with every weight re-drawn at random (median; near 1 would mean the "
        "map ignores what the network learnt); **randomised head**: the same with only the "
        "linear head re-drawn (near 1: the map ignores the class weights).", "",
        "A map is `[method:]layer[+layer]`: Grad-CAM (channel weights = mean gradient) unless "
        "`hirescam:` (gradient x activation voxel by voxel, exact for `layer4`, the stage "
        "before global average pooling and the linear head); `a+b` is the geometric mean of "
        "the layers' maps. The cell is the finest layer's cell on the 1.5 mm crop.", "",
        *_table(data, ""), "",
        "Kept only within 4.5 mm of the fibula mask (is the hottest part *of the fibula* at "
        "the fracture?):", "", *_table(data, "_fibula"), "",
        "## What this means", "", *_findings(data), ""]
    return "\n".join(lines)


def write_page(json_path: str) -> str:
    """Write the ``.md`` beside ``json_path`` from it; returns the page's path."""
    with open(json_path, encoding="utf-8") as fh:
        data = json.load(fh)
    md = os.path.splitext(json_path)[0] + ".md"
    with open(md, "w", encoding="utf-8") as fh:
        fh.write(render_page(data))
    return md


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=6, help="phantoms per fracture class")
    parser.add_argument("--seed", type=int, default=8100, help="first phantom seed")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--out", default="docs/gradcam_localisation.json")
    parser.add_argument("--commit", default=None,
                        help="commit to record (default: this checkout's HEAD)")
    parser.add_argument("--render", metavar="JSON",
                        help="only write the Markdown page (beside the JSON) from this JSON")
    args = parser.parse_args()
    if args.render:
        print(f"wrote {write_page(args.render)}")
        return 0
    data = measure(args)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
    print(f"wrote {args.out} and {write_page(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
