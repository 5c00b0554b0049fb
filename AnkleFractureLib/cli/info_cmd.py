"""``ankle-fracture info``: read a CT (file or DICOM folder) and describe it."""

from __future__ import annotations

import argparse
import json

import numpy as np


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("info", help="read a CT and print its geometry and HU range",
                       description="Read a CT (NIfTI, NRRD, MetaImage file or DICOM folder) and "
                                   "print its size, spacing (mm), origin (LPS mm), direction, "
                                   "HU range and any reader warnings.",
                       epilog="example:\n  ankle-fracture info path/to/dicom_folder",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ct", metavar="CT", help="image file or DICOM folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from AnkleFractureLib.io import read_image

    vol = read_image(args.ct)
    arr = vol.array
    info = {
        "path": args.ct,
        "size_xyz": list(vol.size),
        "spacing_mm": [round(s, 6) for s in vol.spacing],
        "origin_lps_mm": [round(o, 4) for o in vol.origin],
        "direction": np.round(vol.direction, 6).tolist(),
        "dtype": str(arr.dtype),
        "hu_min": float(arr.min()),
        "hu_max": float(arr.max()),
        "hu_median": float(np.median(arr[::4, ::4, ::4])),
        "warnings": list(vol.meta.get("warnings", [])),
    }
    for key in ("format", "modality", "series_description"):
        if key in vol.meta:
            info[key] = vol.meta[key]
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0
