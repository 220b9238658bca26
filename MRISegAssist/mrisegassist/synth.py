"""Synthetic brain-MRI cases with exact ground truth, built from real anatomy (no downloaded data).

Anatomy comes from the MNI ICBM152 2009a symmetric template and its grey/white-matter probability maps that
ship inside the nilearn wheel (``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted
.nii.gz``, 197x233x189 at 1 mm). CSF is the brain minus grey and white matter. Four sequences are simulated
from the tissue fractions (relative signal, white matter T1 = 1):

=================  =====  =====  =====  =====
tissue / lesion     T1    T1c     T2    FLAIR
=================  =====  =====  =====  =====
CSF                 0.25   0.25   1.00   0.08
grey matter         0.62   0.64   0.58   0.62
white matter        0.95   0.96   0.42   0.48
oedema              0.60   0.60   0.85   0.92
non-enhancing       0.50   0.52   0.78   0.85
enhancing           0.55   1.35   0.70   0.80
necrosis            0.30   0.30   0.95   0.40
MS lesion           0.55   0.55   0.80   0.95
=================  =====  =====  =====  =====

(T1: WM > GM > CSF; T2: CSF > GM > WM; FLAIR: CSF dark, GM > WM, lesions bright; T1c = T1 plus
enhancement), then a smooth tissue texture, a multiplicative bias field, Rician noise and an arbitrary
per-sequence gain (raw MRI has no absolute scale); values are rounded to integers (written as int16, like
raw BraTS scans). Voxels outside the brain are 0, as in skull-stripped BraTS data.

Labels (uint8, exact: the masks the images were generated from):

* ``glioma`` (BraTS 2013-2020 convention): 1 necrotic core, 2 oedema, 3 non-enhancing tumour,
  4 enhancing rim. One irregular tumour (smoothed-noise boundary) in deep white matter; oedema follows
  white matter.
* ``metastases``: 1 metastasis (enhancing rim + necrotic centre together, as the BraTS-METS "tumour core"),
  2 oedema. Two to five small lesions at the grey/white-matter junction.
* ``ms``: 1 MS lesion. Periventricular ovoid lesions oriented perpendicular to the ventricles and
  juxtacortical lesions, in white matter.
* ``lgg`` (BraTS 2013 convention): a low-grade glioma WITHOUT enhancement: 3 non-enhancing tumour (a large,
  irregular, FLAIR/T2-bright, T1-dark mass that may reach the cortex; T1c equals T1, no enhancing rim),
  2 a thin infiltrative FLAIR-bright rim around it, and in about a third of the cases 1 a small cystic or
  necrotic part. No label 4: a model that paints enhancing tumour here is wrong.
* ``ms-confluent``: 1 MS lesion, a large confluent periventricular lesion load (a band of irregular
  thickness around the lateral ventricles with finger-like extensions, 15-60 ml) plus scattered ovoid
  lesions as in ``ms``.
* ``healthy``: no lesion.

Grids: ``"mni"`` is the template grid (197x233x189, 1 mm, LPS origin (98, 134, -72), direction
diag(-1, -1, 1)); ``"brats"`` is the BraTS grid (240x240x155, 1 mm, identity direction, origin (0, -239, 0)
as SimpleITK reads BraTS files) with the brain scaled by 0.88-0.95 and slightly rotated (seeded) so that it
fits with a margin like real BraTS brains.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError, MRISegAssistError
from .labels import BRATS_LABELS, BRATS2023_LABELS, LabelInfo, LabelMap, METASTASIS_LABELS, MS_LABELS, \
    write_labelmap
from .progress import CancelToken, ProgressFn, check, report
from .volume import Geometry, Volume, write_volume

SYNTH_KINDS = ("glioma", "metastases", "ms", "healthy", "lgg", "ms-confluent")  # new kinds appended: the seeds of
# the older kinds (rng seeded with the kind's index) stay the same
SEQUENCES = ("t1", "t1c", "t2", "flair")
BRATS_GEOMETRY = Geometry((240, 240, 155), (1.0, 1.0, 1.0), (0.0, -239.0, 0.0))
#: BraTS-like placement of the brain centre on the 240x240x155 grid, ``(i, j, k)``.
_BRATS_BRAIN_CENTRE_IJK = (119.5, 128.0, 76.0)

# Relative signal (t1, t1c, t2, flair) per tissue / lesion class; see the module docstring.
_TISSUE = {"csf": (0.25, 0.25, 1.00, 0.08), "gm": (0.62, 0.64, 0.58, 0.62), "wm": (0.95, 0.96, 0.42, 0.48)}
_LESION = {"oedema": (0.60, 0.60, 0.85, 0.92), "nonenhancing": (0.50, 0.52, 0.78, 0.85),
           "enhancing": (0.55, 1.35, 0.70, 0.80), "necrosis": (0.30, 0.30, 0.95, 0.40),
           "ms": (0.55, 0.55, 0.80, 0.95)}
_BASE_GAIN = 1000.0


@dataclass
class SynthCase:
    """A synthetic case: ``images[seq]`` float32 volumes for ``t1, t1c, t2, flair``, uint8 ``labels``,
    ``brainmask`` (uint8 0/1), all on one grid; ``lesions`` describes what was placed (centre in ``(i, j,
    k)`` voxels, radius in mm, kind)."""

    kind: str
    seed: int
    images: dict[str, Volume]
    labels: Volume
    label_info: list[LabelInfo]
    brainmask: Volume
    lesions: list[dict] = field(default_factory=list)

    @property
    def geometry(self) -> Geometry:
        return self.labels.geometry

    @property
    def labelmap(self) -> LabelMap:
        return LabelMap(self.labels, list(self.label_info))

    def stack(self, names: Sequence[str] = SEQUENCES) -> np.ndarray:
        """``(C, k, j, i)`` float32 array of the named sequences, in order."""
        missing = [n for n in names if n not in self.images]
        if missing:
            raise InputError(f"synthetic case has no sequence(s) {', '.join(missing)}; have {', '.join(self.images)}")
        return np.stack([self.images[n].array for n in names]).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------- template
def mni_template_paths() -> dict[str, Path]:
    """Paths of the MNI152 2009a ``t1``, ``gm``, ``wm`` maps inside the installed nilearn package."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise MRISegAssistError("synthetic cases need the MNI152 template shipped with nilearn: "
                                "pip install nilearn (or mrisegassist[atlas])")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    paths = {n: folder / f"mni_icbm152_{n}_tal_nlin_sym_09a_converted.nii.gz" for n in ("t1", "gm", "wm")}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise MRISegAssistError(f"the installed nilearn lacks the MNI152 template files: {', '.join(missing)}")
    return paths


