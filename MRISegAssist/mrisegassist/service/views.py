"""Which slices a prompt propagates across: the volume as seen from the slice view the prompt was drawn in.

Slicer's axial, coronal and sagittal views cut the volume along planes whose normals are the RAS axes S, A and R
(:data:`VIEWS`), whatever the order in which the file stores its voxels. A prompt carries the normal of its view
(``ObjectPrompt.view``, RAS) and its boxes and points in the IJK of :func:`view_grid`, the grid the engine works
on, whose ``k`` axis is that normal. This module is the one place of that rule:

* When the volume axis closest to the normal is within :data:`MAX_TILT_DEG` of it (every non-oblique
  acquisition, and oblique ones tilted less), the view grid holds the volume's own voxels with its axes
  transposed: ``k`` is the voxel index along that axis in the volume's own numbering (no flip, no
  interpolation), so results map back onto the input grid exactly. In the plane, ``i`` is the volume axis
  closest to the view's horizontal screen axis (R-L for axial and coronal views, A-P for sagittal ones, as Slicer
  draws them) and ``j`` the other one, so a volume stored in any axis order gives the same view array.
* Otherwise (an oblique volume seen from a view it is tilted against) the view grid is a new grid whose ``k``
  axis is the normal and whose ``i`` axis is the view's horizontal screen axis projected into the plane, with
  the volume's spacing (along the normal: that of the volume axis closest to it; in the plane: the finer of the
  other two), covering the whole volume. Images are resampled onto it (linear) and the engine's logits back onto
  the input grid (linear, then ``> 0``).

``normal=None`` is the volume's own ``k`` slices (the command line's ``--box K,...``, older clients).

Also here: Slicer's ROI crop rule (:func:`voxel_extent`: the voxels wholly inside the IJK bounding box of a ROI's
corners, as ``vtkSlicerCropVolumeLogic.GetVoxelBasedCropOutputExtent`` computes them), applied in any view grid.
Arrays are ``[k, j, i]``; extents ``(i0, i1, j0, j1, k0, k1)`` inclusive; normals and points RAS (millimetres, in
the volume's own frame, i.e. the frame of its IJK->RAS matrix).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError
from ..volume import LPS_TO_RAS, Geometry, Volume, resample_to

Extent = tuple[int, int, int, int, int, int]
#: RAS normals of Slicer's standard slice views (Red: axial, Green: coronal, Yellow: sagittal).
VIEWS: dict[str, tuple[float, float, float]] = {"axial": (0.0, 0.0, 1.0), "coronal": (0.0, 1.0, 0.0),
                                                "sagittal": (1.0, 0.0, 0.0)}
#: Largest angle (degrees) between a view's normal and the volume axis used as its slice axis without resampling.
MAX_TILT_DEG = 20.0
#: Slicer's tolerance (voxels) in the ROI crop rule.
CROP_TOLERANCE = 1e-3


def view_name(normal: Optional[Sequence[float]]) -> str:
    """``axial`` / ``coronal`` / ``sagittal`` for a normal along S / A / R (either sign), ``oblique`` otherwise,
    ``volume`` for ``None``."""
    if normal is None:
        return "volume"
    n = unit(normal)
    for name, axis in VIEWS.items():
        if abs(float(np.dot(n, axis))) > math.cos(math.radians(1.0)):
            return name
    return "oblique"


def unit(vector: Sequence[float]) -> np.ndarray:
    v = np.asarray(vector, dtype=float).reshape(3)
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0:
        raise InputError(f"view normal {tuple(vector)} is not a direction")
    return v / norm


def _screen_x_ras(normal_ras: np.ndarray) -> np.ndarray:
    """The view's horizontal screen axis (as Slicer draws the standard views): R-L unless the normal is closest
    to R (a sagittal view), then A-P."""
    return np.array([0.0, 1.0, 0.0]) if int(np.argmax(np.abs(normal_ras))) == 0 else np.array([1.0, 0.0, 0.0])


@dataclass(frozen=True)
class ViewGrid:
    """The grid an engine works on for prompts drawn in one view (see the module docstring).

    ``order``: the volume's ITK axes (0 = i, 1 = j, 2 = k) that are the view grid's ``i``, ``j``, ``k``, or
    ``None`` when the view grid is resampled. ``normal``: the view's RAS unit normal (``None``: the volume's own
    ``k`` slices).
    """

    source: Geometry
    geometry: Geometry
    normal: Optional[tuple[float, float, float]]
    order: Optional[tuple[int, int, int]]

    @property
    def exact(self) -> bool:
        """The view grid holds the volume's own voxels (no resampling)."""
        return self.order is not None

    @property
    def slice_axis(self) -> str:
        """The volume axis the view's slices are taken along: ``"i"``, ``"j"``, ``"k"``, or ``"oblique"``."""
        return "ijk"[self.order[2]] if self.order is not None else "oblique"

    @property
    def _axes(self) -> tuple[int, int, int]:
        """``np.transpose`` axes taking a volume's ``[k, j, i]`` array to the view's ``[k, j, i]``."""
        o = self.order
        return (2 - o[2], 2 - o[1], 2 - o[0])

    def to_view(self, array: np.ndarray, interpolation: str = "linear", default: float = 0.0) -> np.ndarray:
        """A ``[k, j, i]`` (or ``[c, k, j, i]``) array on the volume's grid, on the view grid (a contiguous copy;
        the input is never modified)."""
        return self._map(array, self.source, self.geometry, interpolation, default, forward=True)

    def from_view(self, array: np.ndarray, interpolation: str = "linear", default: float = 0.0) -> np.ndarray:
        """A ``[k, j, i]`` array on the view grid, back on the volume's grid (exactly, for an exact view grid)."""
        return self._map(array, self.geometry, self.source, interpolation, default, forward=False)

    def _map(self, array: np.ndarray, src: Geometry, dst: Geometry, interpolation: str, default: float,
             forward: bool) -> np.ndarray:
        array = np.asarray(array)
        if array.ndim == 4:
            return np.stack([self._map(a, src, dst, interpolation, default, forward) for a in array])
        if tuple(array.shape) != src.shape:
            raise InputError(f"array shape {array.shape} does not match the grid {src.shape}")
        if self.order is not None:
            axes = self._axes if forward else tuple(int(a) for a in np.argsort(self._axes))
            return np.ascontiguousarray(np.transpose(array, axes))
        return resample_to(Volume(array, src), dst, interpolation, default).array

    def ras_to_ijk(self, points_ras: np.ndarray) -> np.ndarray:
        """``(N, 3)`` RAS points (the volume's frame) -> ``(N, 3)`` continuous ``(i, j, k)`` of the view grid."""
        pts = np.atleast_2d(np.asarray(points_ras, dtype=float))
        return self.geometry.lps_to_continuous_ijk((LPS_TO_RAS[:3, :3] @ pts.T).T)

    def extent(self, corners_ras: np.ndarray, name: str = "ROI") -> Extent:
        """Slicer's crop rule in the view grid for a box given by its corners (RAS, the volume's frame), clipped
        to the grid (see :func:`voxel_extent`)."""
        return voxel_extent(self.ras_to_ijk(corners_ras), self.geometry.size, name)

    def source_index(self, point) -> tuple[int, int, int]:
        """Array index ``(k, j, i)`` on the volume's grid of a view-grid voxel (a :class:`Point2D` or anything
        with ``k``, ``j``, ``i``), clipped to the grid."""
        view_ijk = np.array([point.i, point.j, point.k], dtype=float)
        if self.order is not None:
            src = [0, 0, 0]
            for axis, value in zip(self.order, view_ijk):
                src[axis] = int(value)
        else:
            lps = (self.geometry.ijk_to_lps @ np.r_[view_ijk, 1.0])[:3]
            src = [int(math.floor(v + 0.5)) for v in self.source.lps_to_continuous_ijk(lps)[0]]
        src = [min(max(v, 0), self.source.size[a] - 1) for a, v in enumerate(src)]
        return (src[2], src[1], src[0])

    def voxel(self, point_ras: Sequence[float]) -> tuple[int, int, int]:
        """``(i, j, k)`` of the view-grid voxel holding a RAS point (nearest voxel centre)."""
        ijk = self.ras_to_ijk(np.asarray(point_ras, dtype=float))[0]
        return tuple(int(math.floor(v + 0.5)) for v in ijk)


