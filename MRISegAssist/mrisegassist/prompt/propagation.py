"""Slice-to-slice propagation of box prompts into 3D, shared by every :class:`SliceEngine` (SAM, classical).

For each object the engine first segments every prompted slice with its box. From each prompted slice whose
mask is non-empty the object is then followed slice by slice: slice ``k +/- 1`` is prompted with the bounding
box of slice ``k``'s mask enlarged by a margin (:class:`PropagationConfig`). A walk stops when the object
vanishes (mask area below ``min_area``), the engine's score drops below ``min_score``, the mask suddenly grows
more than ``max_growth`` times (a leak), or the end of the object's ``z_range`` (default: the volume) is reached.

Several prompted slices (strategy B), ``ka < kb``: the gap between them is split at ``mid = (ka + kb) // 2``;
slices ``ka+1..mid`` are reached from ``ka`` and ``mid+1..kb-1`` from ``kb`` (each gap slice from its nearer
prompt, the exact middle from the lower one). A side that stops early leaves the rest of the gap to the other
side, which then walks on until it meets an already segmented slice. A slice is never kept twice and no gap
is left while the object is visible; the only slice ever predicted twice is one where a walk stopped, which
the opposite walk may retry with its own box. Below the lowest and above the highest prompt the walks run
to the ends of the z-range. With ``PropagationConfig(consensus=True)`` each gap is instead walked from both
sides to the other prompt, and a slice both walks reached gets their distance-weighted mean logits (the
walk from the nearer prompt weighs more; where only one walk looked, its logits): one prompt's walk never
simply overrides the other's.

An engine may keep a per-object model (e.g. the object's appearance learnt from the slices segmented so far):
when it defines ``begin_object(prepared, prompt)``, the returned model is passed as ``model=`` to every
:meth:`predict_slice` call of that object (prompted slices first, then the walks), and ``model.kept(k, mask)``
is called for each slice a walk keeps (``mask``: ``[j, i]`` bool, what the walk keeps of that prediction).

Engines that take points per slice (``slice_points``, e.g. SAM) get every slice's points with its box: a slice
with a box or a positive point is a prompted slice (segmented from its box and points, or from its points alone),
and a propagated slice that carries points (e.g. a negative point on a leak) gets them with its propagated box.
The components holding a positive point are kept too. Other engines get boxes only here (the weights-free engine
reads points through its per-object model; the service's point rules handle the rest).

Only the connected components of a slice's mask that touch its prompt box are kept (SAM sometimes returns
far-away fragments); the logits of discarded pixels are set to :data:`OUTSIDE_LOGIT`, so ``mask == logits > 0``.
A prompt with ``bounds`` (a 3D ROI's rectangle) has its propagated boxes clipped to them and nothing outside them
kept, so a leak into neighbouring tissue cannot wander beyond the ROI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..progress import CancelToken, ProgressFn, check, report
from .base import OUTSIDE_LOGIT, Box2D, ObjectPrompt, ObjectResult, SliceEngine, SlicePrompt


@dataclass(frozen=True)
class SlicePrior:
    """What an engine with ``accepts_prior = True`` is told on a propagated slice: the previous slice ``k`` and
    its kept mask (``[j, i]`` bool), and the prompted slice this walk started from with its mask and box."""

    k: int
    mask: np.ndarray
    anchor_k: int
    anchor_mask: np.ndarray
    anchor_box: Optional[np.ndarray] = None  #: ``[x0, y0, x1, y1]`` the prompted slice was segmented in


@dataclass(frozen=True)
class PropagationConfig:
    """Parameters of the slice-to-slice walk.

    ``consensus``: several prompted slices: walk each gap from both sides and blend the walks (module docstring)
    instead of splitting it at its middle. ``extent``: what the growth checks measure, ``"area"`` (voxels of the
    kept mask) or ``"area+hull"`` (voxels and the voxels of its 2D convex hull: a leak grows both; a ring that
    closes over a cavity from one slice to the next grows in area only, a crescent that bends in outline only;
    a prompted slice's hull is at least the ellipse inscribed in its box, the extent the box says).
    """

    margin: float = 0.1
    min_margin: int = 3
    min_area: int = 1
    min_score: float = 0.0
    max_growth: Optional[float] = None
    max_area_ratio: Optional[float] = None
    area_slack: int = 9
    consensus: bool = False
    extent: str = "area"

    def extents(self, mask2d: np.ndarray, box: Optional[Box2D] = None) -> tuple[int, ...]:
        """The measures of a ``[j, i]`` mask the growth checks compare (see ``extent``); ``box``: the prompt's
        box on a prompted slice."""
        area = int(mask2d.sum())
        if self.extent == "area":
            return (area,)
        hull = area
        if area:
            from skimage.morphology import convex_hull_image

            jj, ii = np.nonzero(mask2d)
            hull = int(convex_hull_image(mask2d[jj.min():jj.max() + 1, ii.min():ii.max() + 1]).sum())
        if box is not None:
            hull = max(hull, int(math.pi / 4.0 * (box.i1 - box.i0 + 1) * (box.j1 - box.j0 + 1)))
        return area, hull

    def leaks(self, new: tuple[int, ...], previous: tuple[int, ...], anchor: tuple[int, ...],
              bounded: bool) -> bool:
        """Whether a propagated mask with measures ``new`` is a leak: every measure grew more than ``max_growth``
        times (and ``area_slack``) from ``previous``, or (unbounded objects) every measure exceeds
        ``max_area_ratio`` times (plus ``area_slack``) the prompted slices' ``anchor``."""
        slack = self.area_slack
        if self.max_growth is not None and all(n > self.max_growth * p and n - p > slack
                                               for n, p in zip(new, previous)):
            return True
        return self.max_area_ratio is not None and not bounded and all(
            n > self.max_area_ratio * a + slack for n, a in zip(new, anchor))

    def next_box(self, mask2d: np.ndarray) -> np.ndarray:
        """``[x0, y0, x1, y1]`` of ``mask2d`` (``[j, i]`` bool) enlarged by the margin, clipped to the slice."""
        jj, ii = np.nonzero(mask2d)
        i0, i1, j0, j1 = ii.min(), ii.max(), jj.min(), jj.max()
        mi = max(self.min_margin, math.ceil(self.margin * (i1 - i0 + 1)))
        mj = max(self.min_margin, math.ceil(self.margin * (j1 - j0 + 1)))
        nj, ni = mask2d.shape
        return np.array([max(i0 - mi, 0), max(j0 - mj, 0), min(i1 + mi, ni - 1), min(j1 + mj, nj - 1)],
                        dtype=np.float32)

def volume_shape(engine: SliceEngine, prepared) -> tuple[int, int, int]:
    """``(k, j, i)`` shape of a prepared volume (``engine.volume_shape`` if defined, else ``prepared.shape``)."""
    getter = getattr(engine, "volume_shape", None)
    shape = getter(prepared) if callable(getter) else getattr(prepared, "shape", None)
    if shape is None or len(shape) != 3:
        raise InputError("the prepared handle does not describe a 3D volume (no shape)")
    return tuple(int(s) for s in shape)


def touching(mask: np.ndarray, where: np.ndarray) -> np.ndarray:
    """The connected components of a 2D ``mask`` (8-connected) that have a pixel in ``where`` (bool, same shape)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros(mask.shape, dtype=bool)
    keep = np.bincount(labels[where & mask], minlength=n + 1) > 0
    keep[0] = False
    return keep[labels]


def _components_in_box(mask2d: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The connected components (8-connected) of ``mask2d`` that have a pixel inside ``box``."""
    if not mask2d.any():
        return mask2d
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    inside = mask2d[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1]
    if inside.all() and mask2d.sum() == inside.size:
        return mask2d
    where = np.zeros(mask2d.shape, dtype=bool)
    where[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = True
    return touching(mask2d, where)


@dataclass
class _Slice:
    """One prediction a walk keeps: logits ``[j, i]`` (discarded components at ``OUTSIDE_LOGIT``), kept mask, score
    and the mask's measures for the growth checks (:meth:`PropagationConfig.extents`)."""

    logits: np.ndarray
    mask: np.ndarray
    score: float
    extent: tuple[int, ...] = (0,)


class _ObjectWalk:
    """Mutable state of one object's propagation (full-volume logits/mask, processing order, scores)."""

    def __init__(self, engine: SliceEngine, prepared, prompt: ObjectPrompt, shape: tuple[int, int, int],
                 config: PropagationConfig, cancel: Optional[CancelToken], tick) -> None:
        self.engine, self.prepared, self.prompt, self.config = engine, prepared, prompt, config
        self.cancel, self.tick = cancel, tick
        self.logits = np.full(shape, OUTSIDE_LOGIT, dtype=np.float32)
        self.mask = np.zeros(shape, dtype=bool)
        self.kept = np.zeros(shape[0], dtype=bool)
        self.slices: list[int] = []
        self.scores: dict[int, float] = {}
        self.predicted = 0
        self.anchor_extent: tuple[int, ...] = (0,)
        self.anchor_of: dict[int, tuple] = {}  # kept slice -> (prompted slice, its mask, its box)
        self._prior = bool(getattr(engine, "accepts_prior", False))
        begin = getattr(engine, "begin_object", None)
        self.model = begin(prepared, prompt) if callable(begin) else None
        self._outside = prompt.outside_bounds(shape[1:])  # [j, i] pixels outside the prompt's bounds, or None
        # engines reading points get each slice's points with its box (see the module docstring)
        self.on_slice = ({sp.k: sp for sp in prompt.slice_prompts()} if getattr(engine, "slice_points", False)
                         else {})

    def predict(self, k: int, box: Optional[np.ndarray], prior: Optional[SlicePrior],
                previous: Optional[tuple[int, ...]]) -> Optional[_Slice]:
        """Segment slice ``k`` in ``box`` (``None``: a slice prompted with points only); the prediction to keep, or
        ``None`` where the object vanished (or a leak check failed). The engine's model (if any) is told about a
        kept prediction."""
        check(self.cancel)
        kwargs = {"prior": prior} if self._prior else {}
        if self.model is not None:
            kwargs["model"] = self.model
        here = self.on_slice.get(k)
        if here is not None and here.points:
            kwargs["points"] = here.points
        logits2d, score = self.engine.predict_slice(self.prepared, k, box, cancel=self.cancel, **kwargs)
        self.predicted += 1
        self.tick()
        logits2d = np.asarray(logits2d, dtype=np.float32)
        if self._outside is not None:
            logits2d = np.where(self._outside, OUTSIDE_LOGIT, logits2d).astype(np.float32, copy=False)
        fg = logits2d > 0
        positives = [(p.j, p.i) for p in (here.points if here is not None else ()) if p.positive]
        keep = _components_in_box(fg, box) if box is not None else np.zeros_like(fg)
        if positives or box is None:  # and the components a positive point of the slice is on
            at = np.zeros_like(fg)
            for j, i in positives:
                at[max(j - 1, 0):j + 2, max(i - 1, 0):i + 2] = True
            keep = keep | touching(fg, at)
        cfg = self.config
        if int(keep.sum()) < max(cfg.min_area, 1) or float(score) < cfg.min_score:
            return None
        extent = cfg.extents(keep)
        if previous is not None and cfg.leaks(extent, previous, self.anchor_extent, self.prompt.z_range is not None):
            return None
        kept = getattr(self.model, "kept", None)
        if callable(kept):
            kept(k, keep)
        return _Slice(np.where(fg & ~keep, OUTSIDE_LOGIT, logits2d), keep, float(score), extent)

    def store(self, k: int, result: _Slice) -> None:
        self.logits[k] = result.logits
        self.mask[k] = result.mask
        self.kept[k] = True
        self.slices.append(k)
        self.scores[k] = result.score

    def walk(self, start: int, step: int, limit: int, collect: bool = False):
        """Follow the object from kept slice ``start`` in direction ``step`` up to slice ``limit`` (inclusive),
        stopping where the object vanishes and (unless ``collect``) at an already kept slice. Stores what it
        keeps and returns the last kept slice; with ``collect`` returns ``{k: _Slice}`` without storing."""
        k, prev = start, self.mask[start]
        anchor = self.anchor_of.get(start, (start, self.mask[start], None))
        walked: dict[int, _Slice] = {}
        current = recent = self.config.extents(prev)  # growth: against the larger of the last two kept masks
        while (k + step <= limit) if step > 0 else (k + step >= limit):
            nxt = k + step
            if self.kept[nxt] and not collect:
                break
            prior = SlicePrior(k, prev, *anchor) if self._prior else None
            result = self.predict(nxt, self.prompt.clip_box(self.config.next_box(prev)), prior,
                                  tuple(map(max, recent, current)))
            if result is None:
                break
            recent, current = current, result.extent
            if collect:
                walked[nxt] = result
            else:
                self.store(nxt, result)
                self.anchor_of[nxt] = anchor
            k, prev = nxt, result.mask
        return walked if collect else k

    def blend(self, a: int, b: int) -> None:
        """Walk the gap ``a < k < b`` from both prompted slices and keep each slice either walk reached, with the
        distance-weighted mean logits where both did (consensus; see the module docstring)."""
        up, down = self.walk(a, +1, b - 1, collect=True), self.walk(b, -1, a + 1, collect=True)
        for k in range(a + 1, b):
            ra, rb = up.get(k), down.get(k)
            if ra is None or rb is None:
                result = ra or rb
            else:
                w = (b - k) / (b - a)  # where only one walk looked (the other's crop or box left it out): that one
                seen = (ra.logits > OUTSIDE_LOGIT) & (rb.logits > OUTSIDE_LOGIT)
                logits = np.where(seen, w * ra.logits + (1.0 - w) * rb.logits, np.maximum(ra.logits, rb.logits))
                keep = (logits > 0) & (ra.mask | rb.mask)
                if not keep.any():
                    continue
                logits = np.where((logits > 0) & ~keep, OUTSIDE_LOGIT, logits).astype(np.float32)
                result = _Slice(logits, keep, w * ra.score + (1.0 - w) * rb.score, self.config.extents(keep))
            if result is not None:
                self.store(k, result)
                self.anchor_of[k] = self.anchor_of[a if k - a <= b - k else b]

    def run(self) -> ObjectResult:
        p = self.prompt
        lo, hi = p.z_range if p.z_range is not None else (0, self.mask.shape[0] - 1)
        anchors = []
        prompted = ([sp for sp in self.on_slice.values() if sp.anchored] if self.on_slice
                    else [SlicePrompt(b.k, b) for b in p.boxes])
        for sp in prompted:
            xyxy = None if sp.box is None else sp.box.xyxy
            result = self.predict(sp.k, xyxy, None, None)
            if result is not None:
                self.store(sp.k, result)
                self.anchor_of[sp.k] = (sp.k, result.mask, xyxy)
                anchors.append(sp.k)
        measured = [self.config.extents(self.mask[sp.k], sp.box) for sp in prompted if sp.k in anchors]
        self.anchor_extent = tuple(map(max, *measured)) if len(measured) > 1 else (measured or [(0,)])[0]
        if anchors:
            self.walk(anchors[0], -1, lo)
            for a, b in zip(anchors, anchors[1:]):
                if self.config.consensus:
                    self.blend(a, b)
                    continue
                mid = (a + b) // 2
                last_a = self.walk(a, +1, mid)
                self.walk(b, -1, a + 1)
                if last_a == mid:
                    self.walk(mid, +1, b - 1)
            self.walk(anchors[-1], +1, hi)
        return ObjectResult(p.object_id, self.logits, self.mask, self.slices, self.scores, p.name)


def validate_prompts(prompts: Sequence[ObjectPrompt], shape: Sequence[int]) -> list[ObjectPrompt]:
    """Validate (and clip) every prompt against a ``(k, j, i)`` shape; object ids must be unique."""
    prompts = list(prompts)
    if not prompts:
        raise InputError("no object prompt given")
    ids = [p.object_id for p in prompts]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"object id(s) {dup} given more than once")
    return [p.validate(shape) for p in prompts]


def propagate_objects(engine: SliceEngine, prepared, prompts: Sequence[ObjectPrompt],
                      progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
                      config: Optional[PropagationConfig] = None) -> list[ObjectResult]:
    """Segment each object in 3D from its box prompts by slice-to-slice propagation (see module docstring).

    ``prepared`` is ``engine.prepare(volume)``; ``config`` defaults to ``engine.propagation`` if the engine
    defines it, else :class:`PropagationConfig()`. Every prompt is validated before any slice is predicted.
    Returns one :class:`ObjectResult` per prompt, in order; ``slices`` lists kept slices in processing order.
    """
    config = config or getattr(engine, "propagation", None) or PropagationConfig()
    shape = volume_shape(engine, prepared)
    prompts = validate_prompts(prompts, shape)
    results = []
    n_obj = len(prompts)
    for n, prompt in enumerate(prompts):
        span = (prompt.z_range[1] - prompt.z_range[0] + 1) if prompt.z_range else shape[0]
        label = f"object {prompt.object_id} ({n + 1}/{n_obj})"
        done = [0]

        def tick(n=n, span=span, label=label, done=done) -> None:
            done[0] += 1
            report(progress, (n + min(done[0] / max(span, 1), 0.99)) / n_obj, label)

        report(progress, n / n_obj, label)
        results.append(_ObjectWalk(engine, prepared, prompt, shape, config, cancel, tick).run())
    report(progress, 1.0, "propagation done")
    return results
