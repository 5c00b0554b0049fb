"""Benchmark: side detection + ICP registration + syndesmosis crop on a clinical-size case.

Usage: .venv/bin/python bench/register.py [--runs 5] [--seed 4242]

Generates one clinical-size phantom (512 x 512 x 300-400, about 0.35-0.45 mm in-plane, Weber B,
left ankle; about 25 s, not timed), then times each stage and the whole
(median of several runs) and prints the peak memory. Goal: <= 1 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import peak_rss_mb, time_runs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=4242)
    args = parser.parse_args()

    from AnkleFractureLib.crop import crop_syndesmosis
    from AnkleFractureLib.phantom import generate_case
    from AnkleFractureLib.registration import detect_side, load_template, register_to_template

    t0 = time.perf_counter()
    case = generate_case(args.seed, weber="B", side="left", spacing="clinical")
    print(f"case: {case.ct.size} voxels (x, y, z) at "
          f"{tuple(round(s, 3) for s in case.ct.spacing)} mm, generated in "
          f"{time.perf_counter() - t0:.1f} s (not timed below)")
    template = load_template()

    def side():
        return detect_side(case.label, case.ct)

    def register():
        return register_to_template(case.label, template, side="left")

    reg = register()

    def crop():
        return crop_syndesmosis(case.ct, case.label, reg.patient_to_template, template)

    def whole():
        s = detect_side(case.label, case.ct)
        r = register_to_template(case.label, template, side=s.side)
        return crop_syndesmosis(case.ct, case.label, r.patient_to_template, template)

    rows = [("side detection", side), ("surface + ICP", register), ("crop", crop),
            ("whole (side + ICP + crop)", whole)]
    results = {name: time_runs(fn, runs=args.runs) for name, fn in rows}
    total = results["whole (side + ICP + crop)"]["median_s"]
    print(f"\n{'stage':<28} {'median s':>9} {'min s':>7} {'max s':>7} {'share':>6} {'peak MB':>8}")
    for name, r in results.items():
        share = r["median_s"] / total if not name.startswith("whole") else 1.0
        print(f"{name:<28} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['max_s']:7.3f} "
              f"{share:6.0%} {r['peak_alloc_mb']:8.1f}")
    print(f"\nregistration: side {reg.side}, RMS {reg.rms_mm:.2f} mm, inliers "
          f"{reg.inlier_fraction:.0%} (within {reg.to_json()['inlier_distance_mm']} mm), "
          f"scale {reg.scale:.3f}, {reg.iterations} iterations; runs per stage: {args.runs}")
    print(f"process peak RSS {peak_rss_mb():.0f} MB (includes the phantom generation); goal: "
          f"whole <= 1 s on 2 CPU cores -> {'met' if total <= 1.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
