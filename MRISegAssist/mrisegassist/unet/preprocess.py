"""Preprocessing shared by U-Net training and inference (identical in both, so models see the same inputs).

* :func:`foreground_mask` / :func:`normalise`: z-score inside the head/brain region of one sequence.
* :class:`ModelGrid`: maps a case's reference grid onto the model grid (axis-aligned LPS, model spacing)
  and maps per-class probabilities back. When the reference grid is already axis-aligned (any axis order or
  flips) at the model spacing the mapping is an exact transpose/flip of the array, otherwise SimpleITK
  linear resampling.
* :func:`foreground_bbox`: bounding box of the foreground, to run the network on the brain only.

Arrays are ``[k, j, i]``; model-grid arrays are ``[S, P, L]`` (k = superior, j = posterior, i = left).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..volume import Geometry

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def foreground_mask(array: np.ndarray) -> np.ndarray:
    """Boolean ``[k, j, i]`` mask of voxels that are not background.

    Background is the most common value on the volume's border when it covers at least half the border
    (0 in raw skull-stripped scans, a negative constant in pre-z-scored BraTS data); otherwise every voxel
    counts as foreground (head scans with noisy background).
    """
    border = np.concatenate([array[[0, -1]].ravel(), array[:, [0, -1]].ravel(), array[:, :, [0, -1]].ravel()])
    values, counts = np.unique(border, return_counts=True)
    top = int(np.argmax(counts))
    if counts[top] < 0.5 * border.size:
        return np.ones(array.shape, dtype=bool)
    mask = array != values[top]
    return mask if mask.any() else np.ones(array.shape, dtype=bool)


def normalise(array: np.ndarray, mode: str = "zscore", mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-sequence intensity normalisation; returns a new float32 array (input untouched).

    ``"zscore"``: subtract the mean and divide by the standard deviation of the foreground voxels, set the
    background to 0 and clip to [-8, 8] (robust to raw int16 scans and to already z-scored data).
    ``"nonzero"``: MONAI's ``NormalizeIntensity(nonzero=True)`` (the MONAI BraTS models' convention): mean
    and standard deviation of the non-zero voxels, those voxels z-scored, zeros left at 0, no clipping.
    ``"none"``: a float32 copy.
    """
    out = np.asarray(array, dtype=np.float32).copy()
    if mode == "none":
        return out
    if mode == "nonzero":
        nz = out != 0
        if nz.any():
            values = out[nz]
            std = float(values.std())
            out[nz] = (values - float(values.mean())) / (std if std > 0 else 1.0)
        return out
    if mode != "zscore":
        raise ValueError(f"unknown normalisation {mode!r} (use 'zscore', 'nonzero' or 'none')")
    fg = foreground_mask(out) if mask is None else mask
    values = out[fg]
    mean, std = float(values.mean()), float(values.std())
    out -= mean
    out /= max(std, 1e-6)
    out[~fg] = 0.0
    np.clip(out, -8.0, 8.0, out=out)
    return out


def foreground_bbox(mask: np.ndarray, margin: int = 4) -> tuple[slice, ...]:
    """Slices (one per axis) of the bounding box of ``mask`` grown by ``margin`` voxels (whole volume if empty)."""
    if not mask.any():
        return tuple(slice(0, s) for s in mask.shape)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _signed_permutation(direction: np.ndarray) -> Optional[tuple[list[int], list[int]]]:
    """For a direction matrix that is a signed permutation: (source index axis, sign) per LPS axis."""
    rounded = np.round(direction)
    if not np.allclose(direction, rounded, atol=1e-3) or not np.allclose(np.abs(rounded).sum(axis=0), 1):
        return None
    src = [int(np.flatnonzero(rounded[d])[0]) for d in range(3)]
    sign = [int(rounded[d, src[d]]) for d in range(3)]
    return (src, sign) if sorted(src) == [0, 1, 2] else None


