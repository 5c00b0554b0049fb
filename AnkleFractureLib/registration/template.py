"""The healthy right-ankle template: bone labels, surface points, plafond and syndesmosis box.

The **template frame** is the canonical right-ankle anatomical frame of the phantom: LPS mm
axes (x towards the patient's left = *medial* for a right ankle, y posterior, z superior), the
centre of the tibial plafond at the origin, fibula at -x. A left ankle is mirrored (x -> -x)
before it is compared with the template, so ``patient_to_template`` has det < 0 for a left
ankle.

On disk (``Resources/Templates/healthy_right_ankle/``, nnU-Net style: data, not code)::

    template.json        # format version, provenance, plafond, syndesmosis box + crop grid
    labels.nii.gz        # uint8 (z, y, x), 1 tibia, 2 fibula, identity direction, 1 mm
    surface_points.npz   # points (M, 3) float32 template mm, point_labels (M,) uint8

Every file is written atomically and byte-deterministically (no dates, fixed zip timestamps),
so rebuilding the template with the same arguments gives identical bytes.

The **syndesmosis box** (:data:`DEFAULT_BOX`) is a fixed box in template mm, from 35 mm below
the plafond to 109 mm above it, x from -60 to +36 mm (lateral = -x) and y from -36 to +36 mm.
It was chosen to contain every fibular fracture line the classifier must place
(:data:`AnkleFractureLib.phantom.fractures.WEBER_HEIGHT_MM`: A 3-20 mm below the plafond with
the lateral malleolus tip reaching 28 mm below it, B 0-25 mm above, C 35-100 mm above with
2-5 mm of lateral widening) plus the whole distal tibial cross-section with the fibular notch,
with >= 7 mm of margin around the template's bones for registration error. The crop grid is
64 x 48 x 96 voxels (x, y, z) of 1.5 mm = 96 x 72 x 144 mm.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from AnkleFractureLib.errors import AnkleFractureError, GeometryError, InputError, PathLike
from AnkleFractureLib.geometry.volume import Volume

#: Version of the on-disk template format.
FORMAT_VERSION = 1
#: Template folder name under ``Resources/Templates``.
TEMPLATE_NAME = "healthy_right_ankle"
#: Phantom anatomy seed of the shipped template. Among seeds 0-299 its 46 geometric anatomy
#: parameters are the closest to the population mean (RMS z-score 0.71; seed 0 scores 1.18), so
#: the template is a typical ankle rather than an extreme one (see scripts/build_template.py).
TEMPLATE_SEED = 186
#: Folder name of the template built as the mean of the real-shape ("vh") phantom family.
TEMPLATE_NAME_VH = "healthy_right_ankle_vh"
#: Voxel spacing (mm) of the template label map.
TEMPLATE_SPACING_MM = 1.0
#: Anatomical z range (mm) covered by the phantom-built template (the phantom's whole extent).
TEMPLATE_Z_RANGE_MM = (-45.0, 130.0)
#: Margin (mm) around the bones in x and y of the template grid.
TEMPLATE_MARGIN_MM = 10.0
#: Surface points kept per bone.
POINTS_PER_BONE = 6000

#: Default syndesmosis box in template mm (see the module docstring for how it was chosen).
DEFAULT_BOX: Dict[str, Any] = {
    "centre_mm": [-12.0, 0.0, 37.0],
    "axes": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
    "size_voxels": [64, 48, 96],
    "spacing_mm": [1.5, 1.5, 1.5],
}
_BOX_RATIONALE = (
    "Fixed box in template mm: x -60..+36 (lateral = -x), y -36..+36, z -35..+109 around the "
    "plafond at the origin. It holds every fibular fracture line the classifier must place "
    "(Weber A 3-20 mm below the plafond, lateral malleolus tip to 28 mm below; B 0-25 mm "
    "above; C 35-100 mm above, with 2-5 mm of lateral widening), the distal tibial "
    "cross-section with the fibular notch, and >= 7 mm of margin around the template bones for "
    "registration error. Grid: 64 x 48 x 96 voxels (x, y, z) of 1.5 mm isotropic.")


# ---------------------------------------------------------------------- syndesmosis box
@dataclass
class SyndesmosisBox:
    """An oriented box in template mm with the voxel grid of the syndesmosis crop.

    Attributes:
        centre: (3,) box centre (x, y, z) in template mm.
        axes: 3x3 matrix whose columns are the box x, y, z axes in template mm (orthonormal,
            identity by default).
        size_mm: (3,) edge lengths (x, y, z) in mm; ``size_mm / spacing_mm`` voxels per axis.
        spacing_mm: (3,) crop grid spacing (x, y, z) in mm.
    """

    centre: np.ndarray
    axes: np.ndarray = field(default_factory=lambda: np.eye(3))
    size_mm: np.ndarray = field(default_factory=lambda: np.array([96.0, 72.0, 144.0]))
    spacing_mm: np.ndarray = field(default_factory=lambda: np.array([1.5, 1.5, 1.5]))

    def __post_init__(self) -> None:
        self.centre = np.asarray(self.centre, dtype=float).reshape(3)
        self.axes = np.asarray(self.axes, dtype=float).reshape(3, 3)
        self.size_mm = np.asarray(self.size_mm, dtype=float).reshape(3)
        self.spacing_mm = np.asarray(self.spacing_mm, dtype=float).reshape(3)
        if not np.allclose(self.axes.T @ self.axes, np.eye(3), atol=1e-6):
            raise GeometryError(f"box axes must be orthonormal, got {self.axes.tolist()}")
        if np.any(self.size_mm <= 0) or np.any(self.spacing_mm <= 0):
            raise GeometryError("box size and spacing must be positive, got "
                                f"{self.size_mm.tolist()} and {self.spacing_mm.tolist()}")

    @property
    def grid_size(self) -> Tuple[int, int, int]:
        """Crop grid size (nx, ny, nz) in voxels."""
        n = np.maximum(1, np.round(self.size_mm / self.spacing_mm)).astype(int)
        return (int(n[0]), int(n[1]), int(n[2]))

    @property
    def shape(self) -> Tuple[int, int, int]:
        """Crop array shape (nz, ny, nx)."""
        nx, ny, nz = self.grid_size
        return (nz, ny, nx)

    def grid(self) -> Tuple[Tuple[int, int, int], np.ndarray, np.ndarray, np.ndarray]:
        """The crop grid in template mm.

        Returns:
            ``(size, spacing, origin, direction)``: size (nx, ny, nz) ints, spacing (3,) mm,
            origin (3,) template mm of the centre of voxel (0, 0, 0), direction 3x3 (columns =
            i, j, k axes). The voxel centres are symmetric about the box centre.
        """
        size = self.grid_size
        half = 0.5 * (np.asarray(size, dtype=float) - 1.0) * self.spacing_mm
        origin = self.centre - self.axes @ half
        return size, self.spacing_mm.copy(), origin, self.axes.copy()

    def corners(self) -> np.ndarray:
        """The 8 corners (8, 3) of the box (outer voxel faces) in template mm."""
        half = 0.5 * self.size_mm
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)],
                         dtype=float)
        return self.centre + (signs * half) @ self.axes.T

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Boolean (N,) mask of template-mm points (N, 3) inside the box (faces included)."""
        local = (np.atleast_2d(np.asarray(points, dtype=float)) - self.centre) @ self.axes
        return np.all(np.abs(local) <= 0.5 * self.size_mm + 1e-9, axis=1)

    def to_json(self) -> Dict[str, Any]:
        """JSON description (centre, axes columns, grid size, spacing, derived origin/extent)."""
        size, spacing, origin, _ = self.grid()
        corners = self.corners()
        return {
            "centre_mm": _r(self.centre),
            "axes": [_r(self.axes[:, c]) for c in range(3)],
            "size_voxels": list(size),
            "spacing_mm": _r(spacing),
            "size_mm": _r(self.size_mm),
            "origin_mm": _r(origin),
            "extent_mm": {"min": _r(corners.min(axis=0)), "max": _r(corners.max(axis=0))},
            "rationale": _BOX_RATIONALE,
        }

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "SyndesmosisBox":
        """Build from :meth:`to_json` output (``axes`` = list of the 3 axis columns)."""
        spacing = np.asarray(data["spacing_mm"], dtype=float)
        size = np.asarray(data["size_voxels"], dtype=float)
        axes = np.asarray(data.get("axes", np.eye(3).tolist()), dtype=float).T
        return cls(np.asarray(data["centre_mm"], dtype=float), axes, size * spacing, spacing)


