"""Synthetic failure cases for box-prompted engines, with exact ground truth.

Each case reproduces a failure seen on real scans the project never trained or tuned on (issue 15):

* :func:`dark_core_tumour`: a glioma whose cystic/necrotic core is dark on FLAIR (CSF-like) inside an
  enhancing rim (bright on T1c, bright on FLAIR) and bright oedema, next to a lateral ventricle. The object of
  the box is the whole tumour (core + rim + oedema), or the tumour core (core + rim) on T1c.
* :func:`confluent_ms`: a large MS lesion load: periventricular ovoid lesions overlapping into confluent
  lesions around both lateral ventricles, plus small deep white-matter lesions, of varying contrast.
* :func:`drifting_lesion`: a non-enhancing lesion spanning ~40 slices under a multiplicative intensity drift
  along ``k`` (the signal of every tissue changes slice by slice, as with a coil's sensitivity falling off
  along z) while the lesion's own contrast fades towards one end; cortex (grey matter) lies next to it.

Anatomy is the MNI ICBM152 2009a template shipped in the nilearn wheel (as :mod:`.synth`, whose anatomy and
MR simulation are reused: relative signals per tissue in its docstring, texture, Rician noise, per-sequence
gain). A case is an axial slab of the template grid (1 mm, ``[k, j, i]``, whole slices) holding the lesions.
Deterministic for a given seed; a few seconds each.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from scipy import ndimage

from .errors import InputError
from .synth import SEQUENCES, _anatomy, _images, _radius_field, _rotation, _smooth_noise

#: sequences of every case, in :data:`.synth.SEQUENCES` order
CASE_SEQUENCES = tuple(SEQUENCES)


@dataclass
class PromptCase:
    """A synthetic prompt case: ``images[seq]`` float32 ``[k, j, i]`` (``t1, t1c, t2, flair``), ``labels``
    uint8 ``[k, j, i]`` (values described in ``label_names``), ``target`` bool ``[k, j, i]`` (the object(s) a
    user boxes), on a 1 mm grid."""

    name: str
    images: dict[str, np.ndarray]
    labels: np.ndarray
    label_names: dict[int, str]
    target: np.ndarray
    description: str

    def stack(self, names: Sequence[str]) -> np.ndarray:
        """``[c, k, j, i]`` float32 of the named sequences in order (channel 0 = the first name)."""
        missing = [n for n in names if n not in self.images]
        if missing:
            raise InputError(f"case {self.name} has no sequence(s) {', '.join(missing)}")
        return np.stack([self.images[n] for n in names]).astype(np.float32, copy=False)


@lru_cache(maxsize=1)
def _template_tissue() -> dict[str, np.ndarray]:
    """MNI152 tissue fractions ``gm, wm, csf`` (float32) and ``brain`` (bool), ``[k, j, i]``, read-only."""
    _, tissue = _anatomy("mni", np.random.default_rng(0), False)
    out = {n: (a if n == "brain" else a.astype(np.float32)) for n, a in tissue.items()}
    for a in out.values():
        a.flags.writeable = False
    return out


def _tissue() -> dict[str, np.ndarray]:
    """A writable copy of the template tissue maps."""
    return {n: a.copy() for n, a in _template_tissue().items()}


def _distance(mask: np.ndarray) -> np.ndarray:
    """Distance (mm) to the nearest voxel outside ``mask`` on the 2-voxel strided grid (``mask[::2, ::2, ::2]``)."""
    return ndimage.distance_transform_edt(mask[::2, ::2, ::2], sampling=2)


def _ventricles(tissue: dict[str, np.ndarray]) -> np.ndarray:
    """Deep CSF (lateral ventricles): CSF fraction > 0.6, more than 15 mm inside the brain (full grid)."""
    depth = np.repeat(np.repeat(np.repeat(_distance(tissue["brain"]), 2, 0), 2, 1), 2, 2)
    depth = depth[tuple(slice(0, s) for s in tissue["brain"].shape)]
    return (tissue["csf"] > 0.6) & (depth > 15)


def _slab(tissue: dict[str, np.ndarray], k0: int, k1: int) -> dict[str, np.ndarray]:
    return {n: np.ascontiguousarray(a[k0:k1]) for n, a in tissue.items()}


def _simulate(rng: np.random.Generator, tissue: dict[str, np.ndarray], classes: dict[str, np.ndarray],
              noise: float) -> dict[str, np.ndarray]:
    return {s: a.astype(np.float32) for s, a in _images(rng, tissue, classes, noise, 0.1).items()}


def _local_box(centre: Sequence[int], half: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(max(int(c) - h, 0), min(int(c) + h + 1, s)) for c, h, s in zip(centre, half, shape))


def _pick_centre(rng: np.random.Generator, candidates: np.ndarray) -> np.ndarray:
    """A random voxel of ``candidates`` (a 2-voxel strided mask), as ``[k, j, i]`` of the full grid."""
    idx = np.argwhere(candidates)
    if len(idx) == 0:
        raise InputError("no room for the lesion in the template")
    return idx[int(rng.integers(len(idx)))] * 2


def dark_core_tumour(seed: int = 0, noise: float = 0.03) -> PromptCase:
    """Glioma with a dark (CSF-like) core in a bright rim, oedema, touching a lateral ventricle.

    Labels: 1 cystic/necrotic core (CSF signal: dark on FLAIR, T1 and T1c, bright on T2), 2 oedema,
    4 enhancing rim (bright on T1c and FLAIR). ``target`` = whole tumour (1, 2, 4).
    """
    rng = np.random.default_rng([int(seed), 15, 1])
    tissue = _tissue()
    vent = _ventricles(tissue)
    radius = float(rng.uniform(17.0, 22.0))
    to_vent, depth = _distance(~vent), _distance(tissue["brain"])
    ok = (tissue["wm"][::2, ::2, ::2] > 0.8) & (to_vent > 0.8 * radius) & (to_vent < radius) & (depth > radius + 8)
    centre = _pick_centre(rng, ok)
    half = int(radius * 1.3) + 4
    box = _local_box(centre, (half,) * 3, vent.shape)
    shape = tuple(s.stop - s.start for s in box)
    axes = radius * rng.uniform(0.85, 1.15, size=3)
    rot = _rotation(*rng.uniform(-np.pi, np.pi, size=3))
    r = _radius_field(box, centre, axes, rot) + 0.1 * _smooth_noise(rng, shape, 3.0)
    allowed = tissue["brain"][box] & ~vent[box]
    core = (r < 0.7) & allowed
    rim = (r >= 0.7) & (r < 0.85) & allowed
    oedema = (r >= 0.85) & (r < 1.0 + 0.15 * _smooth_noise(rng, shape, 4.0)) & allowed & (tissue["csf"][box] < 0.5)
    labels = np.zeros(vent.shape, np.uint8)
    sub = labels[box]
    sub[oedema] = 2
    sub[rim] = 4
    sub[core] = 1
    for name, value in (("csf", 1.0), ("gm", 0.0), ("wm", 0.0)):  # the cyst holds fluid
        tissue[name][labels == 1] = value
    k0, k1 = max(int(centre[0]) - half - 6, 0), min(int(centre[0]) + half + 7, vent.shape[0])
    tissue, labels = _slab(tissue, k0, k1), labels[k0:k1]
    images = _simulate(rng, tissue, {"oedema": labels == 2, "enhancing": labels == 4}, noise)
    return PromptCase("dark-core-tumour", images, labels, {1: "cystic core", 2: "oedema", 4: "enhancing rim"},
                      labels > 0, "glioma, CSF-like core dark on FLAIR inside a bright rim, oedema, by a ventricle")


def confluent_ms(seed: int = 0, noise: float = 0.03) -> PromptCase:
    """A large MS lesion load: overlapping periventricular ovoids (confluent lesions) around both lateral
    ventricles and small deep white-matter lesions, each of its own contrast (40-100 % of a full MS lesion's
    signal above white matter). Labels: 1 lesion. ``target`` = every lesion."""
    rng = np.random.default_rng([int(seed), 15, 2])
    tissue = _tissue()
    vent = _ventricles(tissue)
    kc = int(np.median(np.flatnonzero(vent.any(axis=(1, 2)))))
    tissue, vent = _slab(tissue, kc - 22, kc + 23), vent[kc - 22:kc + 23]
    to_vent = ndimage.distance_transform_edt(~vent)
    grad = np.stack(np.gradient(ndimage.gaussian_filter(to_vent, 1.0)), axis=-1)
    wm, brain = tissue["wm"], tissue["brain"]
    near = (np.abs(np.arange(vent.shape[0]) - 22) < 12)[:, None, None]
    band = ((wm > 0.6) & (to_vent > 1.5) & (to_vent < 5) & near)[::2, ::2, ::2]
    deep = ((wm > 0.9) & (to_vent > 12))[::2, ::2, ::2] & (_distance(brain) > 12)
    labels = np.zeros(vent.shape, np.uint8)
    strength = np.zeros(vent.shape, np.float32)
    for n in range(60):
        small = n >= 45
        centre = _pick_centre(rng, deep if small else band)
        long_axis = rng.uniform(1.5, 3.5) if small else rng.uniform(6.0, 13.0)
        short = rng.uniform(1.2, 2.5, size=2) if small else rng.uniform(3.0, 6.0, size=2)
        direction = rng.standard_normal(3) if small else grad[tuple(centre)]
        direction = direction / max(np.linalg.norm(direction), 1e-6)
        helper = np.eye(3)[int(np.argmin(np.abs(direction)))]
        second = np.cross(direction, helper)
        second /= np.linalg.norm(second)
        rot = np.stack([direction, second, np.cross(direction, second)], axis=1)
        box = _local_box(centre, (int(long_axis) + 4,) * 3, vent.shape)
        shape = tuple(s.stop - s.start for s in box)
        r = _radius_field(box, centre, (long_axis, *short), rot) + 0.1 * _smooth_noise(rng, shape, 1.5)
        lesion = (r < 1.0) & (wm[box] > 0.25) & brain[box] & ~vent[box]
        labels[box][lesion] = 1
        sub = strength[box]
        sub[lesion] = np.maximum(sub[lesion], rng.uniform(0.4, 1.0))
    images = _simulate(rng, tissue, {"ms": strength}, noise)
    n_parts = ndimage.label(labels, np.ones((3, 3, 3)))[1]
    return PromptCase("confluent-ms", images, labels, {1: "MS lesion"}, labels > 0,
                      f"MS, {labels.sum() / 1000:.0f} ml in {n_parts} lesions, confluent around the ventricles, "
                      "40-100 % contrast")


def drifting_lesion(seed: int = 0, noise: float = 0.03, drift: float = 0.4, fade: float = 0.45) -> PromptCase:
    """A non-enhancing lesion (FLAIR-bright, ~40 slices) beside the cortex, under an intensity drift along ``k``.

    Every sequence is multiplied by ``exp(drift * t)``, ``t`` going from -1 to 1 over the lesion's slices (a
    smooth change of the whole signal along z); the lesion's own contrast (fraction of the table's signal
    above the tissue it replaces) goes from 1 at the bottom to ``1 - fade`` at the top. Labels: 3
    non-enhancing lesion. ``target`` = the lesion.
    """
    rng = np.random.default_rng([int(seed), 15, 3])
    tissue = _tissue()
    radius_ij, radius_k = float(rng.uniform(10.0, 13.0)), float(rng.uniform(18.0, 21.0))
    gm = tissue["gm"]
    to_gm, depth = _distance(gm < 0.5), _distance(tissue["brain"])
    ok = (tissue["wm"][::2, ::2, ::2] > 0.7) & (to_gm > radius_ij - 2) & (to_gm < radius_ij + 3) & (depth > radius_ij + 6)
    ok[: int(radius_k) // 2 + 5] = False
    ok[-int(radius_k) // 2 - 5:] = False
    centre = _pick_centre(rng, ok)
    half = (int(radius_k) + 5, int(radius_ij * 1.3) + 4, int(radius_ij * 1.3) + 4)
    box = _local_box(centre, half, gm.shape)
    shape = tuple(s.stop - s.start for s in box)
    rot = _rotation(0.0, 0.0, float(rng.uniform(-np.pi, np.pi)))
    r = _radius_field(box, centre, (radius_k, radius_ij, radius_ij * 0.8), rot) + 0.1 * _smooth_noise(rng, shape, 3.0)
    lesion = (r < 1.0) & tissue["brain"][box] & (tissue["csf"][box] < 0.5) & (gm[box] < 0.5)
    labels = np.zeros(gm.shape, np.uint8)
    labels[box][lesion] = 3
    k0, k1 = box[0].start - 4, box[0].stop + 4
    tissue, labels = _slab(tissue, k0, k1), labels[k0:k1]
    ks = np.flatnonzero(labels.any(axis=(1, 2)))
    t = np.clip((np.arange(labels.shape[0]) - ks[0]) / max(ks[-1] - ks[0], 1), 0.0, 1.0) * 2.0 - 1.0
    strength = (labels > 0) * (1.0 - fade * (t[:, None, None] + 1.0) / 2.0)
    images = _simulate(rng, tissue, {"nonenhancing": strength.astype(np.float32)}, noise)
    gain = np.exp(drift * t).astype(np.float32)[:, None, None]
    images = {s: a * gain for s, a in images.items()}
    return PromptCase("drifting-lesion", images, labels, {3: "non-enhancing lesion"}, labels > 0,
                      f"lesion of fading contrast (to {1 - fade:.0%}) under a x{np.exp(-drift):.2f}..x{np.exp(drift):.2f} "
                      "intensity drift along k, beside the cortex")


CASES = {"dark-core-tumour": dark_core_tumour, "confluent-ms": confluent_ms, "drifting-lesion": drifting_lesion}