@dataclass
class ModelGrid:
    """Mapping between a reference grid (``source``) and the model grid (``target``, axis-aligned LPS)."""

    source: Geometry
    target: Geometry
    axes: Optional[tuple[int, ...]] = None  # fast path: target array = flip(transpose(source, axes), flips)
    flips: tuple[int, ...] = ()

    @classmethod
    def for_geometry(cls, source: Geometry, spacing: Sequence[Optional[float]]) -> "ModelGrid":
        """Model grid covering ``source`` at ``spacing`` (mm, x/y/z = L/P/S; ``None`` keeps the native spacing)."""
        direction = source.direction_matrix
        perm = _signed_permutation(direction)
        if perm is not None:
            src, sign = perm
            native = [source.spacing[src[d]] for d in range(3)]
        else:  # oblique: native spacing of the axis closest to each LPS axis
            native = [source.spacing[int(np.argmax(np.abs(direction[d])))] for d in range(3)]
        target_spacing = [float(native[d] if s in (None, 0) else s) for d, s in enumerate(spacing)]
        if perm is not None and np.allclose(target_spacing, native, rtol=1e-4, atol=1e-5):
            size = [source.size[src[d]] for d in range(3)]
            corner = np.array([0 if sign[d] > 0 else source.size[src[d]] - 1 for d in range(3)], dtype=float)
            index = np.zeros(3)
            index[src] = corner
            origin = (source.ijk_to_lps @ np.r_[index, 1.0])[:3]
            target = Geometry(tuple(size), tuple(native), tuple(float(o) for o in origin), IDENTITY)
            # array axes: target axis (2 - d) comes from source axis (2 - src[d])
            axes = tuple(2 - src[2 - a] for a in range(3))
            flips = tuple(a for a in range(3) if sign[2 - a] < 0)
            return cls(source, target, axes, flips)
        corners = source.corners_lps()
        lo, hi = corners.min(axis=0), corners.max(axis=0)
        sp = np.asarray(target_spacing)
        size = np.maximum(np.round((hi - lo) / sp).astype(int), 1)
        origin = lo + sp / 2
        return cls(source, Geometry(tuple(int(s) for s in size), tuple(float(s) for s in sp),
                                    tuple(float(o) for o in origin), IDENTITY))

    @property
    def exact(self) -> bool:
        return self.axes is not None

    def to_model(self, array: np.ndarray, interpolation: str = "linear") -> np.ndarray:
        """Reference-grid ``[k, j, i]`` array -> model-grid ``[S, P, L]`` array (a new array)."""
        if self.exact:
            out = np.transpose(array, self.axes)
            return np.ascontiguousarray(np.flip(out, self.flips) if self.flips else out)
        interp = sitk.sitkNearestNeighbor if interpolation == "nearest" else sitk.sitkLinear
        return _resample(array, self.source, self.target, interp)

    def to_reference(self, array: np.ndarray, interpolation: str = "linear", default: float = 0.0) -> np.ndarray:
        """Model-grid ``[S, P, L]`` array -> reference-grid ``[k, j, i]`` array (a new array)."""
        if self.exact:
            out = np.flip(array, self.flips) if self.flips else array
            return np.ascontiguousarray(np.transpose(out, np.argsort(self.axes)))
        interp = sitk.sitkNearestNeighbor if interpolation == "nearest" else sitk.sitkLinear
        return _resample(array, self.target, self.source, interp, default)


def _resample(array: np.ndarray, source: Geometry, target: Geometry, interpolation: int,
              default: float = 0.0) -> np.ndarray:
    image = source.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array)))
    reference = target.apply_to(sitk.Image(list(target.size), sitk.sitkUInt8))
    out = sitk.Resample(image, reference, sitk.Transform(), interpolation, float(default), image.GetPixelID())
    return sitk.GetArrayFromImage(out)


def prepare_inputs(images: dict[str, np.ndarray], names: Sequence[str], grid: ModelGrid,
                   normalisation: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Stack, map to the model grid and normalise sequences.

    Returns ``(x, fg)``: ``x`` is ``(C, S, P, L)`` float32 on the model grid and ``fg`` the union of the
    sequences' foreground masks ``(S, P, L)`` (bool).
    """
    x, fg = None, None
    for c, name in enumerate(names):  # filled channel by channel: no list of channels stacked at the end
        moved = grid.to_model(np.asarray(images[name], dtype=np.float32))
        mask = foreground_mask(moved)
        if x is None:
            x = np.empty((len(names),) + moved.shape, dtype=np.float32)
        x[c] = normalise(moved, normalisation.get(name, "zscore"), mask)
        del moved
        fg = mask if fg is None else (fg | mask)
    return x, fg
