"""Weights-free box-prompted engine: a random walker seeded from the box, on one axial slice at a time.

``prepare`` normalises a copy of the volume to 0..1 (percentile window of the non-background voxels) and
estimates the noise level ``sigma`` once; slices are smoothed lazily and cached. Per slice, in a crop around
the box (cost grows with the object, not the image):

1. polarity: the object is brighter than its surroundings (FLAIR lesions, enhancing tumour), darker (CSF
   spaces, cysts), or of intermediate intensity (grey-matter nuclei between white matter and CSF: then
   "closeness to the box centre's intensity" is used); on propagated slices it comes from the prompted slice;
2. background level ``B``: a percentile of the ring between box and crop border, inside the body only (not
   the zeros around a skull-stripped brain); object level ``F``: a high percentile in the box centre (or
   where the previous slice's mask was). The object is present if ``F - B >= min_cnr * sigma`` and, on a
   propagated slice, at least ``min_relative_contrast`` of the prompted slice's contrast (absolute levels
   from the prompted slice: no drift from slice to slice); otherwise the slice is returned empty;
3. seeds on the contrast ``(I - B) / (F - B)``: foreground ``>= fg_level`` connected to the centre,
   background the ring plus ``<= bg_level`` in the box; ``skimage.segmentation.random_walker`` labels the
   rest. On a prompted slice the mask should span the box (``min_span``): if not, and the rest of the box
   is still brighter than the ring (a partly found object, not a loose box), the seed levels are lowered
   step by step (a box is drawn around its object);
4. logits = log-odds of the random walker's foreground probability; score = mean probability in the mask.

3D comes from the shared slice propagation (:mod:`.propagation`, with leak guards set in ``propagation``
below), multi-object fusion from :mod:`.fusion`. Parameters were tuned with ``mrisegassist bench
prompt-accuracy`` on expert-labelled MS lesions, BraTS tumours and thick-slice post-contrast T1 lesions.
"""
from __future__ import annotations

import hashlib
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
from ..volume import validate_array
from .base import OUTSIDE_LOGIT, SliceEngine
from .propagation import PropagationConfig, SlicePrior

MAX_LOGIT = 8.0


@dataclass(frozen=True)
class ClassicalParams:
    """Tuned on expert-labelled lesions (``mrisegassist bench prompt-accuracy``)."""

    pad: float = 0.5              #: crop padding around the box, fraction of the box size ...
    min_pad: int = 5              #: ... and at least this many voxels
    smooth_sigma: float = 0.6     #: Gaussian smoothing of each slice (voxels) before anything else
    beta: float = 130.0           #: random-walker edge penalty (scikit-image's ``beta``)
    fg_level: float = 0.6         #: foreground seeds: J >= fg_level * F
    bg_level: float = 0.25        #: background seeds inside the box: J <= bg_level * F
    core: float = 0.25            #: box centre = box shrunk by this fraction on each side
    peak_percentile: float = 90.0  #: F = this percentile of J in the core
    min_cnr: float = 2.0          #: the object is present when F >= min_cnr
    min_relative_contrast: float = 0.7  #: ... and (propagated slices) F >= this fraction of the prompted one's
    bg_percentile: float = 65.0   #: background level = this percentile of the ring (polarity-adjusted)
    min_span: float = 0.8         #: prompted slice: the mask should span this fraction of the box ...
    span_scales: tuple = (1.0, 0.75, 0.5)  #: ... else seed levels are scaled down by these factors in turn
    expand_cnr: float = 1.0       #: ... and the rest of the box is this much (noise units) above the ring
    anchor_percentile: float = 75.0  #: object level on the prompted slice: this percentile inside its mask
    anchor_level: bool = True     #: propagated slices: thresholds from the prompted slice's object level
    intermediate: float = 0.2     #: "auto" picks "similar" when this fraction of the ring is brighter and darker
    polarity: str = "auto"        #: "auto", "bright", "dark" or "similar" (intermediate intensity) object
    part_fraction: float = 0.3    #: polarity candidates: parts at least this fraction of the largest count
    off_centre: float = 0.1       #: prompted slice: when less of the candidate lies in the core, it is the core
    extreme_span: float = 0.6     #: a box with tissue beyond the ring's range is bright or dark (not intermediate)
    #: when that side's candidate object spans this much of the box ...
    extreme_core: float = 0.1     #: ... or the tissue beyond the range fills this fraction of the box centre


