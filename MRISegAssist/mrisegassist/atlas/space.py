"""The common space: references registered once (cached on disk), one registration per target.

The common space is the first reference's image (the *anchor*). Reference ``r`` is registered into it once
(``T_r``: common -> reference, cached under the registration settings' key, the anchor's and the reference's
content keys) and its label map is warped into it (nearest neighbour, cached); the references' score maps
(per structure, the fraction of references labelling a voxel) are then computed once on the anchor's grid and
cached too. None of that depends on the patient. A target is registered once (``S``: target -> common) and each
structure's common score map is resampled onto the target grid through ``S`` (linear interpolation, only over
the target region that ``S`` maps onto the structure's box): :meth:`CommonSpace.target_scores`, the path of
atlas boxes. Its cost does not grow with the number of references.

:meth:`CommonSpace.warp` keeps the exact per-reference path (every reference label map warped onto the target
through ``T_r(S(x))``). Independent registrations and warps run in a thread pool; SimpleITK releases the GIL
inside its filters and each job gets ``cpu_count // workers`` ITK threads.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..progress import CancelToken, ProgressFn, check, report
from ..volume import Geometry, Volume, atomic_write, fingerprint
from .boxes import ScoreMap, score_maps
from .references import Reference, ReferenceSet, Structure, cache_dir
from .registration import (FAST, RegistrationSettings, as_field, compose, load_transform, register,
                           save_transform, warp_labels, working_image)


#: spacing of the displacement fields that stand for B-spline transforms when warping (mm)
FIELD_SPACING_MM = 2.0
#: spacing of the target points mapped into the common space to find each structure's target region (mm)
REGION_STEP_MM = 4.0
#: bump when the common-space label maps or score maps change, so cached ones are redone
COMMON_VERSION = 1
#: ``memo(key, make)``: a cache returning the value kept under ``key``, else ``make()``'s (kept)
Memo = Callable[[tuple, Callable[[], object]], object]


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class TargetScores:
    """Score maps of the references' structures on the target grid (:class:`~.boxes.ScoreMap`, values = the
    structures' 1-based positions), the target -> common transform and the timings of each phase (s)."""

    geometry: Geometry
    scores: list[ScoreMap]
    target_transform: sitk.Transform
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class WarpedReferences:
    """Reference label maps on the target grid: ``labels[r]`` is ``[k, j, i]`` (same dtype as the reference)."""

    geometry: Geometry
    labels: list[np.ndarray]
    names: list[str]
    target_transform: sitk.Transform
    timings: dict[str, float] = field(default_factory=dict)


