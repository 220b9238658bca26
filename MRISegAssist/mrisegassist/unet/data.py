"""Training data: case discovery (BraTS-style folders or a CSV manifest), preprocessing onto the model grid
(the same :func:`~mrisegassist.unet.preprocess.prepare_inputs` as inference) and MONAI augmentation.

Folder naming understood by :func:`discover_cases` (one sub-folder per case, ``.nii.gz``/``.nii``/``.nrrd``/
``.mha``): ``flair, t1, t1c, t2`` + ``labels`` (as in ``brats2013-deepmedic``), BraTS-2023 names
``<case>-t1n, -t1c, -t2w, -t2f, -seg``, and ``t1ce``/``t1post``/``t2w``/``lesions``/``seg``/``gt`` variants.
Training arrays are ``(C, S, P, L)`` float32 images and ``(S, P, L)`` uint8 class indices on the model grid.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from ..errors import InputError
from ..volume import READABLE_SUFFIXES, Volume, load_case, read_volume, resample_to
from .preprocess import ModelGrid, foreground_bbox, prepare_inputs

SEQUENCE_ALIASES = {
    "flair": "flair", "t2f": "flair", "t2flair": "flair", "t2-flair": "flair",
    "t1c": "t1c", "t1ce": "t1c", "t1gd": "t1c", "t1post": "t1c",
    "t1": "t1", "t1n": "t1", "t1w": "t1",
    "t2": "t2", "t2w": "t2",
}
LABEL_NAMES = ("labels", "label", "seg", "lesions", "gt", "mask")


@dataclass
class CaseFiles:
    """Files of one training case: sequence name -> path, and the label map path (or None)."""

    name: str
    images: dict[str, Path]
    labels: Optional[Path] = None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(READABLE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _classify(path: Path) -> Optional[str]:
    """'labels', a sequence name, or None for a file that is neither."""
    stem = _stem(path).lower()
    for candidate in (stem, stem.replace("_", "-").split("-")[-1]):
        if candidate in LABEL_NAMES:
            return "labels"
        if candidate in SEQUENCE_ALIASES:
            return SEQUENCE_ALIASES[candidate]
    return None


def find_case_files(folder: Path) -> Optional[CaseFiles]:
    """The sequence and label files of one case folder (None when it holds no recognised sequence)."""
    images: dict[str, Path] = {}
    labels = None
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not any(path.name.lower().endswith(s) for s in READABLE_SUFFIXES):
            continue
        kind = _classify(path)
        if kind == "labels":
            labels = path
        elif kind is not None:
            images.setdefault(kind, path)
    return CaseFiles(folder.name, images, labels) if images else None


def discover_cases(root: Path) -> list[CaseFiles]:
    """Cases in ``root``: each sub-folder with recognised sequence files (or ``root`` itself)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: cases folder does not exist")
    cases = [c for c in (find_case_files(sub) for sub in sorted(root.iterdir()) if sub.is_dir()) if c is not None]
    if not cases:
        single = find_case_files(root)
        cases = [single] if single is not None else []
    if not cases:
        raise InputError(f"{root}: no cases found (expected sub-folders with flair/t1/t1c/t2 + labels files, "
                         f"or BraTS-2023 names *-t2f/-t1c/-t1n/-t2w/-seg)")
    return cases