def voxel_extent(corners_ijk: np.ndarray, size: Sequence[int], name: str = "ROI") -> Extent:
    """Inclusive ``(i0, i1, j0, j1, k0, k1)`` of the voxels wholly inside the IJK bounding box of ``corners_ijk``
    (``(N, 3)`` continuous ``(i, j, k)``), within :data:`CROP_TOLERANCE` voxel: Slicer's rule
    (``ceil(lo + 0.5 - tol) .. floor(hi - 0.5 + tol)`` per axis). Along an axis where the box is thinner than a
    voxel (a flat box) the voxel nearest to its centre is taken. Clipped to ``size`` (``(i, j, k)``); a box outside
    the grid raises :class:`InputError`."""
    ijk = np.atleast_2d(np.asarray(corners_ijk, dtype=float))
    lo, hi = ijk.min(axis=0), ijk.max(axis=0)
    out = []
    for axis in range(3):
        a = int(math.ceil(lo[axis] + 0.5 - CROP_TOLERANCE))
        b = int(math.floor(hi[axis] - 0.5 + CROP_TOLERANCE))
        if b < a:
            a = b = int(math.floor((lo[axis] + hi[axis]) / 2.0 + 0.5))
        a, b = max(a, 0), min(b, int(size[axis]) - 1)
        if b < a:
            raise InputError(f"{name} lies outside the volume")
        out += [a, b]
    return tuple(out)


