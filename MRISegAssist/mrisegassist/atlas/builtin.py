"""Built-in brain atlases, built once from template files installed on the system and cached on disk.

* ``colin27``: Colin27 single-subject T1, skull-stripped (``ch2bet.nii.gz``, Debian ``mricron-data``, 1 mm) with
  the AAL labels drawn on it (``aal.nii.gz``, values 1..116) plus ventricles derived from its intensities
  (values 201..204, see :func:`derive_ventricles`).
* ``mni152``: MNI ICBM152 2009a symmetric T1 (nilearn wheel, 1 mm, brain only) with ventricles derived from
  its own grey/white-matter probability maps and the AAL labels *propagated* from Colin27 by deformable
  registration (model-derived labels, say so in any report).
* ``brain``: both as two references (same structures).

Derived ventricles (MNI RAS millimetres; both templates are MNI-aligned): CSF voxels (Colin27: darkest of three
Otsu classes inside the brain; MNI152: grey + white probability < 0.5) at least 6 mm inside the brain, then
connected regions grown from anatomical seed points: lateral ventricles from (+-16, -10, 20) after a 1-voxel
opening (cuts the thin links to sulcal CSF), third ventricle from (0, -12, 2) within |x| <= 4 mm, fourth
ventricle from (0, -45, -30) below z = -15. Temporal horns and the corpus callosum are not derived.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..progress import CancelToken, ProgressFn, check, report
from ..volume import Volume, read_volume, write_volume
from .references import (Reference, ReferenceSet, builtin_definition, cache_dir, structures_from)

#: bump when a builder's output changes, so cached builds are redone
BUILD_VERSION = 1
VENTRICLE_LABELS = {"lateral-ventricle-left": 201, "lateral-ventricle-right": 202, "third-ventricle": 203,
                    "fourth-ventricle": 204}


def mricron_dir() -> Path:
    return Path(os.environ.get("MRISEGASSIST_MRICRON_DIR", "/usr/share/mricron/templates"))


def nilearn_data_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the MNI152 atlas needs the nilearn package (pip install nilearn)")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def _need(path: Path, how: str) -> Path:
    if not path.is_file():
        raise InputError(f"{path} is missing: {how}")
    return path


def colin27_sources() -> dict[str, Path]:
    how = "install Debian's mricron-data (apt-get install mricron-data) or set MRISEGASSIST_MRICRON_DIR"
    d = mricron_dir()
    return {"image": _need(d / "ch2bet.nii.gz", how), "aal": _need(d / "aal.nii.gz", how)}


def mni152_sources() -> dict[str, Path]:
    how = "reinstall nilearn (pip install nilearn); its wheel ships the MNI152 2009a template"
    d = nilearn_data_dir()
    stem = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
    return {k: _need(d / stem.format(k), how) for k in ("t1", "gm", "wm")}


# ------------------------------------------------------------------------------------------ derivation
def ras_coordinates(volume: Volume) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RAS millimetre coordinates ``(x, y, z)`` of every voxel centre, each ``[k, j, i]`` float32."""
    k, j, i = np.indices(volume.geometry.shape, dtype=np.float32)
    m = volume.geometry.ijk_to_ras.astype(np.float32)
    return tuple(m[r, 0] * i + m[r, 1] * j + m[r, 2] * k + m[r, 3] for r in range(3))


def _seeded(mask: np.ndarray, xyz, seed: tuple[float, float, float], radius: float = 8.0) -> np.ndarray:
    """The connected component of ``mask`` nearest to ``seed`` (RAS mm) if within ``radius``, else empty."""
    x, y, z = xyz
    d2 = (x - seed[0]) ** 2 + (y - seed[1]) ** 2 + (z - seed[2]) ** 2
    d2 = np.where(mask, d2, np.inf)
    idx = np.unravel_index(int(np.argmin(d2)), d2.shape)
    if not np.isfinite(d2[idx]) or d2[idx] > radius ** 2:
        return np.zeros(mask.shape, bool)
    lab, _ = ndimage.label(mask)
    return lab == lab[idx]


def derive_ventricles(volume: Volume, brain: np.ndarray, csf: np.ndarray) -> np.ndarray:
    """Ventricle label map (``uint8 [k, j, i]``, values :data:`VENTRICLE_LABELS`) of an MNI-aligned 1 mm
    template from its brain and CSF masks (rules in the module docstring)."""
    xyz = ras_coordinates(volume)
    x, y, z = xyz
    filled = ndimage.binary_fill_holes(ndimage.binary_closing(brain, iterations=3))
    interior = ndimage.binary_erosion(filled, iterations=6)
    cand = csf & interior & (np.abs(x) < 40) & (y > -70) & (y < 40) & (z > -50) & (z < 35)
    lateral_cand = ndimage.binary_opening(cand, iterations=1) & (np.abs(x) > 1.5)
    lateral = _seeded(lateral_cand, xyz, (-16, -10, 20)) | _seeded(lateral_cand, xyz, (16, -10, 20))
    lateral = ndimage.binary_dilation(lateral, iterations=2, mask=cand & (np.abs(x) > 1.5))
    third = _seeded(cand & (np.abs(x) <= 4) & (y > -28) & (y < 8) & (z > -10) & (z < 18) & ~lateral, xyz,
                    (0, -12, 2))
    fourth = _seeded(cand & (np.abs(x) <= 12) & (y > -58) & (y < -33) & (z > -45) & (z < -15), xyz,
                     (0, -45, -30), radius=12)
    out = np.zeros(volume.geometry.shape, np.uint8)
    out[lateral & (x < 0)] = VENTRICLE_LABELS["lateral-ventricle-left"]
    out[lateral & (x >= 0)] = VENTRICLE_LABELS["lateral-ventricle-right"]
    out[third] = VENTRICLE_LABELS["third-ventricle"]
    out[fourth] = VENTRICLE_LABELS["fourth-ventricle"]
    missing = [n for n, v in VENTRICLE_LABELS.items() if not (out == v).any()]
    if missing:
        raise InputError(f"{volume.label}: could not derive {', '.join(missing)} (not an MNI-aligned brain?)")
    return out