def default_box() -> SyndesmosisBox:
    """The default syndesmosis box (:data:`DEFAULT_BOX`)."""
    return SyndesmosisBox.from_json(DEFAULT_BOX)


def _r(values: Any, nd: int = 6) -> List[float]:
    """Round to ``nd`` decimals as plain floats (stable JSON text; -0.0 printed as 0.0)."""
    return [round(float(v), nd) + 0.0 for v in np.asarray(values, dtype=float).reshape(-1)]


# ---------------------------------------------------------------------- template
@dataclass
class Template:
    """The healthy right-ankle template in template mm.

    Attributes:
        labels: uint8 label map (1 tibia, 2 fibula), array (z, y, x), identity direction, ~1 mm.
        points: (M, 3) surface points (x, y, z) template mm (boundary-voxel centres).
        point_labels: (M,) 1 (tibia) or 2 (fibula) per point.
        plafond: (3,) template mm of the tibial plafond landmark ((0, 0, 0) after a build).
        box: The syndesmosis box and crop grid.
        meta: Provenance (how it was built: seed or cases, registration), date-free.
    """

    labels: Volume
    points: np.ndarray
    point_labels: np.ndarray
    plafond: np.ndarray
    box: SyndesmosisBox
    meta: Dict[str, Any] = field(default_factory=dict)


def _template_json(t: Template) -> Dict[str, Any]:
    counts = {str(k): int(np.count_nonzero(t.point_labels == k)) for k in (1, 2)}
    return {
        "format_version": FORMAT_VERSION,
        "name": str(t.meta.get("name", TEMPLATE_NAME)),
        "frame": ("canonical right-ankle anatomical frame: LPS mm axes (x = medial for a right "
                  "ankle, y posterior, z superior), tibial plafond centre at the origin, "
                  "fibula at -x; left ankles are mirrored (x -> -x) onto it"),
        "labels": {"background": 0, "tibia": 1, "fibula": 2},
        "labels_file": "labels.nii.gz",
        "points_file": "surface_points.npz",
        "grid": {"size": list(t.labels.size), "spacing_mm": _r(t.labels.spacing),
                 "origin_mm": _r(t.labels.origin)},
        "points_per_bone": counts,
        "plafond_mm": _r(t.plafond),
        "syndesmosis_box": t.box.to_json(),
        "meta": t.meta,
    }


