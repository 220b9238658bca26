"""Point prompts for engines without point support of their own (``PromptableEngine.accepts_points`` False).

Every engine takes boxes; these rules turn positive and negative points into boxes and a cut around them, using
only the engine's box interface (so they hold for every engine until it reads points itself):

* **A slice with positive points and no box** gets a box found around them: square boxes centred on the
  points (half-sides :data:`SEARCH_HALF_MM`), each segmented on that slice alone; the first whose mask holds every
  positive point of the slice and either does not touch the box's border or fills at most :data:`MAX_FILL` of it
  (the box is larger than the object) gives the box (the mask's bounding rectangle with a margin: a box drawn
  around the object, as a person draws one), else the largest whose mask holds them.
* **A positive point farther than :data:`NEAR_MM` from the object's mask on its slice** (another part or another
  lesion of the same object) is segmented as its own point prompt, within the object's z-range and bounds, and
  added to the object; fusion keeps every component holding a positive point (:func:`keep_components`). A point
  nearer to the mask (a missed rim) changes nothing here: growing a mask towards a point needs an engine that
  reads points.
* **Negative points cut**: the object's mask is split by a marker watershed on its inner distance map between its
  positive markers (the positive points and, per box, the deepest voxel of the mask near the box's centre) and
  the negative points; the voxels reached from a negative point are removed, in 3D: a leak into a neighbouring
  structure goes, cut at the narrowest neck between the two.

Arrays are ``[k, j, i]`` on the engine's (view) grid; points and boxes in its IJK.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..progress import CancelToken, check
from ..prompt.base import OUTSIDE_LOGIT, Box2D, ObjectPrompt, ObjectResult, Point2D

#: Half-sides (mm) of the square boxes tried around positive points, smallest first.
SEARCH_HALF_MM = (4.0, 6.0, 9.0, 13.5, 20.0, 30.0, 45.0)
#: A box whose mask fills at most this fraction of it is taken even when the mask touches its border (an engine
#: that makes its mask span the box, as the weights-free engine does, always touches it).
MAX_FILL = 0.5
#: A positive point the mask misses by at most this distance (mm, in its slice) is not segmented on its own.
NEAR_MM = 3.0
#: Margin of a found box around its mask: this fraction of the mask's size, at least MIN_MARGIN voxels.
MARGIN = 0.1
MIN_MARGIN = 2


def needs_adapter(engine, prompts: Sequence[ObjectPrompt]) -> bool:
    """True when some prompt has points and the engine does not read them itself."""
    return not getattr(engine, "accepts_points", False) and any(p.points for p in prompts)


def _touches_border(mask2d: np.ndarray, box: Box2D) -> bool:
    """Whether ``mask2d`` (``[j, i]``) has a pixel on the box's outer rows/columns, where the box is not at the
    slice's edge."""
    nj, ni = mask2d.shape
    sides = []
    if box.i0 > 0:
        sides.append(mask2d[box.j0:box.j1 + 1, box.i0])
    if box.i1 < ni - 1:
        sides.append(mask2d[box.j0:box.j1 + 1, box.i1])
    if box.j0 > 0:
        sides.append(mask2d[box.j0, box.i0:box.i1 + 1])
    if box.j1 < nj - 1:
        sides.append(mask2d[box.j1, box.i0:box.i1 + 1])
    return any(bool(s.any()) for s in sides)


def _holds(mask2d: np.ndarray, points: Sequence[Point2D]) -> bool:
    """Whether every point has a mask pixel within one voxel (a click on the object's edge counts)."""
    nj, ni = mask2d.shape
    return all(mask2d[max(p.j - 1, 0):min(p.j + 2, nj), max(p.i - 1, 0):min(p.i + 2, ni)].any() for p in points)


def _around(mask2d: np.ndarray, k: int) -> Box2D:
    """The mask's bounding rectangle on slice ``k`` enlarged by the margin, clipped to the slice."""
    jj, ii = np.nonzero(mask2d)
    nj, ni = mask2d.shape
    mi = max(MIN_MARGIN, math.ceil(MARGIN * (ii.max() - ii.min() + 1)))
    mj = max(MIN_MARGIN, math.ceil(MARGIN * (jj.max() - jj.min() + 1)))
    return Box2D(k, max(int(ii.min()) - mi, 0), max(int(jj.min()) - mj, 0), min(int(ii.max()) + mi, ni - 1),
                 min(int(jj.max()) + mj, nj - 1))


