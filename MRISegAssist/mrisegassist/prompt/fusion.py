"""Multi-object fusion of per-object logits into one label map.

Voxel by voxel: softmax over the objects' logits plus a background logit of 0 (so a voxel becomes an object
only where that object's logit is positive), argmax; then, per object, only its largest 26-connected component
is kept (islands and stray fragments go back to background). Work is done inside the union bounding box of
the objects' positive logits, each object on its own box, so memory grows with the objects, not with the number
of objects times the volume.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from ..errors import InputError
from .base import ObjectResult

_FULL = np.ones((3, 3, 3), dtype=bool)


def union_bbox(masks: Iterable[np.ndarray]) -> tuple[slice, slice, slice] | None:
    """Smallest ``(k, j, i)`` slices holding every non-zero voxel of ``masks`` (3D, any dtype); ``None`` if all
    are empty. Reads each mask once along ``k``, then only its occupied slab (no full-size temporary)."""
    lo, hi = None, None
    for m in masks:
        if not m.size:
            continue
        k = np.flatnonzero(m.reshape(m.shape[0], -1).any(axis=1))
        if not k.size:
            continue
        slab = m[k[0]:k[-1] + 1]
        j = np.flatnonzero(slab.any(axis=(0, 2)))
        i = np.flatnonzero(slab[:, j[0]:j[-1] + 1].any(axis=(0, 1)))
        mlo = np.array([k[0], j[0], i[0]])
        mhi = np.array([k[-1], j[-1], i[-1]])
        lo = mlo if lo is None else np.minimum(lo, mlo)
        hi = mhi if hi is None else np.maximum(hi, mhi)
    if lo is None:
        return None
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))


def label_counts(labels: np.ndarray, minlength: int = 0) -> np.ndarray:
    """Voxels per value of an integer label map ``[k, j, i]`` (``np.bincount`` of its non-zero box; index 0
    counts only the background inside that box)."""
    box = union_bbox([labels])
    if box is None:
        return np.zeros(max(minlength, 1), dtype=np.int64)
    return np.bincount(labels[box].ravel(), minlength=minlength)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a bool array (a copy; empty stays empty)."""
    labels, n = ndimage.label(mask, structure=_FULL)
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def fuse(results: Sequence[ObjectResult], keep_largest_component: bool = True) -> np.ndarray:
    """Fuse per-object results into a ``uint16`` label map ``[k, j, i]`` (0 = background, values = object ids).

    A voxel gets the object with the highest logit among those with a positive logit (softmax with a
    background logit of 0, then argmax; a tie goes to the earlier object). ``keep_largest_component`` then keeps
    each object's largest 26-connected component only. Each object is read on its own box
    (:attr:`ObjectResult.box`): no full-volume array per object.
    """
    results = list(results)
    if not results:
        raise InputError("nothing to fuse: no object result")
    shape = results[0].shape
    for r in results:
        if r.shape != shape:
            raise InputError(f"object {r.object_id}: volume shape {r.shape} differs from {shape}")
        if not 1 <= r.object_id <= np.iinfo(np.uint16).max:
            raise InputError(f"object id {r.object_id} does not fit a uint16 label map")
    ids = [r.object_id for r in results]
    if len(set(ids)) != len(ids):
        raise InputError(f"object ids are not unique: {ids}")
    out = np.zeros(shape, dtype=np.uint16)
    positive = {}  # object id -> its positive-logit bounding box (volume slices)
    for r in results:
        local = union_bbox([r.logits > 0])
        if local is not None:
            positive[r.object_id] = tuple(slice(o + s.start, o + s.stop) for o, s in zip(r.origin, local))
    if not positive:
        return out
    box = tuple(slice(min(b[a].start for b in positive.values()), max(b[a].stop for b in positive.values()))
                for a in range(3))
    # argmax of the softmax == argmax of the logits; background (0) wins unless some logit is positive
    best = np.zeros(out[box].shape, dtype=np.float32)
    label = np.zeros(out[box].shape, dtype=np.uint16)
    for r in results:
        if r.object_id not in positive:
            continue
        own = _within(positive[r.object_id], box)
        sub = r.logits_in(positive[r.object_id])
        win = sub > best[own]
        best[own][win] = sub[win]
        label[own][win] = r.object_id
    if keep_largest_component:
        for oid, where in positive.items():  # an object's voxels lie inside its positive box
            own = _within(where, box)
            m = label[own] == oid
            if m.any():
                label[own][m & ~largest_component(m)] = 0
    out[box] = label
    return out


def _within(inner: tuple[slice, ...], outer: tuple[slice, ...]) -> tuple[slice, ...]:
    """``inner`` (volume slices, inside ``outer``) as slices of an array on ``outer``."""
    return tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(inner, outer))