def read_manifest(path: Path) -> list[CaseFiles]:
    """Cases from a CSV with columns ``case``, one per sequence (``flair``, ``t1c``, ...) and ``label``.

    Relative paths are relative to the CSV's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: manifest does not exist")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "case" not in rows[0]:
        raise InputError(f"{path}: manifest needs a header with a 'case' column")
    label_col = next((c for c in ("label", "labels", "seg") if c in rows[0]), None)
    cases = []
    for row in rows:
        images = {SEQUENCE_ALIASES.get(k.lower(), k.lower()): (path.parent / v).resolve()
                  for k, v in row.items() if k not in ("case", label_col) and v}
        labels = (path.parent / row[label_col]).resolve() if label_col and row.get(label_col) else None
        cases.append(CaseFiles(row["case"], images, labels))
    return cases


@dataclass
class TrainingCase:
    """One preprocessed case on the model grid (cropped to the foreground)."""

    name: str
    image: np.ndarray  # (C, S, P, L) float32, normalised
    label: np.ndarray  # (S, P, L) uint8 class indices
    fg: np.ndarray  # (S, P, L) bool
    indices: list = field(default_factory=list)  # per class: flat voxel indices (for class-balanced crops)


def labels_to_classes(labels: np.ndarray, label_values: Sequence[int], name: str,
                      remap: Optional[Mapping[int, int]] = None) -> np.ndarray:
    """Label values -> class indices (0 = background, ``label_values[c-1]`` -> c); InputError on unknown values."""
    values = np.asarray(labels).astype(np.int64)
    if remap:
        lut_src = np.arange(max(int(values.max()), max(remap)) + 1)
        for src, dst in remap.items():
            lut_src[src] = dst
        values = lut_src[values]
    present = set(np.unique(values).tolist()) - {0}
    unknown = sorted(present - set(int(v) for v in label_values))
    if unknown:
        raise InputError(f"{name}: label value(s) {unknown} are not among the model's labels "
                         f"{list(label_values)} (use --remap SRC:DST to map them)")
    lut = np.zeros(int(values.max()) + 1, dtype=np.uint8)
    for c, v in enumerate(label_values, start=1):
        if v < lut.size:
            lut[v] = c
    return lut[values]


def training_case(name: str, images: Mapping[str, Volume], labels: Volume, inputs: Sequence[str],
                  spacing: Sequence[Optional[float]], normalization: Mapping[str, str],
                  label_values: Sequence[int], remap: Optional[Mapping[int, int]] = None) -> TrainingCase:
    """Preprocess one case exactly as inference does, and convert its labels to class indices."""
    case = load_case({n: images[n] for n in inputs}, reference=inputs[0])
    label_vol = resample_to(labels, case.geometry, "nearest")
    grid = ModelGrid.for_geometry(case.geometry, spacing)
    x, fg = prepare_inputs(case.images, inputs, grid, dict(normalization))
    classes = labels_to_classes(grid.to_model(label_vol.array, "nearest"), label_values, name, remap)
    box = foreground_bbox(fg | (classes > 0), margin=8)
    return TrainingCase(name, np.ascontiguousarray(x[(slice(None),) + box]), np.ascontiguousarray(classes[box]),
                        np.ascontiguousarray(fg[box]))


def load_training_case(files: CaseFiles, inputs: Sequence[str], spacing: Sequence[Optional[float]],
                       normalization: Mapping[str, str], label_values: Sequence[int],
                       remap: Optional[Mapping[int, int]] = None) -> TrainingCase:
    missing = [n for n in inputs if n not in files.images]
    if missing:
        raise InputError(f"case {files.name}: missing sequence(s) {', '.join(missing)} "
                         f"(has {', '.join(files.images) or 'none'})")
    if files.labels is None:
        raise InputError(f"case {files.name}: no label map found")
    images = {n: read_volume(files.images[n], name=f"{files.name}/{n}") for n in inputs}
    labels = read_volume(files.labels, kind="label", name=f"{files.name}/labels")
    return training_case(files.name, images, labels, inputs, spacing, normalization, label_values, remap)


def class_indices(case: TrainingCase, n_classes: int) -> list[np.ndarray]:
    """Flat indices of each class's voxels; background restricted to the foreground (brain) region."""
    flat = case.label.ravel()
    out = [np.flatnonzero((flat == 0) & case.fg.ravel())]
    out += [np.flatnonzero(flat == c) for c in range(1, n_classes)]
    return out


AUGMENTATIONS = ("none", "standard", "strong")