class CommonSpace:
    """References of ``refset`` in the common space of its first reference.

    ``settings`` apply to every registration; ``workers`` bounds the thread pool (default: CPU count);
    ``cache`` is the folder for reference transforms (default: ``cache_dir()/registrations``; ``False``
    disables caching).
    """

    def __init__(self, refset: ReferenceSet, settings: RegistrationSettings = FAST,
                 workers: Optional[int] = None, cache=None) -> None:
        self.refset = refset
        self.settings = settings
        self.workers = max(1, int(workers or cpu_count()))
        self.anchor: Reference = refset.references[0]
        if cache is False:
            self.cache: Optional[Path] = None
        else:
            self.cache = Path(cache) if cache else cache_dir() / "registrations"
        self._transforms: dict[str, sitk.Transform] = {}
        self._fields: dict[str, sitk.Transform] = {}
        self._anchor_work: dict[float, sitk.Image] = {}
        self._common: dict[tuple[str, ...], tuple[list[ScoreMap], Geometry]] = {}
        self._lock = threading.Lock()
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------------------------- references
    def _path(self, ref: Reference) -> Optional[Path]:
        if self.cache is None:
            return None
        return self.cache / self.settings.key() / self.anchor.key / f"{ref.key}.h5"

    def anchor_image(self, resolution_mm: Optional[float] = None) -> sitk.Image:
        """The anchor image at the working resolution (default) or at ``resolution_mm``: computed once
        (:func:`.registration.working_image`) and kept in memory and in the cache folder (``anchors/``, float32
        MetaImage, read back bit for bit), since it does not depend on the patient."""
        res = self.settings.resolution_mm if resolution_mm is None else resolution_mm
        with self._lock:
            if res not in self._anchor_work:
                path = None if self.cache is None else self.cache / "anchors" / f"{self.anchor.key}-{res:g}mm.mha"
                image = _read_image(path)
                if image is None:
                    image = working_image(self.anchor.image, res)
                    if path is not None:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, True))
                self._anchor_work[res] = image
            return self._anchor_work[res]

    def _fine_anchor(self) -> Optional[sitk.Image]:
        """The anchor at the demons refinement's spacing (``None`` without refinement)."""
        if self.settings.refine == "none" or self.settings.deformable != "bspline":
            return None
        return self.anchor_image(self.settings.refine_resolution_mm)

    def _job_settings(self, jobs: int) -> RegistrationSettings:
        threads = self.settings.threads or max(1, cpu_count() // max(1, min(jobs, self.workers)))
        return replace(self.settings, threads=threads)

    def reference_transform(self, ref: Reference, settings: Optional[RegistrationSettings] = None,
                            cancel: Optional[CancelToken] = None) -> sitk.Transform:
        """``T_ref``: common -> reference (identity for the anchor); registered once, then read from cache."""
        if ref.key in self._transforms:
            return self._transforms[ref.key]
        if ref.key == self.anchor.key:
            t: sitk.Transform = sitk.Transform(3, sitk.sitkIdentity)
        else:
            path = self._path(ref)
            if path is not None and path.is_file():
                t = load_transform(path)
            else:
                t = register(self.anchor_image(), ref.image, settings or self.settings, cancel=cancel,
                             names=(self.anchor.name, ref.name), fine=(self._fine_anchor(), None))
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    save_transform(t, path)
        self._transforms[ref.key] = t
        return t

    def missing(self) -> list[Reference]:
        """References whose transform is neither in memory nor on disk."""
        out = []
        for ref in self.refset.references:
            path = self._path(ref)
            if ref.key != self.anchor.key and ref.key not in self._transforms and not (path and path.is_file()):
                out.append(ref)
        return out

    def prepare(self, progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None) -> list[sitk.Transform]:
        """Register every reference into the common space (in parallel; cached ones are only read)."""
        t0 = time.perf_counter()
        todo = self.missing()
        if todo:
            self.anchor_image()
            self._fine_anchor()
        settings = self._job_settings(len(todo))
        done = [0]

        def job(ref: Reference) -> None:
            check(cancel)
            self.reference_transform(ref, settings, cancel)
            with self._lock:
                done[0] += 1
                report(progress, done[0] / max(len(todo), 1), f"registered reference {ref.name} "
                       f"({done[0]}/{len(todo)})")

        report(progress, 0.0, f"registering {len(todo)} reference(s) into the common space")
        if todo:
            with ThreadPoolExecutor(max_workers=min(self.workers, len(todo))) as pool:
                for future in [pool.submit(job, r) for r in todo]:
                    future.result()
        out = [self.reference_transform(r) for r in self.refset.references]
        self.timings["references_s"] = time.perf_counter() - t0
        return out

    def reference_fields(self, progress: Optional[ProgressFn] = None,
                         cancel: Optional[CancelToken] = None) -> list[sitk.Transform]:
        """``T_ref`` of every reference as a displacement field on the anchor grid (2 mm; linear transforms
        unchanged), computed once: composing two fields per target is far cheaper than composing B-splines."""
        transforms = self.prepare(progress, cancel)
        geometry = self.anchor.labels.geometry
        out = []
        for ref, t in zip(self.refset.references, transforms):
            if ref.key not in self._fields:
                self._fields[ref.key] = as_field(t, geometry, FIELD_SPACING_MM)
            out.append(self._fields[ref.key])
        report(progress, 1.0, "references in the common space")
        return out

    # ----------------------------------------------------------------------------- common score maps
    def _folder(self) -> Optional[Path]:
        return None if self.cache is None else self.cache / self.settings.key() / self.anchor.key

    def common_labels(self, ref: Reference, cancel: Optional[CancelToken] = None) -> np.ndarray:
        """``ref``'s label map on the anchor's label grid (``[k, j, i]``, nearest neighbour through ``T_ref``),
        computed once and cached on disk beside the transform."""
        if ref.key == self.anchor.key:
            return self.anchor.labels.array
        folder = self._folder()
        path = None if folder is None else folder / f"{ref.key}.labels-v{COMMON_VERSION}.npz"
        if path is not None and path.is_file():
            try:
                with np.load(path) as data:
                    return data["labels"]
            except (OSError, ValueError, KeyError):
                pass  # damaged cache entry: computed again and replaced
        transform = self.reference_transform(ref, cancel=cancel)
        check(cancel)
        labels = warp_labels(ref.labels, self.anchor.labels.geometry, transform, FIELD_SPACING_MM)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: np.savez_compressed(tmp, labels=labels))
        return labels

    def _scores_path(self, structures: Sequence[Structure]) -> Optional[Path]:
        folder = self._folder()
        if folder is None:
            return None
        doc = {"v": COMMON_VERSION, "refs": [r.key for r in self.refset.references],
               "structures": [{"name": s.name, "labels": list(s.labels)} for s in structures]}
        return folder / f"scores-{hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:20]}.npz"

    def scores_cached(self, structures: Sequence[Structure]) -> bool:
        """Whether :meth:`common_scores` of ``structures`` is in memory or on disk (no registration to run)."""
        path = self._scores_path(structures)
        return tuple(s.name for s in structures) in self._common or (path is not None and path.is_file())

    def common_scores(self, structures: Optional[Sequence[Structure]] = None,
                      progress: Optional[ProgressFn] = None,
                      cancel: Optional[CancelToken] = None) -> tuple[list[ScoreMap], Geometry]:
        """Score maps of ``structures`` (default: the set's) on the anchor's label grid, and that grid.

        Computed once (references registered and their labels warped into the common space, in parallel) and
        cached on disk, keyed by the settings, the anchor, the references and the structures' label values."""
        structures = list(self.refset.structures if structures is None else structures)
        key = tuple(s.name for s in structures)
        if key in self._common:
            return self._common[key]
        t0 = time.perf_counter()
        path = self._scores_path(structures)
        loaded = load_score_maps(path, structures) if path is not None and path.is_file() else None
        if loaded is None:
            refs = self.refset.references
            self.prepare(None if progress is None else (lambda f, m: progress(0.8 * f, m)), cancel)
            labels: list[Optional[np.ndarray]] = [None] * len(refs)

            def job(n: int) -> None:
                check(cancel)
                labels[n] = self.common_labels(refs[n], cancel)

            report(progress, 0.8, "reference labels in the common space")
            with _itk_threads(min(self.workers, len(refs))), \
                    ThreadPoolExecutor(max_workers=min(self.workers, len(refs))) as pool:
                for future in [pool.submit(job, n) for n in range(len(refs))]:
                    future.result()
            check(cancel)
            geometry = self.anchor.labels.geometry
            loaded = (score_maps([lab for lab in labels if lab is not None], structures), geometry)
            del labels
            if path is not None:
                save_score_maps(path, *loaded)
        self._common[key] = loaded
        self.timings["common_scores_s"] = time.perf_counter() - t0
        report(progress, 1.0, "score maps in the common space")
        return loaded

    # ---------------------------------------------------------------------------------------- target
    def target_scores(self, target: Volume, structures: Optional[Sequence[Structure]] = None,
                      progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
                      memo: Optional[Memo] = None) -> TargetScores:
        """The references' score maps on ``target``'s grid: common score maps (:meth:`common_scores`, cached),
        one target registration (``memo``: see :meth:`register_target`), each structure's map resampled through
        it (see the module docstring)."""
        sub = (lambda a, b: None if progress is None else (lambda f, m: report(progress, a + (b - a) * f, m)))
        structures = list(self.refset.structures if structures is None else structures)
        cold = not self.scores_cached(structures)
        common, geometry = self.common_scores(structures, sub(0.0, 0.5) if cold else None, cancel)
        t0 = time.perf_counter()
        s = self.register_target(target, sub(0.5 if cold else 0.0, 0.9), cancel, memo)
        t1 = time.perf_counter()
        report(progress, 0.9, "score maps onto the target")
        scores = resample_scores(common, geometry, target.geometry, s, cancel)
        self.timings.update(target_registration_s=t1 - t0, scores_to_target_s=time.perf_counter() - t1)
        report(progress, 1.0, "score maps on the target")
        return TargetScores(target.geometry, scores, s, dict(self.timings))

    def register_target(self, target: Volume, progress: Optional[ProgressFn] = None,
                        cancel: Optional[CancelToken] = None, memo: Optional[Memo] = None) -> sitk.Transform:
        """``S``: target -> common space (the only registration that depends on the patient). ``memo(key,
        make)``: a cache (e.g. the service's prepared-volume cache) that returns the transform made before for
        the same target voxels and geometry, anchor and settings, or ``make()``s it."""
        settings = self.settings if self.settings.threads else replace(self.settings, threads=cpu_count())

        def make() -> sitk.Transform:
            return register(target, self.anchor_image(), settings, progress=progress, cancel=cancel,
                            names=(target.label, self.anchor.name), fine=(None, self._fine_anchor()))

        if memo is None:
            return make()
        key = ("atlas target registration", self.settings.key(), self.anchor.key, fingerprint(target.array),
               json.dumps(target.geometry.to_dict(), sort_keys=True))
        return memo(key, make)

    def warp(self, target: Volume, progress: Optional[ProgressFn] = None,
             cancel: Optional[CancelToken] = None) -> WarpedReferences:
        """Every reference label map on the target grid (registers references first if needed)."""
        sub = (lambda a, b: (lambda f, m: report(progress, a + (b - a) * f, m)))
        transforms = self.reference_fields(sub(0.0, 0.4) if self.missing() else None, cancel)
        t0 = time.perf_counter()
        s = self.register_target(target, sub(0.4 if self.timings.get("references_s", 0) > 1 else 0.0, 0.85),
                                 cancel)
        t1 = time.perf_counter()
        refs = self.refset.references
        s_field = as_field(s, target.geometry, FIELD_SPACING_MM)
        labels: list[Optional[np.ndarray]] = [None] * len(refs)
        done = [0]

        def job(n: int) -> None:
            check(cancel)
            labels[n] = warp_labels(refs[n].labels, target.geometry, compose(transforms[n], s_field),
                                    FIELD_SPACING_MM)
            with self._lock:
                done[0] += 1
                report(progress, 0.85 + 0.15 * done[0] / len(refs), f"warped {refs[n].name}")

        jobs = min(self.workers, len(refs))
        with _itk_threads(jobs), ThreadPoolExecutor(max_workers=jobs) as pool:
            for future in [pool.submit(job, n) for n in range(len(refs))]:
                future.result()
        self.timings.update(target_registration_s=t1 - t0, warp_s=time.perf_counter() - t1)
        report(progress, 1.0, "references warped onto the target")
        return WarpedReferences(target.geometry, [lab for lab in labels if lab is not None],
                                [r.name for r in refs], s, dict(self.timings))


