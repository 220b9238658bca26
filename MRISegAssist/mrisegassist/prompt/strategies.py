"""Box prompts derived from a reference mask (the MedSAM2 evaluation seed), for benchmarks and tests.

* :func:`objects_from_mask`: a label map's values (``mode="labels"``) or a mask's 3D connected components
  (``mode="components"``, 26-connected) as separate objects, dropping those under ``min_voxels``;
* :func:`box_slices`: THE A/B slice rule (used by the CLI, the service, the Slicer/browser ROIs, the atlas and
  the cascade): ``"A"`` = the middle slice of a z-range, ``"B"`` = the slices at 1/4, 1/2 and 3/4 of it;
* :func:`boxes_for_object`: boxes on those slices of the object's z-range; each box is the object's
  bounding rectangle on that slice, enlarged by ``margin`` voxels and clipped to the slice;
* :func:`prompts_from_mask`: both, as :class:`ObjectPrompt` list (optionally with the reference z-range).

Arrays are ``[k, j, i]``; boxes are inclusive voxel rectangles on axial slices (constant ``k``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage

from ..errors import InputError
from .base import Box2D, ObjectPrompt

STRATEGIES = ("A", "B")


def _check_3d(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 3:
        raise InputError(f"{what}: expected a 3D [k, j, i] array, got shape {array.shape}")
    return array


def objects_from_mask(mask_or_labels: np.ndarray, mode: str = "components",
                      min_voxels: int = 1) -> list[tuple[int, np.ndarray]]:
    """Split a reference into objects: ``[(object_id, bool mask [k, j, i]), ...]``.

    ``mode="labels"``: one object per non-zero value (id = the value). ``mode="components"``: one object per
    26-connected component of ``mask_or_labels > 0`` (ids 1..n, largest first). Objects with fewer than
    ``min_voxels`` voxels are dropped.
    """
    ref = _check_3d(mask_or_labels, "reference mask")
    if mode == "labels":
        values = [int(v) for v in np.unique(ref) if v > 0]
        objects = [(v, ref == v) for v in values]
    elif mode == "components":
        labels, n = ndimage.label(ref > 0, structure=np.ones((3, 3, 3), bool))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        order = np.argsort(-sizes, kind="stable")
        objects = []
        slices = ndimage.find_objects(labels)
        for rank, idx in enumerate(order, start=1):
            m = np.zeros(ref.shape, dtype=bool)
            sl = slices[idx]
            m[sl] = labels[sl] == idx + 1
            objects.append((rank, m))
    else:
        raise InputError(f"unknown mode {mode!r}; use 'labels' or 'components'")
    return [(i, m) for i, m in objects if int(m.sum()) >= max(min_voxels, 1)]


def z_extent(mask: np.ndarray) -> tuple[int, int]:
    """Inclusive ``(k0, k1)`` of the slices where ``mask`` is non-empty."""
    ks = np.nonzero(_check_3d(mask, "object mask").any(axis=(1, 2)))[0]
    if ks.size == 0:
        raise InputError("object mask is empty")
    return int(ks[0]), int(ks[-1])


def mask_bounds(mask: np.ndarray) -> tuple[int, int, int, int]:
    """In-plane bounds ``(i0, j0, i1, j1)`` (inclusive) of a ``[k, j, i]`` mask over all its slices."""
    jj, ii = np.nonzero(_check_3d(mask, "object mask").any(axis=0))
    if jj.size == 0:
        raise InputError("object mask is empty")
    return int(ii.min()), int(jj.min()), int(ii.max()), int(jj.max())


#: Strategy -> fractions of the z-range whose slices carry a box: A = the middle, B = the quartiles.
STRATEGY_FRACTIONS = {"A": ((1, 2),), "B": ((1, 4), (1, 2), (3, 4))}


def _slice_at(z0: int, z1: int, num: int, den: int) -> int:
    """The slice nearest to fraction ``num/den`` of ``z0..z1``; a tie goes towards the middle of the range (for
    the middle itself: the lower slice). Exact integer arithmetic."""
    twice = 2 * num * (z1 - z0)  # 2 * den * position
    if 2 * num < den:
        return z0 + (twice + den) // (2 * den)          # round half up
    if 2 * num > den:
        return z0 + (twice + den - 1) // (2 * den)      # round half down
    return z0 + (z1 - z0) // 2


def box_slices(z_range: tuple[int, int], strategy: str) -> list[int]:
    """The prompted slices of an inclusive z-range ``(k0, k1)``: the one rule of every front end and the engine.

    Strategy ``"A"``: the middle slice; ``"B"``: the slices at 1/4, 1/2 and 3/4 of the range. Each is the slice
    nearest to that fraction; a tie (the position falls between two slices) goes towards the middle of the
    range, and for the middle itself to the lower slice, so the rule is symmetric about the middle: ``0..3`` ->
    A ``[1]``, B ``[1, 2]``; ``8..14`` -> B ``[10, 11, 12]``. Duplicates (thin ranges) are dropped; sorted.
    """
    if strategy not in STRATEGIES:
        raise InputError(f"unknown box strategy {strategy!r}; use 'A' (one box) or 'B' (three boxes)")
    z0, z1 = int(z_range[0]), int(z_range[1])
    if z1 < z0:
        raise InputError(f"z-range {z0}..{z1} is empty")
    return sorted({_slice_at(z0, z1, num, den) for num, den in STRATEGY_FRACTIONS[strategy]})


def slice_box(mask: np.ndarray, k: int, margin: int = 0) -> Box2D:
    """Bounding rectangle of ``mask[k]`` enlarged by ``margin`` voxels, clipped to the slice."""
    jj, ii = np.nonzero(mask[k])
    if jj.size == 0:
        raise InputError(f"object is empty on slice {k}")
    nj, ni = mask.shape[1:]
    return Box2D(int(k), max(int(ii.min()) - margin, 0), max(int(jj.min()) - margin, 0),
                 min(int(ii.max()) + margin, ni - 1), min(int(jj.max()) + margin, nj - 1))


def boxes_for_object(mask: np.ndarray, strategy: str = "A", margin: int = 0) -> list[Box2D]:
    """Boxes of one object (bool ``[k, j, i]``): strategy A (middle slice) or B (quartile slices).

    A chosen slice on which the object is absent (a z-gap) moves to the nearest slice where it is present.
    """
    mask = _check_3d(mask, "object mask").astype(bool, copy=False)
    present = np.nonzero(mask.any(axis=(1, 2)))[0]
    if present.size == 0:
        raise InputError("object mask is empty")
    ks = []
    for k in box_slices((int(present[0]), int(present[-1])), strategy):
        k = int(present[np.argmin(np.abs(present - k))])
        if k not in ks:
            ks.append(k)
    return [slice_box(mask, k, margin) for k in sorted(ks)]


def prompts_from_mask(ref: np.ndarray, strategy: str = "A", *, mode: str = "components",
                      min_voxels: int = 1, margin: int = 0, with_z_range: bool = False,
                      names: Optional[dict[int, str]] = None) -> list[ObjectPrompt]:
    """One :class:`ObjectPrompt` per object of ``ref`` (see :func:`objects_from_mask`), boxes by strategy.

    ``with_z_range=True`` gives each prompt the object's reference z-range (propagation then stays inside it).
    """
    objects = objects_from_mask(ref, mode=mode, min_voxels=min_voxels)
    if not objects:
        raise InputError(f"reference mask has no object of at least {min_voxels} voxels")
    prompts = []
    for oid, m in objects:
        z = z_extent(m) if with_z_range else None
        prompts.append(ObjectPrompt(oid, boxes_for_object(m, strategy, margin), z, (names or {}).get(oid, "")))
    return prompts
