"""Syndesmosis crop: sample the CT and bone masks on the template's box, and map back."""

from __future__ import annotations

from AnkleFractureLib.crop.syndesmosis import (
    CHANNELS,
    SyndesmosisCrop,
    crop_raw_ct,
    crop_syndesmosis,
    crop_to_ct,
    read_crop,
    write_crop,
)

__all__ = ["CHANNELS", "SyndesmosisCrop", "crop_raw_ct", "crop_syndesmosis", "crop_to_ct",
           "read_crop", "write_crop"]