def _npz_bytes(arrays: Dict[str, np.ndarray]) -> bytes:
    """A .npz archive with fixed zip timestamps, so equal arrays give identical bytes.

    ``np.savez_compressed`` stamps the current time into the zip entries.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]),
                                      allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def save_template(template: Template, folder: PathLike) -> None:
    """Write a template folder (labels.nii.gz, surface_points.npz, template.json last).

    Each file is written atomically; ``template.json`` is written last, so a folder with a
    ``template.json`` always has its data files. The bytes are deterministic.

    Args:
        template: The template.
        folder: Destination folder (created).
    """
    from AnkleFractureLib.io import atomic_output, atomic_write_json, write_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_image(template.labels.with_array(template.labels.array.astype(np.uint8), meta={}),
                folder / "labels.nii.gz")
    data = _npz_bytes({"points": np.asarray(template.points, dtype=np.float32),
                       "point_labels": np.asarray(template.point_labels, dtype=np.uint8)})
    with atomic_output(folder / "surface_points.npz") as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    atomic_write_json(folder / "template.json", _template_json(template))


def load_template(path: Optional[PathLike] = None) -> Template:
    """Load a template folder.

    Args:
        path: The folder (or its ``template.json``), or the bare name of a shipped template
            (``healthy_right_ankle_vh``: the mean of the real-shape family); default: the
            shipped ``Resources/Templates/healthy_right_ankle``.

    Returns:
        The template.

    Raises:
        InputError: The folder or a file is missing or corrupt (the message names the path).
    """
    if path is None:
        from AnkleFractureLib.resources import resource_path

        path = resource_path("Templates", TEMPLATE_NAME)
    folder = Path(path)
    if not folder.exists() and len(folder.parts) == 1 and folder.name != "template.json":
        from AnkleFractureLib.resources import resource_path

        shipped = Path(resource_path("Templates", folder.name))
        folder = shipped if shipped.is_dir() else folder
    if folder.name == "template.json":
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(folder, "template folder does not exist")
    index = folder / "template.json"
    if not index.is_file():
        raise InputError(folder, "not a template folder: template.json is missing")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        version = int(data.get("format_version", -1))
        box = SyndesmosisBox.from_json(data["syndesmosis_box"])
        plafond = np.asarray(data["plafond_mm"], dtype=float).reshape(3)
        labels_file = folder / str(data.get("labels_file", "labels.nii.gz"))
        points_file = folder / str(data.get("points_file", "surface_points.npz"))
        meta = dict(data.get("meta") or {})
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, GeometryError) as exc:
        raise InputError(index, f"corrupt template description ({type(exc).__name__}: {exc})") \
            from None
    if version != FORMAT_VERSION:
        raise InputError(index, f"unsupported template format_version {version} "
                                f"(this library reads {FORMAT_VERSION})")
    from AnkleFractureLib.io import read_image

    if not labels_file.is_file():
        raise InputError(labels_file, "template label map is missing")
    labels = read_image(labels_file)  # raises InputError naming the file when corrupt
    values = set(np.unique(labels.array).tolist())
    if not values <= {0, 1, 2} or not {1, 2} <= values:
        raise InputError(labels_file, f"template labels must hold 1 (tibia) and 2 (fibula) and "
                                      f"nothing but 0/1/2, got {sorted(values)}")
    labels = Volume(labels.array.astype(np.uint8), labels.spacing, labels.origin,
                    labels.direction, {"source": str(labels_file)})
    if not points_file.is_file():
        raise InputError(points_file, "template surface points are missing")
    try:
        with np.load(points_file, allow_pickle=False) as npz:
            points = np.asarray(npz["points"], dtype=float)
            point_labels = np.asarray(npz["point_labels"], dtype=np.uint8)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(points_file, f"corrupt template surface points ({type(exc).__name__})") \
            from None
    if points.ndim != 2 or points.shape[1] != 3 or point_labels.shape != (points.shape[0],) \
            or not np.all(np.isfinite(points)) or not set(np.unique(point_labels)) <= {1, 2}:
        raise InputError(points_file, "template surface points must be (M, 3) finite with "
                                      "labels (M,) in {1, 2}")
    meta["path"] = str(folder)
    return Template(labels, points, point_labels, plafond, box, meta)


# ---------------------------------------------------------------------- helpers
def _bone_points(labels: Volume, value: int, max_points: int) -> np.ndarray:
    """Centres (N, 3) LPS mm of the voxels of bone ``value`` (deterministic subsample)."""
    kji = np.argwhere(labels.array == value)
    if kji.shape[0] > max_points:
        keep = np.linspace(0, kji.shape[0] - 1, max_points).round().astype(int)
        kji = kji[keep]
    return labels.index_to_physical(kji[:, ::-1].astype(float))


def surface_points(labels: Volume, max_points_per_bone: int = POINTS_PER_BONE,
                   seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Boundary-voxel surface points of tibia and fibula (the same rule as the patient side).

    Args:
        labels: Label map (1 tibia, 2 fibula), any grid.
        max_points_per_bone: Points kept per bone (deterministic random subset).
        seed: Subsampling seed.

    Returns:
        (points (M, 3) LPS mm, point_labels (M,) uint8 in {1, 2}), tibia first.
    """
    from AnkleFractureLib.registration.surface import labelled_surface_points

    pts, lab = labelled_surface_points(labels, max_points_per_bone=max_points_per_bone, seed=seed)
    return np.asarray(pts, dtype=float), np.asarray(lab, dtype=np.uint8)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix, dtype=float)
    return np.asarray(points, dtype=float) @ m[:3, :3].T + m[:3, 3]


def _tibial_axis(labels: Volume) -> np.ndarray:
    """Unit long axis (x, y, z) of the tibia (principal axis of its voxels), pointing superior.

    LPS is a patient frame, so "superior" is +z whatever the scan direction (feet-first scans
    included); the sign is chosen so the axis has a positive z component.
    """
    pts = _bone_points(labels, 1, 200_000)
    if pts.shape[0] < 50:
        raise InputError(labels.meta.get("source"), "no tibia (label 1) in the label map")
    c = pts - pts.mean(axis=0)
    w, v = np.linalg.eigh(c.T @ c)
    u = v[:, int(np.argmax(w))]
    return u if u[2] >= 0 else -u