def box_around_points(engine, prepared, points: Sequence[Point2D], shape: Sequence[int],
                      spacing_ij: Sequence[float], bounds=None, cancel: Optional[CancelToken] = None) -> Optional[Box2D]:
    """The box for positive ``points`` on one slice (see the module docstring), or ``None`` when no box's mask
    holds them. ``spacing_ij``: in-plane spacing (mm) along ``i`` and ``j``; ``bounds``: the object's bounds."""
    k = points[0].k
    nk, nj, ni = shape
    ci = (min(p.i for p in points) + max(p.i for p in points)) / 2.0
    cj = (min(p.j for p in points) + max(p.j for p in points)) / 2.0
    reach_i = (max(p.i for p in points) - min(p.i for p in points)) / 2.0
    reach_j = (max(p.j for p in points) - min(p.j for p in points)) / 2.0
    best = None
    for half_mm in SEARCH_HALF_MM:
        check(cancel)
        hi = max(int(round(half_mm / spacing_ij[0])), 2) + math.ceil(reach_i)
        hj = max(int(round(half_mm / spacing_ij[1])), 2) + math.ceil(reach_j)
        box = Box2D(k, int(ci - hi), int(cj - hj), int(math.ceil(ci + hi)), int(math.ceil(cj + hj)))
        try:
            box = box.validate(shape)
            prompt = ObjectPrompt(1, [box], (k, k), "", bounds).validate(shape)
        except InputError:
            continue
        (result,) = engine.segment(prepared, [prompt], cancel=cancel)
        mask2d = np.asarray(result.mask[k], dtype=bool)
        if not mask2d.any() or not _holds(mask2d, points):
            continue
        best = _around(mask2d, k)
        fill = float(mask2d.sum()) / float((box.i1 - box.i0 + 1) * (box.j1 - box.j0 + 1))
        if not _touches_border(mask2d, prompt.boxes[0]) or fill <= MAX_FILL:
            break
        if box.i0 == 0 and box.j0 == 0 and box.i1 == ni - 1 and box.j1 == nj - 1:
            break
    return best


def with_point_boxes(engine, prepared, prompt: ObjectPrompt, shape: Sequence[int], spacing_ij: Sequence[float],
                     cancel: Optional[CancelToken] = None) -> ObjectPrompt:
    """``prompt`` with a found box on every slice that has positive points and no box; points dropped (the
    engine reads boxes only). Raises :class:`InputError` when no box is found for a slice and the object has
    no box at all."""
    boxed = {b.k for b in prompt.boxes}
    by_slice: dict[int, list[Point2D]] = {}
    for p in prompt.positive_points:
        if p.k not in boxed:
            by_slice.setdefault(p.k, []).append(p)
    boxes = list(prompt.boxes)
    for k, points in sorted(by_slice.items()):
        box = box_around_points(engine, prepared, points, shape, spacing_ij, prompt.bounds, cancel)
        if box is not None:
            boxes.append(box)
    if not boxes:
        where = ", ".join(f"(k={p.k}, i={p.i}, j={p.j})" for p in prompt.positive_points)
        raise InputError(f"object {prompt.object_id}{' (' + prompt.name + ')' if prompt.name else ''}: no object "
                         f"found at the positive point(s) {where}; place a box around it")
    return dataclasses.replace(prompt, boxes=sorted(boxes, key=lambda b: b.k), points=[])


def _union(result: ObjectResult, extra: ObjectResult) -> ObjectResult:
    logits = np.maximum(result.logits, extra.logits)
    slices = list(result.slices) + [k for k in extra.slices if k not in result.slices]
    return dataclasses.replace(result, logits=logits, mask=logits > 0, slices=slices,
                               scores={**extra.scores, **result.scores})


def add_missed_points(engine, prepared, prompt: ObjectPrompt, result: ObjectResult, shape: Sequence[int],
                      spacing_ij: Sequence[float], cancel: Optional[CancelToken] = None) -> ObjectResult:
    """Segment every positive point farther than :data:`NEAR_MM` from the result's mask on its slice as its own
    point prompt, and add it."""
    for p in prompt.positive_points:
        check(cancel)
        ri = int(math.ceil(NEAR_MM / spacing_ij[0]))
        rj = int(math.ceil(NEAR_MM / spacing_ij[1]))
        if result.mask[p.k, max(p.j - rj, 0):p.j + rj + 1, max(p.i - ri, 0):p.i + ri + 1].any():
            continue
        box = box_around_points(engine, prepared, [p], shape, spacing_ij, prompt.bounds, cancel)
        if box is None:
            continue
        sub = ObjectPrompt(prompt.object_id, [box], prompt.z_range, prompt.name, prompt.bounds).validate(shape)
        (extra,) = engine.segment(prepared, [sub], cancel=cancel)
        result = _union(result, extra)
    return result


