"""The common space: references registered once (cached on disk), one registration per target.

The common space is the first reference's image (the *anchor*). Reference ``r`` is registered into it once
(``T_r``: common -> reference, cached under the registration settings' key, the anchor's and the reference's
content keys); that work does not depend on the patient. A target is registered once (``S``: target ->
common) and every reference label map is warped onto the target grid through ``T_r(S(x))`` with nearest
neighbour interpolation. Independent registrations and warps run in a thread pool; SimpleITK releases the
GIL inside its filters and each job gets ``cpu_count // workers`` ITK threads.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from ..progress import CancelToken, ProgressFn, check, report
from ..volume import Geometry, Volume
from .references import Reference, ReferenceSet, cache_dir
from .registration import (FAST, RegistrationSettings, as_field, compose, load_transform, register,
                           save_transform, warp_labels, working_image)


#: spacing of the displacement fields that stand for B-spline transforms when warping (mm)
FIELD_SPACING_MM = 2.0


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


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
        self._lock = threading.Lock()
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------------------------- references
    def _path(self, ref: Reference) -> Optional[Path]:
        if self.cache is None:
            return None
        return self.cache / self.settings.key() / self.anchor.key / f"{ref.key}.h5"

    def anchor_image(self, resolution_mm: Optional[float] = None) -> sitk.Image:
        """The anchor image at the working resolution (default) or at ``resolution_mm`` (computed once each)."""
        res = self.settings.resolution_mm if resolution_mm is None else resolution_mm
        with self._lock:
            if res not in self._anchor_work:
                self._anchor_work[res] = working_image(self.anchor.image, res)
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

    # ---------------------------------------------------------------------------------------- target
    def register_target(self, target: Volume, progress: Optional[ProgressFn] = None,
                        cancel: Optional[CancelToken] = None) -> sitk.Transform:
        """``S``: target -> common space (the only registration that depends on the patient)."""
        settings = self.settings if self.settings.threads else replace(self.settings, threads=cpu_count())
        return register(target, self.anchor_image(), settings, progress=progress, cancel=cancel,
                        names=(target.label, self.anchor.name), fine=(None, self._fine_anchor()))

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

        previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        jobs = min(self.workers, len(refs))
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, cpu_count() // jobs))
        try:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                for future in [pool.submit(job, n) for n in range(len(refs))]:
                    future.result()
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
        self.timings.update(target_registration_s=t1 - t0, warp_s=time.perf_counter() - t1)
        report(progress, 1.0, "references warped onto the target")
        return WarpedReferences(target.geometry, [lab for lab in labels if lab is not None],
                                [r.name for r in refs], s, dict(self.timings))