def make_transforms(dims: str, patch: int, n_classes: int, ratios: Optional[Sequence[float]] = None,
                    context: int = 0, augment: str = "standard", n_sequences: int = 1):
    """MONAI dictionary transforms: class-balanced crop, intensity augmentation, flips, rotation/zoom.

    Input dict: ``image`` (C, S, P, L), ``label`` (1, S, P, L), ``indices`` (per-class flat indices).
    Output: 2D ``(C * (2 * context + 1), P, L)`` image / ``(1, P, L)`` label patches (2.5D: the ``context``
    slices below and above the labelled one as extra channels, sequence-major: channel ``c * (2 * context
    + 1) + (d + context)`` is sequence ``c`` at slice offset ``d``), or 3D ``(C, S, P, L)`` patches of side
    ``patch``. ``augment``: ``"standard"`` (the recipe of the first shipped models), ``"strong"``: per
    sequence (``n_sequences`` = C) gamma, histogram shift, bias field, scale and shift, applied alike to a
    sequence's neighbouring slices, then noise, in-plane blur, flips and a stronger affine; ``"none"``: the
    class-balanced crop only (for checks).
    """
    from monai.transforms import (CastToTyped, Compose, ConcatItemsd, DeleteItemsd, Lambdad, RandAdjustContrastd,
                                  RandAffined, RandBiasFieldd, RandCropByLabelClassesd, RandFlipd,
                                  RandGaussianNoised, RandGaussianSmoothd, RandHistogramShiftd,
                                  RandScaleIntensityd, RandShiftIntensityd, SplitDimd, SqueezeDimd, ToTensord)

    if augment not in AUGMENTATIONS:
        raise InputError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    if context and dims != "2d":
        raise InputError("neighbouring-slice context (2.5D) needs a 2D model")
    keys = ["image", "label"]
    depth = 2 * int(context) + 1
    size = (depth, patch, patch) if dims == "2d" else (patch, patch, patch)
    spatial = 2 if dims == "2d" else 3
    steps = [RandCropByLabelClassesd(keys, label_key="label", spatial_size=size, num_classes=n_classes,
                                     ratios=list(ratios) if ratios else None, num_samples=1,
                                     indices_key="indices"),
             CastToTyped("label", dtype=np.float32)]
    if augment == "strong":
        # one part per sequence: (depth, P, L) in 2D (its neighbouring slices as channels of one 2D image, so that
        # every intensity transform, the bias field included, is the same on all of them), (1, S, P, L) in 3D
        parts = [f"image_{c}" for c in range(n_sequences)]
        steps.append(SplitDimd("image", output_postfixes=[str(c) for c in range(n_sequences)], dim=0,
                               keepdim=dims != "2d"))
        for part in parts:  # one transform instance per sequence: independent draws
            steps += [RandAdjustContrastd(part, prob=0.4, gamma=(0.6, 1.7), retain_stats=True),
                      RandHistogramShiftd(part, num_control_points=(6, 10), prob=0.2),
                      RandBiasFieldd(part, prob=0.4, coeff_range=(0.0, 0.3)),
                      RandScaleIntensityd(part, factors=0.25, prob=0.6),
                      RandShiftIntensityd(part, offsets=0.25, prob=0.6)]
        steps += [ConcatItemsd(parts, "image", dim=0), DeleteItemsd(parts),  # 2D: (C * depth, P, L), sequence-major
                  RandGaussianNoised("image", prob=0.25, std=0.12),
                  RandGaussianSmoothd("image", sigma_x=(0.25, 1.1), sigma_y=(0.25, 1.1),
                                      sigma_z=(0.25, 1.1), prob=0.15)]
        if dims == "2d":
            steps.append(Lambdad("label", lambda y: y[:, int(context)]))  # the centre slice's labels
    elif dims == "2d":
        if context:
            steps += [Lambdad("image", lambda x: x.reshape((-1,) + tuple(x.shape[2:]))),  # slices -> channels
                      Lambdad("label", lambda y: y[:, int(context)])]
        else:
            steps.append(SqueezeDimd(keys, dim=1))
    if augment == "none":
        return Compose(steps + [ToTensord(keys, track_meta=False)])
    rotate = (0.3,) if dims == "2d" else (0.1, 0.1, 0.3)
    scale = 0.15
    if augment == "strong":
        rotate, scale = ((0.4,) if dims == "2d" else (0.15, 0.15, 0.4)), 0.2
    steps += [
        RandFlipd(keys, prob=0.5, spatial_axis=spatial - 1),  # left-right
        RandFlipd(keys, prob=0.2, spatial_axis=spatial - 2),  # anterior-posterior (robust to header flips)
        RandAffined(keys, prob=0.6 if augment == "strong" else 0.5, rotate_range=rotate,
                    scale_range=(scale,) * spatial, mode=("bilinear", "nearest"), padding_mode="zeros",
                    spatial_size=(patch,) * spatial, cache_grid=True),
    ]
    if augment == "standard":
        steps += [
            RandBiasFieldd("image", prob=0.2, coeff_range=(0.0, 0.15)),
            RandAdjustContrastd("image", prob=0.25, gamma=(0.7, 1.5)),
            RandScaleIntensityd("image", factors=0.15, prob=0.5, channel_wise=True),
            RandShiftIntensityd("image", offsets=0.15, prob=0.5, channel_wise=True),
            RandGaussianNoised("image", prob=0.15, std=0.1),
        ]
    steps.append(ToTensord(keys, track_meta=False))
    return Compose(steps)


