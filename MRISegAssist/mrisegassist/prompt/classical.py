"""Weights-free box-prompted engine: a random walker seeded from the box on the prompted slices, then from the
object's footprint and its appearance learnt over the slices segmented so far.

Input: ``prepare`` takes one ``[k, j, i]`` volume or ``[c, k, j, i]`` co-registered sequences on one grid
(``accepts_channels``; e.g. FLAIR, T1c, T2, T1). Channel 0 is the sequence the boxes were drawn on; boxes,
prompts and results are ``[k, j, i]`` of that grid. Each channel is normalised on a copy (percentile window
of its non-background voxels: 0..1, brighter voxels kept up to ``CLIP_HIGH``) with its own noise level
``sigma``; slices are smoothed lazily and cached.

Prompted slice (channel 0 clipped to 0..1, in a crop around the box, so cost grows with the object):

1. polarity: the object is brighter than its surroundings (FLAIR lesions, enhancing tumour), darker (CSF
   spaces, cysts), or of intermediate intensity (grey-matter nuclei between white matter and CSF: then
   "closeness to the box centre's intensity" is used). A bright candidate that encloses the dark one (an
   enhancing rim around a necrotic core) or the reverse wins. One object has one polarity: with three or more
   boxes, the polarity most of them show is used for all;
2. background level ``B``: a percentile of the ring between box and crop border, inside the body only (not
   the zeros around a skull-stripped brain); object level ``F``: a high percentile in the box centre. The
   object is present if ``F - B >= min_cnr * sigma``;
3. seeds on the contrast ``(I - B) / (F - B)``: foreground ``>= fg_level`` connected to the centre,
   background the ring plus ``<= bg_level`` in the box; ``skimage.segmentation.random_walker`` labels the
   rest. The mask should span the box (``min_span``): if not, and the rest of the box is still brighter than
   the ring (a partly found object, not a loose box), the seed levels are lowered step by step.

Propagated slices (:mod:`.propagation` walks slice by slice away from each prompted slice): each prompted
slice starts an :class:`Appearance` for its walks, per channel a histogram of the object's inner voxels and
one of its surroundings (the crop minus the object, a 2-voxel margin and, after the prompted slice, whatever
looks like the object), learnt from the prompted slice and every slice its walks kept so far. The object is
judged on channel 0's log-likelihood ratio object / surroundings (on the shared cases the other sequences'
ratios made things worse); all channels shape the boundary (random-walker edges weighted by each sequence's
contrast-to-noise ratio for the object). A change of contrast from one slice to the next neither stops the walk
(the object still looks more like itself than like its surroundings) nor sends it into neighbouring tissue
(which the surroundings' histogram has learnt). Intensities are divided by the slice's gain relative to the
prompted slice (median voxel-wise ratio of consecutive slices in the body's interior, taken only where the
surroundings and the whole slice agree), so a smooth intensity drift along ``k`` is followed but a change of
anatomy is not taken for one. Seeds: foreground where the ratio is at least ``seed_llr`` or the object's own median
voxel's ratio (a barely separable object, e.g. grey matter beside grey matter), connected to the previous
slice's mask (the footprint); background the ring and the box's voxels as unlike the object as its
surroundings' median (or ``-seed_llr``). The object is present while the footprint's top decile is at least
``min_relative_llr`` as object-like as the object's median voxel.

Every slice: regions the object encloses belong to it (holes filled: a necrotic or cystic core inside an
enhancing rim is part of the tumour), and after propagation in 3D and in every axial, coronal and sagittal
section of the object (:func:`enclosed`). Logits = log-odds of the walker's foreground probability (filled
holes: ``FILL_LOGIT``); score = mean probability in the mask. Several boxes of one object: each gap between
prompted slices is walked from both sides and the walks blended (``PropagationConfig(consensus=True)``); leaks
are judged on area and outline together (``extent="area+hull"``). Multi-object fusion: :mod:`.fusion`.
Parameters were set with ``mrisegassist bench prompt-accuracy`` (expert-labelled MS lesions, BraTS tumours,
thick-slice post-contrast T1 lesions) and cross-checked on the synthetic failure cases of
:mod:`..synth_prompt_cases` and the ITK-SNAP manual anatomy.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy import ndimage
from skimage.segmentation import random_walker

from ..errors import InputError
from ..progress import CancelToken, ProgressFn, check, report
from ..volume import fingerprint, validate_array
from .base import OUTSIDE_LOGIT, ObjectPrompt, ObjectResult, SliceEngine
from .fusion import union_bbox
from .propagation import PropagationConfig, SlicePrior, touching

MAX_LOGIT = 8.0
#: normalised intensities are clipped to 0..CLIP_HIGH (1 = the window's top: lesions brighter than it keep their
#: contrast for the appearance model; the prompted slice works on 0..1)
CLIP_HIGH = 2.0
#: logit of voxels added because the object encloses them (holes filled; sigmoid ~ 0.88)
FILL_LOGIT = 2.0


@dataclass(frozen=True)
class ClassicalParams:
    """Set with ``mrisegassist bench prompt-accuracy`` (expert labels) and the synthetic failure cases."""

    pad: float = 0.5              #: crop padding around the box, fraction of the box size ...
    min_pad: int = 5              #: ... and at least this many voxels
    smooth_sigma: float = 0.6     #: Gaussian smoothing of each slice (voxels) before anything else
    beta: float = 130.0           #: random-walker edge penalty (scikit-image's ``beta``)
    fg_level: float = 0.6         #: prompted slice: foreground seeds J >= fg_level * F
    bg_level: float = 0.25        #: prompted slice: background seeds inside the box J <= bg_level * F
    core: float = 0.25            #: box centre = box shrunk by this fraction on each side
    peak_percentile: float = 90.0  #: F = this percentile of J in the core
    min_cnr: float = 2.0          #: the object is present when F >= min_cnr
    bg_percentile: float = 65.0   #: background level = this percentile of the ring (polarity-adjusted)
    min_span: float = 0.8         #: prompted slice: the mask should span this fraction of the box ...
    span_scales: tuple = (1.0, 0.75, 0.5)  #: ... else seed levels are scaled down by these factors in turn
    expand_cnr: float = 1.0       #: ... and the rest of the box is this much (noise units) above the ring
    intermediate: float = 0.2     #: "auto" picks "similar" when this fraction of the ring is brighter and darker
    polarity: str = "auto"        #: "auto", "bright", "dark" or "similar" (intermediate intensity) object
    part_fraction: float = 0.3    #: polarity candidates: parts at least this fraction of the largest count
    off_centre: float = 0.1       #: prompted slice: when less of the candidate lies in the core, it is the core
    extreme_span: float = 0.6     #: a box with tissue beyond the ring's range is bright or dark (not intermediate)
    #: when that side's candidate object spans this much of the box ...
    extreme_core: float = 0.1     #: ... or the tissue beyond the range fills this fraction of the box centre
    seed_llr: float = math.log(9.0)  #: propagated slices: seeds where the appearance log-likelihood ratio
    #: is beyond +-seed_llr (object / surroundings 9:1)
    min_relative_llr: float = 0.7  #: propagated slices: the object is present while its footprint's top decile
    #: (``peak_percentile``) is this much as object-like (log-odds) as the object's median voxel
    bins: int = 128               #: appearance histograms: bins over normalised intensities 0..2
    surround_margin: int = 2      #: surroundings' samples lie at least this far (voxels) from the object
    min_interior: float = 0.3     #: the object's samples are its interior (mask minus its edge) unless that is
    #: less than this fraction of the mask (a small object: all of it)
    fill_holes: bool = True       #: regions enclosed by the object belong to it (per slice and in 3D)
    gain_depth: int = 3           #: slice gain: measured this far (voxels, in-plane and across slices) inside the body


@dataclass
class PreparedVolume:
    """Handle returned by :meth:`ClassicalEngine.prepare`: normalised copies ``channels`` ``[c, k, j, i]``
    (percentile window per channel mapped to 0..1, clipped to 0..``CLIP_HIGH``; channel 0 = the prompted
    sequence), their percentile ``windows``, the noise level of each (``noises``), and lazily smoothed slices
    (``smoothed[(c, k)]``, ``[j, i]``)."""

    channels: np.ndarray
    windows: list
    smooth_sigma: float
    noises: tuple = ()
    smoothed: dict = field(default_factory=dict)
    slice_hits: int = 0
    slice_misses: int = 0

    @property
    def array(self) -> np.ndarray:
        """Channel 0 ``[k, j, i]``."""
        return self.channels[0]

    @property
    def noise(self) -> float:
        """Noise level of channel 0."""
        return self.noises[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.channels.shape[1:])

    @property
    def n_channels(self) -> int:
        return int(self.channels.shape[0])

    def body(self, k: int) -> np.ndarray:
        """``[j, i]`` bool: voxels of slice ``k`` above channel 0's window's low end (not background/air)."""
        return self.channels[0, k] > 0

    def slice(self, k: int, c: int = 0) -> np.ndarray:
        """Smoothed slice ``k`` of channel ``c`` (``[j, i]`` float32), computed once and cached."""
        img = self.smoothed.get((c, k))
        if img is None:
            self.slice_misses += 1
            img = self.channels[c, k]
            if self.smooth_sigma > 0:
                img = ndimage.gaussian_filter(img, self.smooth_sigma)
            self.smoothed[(c, k)] = img = img.astype(np.float32, copy=False)
        else:
            self.slice_hits += 1
        return img

    def crop(self, k: int, region: tuple) -> np.ndarray:
        """``[c, h, w]`` smoothed crop ``region`` of slice ``k``, every channel."""
        return np.stack([self.slice(k, c)[region] for c in range(self.n_channels)])


class Appearance:
    """Appearance of an object: per channel, histograms of the object's and of its surroundings' (gain-corrected,
    normalised) intensities, smoothed by the channel's noise level."""

    def __init__(self, noises: tuple, bins: int) -> None:
        self.noises = tuple(noises)
        self.edges = np.linspace(0.0, 2.0, bins + 1)
        self.fg = np.zeros((len(noises), bins))
        self.bg = np.zeros((len(noises), bins))
        self.kernel_bins = [max(float(n) * bins / 2.0, 1.0) for n in noises]  # noise level in bins (>= 1)
        self._llr: Optional[np.ndarray] = None

    @property
    def trained(self) -> bool:
        return bool(self.fg.sum() > 0 and self.bg.sum() > 0)

    def add(self, obj: np.ndarray, surroundings: np.ndarray) -> None:
        """Learn from ``[c, n]`` object and ``[c, m]`` surroundings intensities."""
        for hist, values in ((self.fg, obj), (self.bg, surroundings)):
            for c in range(hist.shape[0]):
                hist[c] += np.histogram(np.clip(values[c], 0.0, 1.999), bins=self.edges)[0]
        self._llr = None

    def llr_table(self) -> np.ndarray:
        """``[c, bins]`` log-likelihood ratio object / surroundings per channel and intensity bin."""
        if self._llr is None:
            table = np.zeros(self.fg.shape)
            for c in range(self.fg.shape[0]):
                f = ndimage.gaussian_filter1d(self.fg[c], self.kernel_bins[c], mode="constant")
                b = ndimage.gaussian_filter1d(self.bg[c], self.kernel_bins[c], mode="constant")
                f, b = f / max(f.sum(), 1e-12), b / max(b.sum(), 1e-12)
                table[c] = np.log(f + 1e-6) - np.log(b + 1e-6)
            self._llr = np.clip(table, -MAX_LOGIT, MAX_LOGIT)
        return self._llr

    def llr(self, features: np.ndarray) -> np.ndarray:
        """Log-likelihood ratio object / surroundings ``[h, w]`` of ``features`` ``[c, h, w]``, judged on channel 0
        (the prompted sequence; on the expert-labelled shared cases adding the other sequences' ratios, summed or
        weighted by their separation, made every multi-sequence result worse: they shape the boundary instead,
        :meth:`edge_weights`)."""
        idx = np.clip(np.digitize(features[0], self.edges) - 1, 0, self.fg.shape[1] - 1)
        return self.llr_table()[0][idx]

    def typical_llr(self) -> tuple[float, float]:
        """Median log-likelihood ratio (channel 0) of the surroundings' and of the object's own samples: how
        separable the object is from its surroundings (``(-8, 8)`` clear, ``(-1, 1)`` barely)."""
        table = self.llr_table()[0]
        out = []
        for hist in (self.bg[0], self.fg[0]):
            order = np.argsort(table)
            cum = np.cumsum(hist[order])
            out.append(float(table[order][np.searchsorted(cum, 0.5 * cum[-1])]))
        return out[0], out[1]

    def edge_weights(self) -> np.ndarray:
        """``[c]`` scale of each channel for the random walker's edges: its share of the object's
        contrast-to-noise ratio (median object vs surroundings over the channel's noise level; the sequences that
        show the object best weigh most) over its noise level (edges in noise units)."""
        centre = 0.5 * (self.edges[1:] + self.edges[:-1])
        cnr = np.zeros(self.fg.shape[0])
        for c in range(cnr.size):
            f, b = np.cumsum(self.fg[c]), np.cumsum(self.bg[c])
            cnr[c] = abs(centre[np.searchsorted(f, 0.5 * f[-1])] - centre[np.searchsorted(b, 0.5 * b[-1])])
            cnr[c] /= self.noises[c]
        share = cnr / cnr.sum() if cnr.sum() > 0 else np.full(cnr.size, 1.0 / cnr.size)
        return share / np.asarray(self.noises)