def _read_image(path: Optional[Path]) -> Optional[sitk.Image]:
    """A cached image, or ``None`` when absent or unreadable (then computed again and replaced)."""
    if path is None or not path.is_file():
        return None
    try:
        return sitk.ReadImage(str(path), sitk.sitkFloat32)
    except RuntimeError:
        return None


@contextlib.contextmanager
def _itk_threads(jobs: int):
    """ITK's default thread count set to ``cpu_count // jobs`` while ``jobs`` warps run at once."""
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, cpu_count() // max(1, jobs)))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


# ------------------------------------------------------------------------------------ score map files
def save_score_maps(path: Path, scores: Sequence[ScoreMap], geometry: Geometry) -> None:
    """Score maps with their boxes and grid in one compressed ``.npz``: counts of agreeing references
    (``uint8``/``uint16``) where the scores are such fractions (common space), float32 values otherwise."""
    n = scores[0].n_references if scores else 0
    dtype = np.uint8 if n < 256 else np.uint16
    arrays = {}
    for m, s in enumerate(scores):
        counts = np.rint(s.array * n)
        if np.allclose(counts, s.array * n, atol=1e-4):
            arrays[f"counts_{m}"] = counts.astype(dtype)
        else:
            arrays[f"values_{m}"] = s.array.astype(np.float32)
    boxes = np.array([[b.start for b in s.box] + [b.stop for b in s.box] for s in scores], np.int64).reshape(-1, 6)
    meta = json.dumps({"n": n, "names": [s.structure.name for s in scores], "values": [s.value for s in scores],
                       "geometry": geometry.to_dict()})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: np.savez_compressed(tmp, boxes=boxes, meta=np.array(meta), **arrays))