def colin27_csf(image: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Brain mask and CSF mask (darkest of three Otsu classes inside the brain) of skull-stripped Colin27."""
    from skimage.filters import threshold_multiotsu

    brain = image.array > 0
    low, _ = threshold_multiotsu(image.array[brain], classes=3)
    return brain, brain & (image.array < low)


# ---------------------------------------------------------------------------------------------- builders
def _source_key(sources: dict[str, Path]) -> str:
    import hashlib

    h = hashlib.sha256(f"v{BUILD_VERSION}".encode())
    for k in sorted(sources):
        h.update(k.encode())
        h.update(sources[k].read_bytes())
    return h.hexdigest()[:16]


def _cached_build(name: str, sources: dict[str, Path], build, progress, cancel) -> Reference:
    key = _source_key(sources)
    folder = cache_dir() / "builtin" / f"{name}-{key}"
    image_path, labels_path = folder / "image.nii.gz", folder / "labels.nii.gz"
    if not (image_path.is_file() and labels_path.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        image, labels = build(progress, cancel)
        write_volume(image, image_path)
        write_volume(labels, labels_path)
        (folder / "sources.json").write_text(json.dumps({k: str(v) for k, v in sources.items()}, indent=1))
    return Reference(name, image_path, labels_path, key=f"{name}-{key}", origin=f"builtin:{name}")


def build_colin27(progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> Reference:
    """Colin27 + AAL + derived ventricles (built once, cached)."""
    src = colin27_sources()

    def build(progress, cancel):
        report(progress, 0.0, "building Colin27 atlas")
        image = read_volume(src["image"], name="colin27")
        aal = read_volume(src["aal"], kind="label", name="aal")
        if not aal.geometry.same_as(image.geometry, atol=1e-3):
            raise InputError("aal.nii.gz and ch2bet.nii.gz are not on the same grid")
        brain, csf = colin27_csf(image)
        check(cancel)
        vent = derive_ventricles(image, brain, csf)
        labels = np.where(vent > 0, vent, aal.array).astype(np.uint8)
        report(progress, 1.0, "Colin27 atlas built")
        return image, image.with_array(labels, "colin27 labels")

    return _cached_build("colin27", src, build, progress, cancel)


def build_mni152(progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> Reference:
    """MNI152 2009a + AAL propagated from Colin27 + ventricles from its own tissue maps (built once, cached)."""
    src = {**mni152_sources(), **{f"colin27-{k}": v for k, v in colin27_sources().items()}}

    def build(progress, cancel):
        from .registration import PROPAGATE, register, warp_labels

        report(progress, 0.0, "building MNI152 atlas: registering Colin27 onto MNI152")
        image = read_volume(src["t1"], name="mni152")
        gm = read_volume(src["gm"]).array / 255.0
        wm = read_volume(src["wm"]).array / 255.0
        colin = build_colin27(cancel=cancel)
        transform = register(image, colin.image, PROPAGATE, cancel=cancel,
                             progress=None if progress is None else (lambda f, m: progress(0.9 * f, m)))
        aal = warp_labels(colin.labels, image.geometry, transform)
        aal[aal > 116] = 0  # Colin27's own ventricles are replaced by MNI152's
        tissue = gm + wm
        vent = derive_ventricles(image, tissue > 0.5, tissue < 0.5)
        labels = np.where(vent > 0, vent, aal).astype(np.uint8)
        report(progress, 1.0, "MNI152 atlas built")
        return image, image.with_array(labels, "mni152 labels")

    return _cached_build("mni152", src, build, progress, cancel)


BUILDERS = {"colin27": build_colin27, "mni152": build_mni152}


def builtin_reference_set(name: str, progress: Optional[ProgressFn] = None,
                          cancel: Optional[CancelToken] = None) -> ReferenceSet:
    """The built-in atlas ``name`` (``builtin/<name>.json``) as a reference set."""
    data = builtin_definition(name)
    builders = data.get("builders") or []
    unknown = [b for b in builders if b not in BUILDERS]
    if not builders or unknown:
        raise InputError(f"built-in atlas {name!r}: unknown builders {unknown or builders}")
    refs = []
    for n, b in enumerate(builders):
        sub = None if progress is None else (lambda f, m, n=n: progress((n + f) / len(builders), m))
        refs.append(BUILDERS[b](sub, cancel))
    return ReferenceSet(str(data.get("name", name)), refs, structures_from(data, f"builtin:{name}"),
                        str(data.get("label_kind", "")), str(data.get("description", "")))