def view_grid(geometry: Geometry, normal: Optional[Sequence[float]] = None) -> ViewGrid:
    """The grid on which prompts drawn in the view with RAS ``normal`` are given and propagated."""
    if normal is None:
        return ViewGrid(geometry, geometry, None, (0, 1, 2))
    n_ras = unit(normal)
    n_lps = LPS_TO_RAS[:3, :3] @ n_ras
    x_lps = LPS_TO_RAS[:3, :3] @ _screen_x_ras(n_ras)
    d = geometry.direction_matrix  # columns: the volume's i, j, k axes (LPS)
    cos = np.abs(d.T @ n_lps)
    a = int(np.argmax(cos))
    if cos[a] >= math.cos(math.radians(MAX_TILT_DEG)) - 1e-9:
        rest = [b for b in range(3) if b != a]
        i_axis = max(rest, key=lambda b: (abs(float(d[:, b] @ x_lps)), -b))
        j_axis = next(b for b in rest if b != i_axis)
        order = (i_axis, j_axis, a)
        view = Geometry(tuple(geometry.size[o] for o in order), tuple(geometry.spacing[o] for o in order),
                        geometry.origin, tuple(float(v) for v in d[:, list(order)].ravel()))
        return ViewGrid(geometry, view, tuple(float(v) for v in n_ras), order)
    return ViewGrid(geometry, _resampled_grid(geometry, n_lps, x_lps, a), tuple(float(v) for v in n_ras), None)


def _resampled_grid(geometry: Geometry, n_lps: np.ndarray, x_lps: np.ndarray, a: int) -> Geometry:
    """A grid with ``k`` along ``n_lps`` and ``i`` along ``x_lps`` projected into the plane, covering ``geometry``."""
    u = x_lps - float(x_lps @ n_lps) * n_lps
    u /= np.linalg.norm(u)
    v = np.cross(n_lps, u)
    axes = np.stack([u, v, n_lps], axis=1)
    in_plane = min(geometry.spacing[b] for b in range(3) if b != a)
    spacing = np.array([in_plane, in_plane, geometry.spacing[a]])
    coords = geometry.corners_lps() @ axes  # edges of the volume in the new frame
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    size = np.maximum(np.round((hi - lo) / spacing).astype(int), 1)
    origin = axes @ (lo + spacing / 2.0)
    return Geometry(tuple(int(s) for s in size), tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
                    tuple(float(x) for x in axes.ravel()))