@dataclass
class PreparedVolume:
    """Handle returned by :meth:`ClassicalEngine.prepare`: the normalised copy ``array`` ``[k, j, i]`` in 0..1
    (percentile window) and lazily smoothed slices (``smoothed[k]``, ``[j, i]``)."""

    array: np.ndarray
    window: tuple[float, float]
    smooth_sigma: float
    noise: float = 0.0
    smoothed: dict[int, np.ndarray] = field(default_factory=dict)
    anchors: dict = field(default_factory=dict)
    slice_hits: int = 0
    slice_misses: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    def body(self, k: int) -> np.ndarray:
        """``[j, i]`` bool: voxels of slice ``k`` above the window's low end (not background/air)."""
        return self.array[k] > 0

    def slice(self, k: int) -> np.ndarray:
        """Smoothed slice ``k`` (``[j, i]`` float32), computed once and cached."""
        img = self.smoothed.get(k)
        if img is None:
            self.slice_misses += 1
            img = self.array[k]
            if self.smooth_sigma > 0:
                img = ndimage.gaussian_filter(img, self.smooth_sigma)
            self.smoothed[k] = img = img.astype(np.float32, copy=False)
        else:
            self.slice_hits += 1
        return img


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


def noise_level(prepared: "PreparedVolume", n_slices: int = 12) -> float:
    """Robust noise level of the smoothed, normalised volume: MAD of neighbour differences (along i) inside
    the body, on a few evenly spaced slices (edges are outliers the median ignores)."""
    nk = prepared.shape[0]
    diffs = []
    for k in np.unique(np.linspace(nk * 0.2, nk * 0.8, n_slices).astype(int)):
        img = prepared.slice(int(k))
        body = (img[:, 1:] > 0.02) & (img[:, :-1] > 0.02)
        diffs.append(np.diff(img, axis=1)[body])
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    if d.size < 100:
        return 0.01
    return max(1.4826 * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2.0), 1e-3)


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