def _lookup(labels: Volume, points: np.ndarray, value: int) -> np.ndarray:
    """Nearest-voxel test ``labels == value`` at LPS points (N, 3); False outside the grid."""
    idx = np.rint(labels.physical_to_index(points)).astype(np.int64)
    nx, ny, nz = labels.size
    ok = (idx >= 0).all(axis=1) & (idx[:, 0] < nx) & (idx[:, 1] < ny) & (idx[:, 2] < nz)
    out = np.zeros(points.shape[0], dtype=bool)
    i = idx[ok]
    out[ok] = labels.array[i[:, 2], i[:, 1], i[:, 0]] == value
    return out


#: :func:`_lowest_full_section`: a level is "full" when its cross-section holds at least this
#: fraction of the largest cross-section within :data:`FULL_SECTION_WINDOW_MM` of the lowest
#: tibia voxel (the distal metaphysis is the widest part of the distal tibia; the malleolus
#: and stray talus pieces are far smaller).
FULL_SECTION_FRACTION = 0.5
#: Only the distal this many mm are searched for the largest section: a scan that reaches the
#: knee holds a tibial plateau about twice as wide as the metaphysis.
FULL_SECTION_WINDOW_MM = 80.0


def _lowest_full_section(h: np.ndarray, spacing: Sequence[float]) -> float:
    """Lowest height (mm along the axis) of a level whose tibia cross-section holds at least
    :data:`FULL_SECTION_FRACTION` of the largest one's voxels within
    :data:`FULL_SECTION_WINDOW_MM` of the lowest.

    Args:
        h: Heights (N,) in mm of tibia voxel centres along the tibial axis.
        spacing: Voxel size (x, y, z) mm; the levels are at least as thick as the coarsest
            voxel side, so thick slices leave no empty levels between them.
    """
    width = max(2.0, float(max(spacing)))
    lo = float(h.min())
    counts = np.bincount(((h - lo) / width).astype(np.int64))
    largest = counts[: max(1, int(FULL_SECTION_WINDOW_MM / width))].max()
    full = np.flatnonzero(counts >= FULL_SECTION_FRACTION * largest)
    return lo + float(full[0]) * width


def find_plafond(labels: Volume) -> np.ndarray:
    """The tibial plafond landmark, LPS mm (x, y, z), found from the tibia label alone.

    Rule: the plafond is the point of the distal articular surface of the tibia below the
    centroid of the tibial cross-section 5-12 mm above the joint (which excludes the medial
    malleolus and the anterior/posterior lips, all below the plafond):

    1. ``u`` = the tibia's long (principal) axis, pointing superior.
    2. Start with the joint level ``h0`` = the most distal tibia voxel along ``u`` + 15 mm
       (the medial malleolus reaches 10-15 mm below the plafond), or the lowest level whose
       cross-section holds at least half the largest one's voxels when that is higher (a
       piece of talus a network labelled tibia, connected or not, lies well below the
       plafond but is small in cross-section: it must not pull the start down).
    3. ``c`` = centroid of the tibia voxels with height in [h0 + 5, h0 + 12] mm along ``u``.
    4. March from ``c`` along ``-u`` in 0.2 mm steps until leaving the tibia: that exit is the
       articular surface, the new ``h0``. Repeat 3-4 until ``h0`` moves < 0.2 mm (<= 5 times).

    Works on any grid and pose (rotation, mirrored left ankles); accurate to about one voxel.

    Args:
        labels: Label map (1 tibia, 2 fibula), any geometry.

    Returns:
        (3,) LPS mm of the plafond.

    Raises:
        InputError: No tibia, or no articular surface found below the cross-section.
    """
    u = _tibial_axis(labels)
    pts = _bone_points(labels, 1, 400_000)
    h = pts @ u
    h0 = max(float(h.min()) + 15.0, _lowest_full_section(h, labels.spacing))
    plafond = None
    steps = np.arange(0.0, 60.0, 0.2)
    for _ in range(5):
        sel = (h >= h0 + 5.0) & (h <= h0 + 12.0)
        if np.count_nonzero(sel) < 10:
            break
        c = pts[sel].mean(axis=0)
        line = c[None, :] - steps[:, None] * u[None, :]
        inside = _lookup(labels, line, 1)
        first_in = np.flatnonzero(inside)
        if first_in.size == 0:
            break
        after = np.flatnonzero(~inside[first_in[0]:])
        if after.size == 0:
            break
        k = first_in[0] + after[0]
        plafond = line[k] + 0.1 * u  # halfway between the last inside and first outside sample
        h_new = float(plafond @ u)
        if abs(h_new - h0) < 0.2:
            break
        h0 = h_new
    if plafond is None:
        raise InputError(labels.meta.get("source"),
                         "cannot find the tibial plafond: no distal tibial articular surface")
    return plafond


