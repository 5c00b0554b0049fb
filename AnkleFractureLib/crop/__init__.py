"""Syndesmosis crop: sample the CT and bone masks on the template's box, and map back."""

from __future__ import annotations

from AnkleFractureLib.crop.syndesmosis import (
    ALL_CHANNELS,
    CHANNELS,
    SUB_CHANNELS,
    SyndesmosisCrop,
    box_on_grid,
    crop_raw_ct,
    crop_syndesmosis,
    crop_to_ct,
    crop_to_ct_box,
    min_pooled_bone,
    paste_on_grid,
    read_crop,
    sub_sampled_bone,
    write_crop,
)

__all__ = ["ALL_CHANNELS", "CHANNELS", "SUB_CHANNELS", "SyndesmosisCrop", "box_on_grid",
           "crop_raw_ct", "crop_syndesmosis", "crop_to_ct", "crop_to_ct_box", "min_pooled_bone",
           "paste_on_grid", "read_crop", "sub_sampled_bone", "write_crop"]