@dataclass
class Prediction:
    """What :meth:`ClassicalEngine.predict_slice` learns from once propagation keeps the slice: the walk's prompted
    slice ``anchor``, the crop ``region``, gain-corrected ``features`` ``[c, h, w]``, the walker's mask ``raw``
    and the ``surroundings`` ``[h, w]`` of the crop, and the slice's per-channel ``gain``."""

    anchor: int
    region: tuple
    features: np.ndarray
    raw: np.ndarray
    surroundings: np.ndarray
    gain: np.ndarray


class ObjectModel:
    """What :class:`ClassicalEngine` knows about one object during one ``segment`` call.

    ``polarity``: the polarity its boxes agree on (``None``: each box its own). Each prompted slice anchors its
    own walks with its own :class:`Appearance` (``appearance[anchor]``), learnt from the prompted slice and every
    slice those walks kept so far; ``gains[(anchor, k)]``: per-channel gain of kept slice ``k`` relative to its
    walk's prompted slice. Propagation calls :meth:`kept` for every slice it keeps; ``predict_slice`` leaves its
    :class:`Prediction` in ``pending`` (and, on propagated slices, what looked like the object in ``likeness``).
    ``points``: the object's point prompts per slice, ``{k: [(j, i, positive)]}`` (seeds of the walker there).
    """

    def __init__(self, noises: tuple, params: ClassicalParams, polarity: Optional[float] = None,
                 points: Optional[dict] = None) -> None:
        self.params, self.polarity, self.noises = params, polarity, tuple(noises)
        self.points: dict[int, list[tuple[int, int, bool]]] = dict(points or {})
        self.appearance: dict[int, Appearance] = {}
        self.gains: dict[tuple[int, int], np.ndarray] = {}
        self.pending: dict[int, Prediction] = {}
        self.likeness: dict[int, np.ndarray] = {}  # k -> [h, w] crop voxels the appearance finds object-like

    def of(self, anchor: int) -> Appearance:
        """The appearance of the walks anchored at prompted slice ``anchor`` (created empty)."""
        if anchor not in self.appearance:
            self.appearance[anchor] = Appearance(self.noises, self.params.bins)
        return self.appearance[anchor]

    def kept(self, k: int, mask: np.ndarray) -> None:
        """Propagation kept ``mask`` (``[j, i]``) on slice ``k``: learn from the prediction made there."""
        pending = self.pending.pop(k, None)
        if pending is None:
            return
        region, features = pending.region, pending.features
        obj = pending.raw & mask[region]
        if not obj.any():
            return
        # partial-volume edge voxels are neither object nor surroundings, unless the object is mostly edge (small)
        inner = ndimage.binary_erosion(obj)
        if inner.sum() < self.params.min_interior * obj.sum():
            inner = obj
        self.of(pending.anchor).add(features[:, inner],
                                    features[:, pending.surroundings & ~mask[region]])
        self.gains[(pending.anchor, k)] = pending.gain


