"""Multi-object fusion of per-object logits into one label map.

Voxel by voxel: softmax over the objects' logits plus a background logit of 0 (so a voxel becomes an object
only where that object's logit is positive), argmax; then, per object, only its largest 26-connected component
is kept (islands and stray fragments go back to background). Work is done inside the union bounding box of
the objects' masks only, so memory grows with the objects, not with the number of objects times the volume.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from ..errors import InputError
from .base import ObjectResult

_FULL = np.ones((3, 3, 3), dtype=bool)


def union_bbox(masks: Iterable[np.ndarray]) -> tuple[slice, slice, slice] | None:
    """Smallest ``(k, j, i)`` slices holding every ``True`` voxel of ``masks``; ``None`` if all are empty."""
    lo, hi = None, None
    for m in masks:
        if not m.any():
            continue
        idx = [np.nonzero(m.any(axis=tuple(a for a in range(3) if a != ax)))[0] for ax in range(3)]
        mlo = np.array([i[0] for i in idx])
        mhi = np.array([i[-1] for i in idx])
        lo = mlo if lo is None else np.minimum(lo, mlo)
        hi = mhi if hi is None else np.maximum(hi, mhi)
    if lo is None:
        return None
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))


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
    background logit of 0, then argmax). ``keep_largest_component`` then keeps each object's largest
    26-connected component only.
    """
    results = list(results)
    if not results:
        raise InputError("nothing to fuse: no object result")
    shape = results[0].logits.shape
    for r in results:
        if r.logits.shape != shape:
            raise InputError(f"object {r.object_id}: logits shape {r.logits.shape} differs from {shape}")
        if not 1 <= r.object_id <= np.iinfo(np.uint16).max:
            raise InputError(f"object id {r.object_id} does not fit a uint16 label map")
    ids = [r.object_id for r in results]
    if len(set(ids)) != len(ids):
        raise InputError(f"object ids are not unique: {ids}")
    out = np.zeros(shape, dtype=np.uint16)
    box = union_bbox(r.logits > 0 for r in results)
    if box is None:
        return out
    # argmax of the softmax == argmax of the logits; background (0) wins unless some logit is positive
    best = np.zeros(out[box].shape, dtype=np.float32)
    label = np.zeros(out[box].shape, dtype=np.uint16)
    for r in results:
        sub = r.logits[box]
        win = sub > best
        best[win] = sub[win]
        label[win] = r.object_id
    if keep_largest_component:
        for oid in ids:
            m = label == oid
            if m.any():
                label[m & ~largest_component(m)] = 0
    out[box] = label
    return out