def load_score_maps(path: Path, structures: Sequence[Structure]) -> Optional[tuple[list[ScoreMap], Geometry]]:
    """What :func:`save_score_maps` wrote, or ``None`` when the file is damaged or for other structures."""
    try:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            if meta["names"] != [s.name for s in structures]:
                return None
            geometry = Geometry.from_dict(meta["geometry"])
            n = int(meta["n"])
            out = []
            for m, (s, value) in enumerate(zip(structures, meta["values"])):
                b = [int(v) for v in data["boxes"][m]]
                box = (slice(b[0], b[3]), slice(b[1], b[4]), slice(b[2], b[5]))
                array = (data[f"counts_{m}"].astype(np.float32) / n if f"counts_{m}" in data.files
                         else data[f"values_{m}"].astype(np.float32))
                out.append(ScoreMap(s, int(value), array, box, geometry.shape, n))
            return out, geometry
    except (OSError, ValueError, KeyError, IndexError, InputError):
        return None


# ------------------------------------------------------------------------------- common -> target
def _mapped_points(transform: sitk.Transform, target: Geometry, step_mm: float) -> tuple[np.ndarray, list[int]]:
    """Target grid points every ``step_mm`` (index steps per axis ``(i, j, k)``) mapped through ``transform``:
    ``(nk, nj, ni, 3)`` LPS points in the common space, and the steps."""
    steps = [max(1, int(round(step_mm / s))) for s in target.spacing]
    size = [int(np.ceil((n - 1) / st)) + 1 for n, st in zip(target.size, steps)]
    spacing = [sp * st for sp, st in zip(target.spacing, steps)]
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, size, target.origin, spacing,
                                              target.direction)
    disp = sitk.GetArrayFromImage(field)  # (nk, nj, ni, 3)
    k, j, i = np.meshgrid(*[np.arange(n) * st for n, st in zip(size[::-1], steps[::-1])], indexing="ij")
    m = target.ijk_to_lps
    points = np.stack([m[r, 0] * i + m[r, 1] * j + m[r, 2] * k + m[r, 3] for r in range(3)], axis=-1)
    return points + disp, steps


