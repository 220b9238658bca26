"""More references from few: smooth random deformations of labelled atlases (for benchmarks and evaluations).

A deformation is a small random affine (rotation, scaling, shift about the image centre) composed with a
cubic B-spline displacement field whose control points (every ``spacing_mm``) move by Gaussian amounts of
standard deviation ``magnitude_mm``. Image and labels are resampled through it on their own grid (linear /
nearest neighbour); results are cached on disk, keyed by the source reference and the parameters.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..progress import CancelToken, ProgressFn, check, report
from ..volume import Geometry, Volume, read_volume, write_volume
from .references import Reference, ReferenceSet, cache_dir
from .registration import compose, warp_image, warp_labels


@dataclass(frozen=True)
class Deformation:
    """Parameters of one smooth random deformation (``seed`` makes it reproducible)."""

    seed: int
    magnitude_mm: float = 4.0
    spacing_mm: float = 40.0
    rotation_deg: float = 4.0
    scale: float = 0.04
    shift_mm: float = 4.0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def transform(self, geometry: Geometry) -> sitk.Transform:
        """Output-grid -> input-grid transform (LPS mm) on ``geometry``."""
        rng = np.random.default_rng(self.seed)
        centre = geometry.ijk_to_lps @ np.r_[(np.asarray(geometry.size) - 1) / 2.0, 1.0]
        affine = sitk.AffineTransform(3)
        affine.SetCenter(centre[:3].tolist())
        angles = np.deg2rad(rng.uniform(-self.rotation_deg, self.rotation_deg, 3))
        rot = sitk.Euler3DTransform()
        rot.SetRotation(*angles.tolist())
        matrix = np.asarray(rot.GetMatrix()).reshape(3, 3) @ np.diag(1 + rng.uniform(-self.scale, self.scale, 3))
        affine.SetMatrix(matrix.ravel().tolist())
        affine.SetTranslation(rng.uniform(-self.shift_mm, self.shift_mm, 3).tolist())
        reference = geometry.apply_to(sitk.Image(list(geometry.size), sitk.sitkUInt8))
        extent = np.asarray(geometry.size) * np.asarray(geometry.spacing)
        mesh = [max(1, int(round(e / self.spacing_mm))) for e in extent]
        bspline = sitk.BSplineTransformInitializer(reference, mesh, order=3)
        n = len(bspline.GetParameters())
        bspline.SetParameters(rng.normal(0.0, self.magnitude_mm, n).tolist())
        return compose(affine, bspline)


def deform(image: Volume, labels: Volume, deformation: Deformation) -> tuple[Volume, Volume]:
    """The deformed image (linear) and label map (nearest neighbour), on the same grid as the inputs."""
    if not image.geometry.same_as(labels.geometry, atol=1e-3):
        raise InputError(f"{image.label}: image and label map are not on the same grid")
    t = deformation.transform(image.geometry)
    out = warp_image(image, image.geometry, t)
    lab = warp_labels(labels, labels.geometry, t)
    return out, labels.with_array(lab.astype(labels.array.dtype, copy=False))


def deformed_reference(ref: Reference, deformation: Deformation) -> Reference:
    """A lazily built, disk-cached deformed copy of ``ref``."""
    key = f"{ref.key}-d{deformation.key()}"
    folder = cache_dir() / "deformed" / key
    image_path, labels_path = folder / "image.nii.gz", folder / "labels.nii.gz"

    def build() -> None:
        if image_path.is_file() and labels_path.is_file():
            return
        folder.mkdir(parents=True, exist_ok=True)
        image, labels = deform(ref.image, ref.labels, deformation)
        write_volume(image, image_path)
        write_volume(labels, labels_path)

    def load_image() -> Volume:
        build()
        return read_volume(image_path, name=f"{ref.name}~{deformation.seed}")

    def load_labels() -> Volume:
        build()
        return read_volume(labels_path, kind="label", name=f"{ref.name}~{deformation.seed} labels")

    return Reference(f"{ref.name}~{deformation.seed}", load_image, load_labels, key=key,
                     origin=f"{ref.origin or ref.name} deformed (seed {deformation.seed})", source=ref.source)


def augment(refset: ReferenceSet, total: int, *, seed: int = 0, magnitude_mm: float = 4.0,
            keep_originals: bool = True, progress: Optional[ProgressFn] = None,
            cancel: Optional[CancelToken] = None) -> ReferenceSet:
    """``total`` references: the originals (if ``keep_originals``) then deformed copies cycling through them.

    Copies are built eagerly (and cached), reporting progress.
    """
    if total < 1:
        raise InputError(f"need at least one reference, asked for {total}")
    base = refset.references
    refs = list(base[:total]) if keep_originals else []
    n = 0
    while len(refs) < total:
        refs.append(deformed_reference(base[n % len(base)], Deformation(seed=seed * 1000 + n,
                                                                        magnitude_mm=magnitude_mm)))
        n += 1
    for m, ref in enumerate(refs):
        check(cancel)
        report(progress, m / len(refs), f"preparing reference {ref.name}")
        ref.labels  # noqa: B018  (builds and loads the deformed copy)
    report(progress, 1.0, "references ready")
    return ReferenceSet(f"{refset.name}x{total}", refs, refset.structures, refset.label_kind,
                        refset.description)