def _resample_masks(labels: Volume, matrix: np.ndarray, size: Sequence[int],
                    spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """Per-bone occupancy (2, nz, ny, nx) float32 of ``labels`` on an identity-direction grid.

    ``matrix`` maps the label map's LPS points to the grid's frame; each binary mask is
    linearly interpolated (so the average of several cases is a probability).
    """
    from AnkleFractureLib.preprocessing.resample import resample_to_grid

    inv = np.linalg.inv(matrix)
    out = []
    for value in (1, 2):
        mask = labels.with_array((labels.array == value).astype(np.uint8))
        out.append(resample_to_grid(mask, size, spacing, origin, np.eye(3), "linear", 0.0,
                                    transform=inv).array.astype(np.float32))
    return np.stack(out)


def _labels_from_prob(prob: np.ndarray) -> np.ndarray:
    """uint8 labels from per-bone probabilities (2, ...): bone where p >= 0.5, fibula wins ties."""
    out = np.zeros(prob.shape[1:], np.uint8)
    out[prob[0] >= 0.5] = 1
    out[(prob[1] >= 0.5) & (prob[1] >= prob[0])] = 2
    return out


def _tight_grid(points: np.ndarray, spacing: float, margin: float,
                z_range: Optional[Tuple[float, float]] = None) -> Tuple[List[int], np.ndarray]:
    """Identity-direction grid (size (nx, ny, nz), origin) on whole-spacing positions."""
    lo = points.min(axis=0) - margin
    hi = points.max(axis=0) + margin
    if z_range is not None:
        lo[2], hi[2] = z_range
    lo = np.floor(lo / spacing) * spacing
    hi = np.ceil(hi / spacing) * spacing
    size = [int(v) for v in np.round((hi - lo) / spacing).astype(int) + 1]
    return size, lo


def _crop_to_bones(vol: Volume, margin_mm: float, keep_z: bool) -> Volume:
    """Crop an identity-direction label map to its bones' bounding box + margin (x, y[, z])."""
    idx = np.argwhere(vol.array > 0)
    lo = idx.min(axis=0)
    hi = idx.max(axis=0) + 1
    pad = np.ceil(margin_mm / np.asarray(vol.spacing)[::-1]).astype(int)
    lo = np.maximum(lo - pad, 0)
    hi = np.minimum(hi + pad, vol.array.shape)
    if keep_z:
        lo[0], hi[0] = 0, vol.array.shape[0]
    arr = vol.array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    origin = vol.index_to_physical(lo[::-1][None, :].astype(float))[0]
    return Volume(np.ascontiguousarray(arr), vol.spacing, origin, vol.direction, dict(vol.meta))


def _finish(labels: Volume, box: SyndesmosisBox, meta: Dict[str, Any]) -> Template:
    """Surface points and the Template object for labels already in the template frame."""
    points, point_labels = surface_points(labels, POINTS_PER_BONE, seed=0)
    # float32 is what is stored; keep the in-memory template equal to the loaded one.
    points = points.astype(np.float32).astype(float)
    meta = dict(meta)
    meta.setdefault("library_version", _library_version())
    return Template(labels, points, point_labels, np.zeros(3), box, meta)


def _library_version() -> str:
    from AnkleFractureLib import __version__

    return str(__version__)


# ---------------------------------------------------------------------- builds
def build_template_from_phantom(seed: int = TEMPLATE_SEED) -> Template:
    """The template of one healthy right phantom, resampled into the anatomical frame.

    The phantom (weber "none", right, "fast" spacing: 0.7-1.0 mm in-plane, 1.0-1.5 mm slices) is
    rendered in its random patient pose; its tibia and fibula masks are linearly resampled
    through ``info["anatomy_to_patient"]`` onto a 1 mm identity grid in the anatomical frame
    (z from -45 to +130 mm, x/y the bones' bounding box + 10 mm) and thresholded at 0.5. The
    plafond is the frame origin by construction of the phantom.

    Args:
        seed: Phantom seed (the anatomy stream of this seed). Default: :data:`TEMPLATE_SEED`,
            the most typical anatomy among seeds 0-299.

    Returns:
        The template (default syndesmosis box, plafond (0, 0, 0)); ``meta`` records the seed.
    """
    # The phantom is an upper layer for the build only; never imported at module level.
    from AnkleFractureLib.phantom.generator import generate_case

    case = generate_case(int(seed), weber="none", side="right", spacing="fast")
    a2p = np.asarray(case.info["anatomy_to_patient"], dtype=float)
    p2a = np.linalg.inv(a2p)
    sp = TEMPLATE_SPACING_MM
    # Generous first grid (the anatomy never leaves x -75..55, y -50..60), cropped afterwards.
    size, origin = _tight_grid(np.array([[-75.0, -50.0, 0.0], [55.0, 60.0, 0.0]]), sp, 0.0,
                               TEMPLATE_Z_RANGE_MM)
    prob = _resample_masks(case.label, p2a, size, (sp, sp, sp), origin)
    full = Volume(_labels_from_prob(prob), (sp, sp, sp), origin, np.eye(3))
    labels = _crop_to_bones(full, TEMPLATE_MARGIN_MM, keep_z=True)
    meta = {
        "built_from": "phantom",
        "phantom_seed": int(seed),
        "phantom_weber": "none",
        "phantom_side": "right",
        "phantom_spacing_mode": "fast",
        "phantom_grid": case.info["grid"],
        "anatomy": case.info["anatomy"],
        "resampling": "per-bone linear interpolation of the binary masks, threshold 0.5",
        "spacing_mm": sp,
        "surface_points": f"boundary voxels, <= {POINTS_PER_BONE} per bone, seed 0",
    }
    return _finish(labels, default_box(), meta)


#: Anatomies averaged into the vh-mean template, and the first anatomy seed tried. The seeds
#: 5000+ are far from the test and sweep seeds (0-999), so every tested case is held out.
VH_TEMPLATE_CASES = 32
VH_TEMPLATE_SEED0 = 5000
#: Anatomical z range (mm) of the vh-mean template: the fibular tip (to about 35 mm below the
#: plafond) up to 160 mm, so a long scan's shaft fixes the rotation.
VH_TEMPLATE_Z_RANGE_MM = (-50.0, 160.0)
#: x / y range (mm) rendered for the vh-mean template before cropping to the bones.
VH_TEMPLATE_XY_MM = ((-60.0, 45.0), (-40.0, 55.0))


def vh_template_seeds(n_cases: int = VH_TEMPLATE_CASES, seed0: int = VH_TEMPLATE_SEED0
                      ) -> List[int]:
    """Anatomy seeds of the vh-mean template: half on each real base shape.

    Seeds ``seed0, seed0 + 1, ...`` are taken in order while their base shape still has room,
    so the mean weighs the two Visible Human legs equally.
    """
    from AnkleFractureLib.phantom.real_generator import plan_real
    from AnkleFractureLib.phantom.shapes import shipped_library

    n_bases = len(shipped_library())
    quota = {b: n_cases // n_bases + (1 if b < n_cases % n_bases else 0) for b in range(n_bases)}
    seeds: List[int] = []
    seed = int(seed0)
    while len(seeds) < n_cases:
        base = int(plan_real(seed, "right", "fast")[0].p.base)
        if quota[base] > 0:
            quota[base] -= 1
            seeds.append(seed)
        seed += 1
    return seeds


def _occupancy(sdf: Callable[..., np.ndarray], x: np.ndarray, y: np.ndarray,
               z: np.ndarray, shape: Tuple[int, int, int], voxel_mm: float) -> np.ndarray:
    """Partial-volume occupancy (shape (z, y, x), float32 in [0, 1]) of a signed distance
    function (mm, negative inside) at the grid's voxel centres: 0.5 - d / voxel, clipped."""
    d = sdf(x, y, z).reshape(shape)
    return np.clip(0.5 - d / voxel_mm, 0.0, 1.0).astype(np.float32)


#: Smoothing (mm, Gaussian sigma along z) of the fibular centrelines of the vh-mean template.
VH_CENTRELINE_SIGMA_MM = 5.0


def _slice_centroids(occ: np.ndarray, sp: float) -> np.ndarray:
    """Per-slice centroid (nz, 2) (x, y in voxels) of an occupancy (z, y, x), smoothed along z
    (:data:`VH_CENTRELINE_SIGMA_MM`); slices without bone take the nearest slice's value."""
    from scipy import ndimage

    w = occ.reshape(occ.shape[0], -1).sum(axis=1).astype(float)
    jj, ii = np.mgrid[0:occ.shape[1], 0:occ.shape[2]]
    cx = np.tensordot(occ, ii, axes=([1, 2], [0, 1])) / np.maximum(w, 1e-9)
    cy = np.tensordot(occ, jj, axes=([1, 2], [0, 1])) / np.maximum(w, 1e-9)
    ok = w > 0.05 * w.max()
    k = np.arange(len(w))
    c = np.stack([np.interp(k, k[ok], cx[ok]), np.interp(k, k[ok], cy[ok])], axis=1)
    return ndimage.gaussian_filter1d(c, VH_CENTRELINE_SIGMA_MM / sp, axis=0, mode="nearest")


def _mean_on_centreline(occupancies: List[np.ndarray], sp: float) -> np.ndarray:
    """Mean occupancy (z, y, x) of thin bones whose positions differ between the base shapes.

    The two Visible Human legs keep their own rotation about the shaft axis in the canonical
    frame, so their fibulae lie up to ~10 mm apart; a plain mean of a 4 mm-radius shaft would
    fall below 0.5 and vanish. Each case's slices are shifted in-plane from its own (smoothed)
    centreline onto the mean centreline first, so the mean keeps the fibula's shape at its mean
    position.
    """
    from scipy import ndimage

    cents = [_slice_centroids(o.astype(np.float32), sp) for o in occupancies]
    mean_c = np.mean(cents, axis=0)
    out = np.zeros(occupancies[0].shape, np.float64)
    for occ, c in zip(occupancies, cents):
        d = mean_c - c  # (nz, 2) voxels (x, y)
        for k in range(occ.shape[0]):
            out[k] += ndimage.shift(occ[k].astype(np.float32) / 255.0, (d[k, 1], d[k, 0]),
                                    order=1, mode="constant", cval=0.0)
    return out / len(occupancies)

def build_template_from_vh(n_cases: int = VH_TEMPLATE_CASES,
                           seed0: int = VH_TEMPLATE_SEED0) -> Template:
    """The mean of the real-shape ("vh") phantom family, in the anatomical frame.

    Every anatomy of the family is built in the canonical right-ankle frame (the template
    frame, plafond centre at the origin), so the correspondence between cases is exact and no
    registration is needed: each anatomy's tibia and fibula signed distance functions are
    evaluated at the voxel centres of one 1 mm grid (x, y: :data:`VH_TEMPLATE_XY_MM`, z:
    :data:`VH_TEMPLATE_Z_RANGE_MM`), turned into partial-volume occupancies, averaged over the
    ``n_cases`` healthy anatomies (half on each Visible Human leg, see
    :func:`vh_template_seeds`; the fibulae on their mean centreline, see
    :func:`_mean_on_centreline`) and thresholded at 0.5; the grid is then cropped to the bones
    (x, y) + :data:`TEMPLATE_MARGIN_MM`. The syndesmosis box is the default one (template mm).

    Args:
        n_cases: Anatomies averaged.
        seed0: First anatomy seed tried.

    Returns:
        The template (plafond (0, 0, 0)); ``meta`` records the seeds and credits the surfaces.
    """
    from AnkleFractureLib.phantom.real_generator import plan_real
    from AnkleFractureLib.phantom.shapes import VH_CREDIT

    sp = TEMPLATE_SPACING_MM
    (x0, x1), (y0, y1) = VH_TEMPLATE_XY_MM
    z0, z1 = VH_TEMPLATE_Z_RANGE_MM
    axes = [np.arange(lo, hi + 0.5 * sp, sp, dtype=np.float32)
            for lo, hi in ((x0, x1), (y0, y1), (z0, z1))]
    shape = (len(axes[2]), len(axes[1]), len(axes[0]))
    zz, yy, xx = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    x, y, z = xx.ravel(), yy.ravel(), zz.ravel()
    del xx, yy, zz
    seeds = vh_template_seeds(n_cases, seed0)
    prob = np.zeros((2,) + shape, np.float64)
    bases, fibulae = [], []
    for seed in seeds:
        anatomy = plan_real(seed, "right", "fast")[0]
        bases.append(int(anatomy.p.base))
        prob[0] += _occupancy(anatomy.tibia, x, y, z, shape, sp)
        # uint8 keeps 32 fibulae in ~70 MB; 1/255 steps are far below the 0.5 threshold's needs
        fibulae.append(np.round(255.0 * _occupancy(anatomy.fibula, x, y, z, shape, sp))
                       .astype(np.uint8))
    prob[1] = _mean_on_centreline(fibulae, sp)
    prob[0] /= len(seeds)
    origin = np.array([x0, y0, z0])
    full = Volume(_labels_from_prob(prob), (sp, sp, sp), origin, np.eye(3))
    labels = _crop_to_bones(full, TEMPLATE_MARGIN_MM, keep_z=True)
    meta = {
        "built_from": "vh_mean",
        "name": TEMPLATE_NAME_VH,
        "phantom_family": "vh",
        "n_cases": len(seeds),
        "anatomy_seeds": seeds,
        "base_shapes": {str(b): bases.count(b) for b in sorted(set(bases))},
        "weber": "none",
        "averaging": ("per-bone mean of partial-volume occupancies (0.5 - signed distance / "
                      "1 mm, clipped to [0, 1]) of the healthy anatomies in the canonical "
                      "frame (exact correspondence, no registration; each fibula shifted "
                      "slice by slice onto the mean fibular centreline, since the two legs "
                      "differ in their rotation about the shaft), threshold 0.5"),
        "z_range_mm": list(VH_TEMPLATE_Z_RANGE_MM),
        "spacing_mm": sp,
        "surface_points": f"boundary voxels, <= {POINTS_PER_BONE} per bone, seed 0",
        "credit": VH_CREDIT,
        "license": "CC BY 4.0 (derived from the Visible Human bone surfaces; credit required)",
    }
    return _finish(labels, default_box(), meta)


def _default_register() -> Callable[..., np.ndarray]:
    try:
        from AnkleFractureLib.registration.icp import similarity_icp
    except ImportError as exc:  # pragma: no cover - the ICP ships with the library
        raise AnkleFractureError(f"no registration available to build a template ({exc}); "
                                 "pass register=") from None

    def register(ps: np.ndarray, ls: np.ndarray, pd: np.ndarray, ld: np.ndarray) -> np.ndarray:
        return np.asarray(similarity_icp(ps, pd, source_labels=ls, target_labels=ld).matrix)

    return register


def _strip_scale(matrix: np.ndarray, pivot: np.ndarray) -> np.ndarray:
    """The rigid part of a similarity, mapping ``pivot`` where the similarity maps it."""
    m = np.asarray(matrix, dtype=float)
    a = m[:3, :3]
    u, _, vt = np.linalg.svd(a)
    r = u @ vt
    if np.linalg.det(r) < 0:  # a proper rotation only; the mirror was applied before
        u[:, -1] *= -1
        r = u @ vt
    out = np.eye(4)
    out[:3, :3] = r
    out[:3, 3] = _apply(m, pivot[None, :])[0] - r @ pivot
    return out


def _check_case_inputs(labels: List[Volume], sides: List[str]) -> None:
    """Raise InputError for no case, mismatched lengths or a side other than left/right."""
    n = len(labels)
    if n == 0:
        raise InputError(None, "build_template_from_cases needs at least one healthy case")
    if len(sides) != n:
        raise InputError(None, f"{n} label maps but {len(sides)} sides")
    for k, side in enumerate(sides):
        if side not in ("left", "right"):
            raise InputError(None, f"case {k}: side must be 'left' or 'right', got {side!r}")


def _cases_to_first(labels: List[Volume], sides: List[str], register: Callable[..., np.ndarray]
                    ) -> Tuple[List[np.ndarray], np.ndarray]:
    """(4x4 per case: its patient mm -> the first case's mirrored patient mm, the first case's
    surface points (N, 3) mm), left ankles mirrored (x -> -x) first.

    Raises:
        InputError: A case without both bones.
        AnkleFractureError: ``register`` returned an invalid matrix.
    """
    mirror = np.diag([-1.0, 1.0, 1.0, 1.0])
    pre = [mirror if s == "left" else np.eye(4) for s in sides]
    pts, plab = [], []
    for k, lab in enumerate(labels):
        p, l_ = surface_points(lab, POINTS_PER_BONE, seed=0)
        if not {1, 2} <= set(np.unique(l_).tolist()):
            raise InputError(lab.meta.get("source"),
                             f"case {k} needs both tibia (1) and fibula (2)")
        pts.append(_apply(pre[k], p))
        plab.append(l_)
    to_ref = [pre[0]]
    for k in range(1, len(labels)):
        t = np.asarray(register(pts[k], plab[k], pts[0], plab[0]), dtype=float)
        if t.shape != (4, 4) or not np.all(np.isfinite(t)):
            raise AnkleFractureError(f"registration of case {k} returned an invalid matrix")
        to_ref.append(t @ pre[k])
    return to_ref, pts[0]


def _mean_labels(labels: List[Volume], to_ref: List[np.ndarray], frame: np.ndarray, size,
                 origin, sp: float) -> Volume:
    """Per-bone mean of the cases' masks on an isotropic grid (``sp`` mm) in ``frame``."""
    from AnkleFractureLib.preprocessing.resample import resample_to_grid

    n = len(labels)
    shape = tuple(int(s) for s in size[::-1])
    prob = np.zeros((2,) + shape, np.float32)
    seen = np.zeros(shape, np.float32)
    for k in range(n):
        m = frame @ to_ref[k]
        prob += _resample_masks(labels[k], m, size, (sp, sp, sp), origin)
        # Field of view of case k: a voxel outside a scan is unknown, not background, so
        # the mean is over the cases that saw it (the scans end at different heights).
        fov = labels[k].with_array(np.ones(labels[k].shape, np.uint8))
        seen += resample_to_grid(fov, size, (sp, sp, sp), origin, np.eye(3), "nearest", 0,
                                 transform=np.linalg.inv(m)).array
    prob /= np.maximum(seen, 1.0)[None]
    prob[:, seen < 0.5 * n] = 0.0  # fewer than half of the cases: no reliable mean
    return Volume(_labels_from_prob(prob), (sp, sp, sp), origin, np.eye(3))


def _template_frame(mean1: Volume, register: Callable[..., np.ndarray],
                    reference: Optional[Template]) -> Tuple[np.ndarray, "SyndesmosisBox"]:
    """(4x4 rotation frame, box) of the template: the reference's axes and box, or the tibial
    axis with patient x made orthogonal to it and the default box."""
    if reference is not None:
        mp, ml = surface_points(mean1, POINTS_PER_BONE, seed=0)
        t = np.asarray(register(mp, ml, reference.points, reference.point_labels), dtype=float)
        box = SyndesmosisBox(reference.box.centre, reference.box.axes, reference.box.size_mm,
                             reference.box.spacing_mm)
        return _strip_scale(t, mp.mean(axis=0)), box
    z = _tibial_axis(mean1)
    x = np.array([1.0, 0.0, 0.0]) - z[0] * z
    x /= np.linalg.norm(x)
    frame = np.eye(4)
    frame[:3, :3] = np.stack([x, np.cross(z, x), z])  # rows: template axes in ref mm
    return frame, default_box()


def build_template_from_cases(labels: List[Volume], sides: List[str],
                              register: Optional[Callable[..., np.ndarray]] = None, *,
                              reference: Optional[Template] = None,
                              case_ids: Optional[List[str]] = None) -> Template:
    """A probabilistic template from N healthy label maps (a hospital's own cases).

    Steps: mirror left ankles (x -> -x); register each case's surface points to the first
    case's with ``register`` (similarity); average the per-bone masks (linear interpolation)
    in that frame; orient the frame; resample every case again straight into the final frame
    (one interpolation per case), average, threshold at 0.5; re-centre on :func:`find_plafond`.

    Orientation of the final frame: with ``reference`` (e.g. the shipped template), the mean
    is registered to it and the rigid part (scale removed, so the hospital's own size is kept)
    gives the axes, so the reference's syndesmosis box keeps its anatomical meaning. Without
    it: z = the tibial long axis (superior), x = the first case's patient x made orthogonal to
    it (supine CT: patient left-right is close to medio-lateral), y = z x x.

    Args:
        labels: Label maps (1 tibia, 2 fibula), each on its own grid.
        sides: "left" or "right" per case.
        register: ``register(points_src, labels_src, points_dst, labels_dst) -> 4x4`` mapping
            source mm to target mm. Default: the team's similarity ICP.
        reference: Optional template whose axes (and box) the result adopts.
        case_ids: Optional names recorded in ``meta``.

    Returns:
        The template (plafond at the origin; box from ``reference`` or the default box).

    Raises:
        InputError: Empty input, mismatched lengths, a bad side or a case without both bones.
    """
    _check_case_inputs(labels, sides)
    n = len(labels)
    if register is None:
        register = _default_register()
    to_ref, pts0 = _cases_to_first(labels, sides, register)

    # Pass 1: mean in the first case's frame (1.5 mm, enough to orient and find the plafond).
    size1, origin1 = _tight_grid(pts0, 1.5, 15.0)
    mean1 = _mean_labels(labels, to_ref, np.eye(4), size1, origin1, 1.5)
    frame, box = _template_frame(mean1, register, reference)
    plafond1 = _apply(frame, find_plafond(mean1)[None, :])[0]
    frame[:3, 3] -= plafond1
    # Pass 2: every case straight into the final frame at the template spacing.
    sp = TEMPLATE_SPACING_MM
    bone = _apply(frame, mean1.index_to_physical(np.argwhere(mean1.array > 0)[:, ::-1]))
    size2, origin2 = _tight_grid(bone, sp, TEMPLATE_MARGIN_MM)
    final = _mean_labels(labels, to_ref, frame, size2, origin2, sp)
    # Re-centre exactly on the plafond of the final mean.
    plafond2 = find_plafond(final)
    final = Volume(final.array, final.spacing, np.asarray(final.origin) - plafond2, np.eye(3))
    meta = {
        "built_from": "cases",
        "n_cases": n,
        "sides": list(sides),
        "case_ids": list(case_ids) if case_ids is not None else None,
        "reference_case": 0,
        "orientation": "reference template" if reference is not None else
                       "tibial axis + patient x",
        "averaging": ("per-bone mean of linearly resampled masks over the cases whose field "
                      "of view holds the voxel (>= half of them), threshold 0.5"),
        "spacing_mm": sp,
        "surface_points": f"boundary voxels, <= {POINTS_PER_BONE} per bone, seed 0",
    }
    return _finish(final, box, meta)
