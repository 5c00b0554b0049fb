#!/usr/bin/env python3
"""Write a segmentation training run's *last* weights as a model folder.

Usage:
    python scripts/seg_checkpoint_to_model.py RUN_DIR --out MODEL_DIR

``train-seg`` keeps, as RUN_DIR/model.pt, the weights of the epoch with the best mean
validation Dice on its own validation cases, and the weights of the last step in
RUN_DIR/checkpoint.pt (for --resume). When the validation cases cannot show what a run was
for (e.g. a run that teaches plates, validated on scans without plates), the last weights
are the model to compare; this writes them (float16, with RUN_DIR's plans.json and the
checkpoint's step) into MODEL_DIR, the format ``--seg-model`` reads.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    import torch

    from AnkleFractureLib.segmentation.model_io import save_model
    from AnkleFractureLib.segmentation.network import build_network
    from AnkleFractureLib.segmentation.plans import SegPlans

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    ckpt_file = args.run_dir / "checkpoint.pt"
    if not ckpt_file.exists():
        p.error(f"{ckpt_file}: no checkpoint (was the run started with --no-keep-checkpoint?)")
    ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    plans = SegPlans.load(args.run_dir / "plans.json")
    network = build_network(plans.network)
    network.load_state_dict(ckpt["model"])
    save_model(args.out, network, plans, {"epoch": int(ckpt["epoch"]),
                                          "step": int(ckpt["global_step"]),
                                          "weights": "last step of the run"})
    print(f"{args.out}: weights of step {ckpt['global_step']} (epoch {ckpt['epoch']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