def cut_negative(result: ObjectResult, prompt: ObjectPrompt, spacing_kji: Sequence[float]) -> ObjectResult:
    """Remove from the result the voxels that a marker watershed on the mask's inner distance map (so fronts meet
    at the mask's narrowest necks) floods from the negative points rather than from the object's positive markers.
    ``spacing_kji``: voxel spacing (mm) along ``k``, ``j``, ``i``."""
    from skimage.segmentation import watershed

    negatives = [p for p in prompt.negative_points if result.mask[p.k, p.j, p.i]]
    if not negatives:
        return result
    mask = result.mask
    kk, jj, ii = np.nonzero(mask)
    lo = np.array([kk.min(), jj.min(), ii.min()])
    hi = np.array([kk.max(), jj.max(), ii.max()]) + 1
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    sub_mask = mask[crop]
    depth = ndimage.distance_transform_edt(np.pad(sub_mask, 1), sampling=spacing_kji)[1:-1, 1:-1, 1:-1]
    markers = np.zeros(sub_mask.shape, dtype=np.int32)
    for voxel in _positive_markers(prompt, mask, depth, lo):
        markers[tuple(np.asarray(voxel) - lo)] = 1
    for p in negatives:
        markers[p.k - lo[0], p.j - lo[1], p.i - lo[2]] = 2
    if (markers == 1).any():
        drop = watershed(-depth, markers, mask=sub_mask) == 2
    else:  # nothing says where the object is: the negative points' components go
        labels, _ = ndimage.label(sub_mask, structure=np.ones((3, 3, 3), bool))
        drop = np.isin(labels, [labels[p.k - lo[0], p.j - lo[1], p.i - lo[2]] for p in negatives])
    logits = result.logits.copy()
    logits[crop][drop] = OUTSIDE_LOGIT
    return dataclasses.replace(result, logits=logits, mask=logits > 0)


def _positive_markers(prompt: ObjectPrompt, mask: np.ndarray, depth: np.ndarray,
                      lo: np.ndarray) -> list[tuple[int, int, int]]:
    """``(k, j, i)`` voxels that certainly belong to the object: its positive points in the mask and, per box, the
    deepest voxel (``depth``: inner distance on the crop starting at ``lo``) of the mask's part on the box's slice
    nearest to the box's centre."""
    out = [(p.k, p.j, p.i) for p in prompt.positive_points if mask[p.k, p.j, p.i]]
    negatives = {(p.k, p.j, p.i) for p in prompt.negative_points}
    for b in prompt.boxes:
        inside = mask[b.k, b.j0:b.j1 + 1, b.i0:b.i1 + 1]
        if not inside.any():
            continue
        parts, _ = ndimage.label(inside, structure=np.ones((3, 3), bool))
        jj, ii = np.nonzero(parts)
        near = int(np.argmin((jj - (b.j1 - b.j0) / 2.0) ** 2 + (ii - (b.i1 - b.i0) / 2.0) ** 2))
        part = parts == parts[jj[near], ii[near]]
        pj, pi = np.nonzero(part)
        d = depth[b.k - lo[0], b.j0 + pj - lo[1], b.i0 + pi - lo[2]]
        n = int(np.argmax(d))
        voxel = (b.k, b.j0 + int(pj[n]), b.i0 + int(pi[n]))
        if voxel not in negatives:
            out.append(voxel)
    return out


def segment_with_points(engine, prepared, prompts: Sequence[ObjectPrompt], shape: Sequence[int],
                        spacing: Sequence[float], progress=None, cancel: Optional[CancelToken] = None
                        ) -> tuple[list[ObjectResult], list[ObjectPrompt]]:
    """``engine.segment`` for prompts that may carry points, on an engine without point support (see the module
    docstring), on a grid of ``shape`` ``(k, j, i)`` and ``spacing`` ``(i, j, k)`` (mm). Returns the results and
    the prompts with the boxes found around positive points (their points kept)."""
    spacing_ij, spacing_kji = tuple(spacing[:2]), tuple(spacing[::-1])
    shape = tuple(shape)
    boxed = [with_point_boxes(engine, prepared, p, shape, spacing_ij, cancel) for p in prompts]
    results = engine.segment(prepared, boxed, progress=progress, cancel=cancel)
    out, used = [], []
    for prompt, box_prompt, result in zip(prompts, boxed, results):
        result = add_missed_points(engine, prepared, prompt, result, shape, spacing_ij, cancel)
        full = dataclasses.replace(prompt, boxes=box_prompt.boxes)
        out.append(cut_negative(result, full, spacing_kji))
        used.append(full)
    return out, used


def keep_components(labels: np.ndarray, positives: dict) -> np.ndarray:
    """Per object id, its largest 26-connected component plus every component holding one of its positive
    points (``positives``: ``{object id: [(k, j, i) on this grid]}``); the rest goes back to background.
    ``labels``: ``uint16 [k, j, i]`` (modified in place and returned)."""
    from ..prompt.fusion import largest_component

    for object_id, voxels in positives.items():
        m = labels == object_id
        if not m.any():
            continue
        keep = largest_component(m)
        voxels = [v for v in voxels if m[v]]
        if voxels:
            components, _ = ndimage.label(m, structure=np.ones((3, 3, 3), bool))
            keep |= np.isin(components, [components[v] for v in voxels])
        labels[m & ~keep] = 0
    return labels