def pad_case(case: TrainingCase, patch: int, dims: str) -> TrainingCase:
    """Zero-pad a case (at the end of each axis) so that patches of side ``patch`` fit (in-plane only in 2D)."""
    axes = (1, 2) if dims == "2d" else (0, 1, 2)
    pads = [(0, max(patch - case.label.shape[a], 0)) if a in axes else (0, 0) for a in range(3)]
    if not any(p[1] for p in pads):
        return case
    return TrainingCase(case.name, np.pad(case.image, [(0, 0)] + pads), np.pad(case.label, pads),
                        np.pad(case.fg, pads), [])


@dataclass(frozen=True)
class SyntheticSet:
    """``count`` seeded synthetic cases of one ``kind`` (``mrisegassist.synth``), with ``make_case`` options."""

    kind: str
    count: int
    options: tuple = ()  # sorted (name, value) pairs of make_case keyword arguments

    @classmethod
    def from_dict(cls, data: Mapping) -> "SyntheticSet":
        unknown = sorted(set(data) - {"kind", "count", "options"})
        if unknown or "kind" not in data:
            raise InputError(f"synthetic set {dict(data)}: needs 'kind' and 'count' (and optional 'options'); "
                             f"unknown keys {unknown}")
        options = tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v)
                               for k, v in dict(data.get("options") or {}).items()))
        return cls(str(data["kind"]), int(data.get("count", 0)), options)


_SYNTH_CACHE: dict = {}


def synthetic_cases(kind: str, count: int, seed: int, inputs: Sequence[str], spacing, normalization,
                    label_values: Sequence[int], options: Optional[Mapping] = None,
                    remap: Optional[Mapping[int, int]] = None) -> list[TrainingCase]:
    """``count`` synthetic cases (seeds ``seed``, ``seed + 1``, ...) preprocessed like real ones (kept in a
    per-process cache: cross-validation folds reuse them). ``options``: further keyword arguments of
    ``make_case``, e.g. ``ms_small_fraction``); ``remap``: label values changed before training."""
    if count <= 0:
        return []
    try:
        from ..synth import make_case
    except ImportError as exc:
        raise InputError(f"synthetic training cases need mrisegassist.synth ({exc})") from None
    out = []
    for n in range(count):
        key = json.dumps([kind, seed + n, list(inputs), list(spacing), normalization, list(label_values),
                          options or {}, {str(k): v for k, v in (remap or {}).items()}], sort_keys=True)
        if key not in _SYNTH_CACHE:
            case = make_case(kind, seed + n, **dict(options or {}))
            _SYNTH_CACHE[key] = training_case(f"synthetic-{kind}-{seed + n}", case.images, case.labels, inputs,
                                              spacing, normalization, label_values, remap)
        out.append(_SYNTH_CACHE[key])
    return out
