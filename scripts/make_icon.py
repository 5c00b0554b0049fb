"""Draw the AnkleFracture module/extension icon (Resources/Icons/AnkleFracture.png).

A stylised anterior view of a right ankle: the distal tibia with its medial malleolus, the
fibula with its lateral malleolus, the talar dome beneath the plafond and a red oblique
fracture line through the distal fibula (a Danis-Weber B pattern), on a rounded dark-blue tile.

The drawing is deterministic (fixed geometry, no randomness, no timestamp in the PNG), so
running the script again reproduces the committed file byte for byte with the same Pillow.
It is drawn at 4x and downsampled for anti-aliasing.

Usage::

    .venv/bin/python scripts/make_icon.py [--output Resources/Icons/AnkleFracture.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
"""Output edge length in pixels (Slicer asks for 128 x 128 extension icons)."""

SCALE = 4
"""Supersampling factor: draw at SIZE * SCALE, then downsample with a Lanczos filter."""

BACKGROUND_TOP = (44, 88, 122)
BACKGROUND_BOTTOM = (22, 40, 62)
BONE = (241, 214, 145)  # Slicer's "bone" colour, also the tibia colour of the terminology
FIBULA = (232, 196, 128)
TALUS = (196, 170, 118)
OUTLINE = (120, 92, 52)
FRACTURE = (236, 56, 44)
FRACTURE_EDGE = (90, 18, 14)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "Resources" / "Icons" / "AnkleFracture.png"

# Outlines in icon pixels (0..128), listed around each shape.
TIBIA = [
    (37, -4), (69, -4), (70, 46), (74, 60), (80, 74), (81, 86),
    # plafond (the tibia's articular roof, slightly concave over the talar dome)
    (76, 88), (66, 86), (56, 85.5), (46, 86.5), (40, 89),
    # medial malleolus
    (39, 96), (36, 103), (31, 105), (26, 101), (24, 90), (25, 76), (29, 62), (34, 46),
]
FIBULA_OUTLINE = [
    (88, -4), (98, -4), (98.5, 40), (99.5, 58), (103, 72), (106, 86), (106, 98),
    # lateral malleolus tip, lower than the medial one
    (102, 108), (96, 112), (90, 107), (86, 96), (85, 82), (86, 66), (87, 50), (87.5, 30),
]
TALUS_BOX = (32, 86, 90, 156)
"""Bounding box of the ellipse whose upper half is the talar dome (clipped by the tile)."""

FRACTURE_LINE = [(82, 87), (88, 81), (92, 82), (96, 75), (100, 76), (108, 66)]
"""Oblique, slightly jagged line from antero-inferior to postero-superior across the fibula."""


def _scaled(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Scale icon-pixel coordinates to the supersampled canvas.

    Args:
        points: (x, y) pairs in icon pixels.

    Returns:
        The same points in supersampled pixels.
    """
    return [(x * SCALE, y * SCALE) for x, y in points]


def _background(size: int) -> Image.Image:
    """Vertical two-colour gradient filling the whole canvas.

    Args:
        size: Canvas edge length in pixels.

    Returns:
        An RGBA image.
    """
    img = Image.new("RGBA", (size, size))
    draw = ImageDraw.Draw(img)
    for y in range(size):
        t = y / (size - 1)
        colour = tuple(round(a + (b - a) * t) for a, b in zip(BACKGROUND_TOP, BACKGROUND_BOTTOM))
        draw.line([(0, y), (size - 1, y)], fill=colour + (255,))
    return img


def draw_icon(size: int = SIZE) -> Image.Image:
    """Draw the icon.

    Args:
        size: Output edge length in pixels.

    Returns:
        An RGBA image of size x size pixels with a transparent margin around the rounded tile.
    """
    big = size * SCALE
    k = big / (SIZE * SCALE)  # lets a non-default size reuse the 128-pixel geometry
    art = _background(big)
    draw = ImageDraw.Draw(art)

    def pts(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(x * k, y * k) for x, y in _scaled(points)]

    line = max(1, round(2 * SCALE * k))
    talus = [c * SCALE * k for c in TALUS_BOX]
    draw.ellipse(talus, fill=TALUS, outline=OUTLINE, width=line)
    draw.polygon(pts(TIBIA), fill=BONE, outline=OUTLINE, width=line)
    draw.polygon(pts(FIBULA_OUTLINE), fill=FIBULA, outline=OUTLINE, width=line)
    draw.line(pts(FRACTURE_LINE), fill=FRACTURE_EDGE, width=round(7 * SCALE * k), joint="curve")
    draw.line(pts(FRACTURE_LINE), fill=FRACTURE, width=round(4 * SCALE * k), joint="curve")

    # Rounded tile: everything outside it becomes transparent.
    mask = Image.new("L", (big, big), 0)
    margin, radius = 4 * SCALE * k, 22 * SCALE * k
    ImageDraw.Draw(mask).rounded_rectangle(
        [margin, margin, big - 1 - margin, big - 1 - margin], radius=radius, fill=255
    )
    tile = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    tile.paste(art, (0, 0), mask)
    return tile.resize((size, size), Image.LANCZOS)


def main(argv: list[str] | None = None) -> Path:
    """Write the icon PNG.

    Args:
        argv: Command-line arguments (defaults to sys.argv[1:]).

    Returns:
        The path written.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="PNG to write")
    args = parser.parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    draw_icon().save(args.output, format="PNG", optimize=True)
    print(f"wrote {args.output}")
    return args.output


if __name__ == "__main__":
    main()