def resample_scores(common: Sequence[ScoreMap], common_geometry: Geometry, target: Geometry,
                    transform: sitk.Transform, cancel: Optional[CancelToken] = None) -> list[ScoreMap]:
    """Common-space score maps on the ``target`` grid through ``transform`` (target -> common points), linear
    interpolation, each computed only over the target region whose points ``transform`` maps into the map's box
    (found on a :data:`REGION_STEP_MM` grid, with that step as margin on both sides). A map no target voxel
    reaches comes back empty (score 0 everywhere)."""
    s_field = as_field(transform, target, FIELD_SPACING_MM)
    points, steps = _mapped_points(s_field, target, REGION_STEP_MM)
    cidx = common_geometry.lps_to_continuous_ijk(points.reshape(-1, 3)).reshape(points.shape)  # (i, j, k)
    margin = [REGION_STEP_MM / s + 1.0 for s in common_geometry.spacing]
    empty = (slice(0, 0),) * 3
    out = []
    for score in common:
        check(cancel)
        box = score.box
        inside = np.ones(points.shape[:3], bool)
        for axis, sl in zip((2, 1, 0), box):  # box is (k, j, i); cidx's last axis is (i, j, k)
            inside &= (cidx[..., axis] >= sl.start - margin[axis]) & (cidx[..., axis] <= sl.stop - 1 + margin[axis])
        if score.max <= 0 or not inside.any():
            out.append(ScoreMap(score.structure, score.value, np.zeros((0, 0, 0), np.float32), empty, target.shape,
                                score.n_references))
            continue
        nz = np.nonzero(inside)  # coarse (k, j, i)
        lo = [max(0, (int(nz[a].min()) - 1) * steps[2 - a]) for a in range(3)]  # (k, j, i)
        hi = [min(target.shape[a], (int(nz[a].max()) + 1) * steps[2 - a] + 1) for a in range(3)]
        image = sitk.GetImageFromArray(score.array.astype(np.float32, copy=False))
        origin = common_geometry.ijk_to_lps @ np.array([box[2].start, box[1].start, box[0].start, 1.0])
        image.SetOrigin(tuple(float(v) for v in origin[:3]))
        image.SetSpacing(common_geometry.spacing)
        image.SetDirection(common_geometry.direction)
        sub = target.subgrid((lo[2], lo[1], lo[0]), (hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0]))
        array = sitk.GetArrayFromImage(sitk.Resample(image, sub.size, s_field, sitk.sitkLinear, sub.origin,
                                                     sub.spacing, sub.direction, 0.0, sitk.sitkFloat32))
        np.clip(array, 0.0, 1.0, out=array)
        found = np.nonzero(array > 1e-6)
        if not found[0].size:
            out.append(ScoreMap(score.structure, score.value, np.zeros((0, 0, 0), np.float32), empty, target.shape,
                                score.n_references))
            continue
        tight = tuple(slice(int(f.min()), int(f.max()) + 1) for f in found)
        box_t = tuple(slice(l0 + t.start, l0 + t.stop) for l0, t in zip(lo, tight))
        out.append(ScoreMap(score.structure, score.value, np.ascontiguousarray(array[tight]), box_t, target.shape,
                            score.n_references))
    return out