def _fingerprint(volume: np.ndarray) -> str:
    flat = np.ascontiguousarray(volume.reshape(-1)[:: max(1, volume.size // 65536)])
    return hashlib.sha1(flat.tobytes() + str(volume.shape).encode() + str(volume.dtype).encode()).hexdigest()


class ClassicalEngine(SliceEngine):
    """Weights-free default engine (CPU, numpy/scipy/scikit-image). See the module docstring."""

    name = "classical"
    accepts_prior = True
    propagation = PropagationConfig(margin=0.1, min_margin=2, min_area=1, min_score=0.0, max_growth=1.5,
                                    max_area_ratio=1.5)

    def __init__(self, params: Optional[ClassicalParams] = None, cache_size: int = 2) -> None:
        self.params = params or ClassicalParams()
        self.cache_size = cache_size
        self._prepared: "OrderedDict[str, PreparedVolume]" = OrderedDict()
        self.normalisations = 0  #: how many volumes were actually normalised (cache misses of prepare)

    # ------------------------------------------------------------------------------------------ prepare
    def prepare(self, volume: np.ndarray, *, progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None) -> PreparedVolume:
        """Normalise a copy of ``volume`` (``[k, j, i]``, never modified) to 0..1 by a percentile window.

        The same volume (same content fingerprint) prepared again returns the cached handle.
        """
        volume = np.asarray(volume)
        validate_array(volume, "prompt volume", "image")
        check(cancel)
        key = _fingerprint(volume)
        cached = self._prepared.get(key)
        if cached is not None:
            self._prepared.move_to_end(key)
            report(progress, 1.0, "volume already prepared")
            return cached
        report(progress, 0.0, "normalising volume")
        lo, hi = percentile_window(volume)
        array = np.clip((volume.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
        prepared = PreparedVolume(array, (lo, hi), self.params.smooth_sigma)
        prepared.noise = noise_level(prepared)
        self.normalisations += 1
        self._prepared[key] = prepared
        while len(self._prepared) > self.cache_size:
            self._prepared.popitem(last=False)
        report(progress, 1.0, "volume prepared")
        return prepared

    def release(self) -> None:
        self._prepared.clear()

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
        """The polarity :meth:`predict_slice` finds for ``box`` on a prompted slice ``k``."""
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        img = prepared.slice(k)
        region, inbox, _, core, stats = self._crop(img.shape, x0, y0, x1, y1, prepared.body(k))
        return self._prompted_polarity(img[region], inbox, stats, core, prepared.noise)[0]

    def _prompted_polarity(self, crop: np.ndarray, inbox: np.ndarray, stats: np.ndarray, core: np.ndarray,
                           noise: float) -> tuple[float, float]:
        """``(polarity, centre)`` of a prompted box: the box centre's median intensity and :meth:`_polarity`."""
        centre = float(np.median(crop[core]))
        return self._polarity(crop, inbox, stats, noise, centre, core), centre

    def _anchor_levels(self, prepared: PreparedVolume, k: int, mask: np.ndarray,
                       box: Optional[np.ndarray] = None) -> tuple[float, float, float, float]:
        """``(polarity, centre, object level, background level)`` of the object on its prompted slice (levels
        are polarity-adjusted intensities: a percentile inside the mask, ring percentile around it), cached.
        With the prompted ``box`` the polarity is the one the prompted slice was segmented with; without it,
        it is estimated around the mask."""
        p = self.params
        box_key = None if box is None else tuple(int(round(float(v))) for v in box)
        key = (k, hashlib.sha1(np.packbits(mask).tobytes()).hexdigest(), box_key, p.anchor_percentile)
        hit = prepared.anchors.get(key)
        if hit is None:
            jj, ii = np.nonzero(mask)
            region, inbox, _, _, ring = self._crop(mask.shape, ii.min(), jj.min(), ii.max(), jj.max(),
                                                   prepared.body(k))
            crop = prepared.slice(k)[region]
            inside = crop[mask[region]]
            centre = float(np.median(inside))
            if box is not None:
                sign = self._box_polarity(prepared, k, box)
            else:
                sign = self._polarity(crop, inbox, ring, prepared.noise, centre)
                if sign and (centre - np.median(crop[ring])) * sign < 0:  # the mask itself says otherwise
                    sign = -sign
            u = _transform(crop, sign, centre)
            hit = prepared.anchors[key] = (sign, centre, float(np.percentile(u[mask[region]], p.anchor_percentile)),
                                           self._background(u, ring))
        return hit

    def predict_slice(self, prepared: PreparedVolume, k: int, box: np.ndarray, *,
                      cancel: Optional[CancelToken] = None,
                      prior: Optional[SlicePrior] = None) -> tuple[np.ndarray, float]:
        """Logits ``[j, i]`` (float32, ``OUTSIDE_LOGIT`` outside the crop) and score for slice ``k`` in
        ``box`` = ``[x0, y0, x1, y1]``; ``prior`` (previous and prompted slices' masks) on propagated slices."""
        check(cancel)
        if not isinstance(prepared, PreparedVolume):
            raise InputError("predict_slice needs the handle returned by ClassicalEngine.prepare")
        p = self.params
        img = prepared.slice(k)
        nj, ni = img.shape
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, ni - 1), min(y1, nj - 1)
        if x1 < x0 or y1 < y0:
            raise InputError(f"box {list(box)} is empty or outside slice {k}")
        region, inbox, ring, core, stats = self._crop(img.shape, x0, y0, x1, y1, prepared.body(k))
        crop = img[region]
        out = np.full((nj, ni), OUTSIDE_LOGIT, dtype=np.float32)
        if prior is not None:
            sign, centre, obj_level, bg_anchor = self._anchor_levels(prepared, prior.anchor_k, prior.anchor_mask,
                                                                     prior.anchor_box)
            prev = ndimage.binary_dilation(prior.mask[region], iterations=1) & inbox
            if prev.any():
                core = prev
        else:
            sign, centre = self._prompted_polarity(crop, inbox, stats, core, prepared.noise)
            parts = None
            if sign:  # an object off the box centre (a curved or split structure): its levels come from it
                parts, _ = self._candidate(crop, inbox, stats, prepared.noise, sign)
                if parts.any() and (parts & core).sum() < p.off_centre * parts.sum():
                    core = parts
        u = _transform(crop, sign, centre)
        base = self._background(u, stats)
        peak = float(np.percentile(u[core], p.peak_percentile))
        if prior is None and parts is not None and parts.any() and peak - base < p.min_cnr * prepared.noise:
            # a prompted box asserts its object: when the centre shows none (mostly the object's surroundings,
            # e.g. a tall box around a thin curved ventricle), the box's candidate object gives the levels
            core = parts
            peak = float(np.percentile(u[core], p.peak_percentile))
        if prior is not None:  # judged against the prompted slice's object (absolute levels): no drift
            base = max(base, bg_anchor)
            ref = obj_level - bg_anchor
            present = peak - base >= max(p.min_relative_contrast * ref, p.min_cnr * prepared.noise)
            level = (obj_level - base) if p.anchor_level else (min(peak, obj_level) - base)
        else:
            present = peak - base >= p.min_cnr * prepared.noise
            level = peak - base
        if not present:
            out[region] = -MAX_LOGIT
            return out, 0.0
        contrast = (u - base) / level  # 0 = background level, 1 = object level
        # prompted slice: the object should span the box; lower the seed levels until it does (box prior)
        scales = (1.0,) if prior is not None else p.span_scales
        for scale in scales:
            check(cancel)
            prob = self._walk_levels(contrast, inbox, ring, core, scale)
            mask = prob > 0.5
            if not mask.any() or _span(mask, inbox) >= p.min_span:
                break
            rest = inbox & ~mask
            if rest.any() and np.median(u[rest]) - np.median(u[stats]) < p.expand_cnr * prepared.noise:
                break  # the rest of the box looks like the background: a loose box, not a partial object
        prob = np.clip(prob, 1e-4, 1 - 1e-4)
        out[region] = np.clip(np.log(prob / (1.0 - prob)), -MAX_LOGIT, MAX_LOGIT)
        return out, (float(prob[mask].mean()) if mask.any() else 0.0)

    def _walk_levels(self, contrast: np.ndarray, inbox: np.ndarray, ring: np.ndarray, core: np.ndarray,
                     scale: float) -> np.ndarray:
        """Seeds from the contrast (foreground ``>= scale * fg_level`` connected to the core, background the
        ring and ``<= scale * bg_level`` in the box) and the random walker's foreground probability."""
        p = self.params
        fg = inbox & (contrast >= scale * p.fg_level)
        labels, n = ndimage.label(fg, structure=np.ones((3, 3), bool))
        if n > 1:
            touching = np.unique(labels[core & fg])
            touching = touching[touching > 0]
            if touching.size == 0:
                touching = [labels.flat[np.argmax(np.where(fg, contrast, -np.inf))]]
            fg = np.isin(labels, touching)
        seeds = np.zeros(contrast.shape, dtype=np.int32)
        seeds[ring | (inbox & (contrast <= scale * p.bg_level))] = 1
        seeds[fg] = 2
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
        spans, peaks = {}, {}
        for sign in (1.0, -1.0):
            parts, peaks[sign] = self._candidate(crop, inbox, ring, noise, sign)
            spans[sign] = _span(parts, inbox) if parts.any() else 0.0
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
        """Foreground probability ``[j, i]`` of the 2-label random walker (seeds: 1 bg, 2 fg, 0 unknown)."""
        if not (seeds == 0).any() or not (seeds == 2).any() or not (seeds == 1).any():
            return (seeds == 2).astype(np.float32) if (seeds != 1).any() and (seeds == 2).any() else \
                np.zeros(seeds.shape, np.float32)
        with warnings.catch_warnings():  # "probability range is outside [0, 1]": clipped by the caller
            warnings.filterwarnings("ignore", message="The probability range", category=UserWarning)
            prob = random_walker(data.astype(np.float64), seeds, beta=self.params.beta, mode="cg_j",
                                 return_full_prob=True, tol=1e-3)
        return prob[1].astype(np.float32)
