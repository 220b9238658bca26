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


@dataclass
class ObjectResult:
    """Per-object output on the full volume grid.

    ``logits``: float32 ``[k, j, i]`` (``OUTSIDE_LOGIT`` where not segmented); ``mask``: bool ``[k, j, i]``
    (``logits > 0``); ``slices``: the slice indices in the order they were segmented; ``scores``: per-slice
    engine confidence (predicted IoU for SAM/SAM2, mean probability for the classical engine).
    """

    object_id: int
    logits: np.ndarray
    mask: np.ndarray
    slices: list[int] = field(default_factory=list)
    scores: dict[int, float] = field(default_factory=dict)
    name: str = ""

    @property
    def probabilities(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits))


class PromptableEngine(ABC):
    """Base class of promptable engines. Subclasses keep their model loaded between calls."""

    #: registry name, e.g. ``"classical"``, ``"sam-vit-b"``, ``"sam2.1-hiera-tiny"``, ``"medsam2"``
    name: str = ""
    #: when True, :meth:`prepare` takes ``[c, k, j, i]`` float32 (channel 0 = the prompted sequence, then the other
    #: co-registered sequences on its grid) whenever the request carries other sequences
    accepts_channels: bool = False
    #: when True, :meth:`segment` handles ``ObjectPrompt.points`` itself; otherwise the service turns points
    #: into boxes and a negative-point cut (``mrisegassist.service.points``) around the engine's box prompts
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