def percentile_window(array: np.ndarray, low: float = 0.5, high: float = 99.5) -> tuple[float, float]:
    """Intensity window from percentiles of the non-background voxels (voxels equal to the minimum, e.g.
    outside a skull-stripped brain, are ignored when they are more than 10 % of the volume)."""
    sample = array[:: max(1, array.shape[0] // 64)]
    vmin = sample.min()
    body = sample[sample > vmin]
    values = body if body.size > 0.05 * sample.size and (sample == vmin).mean() > 0.1 else sample
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    return float(lo), float(hi)


def noise_level(prepared: "PreparedVolume", channel: int = 0, n_slices: int = 12) -> float:
    """Robust noise level of one smoothed, normalised channel: MAD of neighbour differences (along i) inside
    the body, on a few evenly spaced slices (edges are outliers the median ignores)."""
    nk = prepared.shape[0]
    diffs = []
    for k in np.unique(np.linspace(nk * 0.2, nk * 0.8, n_slices).astype(int)):
        img = prepared.slice(int(k), channel)
        body = (img[:, 1:] > 0.02) & (img[:, :-1] > 0.02)
        diffs.append(np.diff(img, axis=1)[body])
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    if d.size < 100:
        return 0.01
    return max(1.4826 * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2.0), 1e-3)


def _clicks(model: Optional[ObjectModel], k: int, region: tuple) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """``(positive, negative)`` ``[h, w]`` bool masks of the object's point prompts on slice ``k`` inside the crop
    ``region`` (a negative point with its 3x3 neighbourhood, so a click on a thin neck cuts it), or ``None``."""
    points = model.points.get(k) if model is not None else None
    if not points:
        return None
    (sj, si) = region
    h, w = sj.stop - sj.start, si.stop - si.start
    out = (np.zeros((h, w), dtype=bool), np.zeros((h, w), dtype=bool))
    for j, i, positive in points:
        y, x = j - sj.start, i - si.start
        if 0 <= y < h and 0 <= x < w:
            r = 0 if positive else 1
            out[0 if positive else 1][max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1] = True
    out[0][out[1]] = False
    return out if out[0].any() or out[1].any() else None


def _without_clicked(filled: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """``filled`` (2D or 3D bool: regions a mask encloses) less its connected regions holding a ``negative`` voxel
    (a negative point says that cavity is not the object)."""
    if not (filled & negative).any():
        return filled
    labels, _ = ndimage.label(filled)
    return filled & ~np.isin(labels, np.unique(labels[filled & negative]))


def _transform(crop: np.ndarray, sign: float, centre: float) -> np.ndarray:
    """Polarity-adjusted intensities: ``sign * crop`` (+1 bright, -1 dark object) or, for ``sign == 0`` (an
    object of intermediate intensity), closeness to the object's intensity ``-|crop - centre|``."""
    return sign * crop if sign else -np.abs(crop - centre)


def _span(mask: np.ndarray, inbox: np.ndarray) -> float:
    """How far ``mask`` spans the box: the smaller of its width and height fractions of the box's."""
    mj, mi = np.nonzero(mask)
    bj, bi = np.nonzero(inbox)
    return min((mi.max() - mi.min() + 1) / (bi.max() - bi.min() + 1),
               (mj.max() - mj.min() + 1) / (bj.max() - bj.min() + 1))




def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` (2D or 3D bool) with its holes filled: background components (4-/6-connected, as
    ``scipy.ndimage.binary_fill_holes``) that do not reach the array's border; linear time."""
    labels, n = ndimage.label(~mask)
    if n == 0:
        return mask.copy()
    outside = np.zeros(n + 1, dtype=bool)
    for axis in range(mask.ndim):
        for end in (0, -1):
            outside[np.take(labels, end, axis=axis)] = True
    outside[0] = True
    return mask | ~outside[labels]


def enclosed(mask: np.ndarray) -> np.ndarray:
    """Voxels a 3D bool ``mask`` encloses (bool, same shape, ``mask`` excluded): holes of the mask in 3D or
    in any axial, coronal or sagittal section (a cavity whose shell has a gap on one slice is still closed in
    the other directions), repeated until nothing changes."""
    out = mask.copy()
    while True:
        before = int(out.sum())
        for axis in range(3):
            for n in range(out.shape[axis]):
                index = (slice(None),) * axis + (n,)
                section = out[index]
                if section.any():
                    out[index] = fill_holes(section)
        out = fill_holes(out)
        if int(out.sum()) == before:
            return out & ~mask


class ClassicalEngine(SliceEngine):
    """Weights-free default engine (CPU, numpy/scipy/scikit-image). See the module docstring."""

    name = "classical"
    accepts_prior = True
    accepts_channels = True
    accepts_points = True
    propagation = PropagationConfig(margin=0.1, min_margin=2, min_area=1, min_score=0.0, max_growth=1.5,
                                    max_area_ratio=1.5, consensus=True, extent="area+hull")

    def __init__(self, params: Optional[ClassicalParams] = None, cache_size: int = 2) -> None:
        self.params = params or ClassicalParams()
        self.cache_size = cache_size
        self._prepared: "OrderedDict[str, PreparedVolume]" = OrderedDict()
        self.normalisations = 0  #: how many volumes were actually normalised (cache misses of prepare)

    # ------------------------------------------------------------------------------------------ prepare
    def prepare(self, volume: np.ndarray, *, progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None) -> PreparedVolume:
        """Normalise a copy of ``volume`` (``[k, j, i]``, or ``[c, k, j, i]`` co-registered sequences with the
        prompted one first; never modified) to 0..1 per channel by a percentile window.

        The same volume (same content fingerprint) prepared again returns the cached handle.
        """
        volume = np.asarray(volume)
        if volume.ndim == 4:
            if volume.shape[0] < 1:
                raise InputError("prompt volume: no channel given")
            for c in range(volume.shape[0]):
                validate_array(volume[c], f"prompt volume channel {c}", "image")
        else:
            validate_array(volume, "prompt volume", "image")
        check(cancel)
        key = fingerprint(volume)  # every voxel: a small edit is a new volume
        cached = self._prepared.get(key)
        if cached is not None:
            self._prepared.move_to_end(key)
            report(progress, 1.0, "volume already prepared")
            return cached
        stack = volume if volume.ndim == 4 else volume[None]
        channels = np.empty(stack.shape, dtype=np.float32)
        windows = []
        for c in range(stack.shape[0]):
            check(cancel)
            report(progress, c / stack.shape[0], f"normalising channel {c + 1}/{stack.shape[0]}")
            lo, hi = percentile_window(stack[c])
            np.clip((stack[c].astype(np.float32) - lo) / (hi - lo), 0.0, CLIP_HIGH, out=channels[c])
            windows.append((lo, hi))
        prepared = PreparedVolume(channels, windows, self.params.smooth_sigma)
        prepared.noises = tuple(noise_level(prepared, c) for c in range(prepared.n_channels))
        self.normalisations += 1
        self._prepared[key] = prepared
        while len(self._prepared) > self.cache_size:
            self._prepared.popitem(last=False)
        report(progress, 1.0, "volume prepared")
        return prepared

    def release(self) -> None:
        self._prepared.clear()

    # ------------------------------------------------------------------------------------------ objects
    def begin_object(self, prepared: PreparedVolume, prompt: ObjectPrompt) -> ObjectModel:
        """Per-object model for one ``segment`` call (see :class:`ObjectModel`): the polarity most of the object's
        boxes show (each box its own when there is no majority) and, so far, no appearance."""
        boxes = prompt.boxes
        votes = [self._box_polarity(prepared, b.k, b.xyxy) for b in boxes] if len(boxes) > 2 else []
        values, counts = np.unique(votes, return_counts=True) if votes else (np.zeros(0), np.zeros(0))
        polarity = float(values[np.argmax(counts)]) if counts.size and counts.max() > len(votes) / 2 else None
        points: dict[int, list[tuple[int, int, bool]]] = {}
        for q in prompt.points:
            points.setdefault(q.k, []).append((q.j, q.i, q.positive))
        return ObjectModel(prepared.noises, self.params, polarity, points)

    def segment(self, prepared: PreparedVolume, prompts, *, progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None) -> list[ObjectResult]:
        """Slice propagation (:mod:`.propagation`), then regions each object encloses in 3D are added to it."""
        results = super().segment(prepared, prompts, progress=progress, cancel=cancel)
        if self.params.fill_holes:
            for r, prompt in zip(results, prompts):
                if r.mask.any():
                    box = union_bbox([r.mask])  # on the result's own box (its first voxel: r.origin)
                    filled = enclosed(r.mask[box])
                    negative = np.zeros(filled.shape, dtype=bool)
                    for q in prompt.negative_points:
                        at = tuple(v - o - b.start for v, o, b in zip((q.k, q.j, q.i), r.origin, box))
                        if all(0 <= a < n for a, n in zip(at, filled.shape)):
                            negative[at] = True
                    filled = _without_clicked(filled, negative)
                    if filled.any():
                        r.mask[box] |= filled
                        r.logits[box][filled] = FILL_LOGIT
        return results

    # ------------------------------------------------------------------------------------- one slice
    def _crop(self, shape: tuple[int, int], x0: int, y0: int, x1: int, y1: int,
              body: Optional[np.ndarray] = None):
        """Crop slices around the box (padded) and the box / ring / centre masks inside the crop, plus the ring
        part inside the body (``body``: the slice's voxels above the window's low end) for statistics."""
        p = self.params
        nj, ni = shape
        pi = max(p.min_pad, math.ceil(p.pad * (x1 - x0 + 1)))
        pj = max(p.min_pad, math.ceil(p.pad * (y1 - y0 + 1)))
        cy0, cx0 = max(y0 - pj, 0), max(x0 - pi, 0)
        region = (slice(cy0, min(y1 + pj, nj - 1) + 1), slice(cx0, min(x1 + pi, ni - 1) + 1))
        cshape = (region[0].stop - cy0, region[1].stop - cx0)
        inbox = np.zeros(cshape, dtype=bool)
        inbox[y0 - cy0:y1 - cy0 + 1, x0 - cx0:x1 - cx0 + 1] = True
        ring = ~inbox
        if ring.sum() < 8:  # the box covers (almost) the whole slice: its own border is the background
            ring = inbox & ~ndimage.binary_erosion(inbox, border_value=0)
        core = np.zeros(cshape, dtype=bool)
        ci, cj = math.floor(p.core * (x1 - x0)), math.floor(p.core * (y1 - y0))
        core[y0 - cy0 + cj:y1 - cy0 - cj + 1, x0 - cx0 + ci:x1 - cx0 - ci + 1] = True
        stats = ring
        if body is not None:  # outside a skull-stripped brain (or in air) is not the object's background
            inside = ring & body[region]
            stats = inside if inside.sum() >= max(8, 0.1 * ring.sum()) else ring
        return region, inbox, ring, core, stats

    def _background(self, u: np.ndarray, ring: np.ndarray) -> float:
        """Background level of polarity-adjusted intensities ``u``: a percentile of the ring (above the median,
        so dark neighbours such as CSF next to a bright lesion do not lower it)."""
        return float(np.percentile(u[ring], self.params.bg_percentile))

    def _box_polarity(self, prepared: PreparedVolume, k: int, box: np.ndarray) -> float:
        """The polarity ``box`` on slice ``k`` shows on its own (:meth:`_polarity` around the box centre)."""
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        img = prepared.slice(k)
        region, inbox, _, core, stats = self._crop(img.shape, x0, y0, x1, y1, prepared.body(k))
        crop = np.minimum(img[region], 1.0)
        return self._polarity(crop, inbox, stats, prepared.noise, float(np.median(crop[core])), core)

    def predict_slice(self, prepared: PreparedVolume, k: int, box: np.ndarray, *,
                      cancel: Optional[CancelToken] = None, prior: Optional[SlicePrior] = None,
                      model: Optional[ObjectModel] = None) -> tuple[np.ndarray, float]:
        """Logits ``[j, i]`` (float32, ``OUTSIDE_LOGIT`` outside the crop) and score for slice ``k`` in
        ``box`` = ``[x0, y0, x1, y1]``. ``prior`` (the previous slice's mask) on propagated slices; ``model``
        (:meth:`begin_object`) carries the object's pooled polarity and appearance through the walk."""
        check(cancel)
        if not isinstance(prepared, PreparedVolume):
            raise InputError("predict_slice needs the handle returned by ClassicalEngine.prepare")
        nj, ni = prepared.shape[1:]
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, ni - 1), min(y1, nj - 1)
        if x1 < x0 or y1 < y0:
            raise InputError(f"box {list(box)} is empty or outside slice {k}")
        geometry = self._crop((nj, ni), x0, y0, x1, y1, prepared.body(k))
        region = geometry[0]
        out = np.full((nj, ni), OUTSIDE_LOGIT, dtype=np.float32)
        anchor = k if prior is None else prior.anchor_k
        clicks = _clicks(model, k, region)
        if prior is not None and model is not None and model.of(anchor).trained:
            prob, features, gain, present = self._appearance_slice(prepared, k, geometry, prior, model, cancel,
                                                                   clicks)
        else:
            prob, present = self._prompted_slice(prepared, k, geometry, model, cancel, clicks)
            features, gain = None, np.ones(prepared.n_channels)
        if not present:
            out[region] = -MAX_LOGIT
            return out, 0.0
        prob = np.clip(prob, 1e-4, 1 - 1e-4)
        logits = np.clip(np.log(prob / (1.0 - prob)), -MAX_LOGIT, MAX_LOGIT)
        raw = prob > 0.5
        mask = fill_holes(raw) if self.params.fill_holes else raw
        if clicks is not None:  # a hole holding a negative point stays a hole
            mask = raw | _without_clicked(mask & ~raw, clicks[1])
        logits[mask & ~raw] = FILL_LOGIT
        out[region] = logits
        if model is not None:
            near = ndimage.binary_dilation(mask, iterations=self.params.surround_margin) if mask.any() else mask
            alike = model.likeness.pop(k, None)
            if alike is not None:  # propagated slice: surroundings are learnt where they do not look like the object
                near |= alike
            body = prepared.body(k)[region]
            surround = ~near & body if body.any() else ~near
            if features is None:
                features = prepared.crop(k, region)
            model.pending[k] = Prediction(anchor, region, features, raw, surround, gain)
        return out, (float(prob[raw].mean()) if raw.any() else 0.0)

    def _prompted_slice(self, prepared: PreparedVolume, k: int, geometry: tuple, model: Optional[ObjectModel],
                        cancel: Optional[CancelToken], clicks: Optional[tuple] = None) -> tuple[np.ndarray, bool]:
        """Foreground probability of the crop on a prompted slice (channel 0, module docstring steps 1-3) and
        whether the object is present. ``clicks``: ``(positive, negative)`` point masks of the crop (seeds), or
        ``None``."""
        p = self.params
        region, inbox, ring, core, stats = geometry
        crop = np.minimum(prepared.slice(k)[region], 1.0)  # the window's top: the brightest tissue alike
        centre = float(np.median(crop[core]))
        if model is not None and model.polarity is not None:
            sign = model.polarity
        else:
            sign = self._polarity(crop, inbox, stats, prepared.noise, centre, core)
        parts = None
        if sign:  # an object off the box centre (a curved or split structure): its levels come from it
            parts, _ = self._candidate(crop, inbox, stats, prepared.noise, sign)
            if parts.any() and (parts & core).sum() < p.off_centre * parts.sum():
                core = parts
        u = _transform(crop, sign, centre)
        base = self._background(u, stats)
        peak = float(np.percentile(u[core], p.peak_percentile))
        if parts is not None and parts.any() and peak - base < p.min_cnr * prepared.noise:
            # a prompted box asserts its object: when the centre shows none (mostly the object's surroundings,
            # e.g. a tall box around a thin curved ventricle), the box's candidate object gives the levels
            core = parts
            peak = float(np.percentile(u[core], p.peak_percentile))
        if peak - base < p.min_cnr * prepared.noise:
            return np.zeros(crop.shape, np.float32), False
        contrast = (u - base) / (peak - base)  # 0 = background level, 1 = object level
        # the object should span the box; lower the seed levels until it does (a box is drawn around its object)
        for scale in p.span_scales:
            check(cancel)
            prob = self._walk_levels(contrast, inbox, ring, core, scale, clicks)
            mask = prob > 0.5
            if not mask.any() or _span(mask, inbox) >= p.min_span:
                break
            rest = inbox & ~mask
            if rest.any() and np.median(u[rest]) - np.median(u[stats]) < p.expand_cnr * prepared.noise:
                break  # the rest of the box looks like the background: a loose box, not a partial object
        return prob, True

    def _appearance_slice(self, prepared: PreparedVolume, k: int, geometry: tuple, prior: SlicePrior,
                          model: ObjectModel, cancel: Optional[CancelToken], clicks: Optional[tuple] = None) -> tuple:
        """``(probability, features, gain, present)`` on a propagated slice: the crop's foreground probability
        from the object's appearance and the previous slice's footprint (module docstring), its gain-corrected
        channels ``[c, h, w]``, the slice's per-channel gain, and whether the object is present."""
        p = self.params
        region, inbox, ring, core, stats = geometry
        gain = model.gains.get((prior.anchor_k, prior.k), np.ones(prepared.n_channels))
        gain = gain * self._gain(prepared, k, prior.k, region, stats)
        features = prepared.crop(k, region) / gain[:, None, None]
        appearance = model.of(prior.anchor_k)
        llr = appearance.llr(features)
        footprint = ndimage.binary_dilation(prior.mask[region], iterations=1) & inbox
        if not footprint.any():
            footprint = core
        bg_typical, fg_typical = appearance.typical_llr()
        fg_seed, bg_seed = min(p.seed_llr, fg_typical), max(-p.seed_llr, bg_typical)
        positive = clicks[0] if clicks is not None else np.zeros(llr.shape, dtype=bool)
        if not positive.any() and \
                np.percentile(llr[footprint], p.peak_percentile) < max(fg_seed, p.min_relative_llr * fg_typical):
            return llr, features, gain, False  # a positive click says the object is there
        fg = touching(inbox & (llr >= fg_seed), footprint | positive) | positive
        if not fg.any():
            return llr, features, gain, False
        seeds = np.zeros(llr.shape, dtype=np.int32)
        seeds[ring | (inbox & (llr <= bg_seed))] = 1
        seeds[fg] = 2
        if clicks is not None:
            seeds[clicks[1]] = 1
        check(cancel)
        weights = appearance.edge_weights()
        data = np.moveaxis(features * weights[:, None, None], 0, -1) if weights.size > 1 else features[0]
        prob = self._random_walk(data, seeds)
        model.likeness[k] = llr > 0
        return prob, features, gain, True

    def _gain(self, prepared: PreparedVolume, k: int, k_prev: int, region: tuple, stats: np.ndarray) -> np.ndarray:
        """Per-channel intensity ratio of slice ``k`` to slice ``k_prev``: a drift of the signal along ``k``.

        Measured twice, as the median voxel-wise ratio of the tissue interior (:meth:`_interior_ratio`): in the
        surroundings ``stats`` of the crop ``region`` and over the whole slice. A drift of the signal moves both
        alike; a change of anatomy (the brain's surface curving through the slices, tissue pushed aside by the
        object) moves one only or the other way. The step is the smaller of the two when they agree in sign, else
        none: compounded over a walk, an anatomical change taken for a drift makes normal tissue look like the
        object (a FLAIR walk leaking past a tumour's end towards the occipital pole in coronal slices)."""
        local = np.log(self._interior_ratio(prepared, k, k_prev, region, stats))
        whole = np.log(self._interior_ratio(prepared, k, k_prev, (slice(None), slice(None)), None))
        agree = np.sign(local) == np.sign(whole)
        return np.exp(np.where(agree, np.sign(local) * np.minimum(np.abs(local), np.abs(whole)), 0.0))

    def _interior_ratio(self, prepared: PreparedVolume, k: int, k_prev: int, region: tuple,
                        where: Optional[np.ndarray]) -> np.ndarray:
        """Per-channel median voxel-wise ratio slice ``k`` / ``k_prev`` in ``region`` (``where``: a bool mask of the
        region, or ``None``), over the body's interior: voxels inside the body on every slice from
        ``gain_depth`` before to ``gain_depth`` after the pair and at least ``gain_depth`` voxels in-plane from
        its edge (partial volume with the background, in-plane or through the slices, is not a drift)."""
        d = self.params.gain_depth
        lo, hi = max(min(k, k_prev) - d, 0), min(max(k, k_prev) + d, prepared.shape[0] - 1)
        body = np.logical_and.reduce([prepared.body(z)[region] for z in range(lo, hi + 1)])
        inner = ndimage.binary_erosion(body, iterations=d, border_value=1)
        if where is not None:
            inner &= where
        out = np.ones(prepared.n_channels)
        for c in range(prepared.n_channels):
            a, b = prepared.slice(k, c)[region][inner], prepared.slice(k_prev, c)[region][inner]
            valid = (a > 0.02) & (b > 0.02)
            if valid.sum() >= 20:
                out[c] = float(np.clip(np.median(a[valid] / b[valid]), 0.5, 2.0))
        return out

    def _walk_levels(self, contrast: np.ndarray, inbox: np.ndarray, ring: np.ndarray, core: np.ndarray,
                     scale: float, clicks: Optional[tuple] = None) -> np.ndarray:
        """Seeds from the contrast (foreground ``>= scale * fg_level`` connected to the core, background the
        ring and ``<= scale * bg_level`` in the box) and the random walker's foreground probability. ``clicks``:
        ``(positive, negative)`` point masks: the candidate parts the positive points touch are the foreground
        seeds (else the core's, as without points: a click alone in a box inside its object does not shrink the
        object to the click), the negative points background seeds."""
        p = self.params
        fg = inbox & (contrast >= scale * p.fg_level)
        clicked = touching(fg, clicks[0]) if clicks is not None else None
        if clicked is not None and clicked.any():
            fg = clicked
        else:
            if fg.any() and not (fg & core).any():  # none in the core: the part with the strongest contrast
                core = np.zeros(fg.shape, dtype=bool)
                core.flat[np.argmax(np.where(fg, contrast, -np.inf))] = True
            fg = touching(fg, core)
        seeds = np.zeros(contrast.shape, dtype=np.int32)
        seeds[ring | (inbox & (contrast <= scale * p.bg_level))] = 1
        seeds[fg] = 2
        if clicks is not None:
            seeds[clicks[1]] = 1
        return self._random_walk(contrast, seeds)

    def _polarity(self, crop: np.ndarray, inbox: np.ndarray, ring: np.ndarray, noise: float,
                  centre: float, core: Optional[np.ndarray] = None) -> float:
        """+1 if the boxed object is brighter than its surroundings, -1 if darker, 0 if in between.

        In between: both clearly brighter and clearly darker tissue (``intermediate`` of the ring each) surround
        the box centre's intensity ``centre`` (e.g. grey-matter nuclei between white matter and CSF), unless the
        box holds tissue beyond the ring's range whose side's candidate object spans the box (``extreme_span``)
        or whose largest part fills ``extreme_core`` of the box centre ``core`` (a ventricle crescent in its own
        box, a thin dark slit in the middle of the box; not a sliver of ventricle along the edge of a loose box
        around the caudate).
        For each polarity the candidate object is the box's regions at least half-way from the ring's median to
        the box's extreme, its largest connected part and the parts at least ``part_fraction`` of its size (an
        object cut in pieces on the slice, e.g. a curved ventricle); the polarity whose candidate spans the box clearly
        better wins (a box is drawn around its object), else the one with the stronger extreme contrast.
        """
        if self.params.polarity != "auto":
            return {"bright": 1.0, "dark": -1.0, "similar": 0.0}[self.params.polarity]
        r, b = crop[ring], crop[inbox]
        margin = 2.0 * noise
        if min(np.mean(r > centre + margin), np.mean(r < centre - margin)) >= self.params.intermediate:
            # ... unless the box holds tissue brighter or darker than all the ring and that side's object spans the
            # box or fills its centre (an enhancing rim around a dark necrotic centre is a bright object, a
            # ventricle crescent in its box a dark one; a sliver of ventricle along the edge of a loose box
            # around the caudate is a neighbour, not the object)
            (r_lo, r_hi), (b_lo, b_hi) = np.percentile(r, [5, 95]), np.percentile(b, [5, 95])
            lo, hi = r_lo - 1.5 * margin, r_hi + 1.5 * margin
            if b_hi <= hi and b_lo >= lo:
                return 0.0
            sides = []
            if b_hi > hi:
                sides.append((1.0, crop > hi))
            if b_lo < lo:
                sides.append((-1.0, crop < lo))
            if not any(self._extreme_is_object(crop, inbox, ring, noise, core, sign, beyond)
                       for sign, beyond in sides):
                return 0.0
        spans, peaks, parts = {}, {}, {}
        for sign in (1.0, -1.0):
            parts[sign], peaks[sign] = self._candidate(crop, inbox, ring, noise, sign)
            spans[sign] = _span(parts[sign], inbox) if parts[sign].any() else 0.0
        for sign in (1.0, -1.0):  # one candidate encloses the other (a necrotic core in its rim): the enclosing one
            inner = parts[-sign]
            if inner.any() and (fill_holes(parts[sign]) & inner).sum() >= 0.5 * inner.sum():
                return sign
        if abs(spans[1.0] - spans[-1.0]) > 0.25:
            return 1.0 if spans[1.0] > spans[-1.0] else -1.0
        return 1.0 if peaks[1.0] >= peaks[-1.0] else -1.0

    def _extreme_is_object(self, crop: np.ndarray, inbox: np.ndarray, ring: np.ndarray, noise: float,
                           core: Optional[np.ndarray], sign: float, beyond: np.ndarray) -> bool:
        """Whether tissue beyond the ring's range (``beyond``, on side ``sign``) is the boxed object: that side's
        candidate spans the box, or the largest part of ``beyond`` fills ``extreme_core`` of the box centre."""
        p = self.params
        candidate, _ = self._candidate(crop, inbox, ring, noise, sign)
        if candidate.any() and _span(candidate, inbox) >= p.extreme_span:
            return True
        parts, n = ndimage.label(inbox & beyond, structure=np.ones((3, 3), bool))
        if n == 0 or core is None:
            return False
        largest = parts == 1 + int(np.argmax(np.bincount(parts.ravel())[1:]))
        return bool((largest & core).sum() >= p.extreme_core * core.sum())

    def _candidate(self, crop: np.ndarray, inbox: np.ndarray, ring: np.ndarray, noise: float,
                   sign: float) -> tuple[np.ndarray, float]:
        """The box's candidate object for polarity ``sign`` (+1/-1) and its extreme contrast (noise units):
        voxels at least half-way from the ring's median to the box's 98th percentile, their largest connected
        part and the parts at least ``part_fraction`` of its size."""
        zs = sign * (crop - float(np.median(crop[ring]))) / noise
        peak = float(np.percentile(zs[inbox], 98))
        if peak <= 0:
            return np.zeros_like(inbox), peak
        labels, n = ndimage.label(inbox & (zs >= 0.5 * peak), structure=np.ones((3, 3), bool))
        if n == 0:
            return np.zeros_like(inbox), peak
        sizes = np.bincount(labels.ravel())[1:]
        return np.isin(labels, 1 + np.flatnonzero(sizes >= self.params.part_fraction * sizes.max())), peak

    def _random_walk(self, data: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """Foreground probability ``[j, i]`` of the 2-label random walker on ``data`` ``[j, i]`` or ``[j, i, c]``
        (seeds: 1 bg, 2 fg, 0 unknown)."""
        if not (seeds == 0).any() or not (seeds == 2).any() or not (seeds == 1).any():
            return (seeds == 2).astype(np.float32) if (seeds != 1).any() and (seeds == 2).any() else \
                np.zeros(seeds.shape, np.float32)
        with warnings.catch_warnings():  # "probability range is outside [0, 1]": clipped by the caller
            warnings.filterwarnings("ignore", message="The probability range", category=UserWarning)
            prob = random_walker(data.astype(np.float64), seeds, beta=self.params.beta, mode="cg_j",
                                 return_full_prob=True, tol=1e-3, channel_axis=-1 if data.ndim == 3 else None)
        return prob[1].astype(np.float32)
