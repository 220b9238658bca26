"""The one protocol every promptable engine implements (SAM, SAM2.1, MedSAM2, the weights-free engine).

Coordinates: prompts are in the volume's IJK voxel indices. The volume array is ``[k, j, i]``; slices are
constant ``k`` (axial for an axially stored volume). A :class:`Box2D` is an inclusive rectangle ``i0..i1`` x
``j0..j1`` on slice ``k``; a :class:`Point2D` a positive (object) or negative (not the object) voxel on slice ``k``.
An :class:`ObjectPrompt` drawn in another view (``view``: the plane's RAS normal) has its boxes and points in the
IJK of the volume as seen from that view (``mrisegassist.service.views.view_grid``); the service reorients the
volume so that engines always see the view's slices as constant ``k``.

Usage (encode once, prompt many times, as segment-anything's ``SamPredictor``)::

    engine = get_engine("classical")            # or "sam-vit-b", "sam2.1-hiera-tiny", "medsam2", ...
    prepared = engine.prepare(volume_array)      # cached per volume (and per view), reused below
    results = engine.segment(prepared, [ObjectPrompt(1, [Box2D(k=80, i0=100, j0=90, i1=140, j1=130)])])
    labels = fuse(results)                       # multi-object fusion, see fusion.py
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError
from ..progress import CancelToken, ProgressFn

#: Logit written on slices an object was not segmented on (sigmoid ~ 2e-9).
OUTSIDE_LOGIT = -20.0


@dataclass(frozen=True)
class Box2D:
    """Inclusive voxel rectangle on axial slice ``k``: columns ``i0..i1`` (x), rows ``j0..j1`` (y)."""

    k: int
    i0: int
    j0: int
    i1: int
    j1: int

    def validate(self, shape: Sequence[int]) -> "Box2D":
        """Check against a ``(k, j, i)`` volume shape; raise :class:`InputError` if empty or outside."""
        nk, nj, ni = shape
        if self.i1 < self.i0 or self.j1 < self.j0:
            raise InputError(f"box {self.as_tuple()} is empty (need i0 <= i1 and j0 <= j1)")
        if not 0 <= self.k < nk:
            raise InputError(f"box slice k={self.k} is outside the volume (0..{nk - 1})")
        if self.i1 < 0 or self.j1 < 0 or self.i0 >= ni or self.j0 >= nj:
            raise InputError(f"box {self.as_tuple()} lies outside the slice (i 0..{ni - 1}, j 0..{nj - 1})")
        return Box2D(self.k, max(self.i0, 0), max(self.j0, 0), min(self.i1, ni - 1), min(self.j1, nj - 1))

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return (self.k, self.i0, self.j0, self.i1, self.j1)

    @property
    def xyxy(self) -> np.ndarray:
        """``[x0, y0, x1, y1]`` float pixel coordinates as SAM takes them (x = i, y = j)."""
        return np.array([self.i0, self.j0, self.i1, self.j1], dtype=np.float32)


@dataclass(frozen=True)
class Point2D:
    """A point prompt: voxel ``(i, j)`` on slice ``k``; ``positive`` = part of the object, else not."""

    k: int
    i: int
    j: int
    positive: bool = True

    def validate(self, shape: Sequence[int]) -> "Point2D":
        """Check against a ``(k, j, i)`` volume shape; raise :class:`InputError` if outside."""
        nk, nj, ni = shape
        if not (0 <= self.k < nk and 0 <= self.j < nj and 0 <= self.i < ni):
            raise InputError(f"{'positive' if self.positive else 'negative'} point (k={self.k}, i={self.i}, "
                             f"j={self.j}) lies outside the volume (k 0..{nk - 1}, i 0..{ni - 1}, j 0..{nj - 1})")
        return Point2D(int(self.k), int(self.i), int(self.j), bool(self.positive))

    @property
    def xy(self) -> np.ndarray:
        """``[x, y]`` float pixel coordinates as SAM takes them (x = i, y = j)."""
        return np.array([self.i, self.j], dtype=np.float32)


@dataclass(frozen=True)
class SlicePrompt:
    """What one slice of an object is prompted with, as SAM's and SAM 2's predictors take it: the slice's box
    (``None`` if it has none) and its points. ``anchored``: a box or a positive point (the object is there)."""

    k: int
    box: Optional[Box2D] = None
    points: tuple[Point2D, ...] = ()

    @property
    def anchored(self) -> bool:
        return self.box is not None or any(p.positive for p in self.points)

    @property
    def point_coords(self) -> Optional[np.ndarray]:
        """``[n, 2]`` float32 ``(x, y)`` = ``(i, j)`` of the points (``None`` without points)."""
        return np.array([[p.i, p.j] for p in self.points], dtype=np.float32) if self.points else None

    @property
    def point_labels(self) -> Optional[np.ndarray]:
        """``[n]`` int32: 1 positive, 0 negative (SAM's point labels; ``None`` without points)."""
        return np.array([int(p.positive) for p in self.points], dtype=np.int32) if self.points else None


@dataclass
class ObjectPrompt:
    """One object: boxes (each on its own slice) and/or point prompts, an optional inclusive ``z_range`` and
    optional in-plane ``bounds``.

    Without ``z_range`` the engine propagates from the prompted slices until the object vanishes. ``bounds`` =
    ``(i0, j0, i1, j1)`` (inclusive voxel rectangle, the same on every slice) says the object lies inside it, as
    inside a 3D ROI drawn around it: propagated boxes are clipped to it and nothing outside it is kept.
    ``points``: positive and negative :class:`Point2D` (an object needs a box or a positive point). ``view``:
    RAS normal of the slice view the prompt was drawn in (``None``: the volume's own ``k`` slices); the
    coordinates are then those of that view's grid (see the module docstring).
    """

    object_id: int
    boxes: list[Box2D]
    z_range: Optional[tuple[int, int]] = None
    name: str = ""
    bounds: Optional[tuple[int, int, int, int]] = None
    points: list[Point2D] = field(default_factory=list)
    view: Optional[tuple[float, float, float]] = None

    @property
    def positive_points(self) -> list[Point2D]:
        return [p for p in self.points if p.positive]

    @property
    def negative_points(self) -> list[Point2D]:
        return [p for p in self.points if not p.positive]

    def slice_prompts(self) -> list[SlicePrompt]:
        """One :class:`SlicePrompt` per slice holding a box or a point, by ``k`` (points in the order given)."""
        boxes = {b.k: b for b in self.boxes}
        points: dict[int, list[Point2D]] = {}
        for p in self.points:
            points.setdefault(p.k, []).append(p)
        return [SlicePrompt(k, boxes.get(k), tuple(points.get(k, ()))) for k in sorted(set(boxes) | set(points))]

    def clip_box(self, xyxy: np.ndarray) -> np.ndarray:
        """``[x0, y0, x1, y1]`` clipped to ``bounds`` (unchanged without bounds)."""
        if self.bounds is None:
            return xyxy
        i0, j0, i1, j1 = self.bounds
        x0, y0, x1, y1 = (float(v) for v in xyxy)
        return np.array([min(max(x0, i0), i1), min(max(y0, j0), j1), max(min(x1, i1), i0), max(min(y1, j1), j0)],
                        dtype=np.float32)

    def outside_bounds(self, shape2d: Sequence[int]) -> Optional[np.ndarray]:
        """``[j, i]`` bool mask of the slice pixels outside ``bounds`` (``None`` without bounds)."""
        if self.bounds is None:
            return None
        i0, j0, i1, j1 = self.bounds
        out = np.ones(tuple(shape2d), dtype=bool)
        out[j0:j1 + 1, i0:i1 + 1] = False
        return out

    def validate(self, shape: Sequence[int]) -> "ObjectPrompt":
        if self.object_id < 1:
            raise InputError(f"object id must be >= 1, got {self.object_id}")
        points = [p.validate(shape) for p in self.points]
        if not self.boxes and not any(p.positive for p in points):
            raise InputError(f"object {self.object_id}: no box given" if not points else
                             f"object {self.object_id}: only negative points given; add a box or a positive point")
        boxes = [b.validate(shape) for b in self.boxes]
        if len({b.k for b in boxes}) != len(boxes):
            raise InputError(f"object {self.object_id}: two boxes on the same slice")
        z = self.z_range
        if z is not None:
            z0, z1 = int(z[0]), int(z[1])
            if z1 < z0:
                raise InputError(f"object {self.object_id}: z-range {z0}..{z1} has zero size")
            if z1 < 0 or z0 >= shape[0]:
                raise InputError(f"object {self.object_id}: z-range {z0}..{z1} is outside 0..{shape[0] - 1}")
            z = (max(z0, 0), min(z1, shape[0] - 1))
            outside = [b.k for b in boxes if not z[0] <= b.k <= z[1]]
            if outside:
                raise InputError(f"object {self.object_id}: box slice(s) {outside} outside z-range {z}")
            outside = [p.k for p in points if p.positive and not z[0] <= p.k <= z[1]]
            if outside:
                raise InputError(f"object {self.object_id}: positive point slice(s) {outside} outside z-range {z}")
        bounds = self.bounds
        if bounds is not None:
            bi0, bj0, bi1, bj1 = (int(v) for v in bounds)
            if bi1 < bi0 or bj1 < bj0:
                raise InputError(f"object {self.object_id}: bounds {tuple(bounds)} are empty (need i0 <= i1, j0 <= j1)")
            bounds = (max(bi0, 0), max(bj0, 0), min(bi1, shape[2] - 1), min(bj1, shape[1] - 1))
            if bounds[2] < bounds[0] or bounds[3] < bounds[1]:
                raise InputError(f"object {self.object_id}: bounds {(bi0, bj0, bi1, bj1)} lie outside the slice")
            apart = [b.k for b in boxes if b.i1 < bounds[0] or b.i0 > bounds[2] or b.j1 < bounds[1] or b.j0 > bounds[3]]
            if apart:
                raise InputError(f"object {self.object_id}: box(es) on slice(s) {apart} lie outside its bounds "
                                 f"{bounds}")
            boxes = [Box2D(b.k, max(b.i0, bounds[0]), max(b.j0, bounds[1]), min(b.i1, bounds[2]), min(b.j1, bounds[3]))
                     for b in boxes]
            apart = [(p.k, p.i, p.j) for p in points if p.positive and not (bounds[0] <= p.i <= bounds[2]
                                                                             and bounds[1] <= p.j <= bounds[3])]
            if apart:
                raise InputError(f"object {self.object_id}: positive point(s) {apart} lie outside its bounds {bounds}")
        view = tuple(float(v) for v in self.view) if self.view is not None else None
        return ObjectPrompt(self.object_id, sorted(boxes, key=lambda b: b.k), z, self.name, bounds, points, view)


#: Voxels of margin an :class:`ObjectResult` keeps around its object (the engine's logits there stay as they were).
CROP_MARGIN = 2

Box3D = tuple[slice, slice, slice]


def _bbox(masks: Sequence[np.ndarray]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Inclusive ``(lo, hi)`` ``(k, j, i)`` corners holding every ``True`` voxel of ``masks``; ``None`` if all empty."""
    lo = hi = None
    for m in masks:
        if m.size == 0:
            continue
        idx = [np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
        if idx[0].size == 0:
            continue
        mlo, mhi = np.array([i[0] for i in idx]), np.array([i[-1] for i in idx])
        lo = mlo if lo is None else np.minimum(lo, mlo)
        hi = mhi if hi is None else np.maximum(hi, mhi)
    return None if lo is None else (lo, hi)


@dataclass
class ObjectResult:
    """Per-object output, kept on the object's bounding box (plus :data:`CROP_MARGIN` voxels) of the volume grid.

    ``shape``: the volume's ``(k, j, i)``; ``origin``: the ``[k, j, i]`` index in the volume of the box's first
    voxel; ``logits``: float32 ``[k, j, i]`` on the box (``OUTSIDE_LOGIT`` where not segmented); ``mask``: bool on
    the box (``logits > 0``). Voxel ``(k, j, i)`` of the volume is ``mask[k - k0, j - j0, i - i0]`` inside
    :attr:`box` (``volume[result.box]`` is the same region); outside it the logits are ``OUTSIDE_LOGIT`` and the mask
    ``False``. ``slices``: the slice indices (volume ``k``) in the order they were segmented; ``scores``: per-slice
    engine confidence (predicted IoU for SAM/SAM2, mean probability for the classical engine).

    Built from full-volume arrays (``origin`` not given) it crops itself to the voxels with a positive logit or in
    the mask, plus the margin (an empty result keeps a zero-size box), so memory grows with the object, not with
    the volume. With ``origin`` (and ``shape``) the arrays are taken as the box already. :meth:`blank` makes a
    full-grid result an engine fills slice by slice; :meth:`compact` crops it afterwards.
    """

    object_id: int
    logits: np.ndarray
    mask: np.ndarray
    slices: list[int] = field(default_factory=list)
    scores: dict[int, float] = field(default_factory=dict)
    name: str = ""
    origin: Optional[tuple[int, int, int]] = None
    shape: Optional[tuple[int, int, int]] = None

    def __post_init__(self) -> None:
        logits, mask = np.asarray(self.logits), np.asarray(self.mask, dtype=bool)
        if logits.ndim != 3 or logits.shape != mask.shape:
            raise InputError(f"object {self.object_id}: logits {logits.shape} and mask {mask.shape} must be the same "
                             f"[k, j, i] shape")
        if self.origin is None:
            if self.shape is not None and tuple(self.shape) != logits.shape:
                raise InputError(f"object {self.object_id}: full-volume arrays {logits.shape} differ from the shape "
                                 f"{tuple(self.shape)}")
            self.shape = tuple(int(n) for n in logits.shape)
            self.origin, box = self._crop_box(logits, mask, (0, 0, 0), self.shape)
            logits, mask = logits[box].copy(), mask[box].copy()  # copies: the full arrays can go
        else:
            self.origin = tuple(int(o) for o in self.origin)
            if self.shape is None:
                raise InputError(f"object {self.object_id}: a result on a box needs the volume's shape")
            self.shape = tuple(int(n) for n in self.shape)
            if any(o < 0 or o + n > s for o, n, s in zip(self.origin, logits.shape, self.shape)):
                raise InputError(f"object {self.object_id}: box at {self.origin} of size {logits.shape} lies "
                                 f"outside the volume {self.shape}")
        self.logits = logits.astype(np.float32, copy=False)
        self.mask = mask

    @staticmethod
    def _crop_box(logits: np.ndarray, mask: np.ndarray, origin: Sequence[int], shape: Sequence[int],
                  margin: int = CROP_MARGIN) -> tuple[tuple[int, int, int], Box3D]:
        """``(origin in the volume, box in the arrays)`` of the voxels with a positive logit or in the mask, plus
        ``margin`` clipped to the arrays (zero-size at ``origin`` when there is none)."""
        found = _bbox([mask, logits > 0])
        if found is None:
            return tuple(int(o) for o in origin), (slice(0, 0),) * 3
        lo = np.maximum(found[0] - margin, 0)
        hi = np.minimum(found[1] + margin + 1, logits.shape)
        return (tuple(int(o + a) for o, a in zip(origin, lo)),
                tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)))

    @classmethod
    def blank(cls, object_id: int, shape: Sequence[int], name: str = "") -> "ObjectResult":
        """A result covering the whole ``(k, j, i)`` grid (all ``OUTSIDE_LOGIT``), for engines that write it slice
        by slice (``result.logits[k] = ...``); :meth:`compact` it when done."""
        shape = tuple(int(n) for n in shape)
        return cls(object_id, np.full(shape, OUTSIDE_LOGIT, np.float32), np.zeros(shape, bool), name=name,
                   origin=(0, 0, 0), shape=shape)

    def compact(self, margin: int = CROP_MARGIN) -> "ObjectResult":
        """This result cropped to its object plus ``margin`` (itself when its box is that already)."""
        origin, box = self._crop_box(self.logits, self.mask, self.origin, self.shape, margin)
        if all(b.start == 0 and b.stop == n for b, n in zip(box, self.logits.shape)):
            return self
        return dataclasses.replace(self, logits=self.logits[box].copy(), mask=self.mask[box].copy(), origin=origin)

    @property
    def box(self) -> Box3D:
        """The box as ``[k, j, i]`` slices of the volume: ``volume[result.box]`` matches ``result.mask``."""
        return tuple(slice(o, o + n) for o, n in zip(self.origin, self.mask.shape))

    @property
    def nbytes(self) -> int:
        """Bytes held by the result's arrays."""
        return int(self.logits.nbytes + self.mask.nbytes)

    @property
    def voxels(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def probabilities(self) -> np.ndarray:
        """Sigmoid of the logits, on the box."""
        return 1.0 / (1.0 + np.exp(-self.logits))

    def _overlap(self, box: Box3D) -> Optional[tuple[Box3D, Box3D]]:
        """``(part of box, part of our arrays)`` where ``box`` (volume slices) meets ours; ``None`` if they don't."""
        ours, theirs = [], []
        for s, o, n in zip(box, self.origin, self.mask.shape):
            a, b = max(s.start, o), min(s.stop, o + n)
            if b <= a:
                return None
            theirs.append(slice(a - s.start, b - s.start))
            ours.append(slice(a - o, b - o))
        return tuple(theirs), tuple(ours)

    def logits_in(self, box: Box3D) -> np.ndarray:
        """float32 logits on ``box`` (``[k, j, i]`` slices of the volume with explicit starts and stops)."""
        out = np.full(tuple(s.stop - s.start for s in box), OUTSIDE_LOGIT, np.float32)
        hit = self._overlap(box)
        if hit is not None:
            out[hit[0]] = self.logits[hit[1]]
        return out

    def mask_in(self, box: Box3D) -> np.ndarray:
        """bool mask on ``box`` (``[k, j, i]`` slices of the volume with explicit starts and stops)."""
        out = np.zeros(tuple(s.stop - s.start for s in box), bool)
        hit = self._overlap(box)
        if hit is not None:
            out[hit[0]] = self.mask[hit[1]]
        return out

    def slice_mask(self, k: int) -> np.ndarray:
        """bool ``[j, i]`` mask of volume slice ``k`` (whole slice)."""
        return self.mask_in((slice(k, k + 1), slice(0, self.shape[1]), slice(0, self.shape[2])))[0]

    def contains(self, k: int, j: int, i: int) -> bool:
        """Whether volume voxel ``(k, j, i)`` is in the mask."""
        idx = (k - self.origin[0], j - self.origin[1], i - self.origin[2])
        return all(0 <= a < n for a, n in zip(idx, self.mask.shape)) and bool(self.mask[idx])

    def paste_into(self, out: np.ndarray, value=True) -> np.ndarray:
        """Write ``value`` into a volume-shaped array ``out`` where the mask is set; returns ``out``."""
        if tuple(out.shape) != self.shape:
            raise InputError(f"object {self.object_id}: array {out.shape} is not the volume's {self.shape}")
        out[self.box][self.mask] = value
        return out

    def full_mask(self) -> np.ndarray:
        """The mask on the whole volume (allocates one volume: for tests and one-off consumers)."""
        return self.paste_into(np.zeros(self.shape, bool))

    def full_logits(self) -> np.ndarray:
        """The logits on the whole volume (allocates one volume: for tests and one-off consumers)."""
        out = np.full(self.shape, OUTSIDE_LOGIT, np.float32)
        out[self.box] = self.logits
        return out

    def transposed(self, axes: Sequence[int]) -> "ObjectResult":
        """The result with its arrays, box and volume shape transposed as ``np.transpose(volume, axes)`` would be
        (slices and scores unchanged)."""
        axes = tuple(int(a) for a in axes)
        return dataclasses.replace(self, logits=np.ascontiguousarray(np.transpose(self.logits, axes)),
                                   mask=np.ascontiguousarray(np.transpose(self.mask, axes)),
                                   origin=tuple(self.origin[a] for a in axes), shape=tuple(self.shape[a] for a in axes))


class PromptableEngine(ABC):
    """Base class of promptable engines. Subclasses keep their model loaded between calls."""

    #: registry name, e.g. ``"classical"``, ``"sam-vit-b"``, ``"sam2.1-hiera-tiny"``, ``"medsam2"``
    name: str = ""
    #: when True, :meth:`prepare` takes ``[c, k, j, i]`` float32 (channel 0 = the prompted sequence, then the other
    #: co-registered sequences on its grid) whenever the request carries other sequences
    accepts_channels: bool = False
    #: when True, :meth:`segment` reads ``ObjectPrompt.points`` itself (e.g. as seeds on their slices); the service's
    #: point rules (boxes found around points, a 3D negative-point cut: ``mrisegassist.service.points``) run for
    #: every engine, and only engines that read points are given them
    accepts_points: bool = False

    @abstractmethod
    def prepare(self, volume: np.ndarray, *, progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None):
        """Bind a ``[k, j, i]`` volume (never modified) and return a handle for :meth:`segment`.

        Encodings are cached in the handle (lazily, per slice for per-slice engines), so moving a box and
        calling :meth:`segment` again does not re-encode the volume.
        """

    @abstractmethod
    def segment(self, prepared, prompts: Sequence[ObjectPrompt], *, progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None) -> list[ObjectResult]:
        """Segment each object in 3D from its box prompts; returns one :class:`ObjectResult` per prompt."""

    def release(self) -> None:
        """Free models and caches (e.g. GPU memory)."""


class SliceEngine(PromptableEngine):
    """An engine that segments one axial slice at a time; 3D comes from the shared slice-to-slice
    propagation in :mod:`.propagation` (both directions from the prompted slices).

    The handle returned by :meth:`prepare` must expose ``shape`` = ``(k, j, i)`` (or the engine defines
    ``volume_shape(prepared)``). An engine may set ``propagation`` to a ``PropagationConfig`` (its defaults
    for the walk), and ``accepts_prior = True`` to receive ``prior=SlicePrior(...)`` (the previous slice's kept
    mask and the prompted slice's mask; ``None`` on prompted slices) as an extra keyword of :meth:`predict_slice`.
    """

    #: when True, propagation passes ``prior=propagation.SlicePrior`` to :meth:`predict_slice`
    accepts_prior: bool = False
    #: when True, propagation passes each slice's points (``points=[Point2D, ...]``) to :meth:`predict_slice`,
    #: with ``box=None`` on a slice prompted with points alone (SAM); engines reading points another way (the
    #: weights-free engine: seeds in its per-object model) leave it False
    slice_points: bool = False

    @abstractmethod
    def predict_slice(self, prepared, k: int, box: np.ndarray, *,
                      cancel: Optional[CancelToken] = None) -> tuple[np.ndarray, float]:
        """Segment slice ``k`` inside ``box`` = ``[x0, y0, x1, y1]`` (float pixels, x = i, y = j).

        Returns float32 logits ``[j, i]`` for the slice and a confidence score in 0..1. Per-slice
        encodings are cached in ``prepared`` so the same slice is never encoded twice.
        """

    def segment(self, prepared, prompts: Sequence[ObjectPrompt], *, progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None) -> list[ObjectResult]:
        from .propagation import propagate_objects

        return propagate_objects(self, prepared, prompts, progress=progress, cancel=cancel)