@lru_cache(maxsize=1)
def _template() -> dict[str, sitk.Image]:
    """Template maps as float32 images in 0..1, plus a brain mask (T1 above 15 %, holes filled)."""
    maps = {n: sitk.Cast(sitk.ReadImage(str(p)), sitk.sitkFloat32) / 255.0 for n, p in mni_template_paths().items()}
    t1 = sitk.GetArrayViewFromImage(maps["t1"])
    brain = ndimage.binary_fill_holes(ndimage.binary_opening(t1 > 0.15, iterations=1))
    brain_img = sitk.GetImageFromArray(brain.astype(np.float32))
    brain_img.CopyInformation(maps["t1"])
    maps["brain"] = brain_img
    return maps


@lru_cache(maxsize=1)
def _template_brain_centre() -> tuple[float, float, float]:
    """LPS centre of the template brain's bounding box."""
    image = _template()["brain"]
    brain = sitk.GetArrayViewFromImage(image) > 0.5
    kji = [(np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != ax)))) for ax in range(3)]
    centre_ijk = [(kji[ax][0] + kji[ax][-1]) / 2.0 for ax in (2, 1, 0)]
    return tuple(image.TransformContinuousIndexToPhysicalPoint(centre_ijk))


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def _anatomy(grid: str, rng: np.random.Generator, jitter: bool) -> tuple[Geometry, dict[str, np.ndarray]]:
    """Tissue maps ``gm, wm, csf`` (float32 0..1) and ``brain`` (bool) on the requested grid."""
    maps = {n: _template()[n] for n in ("gm", "wm", "brain")}
    if grid == "mni":
        geometry = Geometry.from_sitk(maps["brain"])
        arrays = {n: sitk.GetArrayFromImage(img) for n, img in maps.items()}
    elif grid == "brats":
        geometry = BRATS_GEOMETRY
        scale = rng.uniform(0.88, 0.95) if jitter else 0.915
        angles = np.deg2rad(rng.uniform(-5, 5, size=3) * np.array([0.8, 0.5, 1.0])) if jitter else np.zeros(3)
        centre = geometry.ijk_to_lps @ np.array([*_BRATS_BRAIN_CENTRE_IJK, 1.0])
        transform = sitk.AffineTransform(3)
        transform.SetCenter(centre[:3].tolist())
        transform.SetMatrix((_rotation(*angles) / scale).ravel().tolist())
        transform.SetTranslation((np.asarray(_template_brain_centre()) - centre[:3]).tolist())
        # Resample only the part of the grid the brain can reach (the template's box through the transform).
        template_box = Geometry.from_sitk(maps["brain"]).corners_lps()
        inverse = transform.GetInverse()
        ijk = geometry.lps_to_continuous_ijk(np.array([inverse.TransformPoint(p.tolist()) for p in template_box]))
        lo = np.clip(np.floor(ijk.min(axis=0)).astype(int) - 1, 0, None)
        hi = np.minimum(np.ceil(ijk.max(axis=0)).astype(int) + 2, geometry.size)
        sub = Geometry(tuple(int(v) for v in hi - lo), geometry.spacing,
                       tuple(float(v) for v in (geometry.ijk_to_lps @ np.array([*lo, 1.0]))[:3]), geometry.direction)
        reference = sub.apply_to(sitk.Image(list(sub.size), sitk.sitkUInt8))
        crop = tuple(slice(int(a), int(b)) for a, b in zip(lo[::-1], hi[::-1]))
        arrays = {}
        for n, img in maps.items():
            full = np.zeros(geometry.shape, dtype=np.float32)
            resampled = sitk.Resample(img, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            full[crop] = sitk.GetArrayViewFromImage(resampled)  # the image must outlive its view
            arrays[n] = full
    else:
        raise InputError(f"unknown grid {grid!r}; use 'brats' or 'mni'")
    brain = arrays.pop("brain") > 0.5
    out = {n: np.clip(a, 0.0, 1.0, out=a) * brain for n, a in arrays.items()}
    out["csf"] = np.clip(1.0 - out["gm"] - out["wm"], 0.0, 1.0) * brain
    out["brain"] = brain
    return geometry, out


# --------------------------------------------------------------------------------------------- lesions
def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise with unit standard deviation."""
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field_ / max(float(field_.std()), 1e-6)


def _box(centre: Sequence[int], half: int, shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(max(int(c) - half, 0), min(int(c) + half + 1, s)) for c, s in zip(centre, shape))


def _radius_field(box: tuple[slice, ...], centre: Sequence[float], axes: Sequence[float],
                  rotation: Optional[np.ndarray] = None) -> np.ndarray:
    """Ellipsoidal normalised radius (1 on the surface) on ``box``; ``axes`` are semi-axes in voxels
    along the rotated ``(k, j, i)`` axes."""
    grids = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) - c for s, c in zip(box, centre)],
                        indexing="ij")
    pts = np.stack(grids, axis=-1)
    if rotation is not None:
        pts = pts @ rotation.astype(np.float32)
    return np.sqrt(np.sum((pts / np.asarray(axes, dtype=np.float32)) ** 2, axis=-1))


def _pick(rng: np.random.Generator, candidates: np.ndarray, taken: list[tuple[np.ndarray, float]],
          radius: float, stride: int) -> Optional[np.ndarray]:
    """A random candidate voxel (``[k, j, i]`` from a strided mask) at least ``radius`` + others' radii away."""
    idx = np.argwhere(candidates)
    if len(idx) == 0:
        return None
    for n in rng.permutation(len(idx))[:400]:
        c = idx[n] * stride + rng.integers(0, stride, size=3)
        if all(np.linalg.norm(c - t) > radius + r + 4 for t, r in taken):
            return c
    return None


def _strided_distance(mask: np.ndarray, stride: int) -> np.ndarray:
    """Approximate distance (mm, 1 mm voxels) to the nearest voxel outside ``mask`` on a strided grid."""
    return ndimage.distance_transform_edt(mask[::stride, ::stride, ::stride], sampling=stride)


def _glioma(rng, tissue, labels, lesions) -> None:
    stride = 2
    wm = tissue["wm"][::stride, ::stride, ::stride]
    depth = _strided_distance(tissue["brain"], stride)
    radius = rng.uniform(13.0, 22.0)
    centre = _pick(rng, (wm > 0.85) & (depth > radius + 12), [], radius, stride)
    if centre is None:
        centre = _pick(rng, (wm > 0.5) & (depth > radius), [], radius, stride)
    if centre is None:
        raise MRISegAssistError("no room for a glioma on this grid")
    spread = rng.uniform(1.6, 2.3)
    box = _box(centre, int(radius * spread * 1.5) + 6, labels.shape)
    shape = tuple(s.stop - s.start for s in box)
    axes = radius * rng.uniform(0.8, 1.2, size=3)
    rot = _rotation(*rng.uniform(-np.pi, np.pi, size=3))
    r = _radius_field(box, centre, axes, rot) + 0.22 * _smooth_noise(rng, shape, 4.0)
    ro = _radius_field(box, centre, axes * spread, rot) + 0.3 * _smooth_noise(rng, shape, 5.0)
    patches = _smooth_noise(rng, shape, 3.0)
    allowed = tissue["brain"][box] & (tissue["csf"][box] < 0.5)
    core = (r < 1.0) & allowed
    necrosis = core & (r < rng.uniform(0.5, 0.7))
    rim = core & ~necrosis & (r > 1.0 - rng.uniform(2.0, 5.0) / radius)
    enhancing = rim & (patches < 0.9)
    nonenhancing = core & ~necrosis & ~enhancing
    oedema = (ro < 1.0) & allowed & ~core & ((tissue["wm"][box] > 0.35) | ndimage.binary_dilation(core, iterations=2))
    sub = labels[box]
    sub[oedema] = 2
    sub[nonenhancing] = 3
    sub[enhancing] = 4
    sub[necrosis] = 1
    lesions.append({"kind": "glioma", "centre_ijk": [int(c) for c in centre[::-1]], "radius_mm": float(radius)})


def _metastases(rng, tissue, labels, lesions, soft) -> None:
    stride = 2
    gm, wm = (tissue[n][::stride, ::stride, ::stride] for n in ("gm", "wm"))
    depth = _strided_distance(tissue["brain"], stride)
    junction = (gm > 0.3) & (gm < 0.7) & (wm > 0.25) & (depth > 10)
    taken: list[tuple[np.ndarray, float]] = []
    for _ in range(int(rng.integers(2, 6))):
        radius = rng.uniform(3.0, 9.0)
        centre = _pick(rng, junction, taken, radius * 2.5, stride)
        if centre is None:
            continue
        taken.append((centre, radius * 2.5))
        spread = rng.uniform(1.8, 3.0)
        box = _box(centre, int(radius * spread * 1.4) + 4, labels.shape)
        shape = tuple(s.stop - s.start for s in box)
        axes = radius * rng.uniform(0.85, 1.15, size=3)
        r = _radius_field(box, centre, axes) + 0.12 * _smooth_noise(rng, shape, 2.0)
        ro = _radius_field(box, centre, axes * spread) + 0.3 * _smooth_noise(rng, shape, 4.0)
        allowed = tissue["brain"][box] & (tissue["csf"][box] < 0.6)
        core = (r < 1.0) & allowed
        oedema = (ro < 1.0) & allowed & ~core & (tissue["wm"][box] > 0.3)
        sub = labels[box]
        sub[oedema & (sub == 0)] = 2
        sub[core] = 1
        if radius > 5.0:  # necrotic centre inside label 1: necrosis signal, enhancing rim elsewhere
            soft["necrosis"][box] |= core & (r < 0.5)
        soft["enhancing"][box] |= core & ~((r < 0.5) & (radius > 5.0))
        lesions.append({"kind": "metastasis", "centre_ijk": [int(c) for c in centre[::-1]], "radius_mm": float(radius)})


def _ms(rng, tissue, labels, lesions, small_fraction: float = 0.0,
        strength: Optional[np.ndarray] = None, contrast: Sequence[float] = (1.0, 1.0)) -> None:
    """MS lesions (label 1). ``small_fraction``: share of lesions drawn small (long semi-axis 1-3 mm,
    short 0.7-1.8 mm, as the many tiny lesions of real scans); ``strength``: float map that receives each
    lesion's contrast factor, drawn from ``contrast`` (1 = the full MS-lesion signal of the table)."""
    stride = 2
    brain, csf, gm, wm = (tissue[n] for n in ("brain", "csf", "gm", "wm"))
    depth = _strided_distance(brain, stride)
    ventricles = (csf[::stride, ::stride, ::stride] > 0.6) & (depth > 15)
    to_vent = ndimage.distance_transform_edt(~ventricles, sampling=stride)
    to_gm = ndimage.distance_transform_edt(gm[::stride, ::stride, ::stride] < 0.5, sampling=stride)
    wm_s = wm[::stride, ::stride, ::stride]
    sites = {"periventricular": (wm_s > 0.6) & (to_vent > 2) & (to_vent < 7),
             "juxtacortical": (wm_s > 0.5) & (to_gm > 1) & (to_gm < 3.5) & (depth > 8),
             "deep white matter": (wm_s > 0.9) & (to_vent > 10) & (to_gm > 5)}
    grad = np.stack(np.gradient(ndimage.gaussian_filter(to_vent, 1.0)), axis=-1)
    taken: list[tuple[np.ndarray, float]] = []
    for _ in range(int(rng.integers(6, 26))):
        site = rng.choice(list(sites), p=[0.55, 0.3, 0.15])
        small = small_fraction > 0 and rng.random() < small_fraction  # no extra draw by default
        long_axis = rng.uniform(1.0, 3.0) if small else rng.uniform(3.0, 10.0)
        centre = _pick(rng, sites[site], taken, long_axis, stride)
        if centre is None:
            continue
        taken.append((centre, long_axis))
        short = rng.uniform(0.7, 1.8, size=2) if small else rng.uniform(1.5, 4.5, size=2)
        if site == "periventricular":  # ovoid, long axis perpendicular to the ventricle wall
            g = grad[tuple(np.minimum(centre // stride, np.array(grad.shape[:3]) - 1))]
            direction = g / max(np.linalg.norm(g), 1e-6)
        else:
            direction = rng.standard_normal(3)
            direction /= np.linalg.norm(direction)
        helper = np.eye(3)[int(np.argmin(np.abs(direction)))]
        second = np.cross(direction, helper)
        second /= np.linalg.norm(second)
        rot = np.stack([direction, second, np.cross(direction, second)], axis=1)
        box = _box(centre, int(long_axis) + 4, labels.shape)
        shape = tuple(s.stop - s.start for s in box)
        r = _radius_field(box, centre, (long_axis, *short), rot) + 0.1 * _smooth_noise(rng, shape, 1.5)
        lesion = (r < 1.0) & (wm[box] > 0.25) & brain[box]
        if lesion.sum() < (1 if small else 3):
            continue
        labels[box][lesion] = 1
        if strength is not None:
            strength[box][lesion] = rng.uniform(*contrast) if contrast[0] < contrast[1] else contrast[0]
        lesions.append({"kind": f"MS ({site})", "centre_ijk": [int(c) for c in centre[::-1]],
                        "radius_mm": float(long_axis)})


def _lgg(rng, tissue, labels, lesions) -> None:
    """Low-grade glioma without enhancement: non-enhancing mass (3), thin infiltrative rim (2), sometimes a
    small cyst / necrosis (1). Larger and less round than the high-grade ``_glioma``; may involve cortex."""
    stride = 2
    brain = tissue["brain"]
    wm = tissue["wm"][::stride, ::stride, ::stride]
    depth = _strided_distance(brain, stride)
    radius = rng.uniform(15.0, 28.0)
    centre = _pick(rng, (wm > 0.5) & (depth > radius * 0.6 + 6), [], radius, stride)
    if centre is None:
        centre = _pick(rng, (wm > 0.3) & (depth > 8), [], radius, stride)
    if centre is None:
        raise MRISegAssistError("no room for a low-grade glioma on this grid")
    box = _box(centre, int(radius * 1.9) + 8, labels.shape)
    shape = tuple(s.stop - s.start for s in box)
    axes = radius * rng.uniform(0.65, 1.3, size=3)
    rot = _rotation(*rng.uniform(-np.pi, np.pi, size=3))
    r = _radius_field(box, centre, axes, rot) + 0.35 * _smooth_noise(rng, shape, 5.0)
    allowed = brain[box] & (tissue["csf"][box] < 0.55)
    core = (r < 1.0) & allowed
    rim = (r < 1.0 + rng.uniform(2.0, 5.0) / radius) & allowed & ~core
    sub = labels[box]
    sub[rim] = 2
    sub[core] = 3
    if rng.random() < 0.35:  # a small cystic / necrotic part inside the mass
        cyst = core & (_radius_field(box, centre, axes * rng.uniform(0.2, 0.35), rot) +
                       0.15 * _smooth_noise(rng, shape, 2.0) < 1.0)
        sub[cyst] = 1
    lesions.append({"kind": "low-grade glioma", "centre_ijk": [int(c) for c in centre[::-1]],
                    "radius_mm": float(radius)})


def _ms_confluent(rng, tissue, labels, lesions, strength: Optional[np.ndarray] = None,
                  contrast: Sequence[float] = (1.0, 1.0)) -> None:
    """Confluent periventricular MS lesions (label 1): white matter whose distance to the ventricles, minus a
    smooth random field (irregular thickness, finger-like extensions), is below the threshold that gives a
    drawn total volume of 15-60 ml."""
    brain, csf, wm = tissue["brain"], tissue["csf"], tissue["wm"]
    crop = _union_box([brain], brain.shape, margin=2)
    depth = ndimage.distance_transform_edt(brain[crop])
    ventricles = (csf[crop] > 0.6) & (depth > 15)
    if not ventricles.any():
        raise MRISegAssistError("no ventricles found for confluent MS lesions")
    to_vent = ndimage.distance_transform_edt(~ventricles)
    shape = to_vent.shape
    field_ = rng.uniform(3.0, 6.0) * _smooth_noise(rng, shape, 5.0) + 1.5 * _smooth_noise(rng, shape, 2.0)
    score = to_vent - field_
    candidates = (wm[crop] > 0.35) & (to_vent > 0.5) & (depth > 6)
    target = int(rng.uniform(15.0, 60.0) * 1000)  # voxels (1 mm grids)
    values = np.sort(score[candidates])
    if values.size == 0:
        raise MRISegAssistError("no white matter around the ventricles for confluent MS lesions")
    threshold = values[min(target, values.size - 1)]
    lesion = candidates & (score <= threshold)
    lesion = ndimage.binary_opening(lesion, iterations=1)
    labels[crop][lesion] = 1
    if strength is not None:
        strength[crop][lesion] = rng.uniform(*contrast) if contrast[0] < contrast[1] else contrast[0]
    lesions.append({"kind": "MS (confluent periventricular)", "volume_ml": float(lesion.sum()) / 1000.0})


# --------------------------------------------------------------------------------------------- images
def _smooth_field(rng: np.random.Generator, shape: Sequence[int], terms: int = 6) -> np.ndarray:
    """Smooth random field in [-1, 1]: a sum of separable products of low-frequency cosines."""
    axes = [np.linspace(0.0, np.pi, n, dtype=np.float32) for n in shape]
    total = np.zeros(tuple(shape), dtype=np.float32)
    for _ in range(terms):
        parts = [np.cos(rng.uniform(0.3, 1.5) * x + rng.uniform(0, 2 * np.pi)) for x in axes]
        total += rng.uniform(0.5, 1.0) * parts[0][:, None, None] * parts[1][None, :, None] * parts[2][None, None, :]
    return total / max(float(np.abs(total).max()), 1e-6)


def _images(rng, tissue, classes: dict[str, np.ndarray], noise: float, bias_field: float) -> dict[str, np.ndarray]:
    """Simulated sequences on the brain's bounding box (zeros outside the brain)."""
    full_shape = tissue["brain"].shape
    crop = _union_box([tissue["brain"]], full_shape, margin=2)
    brain = tissue["brain"][crop]
    shape = brain.shape
    texture = rng.standard_normal(tuple(s // 2 + 1 for s in shape), dtype=np.float32)
    texture = np.repeat(np.repeat(np.repeat(texture, 2, 0), 2, 1), 2, 2)[: shape[0], : shape[1], : shape[2]]
    texture = ndimage.gaussian_filter(texture, 1.0)
    texture /= max(float(texture.std()), 1e-6)
    present = {n: m[crop] for n, m in classes.items() if m.any()}
    box = _union_box(list(present.values()), shape)
    alphas = {n: ndimage.gaussian_filter(m[box].astype(np.float32), 0.6) for n, m in present.items()}
    out = {}
    for s, seq in enumerate(SEQUENCES):
        img = sum(tissue[t][crop] * np.float32(_TISSUE[t][s]) for t in ("csf", "gm", "wm"))
        sub = img[box]
        for name, alpha in alphas.items():  # outer classes first (dict order), inner ones painted over
            sub *= 1.0 - alpha
            sub += alpha * np.float32(_LESION[name][s])
        img *= 1.0 + 0.03 * texture
        if bias_field > 0:
            img *= np.exp(np.float32(bias_field) * _smooth_field(rng, shape))
        gain = np.float32(_BASE_GAIN * rng.uniform(0.6, 1.6))
        sigma = np.float32(noise * _TISSUE["wm"][0])
        real = img + sigma * rng.standard_normal(shape, dtype=np.float32)
        imag = sigma * rng.standard_normal(shape, dtype=np.float32)
        full = np.zeros(full_shape, dtype=np.float32)
        full[crop] = np.rint(np.sqrt(real * real + imag * imag) * brain * gain)  # integer signal, as scanners
        out[seq] = full
    return out


def _union_box(masks: list[np.ndarray], shape: Sequence[int], margin: int = 3) -> tuple[slice, ...]:
    if not masks:
        return tuple(slice(0, 1) for _ in shape)
    union = np.logical_or.reduce(masks)
    idx = [np.flatnonzero(union.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    return tuple(slice(max(int(i[0]) - margin, 0), min(int(i[-1]) + margin + 1, s)) for i, s in zip(idx, shape))


# ------------------------------------------------------------------------------------------ public API
def make_case(kind: str = "glioma", seed: int = 0, grid: str = "brats", noise: float = 0.03,
              bias_field: float = 0.15, jitter: bool = True, progress: Optional[ProgressFn] = None,
              cancel: Optional[CancelToken] = None, ms_small_fraction: float = 0.0,
              ms_contrast: Optional[Sequence[float]] = None) -> SynthCase:
    """Generate a synthetic case (see the module docstring for contrasts, labels and grids).

    ``noise``: Rician noise sigma relative to the white-matter T1 signal; ``bias_field``: amplitude of
    the log bias field (0 disables); ``jitter``: seeded random brain scale/rotation on the BraTS grid.
    ``ms_small_fraction`` (``ms``, ``ms-confluent``): share of tiny lesions (1-3 mm long semi-axis); ``ms_contrast``
    (``ms``, ``ms-confluent``): ``(low, high)`` range of each lesion's signal as a fraction of the full MS-lesion contrast
    (partial, fainter lesions as in real FLAIR); the defaults reproduce the plain cases exactly.
    Deterministic for a given ``(kind, seed, grid, noise, bias_field, jitter)`` and options. Takes a few
    seconds; ``progress``/``cancel`` as every long step.
    """
    if not 0.0 <= ms_small_fraction <= 1.0:
        raise InputError(f"ms_small_fraction must be in [0, 1], got {ms_small_fraction}")
    if ms_contrast is not None and (len(ms_contrast) != 2 or not 0.0 < ms_contrast[0] <= ms_contrast[1] <= 1.0):
        raise InputError(f"ms_contrast must be (low, high) with 0 < low <= high <= 1, got {ms_contrast}")
    if kind not in SYNTH_KINDS:
        raise InputError(f"unknown synthetic case kind {kind!r}; use one of {', '.join(SYNTH_KINDS)}")
    if noise < 0 or bias_field < 0:
        raise InputError("noise and bias_field must be >= 0")
    rng = np.random.default_rng([int(seed), SYNTH_KINDS.index(kind)])
    check(cancel)
    report(progress, 0.0, "anatomy from the MNI152 template")
    geometry, tissue = _anatomy(grid, rng, jitter)
    check(cancel)
    report(progress, 0.35, f"placing {kind} lesions")
    labels = np.zeros(geometry.shape, dtype=np.uint8)
    lesions: list[dict] = []
    classes: dict[str, np.ndarray] = {}
    if kind == "glioma":
        _glioma(rng, tissue, labels, lesions)
        info = list(BRATS_LABELS)
        for name, value in (("oedema", 2), ("nonenhancing", 3), ("enhancing", 4), ("necrosis", 1)):
            classes[name] = labels == value
    elif kind == "metastases":
        soft = {"enhancing": np.zeros(labels.shape, bool), "necrosis": np.zeros(labels.shape, bool)}
        _metastases(rng, tissue, labels, lesions, soft)
        info = list(METASTASIS_LABELS)
        classes = {"oedema": labels == 2, **soft}
    elif kind == "lgg":
        _lgg(rng, tissue, labels, lesions)
        info = list(BRATS_LABELS)
        for name, value in (("oedema", 2), ("nonenhancing", 3), ("necrosis", 1)):
            classes[name] = labels == value
    elif kind in ("ms", "ms-confluent"):
        strength = np.zeros(labels.shape, np.float32) if ms_contrast is not None else None
        contrast = tuple(ms_contrast or (1.0, 1.0))
        if kind == "ms-confluent":
            _ms_confluent(rng, tissue, labels, lesions, strength, contrast)
        _ms(rng, tissue, labels, lesions, ms_small_fraction, strength, contrast)
        info = list(MS_LABELS)
        classes["ms"] = strength if strength is not None else labels == 1
    else:
        info = []
    labels[~tissue["brain"]] = 0
    check(cancel)
    report(progress, 0.55, "simulating T1, T1c, T2, FLAIR")
    arrays = _images(rng, tissue, classes, noise, bias_field)
    images = {seq: Volume(a, geometry, seq) for seq, a in arrays.items()}
    report(progress, 1.0, "synthetic case ready")
    return SynthCase(kind, int(seed), images, Volume(labels, geometry, "labels"), info,
                     Volume(tissue["brain"].astype(np.uint8), geometry, "brainmask"), lesions)


#: File names per naming scheme: sequence -> file stem (BraTS 2023 stems follow ``<case>-``).
NAMINGS = {
    "brats2013": {"t1": "t1", "t1c": "t1c", "t2": "t2", "flair": "flair", "labels": "labels",
                  "brainmask": "brainmask"},
    "brats2023": {"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f", "labels": "seg"},
}


def write_case(case: SynthCase, folder: Union[str, Path], naming: str = "brats2013") -> dict[str, Path]:
    """Write a case as a BraTS-style folder; returns ``{sequence or "labels"/"brainmask": path}``.

    ``"brats2013"``: ``flair.nii.gz, t1.nii.gz, t1c.nii.gz, t2.nii.gz, labels.nii.gz, brainmask.nii.gz``
    (the ``brats2013-deepmedic`` layout). ``"brats2023"``: ``<folder name>-t1n/-t1c/-t2w/-t2f/-seg.nii.gz``;
    glioma labels are converted to the BraTS 2023 convention (1 necrotic/non-enhancing core, 2 oedema,
    3 enhancing). Label files get a ``.labels.json`` sidecar with names and colours.
    """
    if naming not in NAMINGS:
        raise InputError(f"unknown naming {naming!r}; use one of {', '.join(NAMINGS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = NAMINGS[naming]
    prefix = f"{folder.name}-" if naming == "brats2023" else ""
    paths: dict[str, Path] = {}
    for seq, vol in case.images.items():  # integer-valued signal: int16 as raw BraTS scans (lossless)
        paths[seq] = write_volume(vol.with_array(vol.array.astype(np.int16)), folder / f"{prefix}{names[seq]}.nii.gz")
    labels, info = case.labels, case.label_info
    if naming == "brats2023" and case.kind == "glioma":
        lut = np.array([0, 1, 2, 1, 3], dtype=np.uint8)
        labels = labels.with_array(lut[labels.array])
        info = list(BRATS2023_LABELS)
    paths["labels"] = write_labelmap(LabelMap(labels, info), folder / f"{prefix}{names['labels']}.nii.gz")
    if "brainmask" in names:
        paths["brainmask"] = write_volume(case.brainmask, folder / f"{prefix}{names['brainmask']}.nii.gz")
    return paths
