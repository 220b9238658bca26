"""Cascade refinement: a second engine pass prompted from the first pass's masks.

* strategy ``C``: boxes (strategy A or B, :mod:`..prompt.strategies`), z-range and in-plane bounds (the
  rectangle holding the mask on every slice) from each first-pass mask;
* strategy ``D``: the same, each box and the bounds enlarged by 10 % in area (both sides scaled by
  ``sqrt(1.1)``) and the z-range by 20 % in height, about their centres; growth is rounded **up** to whole
  voxels (so small boxes grow by at least one voxel per axis) and split between the two ends, then clipped to
  the volume.

The first-pass masks are the objects' parts of the fused first-pass label map. Objects excluded from the
cascade (thin or small structures, ``Structure.cascade = False``) and objects with an empty first pass keep
their first-pass result.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import numpy as np

from ..errors import InputError
from ..progress import CancelToken, ProgressFn
from ..prompt.base import Box2D, ObjectPrompt, ObjectResult, PromptableEngine
from ..prompt.fusion import fuse
from ..prompt.strategies import boxes_for_object, mask_bounds, z_extent

CASCADES = ("C", "D")
AREA_FACTOR = 1.10
HEIGHT_FACTOR = 1.20


def _grow(lo: int, hi: int, factor: float, limit: int) -> tuple[int, int]:
    """Grow the inclusive range ``lo..hi`` to ``factor`` times its length (rounded up), clipped to 0..limit-1."""
    length = hi - lo + 1
    extra = max(0, math.ceil(length * factor - length - 1e-9))
    lo2, hi2 = lo - extra // 2, hi + (extra - extra // 2)
    return max(lo2, 0), min(hi2, limit - 1)


def enlarge_box(box: Box2D, shape: Sequence[int], area_factor: float = AREA_FACTOR) -> Box2D:
    """``box`` with its area scaled by ``area_factor`` (each side by its square root), clipped to the slice of a
    ``(k, j, i)`` volume."""
    if area_factor < 1:
        raise InputError(f"area factor must be >= 1, got {area_factor}")
    side = math.sqrt(area_factor)
    i0, i1 = _grow(box.i0, box.i1, side, shape[2])
    j0, j1 = _grow(box.j0, box.j1, side, shape[1])
    return Box2D(box.k, i0, j0, i1, j1)


def enlarge_range(z_range: tuple[int, int], n_slices: int, height_factor: float = HEIGHT_FACTOR) -> tuple[int, int]:
    """Inclusive z-range scaled by ``height_factor`` about its centre, clipped to ``0..n_slices-1``."""
    if height_factor < 1:
        raise InputError(f"height factor must be >= 1, got {height_factor}")
    return _grow(int(z_range[0]), int(z_range[1]), height_factor, n_slices)


def cascade_prompt(result: ObjectResult, mode: str = "D", strategy: str = "A", mask: Optional[np.ndarray] = None,
                   origin: Optional[Sequence[int]] = None) -> Optional[ObjectPrompt]:
    """The second-pass prompt of one first-pass result, from ``mask`` (default: the result's own mask;
    :func:`run_cascade` passes the object's part of the fused label map). ``mask`` is bool ``[k, j, i]`` on the
    volume, or on a box of it starting at voxel ``origin`` ``(k, j, i)``. ``None`` when that mask is empty."""
    if mode not in CASCADES:
        raise InputError(f"unknown cascade {mode!r}; use C (boxes from the first pass) or D (enlarged)")
    if mask is None:
        mask, origin = result.mask, result.origin
    if not mask.any():
        return None
    ok, oj, oi = (int(v) for v in (origin if origin is not None else (0, 0, 0)))
    z = z_extent(mask)
    z = (z[0] + ok, z[1] + ok)
    boxes = [Box2D(b.k + ok, b.i0 + oi, b.j0 + oj, b.i1 + oi, b.j1 + oj) for b in boxes_for_object(mask, strategy)]
    i0, j0, i1, j1 = mask_bounds(mask)
    bounds = Box2D(z[0], i0 + oi, j0 + oj, i1 + oi, j1 + oj)
    if mode == "D":
        shape = result.shape
        boxes = [enlarge_box(b, shape) for b in boxes]
        bounds = enlarge_box(bounds, shape)
        z = enlarge_range(z, shape[0])
    return ObjectPrompt(result.object_id, boxes, z, result.name, (bounds.i0, bounds.j0, bounds.i1, bounds.j1))


def run_cascade(engine: PromptableEngine, prepared, first: Sequence[ObjectResult], mode: str = "D",
                strategy: str = "A", exclude: Iterable[int] = (), *, progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None) -> list[ObjectResult]:
    """Second pass over ``first`` (same order); ``exclude`` = object ids that keep their first-pass result.

    Prompts come from the first pass as the user sees it: each object's part of the fused label map
    (:func:`~..prompt.fusion.fuse`: overlaps resolved, stray fragments dropped), not its raw mask, which may
    overlap its neighbours. An object with nothing left after fusion keeps its first-pass result.
    """
    excluded = set(int(v) for v in exclude)
    fused = fuse(first) if first else None
    prompts = []
    for r in first:
        p = None if r.object_id in excluded else \
            cascade_prompt(r, mode, strategy, fused[r.box] == r.object_id, r.origin)  # its fused part lies in its box
        if p is not None:
            prompts.append(p)
    second = {r.object_id: r for r in engine.segment(prepared, prompts, progress=progress, cancel=cancel)} \
        if prompts else {}
    return [second.get(r.object_id, r) for r in first]
