"""Segmentation metrics: voxel overlap, surface distances, volumes and lesion-wise detection.

Conventions
-----------
* Masks and label maps are numpy arrays indexed ``[k, j, i]``; ``spacing`` is ``(sx, sy, sz)`` in mm in
  ``(i, j, k)`` order (as :attr:`Geometry.spacing`), i.e. the reverse of the array axes.
* Surfaces are the mask voxels with at least one face neighbour (6-connectivity) outside the mask, the
  volume border counting as outside (``mask ^ binary_erosion(mask)``, as MONAI's ``get_mask_edges``).
  Surface distances are exact Euclidean distances in mm between surface-voxel centres.
* ``hd95_mm`` is the symmetric 95th-percentile Hausdorff distance: the larger of the two directed 95th
  percentiles (pred -> ref and ref -> pred), as MONAI's ``compute_hausdorff_distance(percentile=95)``.
  ``hd_mm`` is the maximum (classic Hausdorff distance), ``assd_mm`` the average symmetric surface distance.
* Lesions are connected components with **26-connectivity** (face, edge and corner neighbours,
  ``scipy.ndimage.label`` with a 3x3x3 structure).

Empty masks (values are ``None`` when undefined, so results stay valid JSON):

================================  ======  =====  ==========  ===========  ===========  ===========
case                               dice    iou   precision   sensitivity  specificity  hd95/hd/assd
================================  ======  =====  ==========  ===========  ===========  ===========
both empty                         1.0     1.0   1.0         1.0          1.0          0.0
reference empty, prediction not    0.0     0.0   0.0         None         computed     None
prediction empty, reference not    0.0     0.0   None        0.0          computed     None
================================  ======  =====  ==========  ===========  ===========  ===========

``volume_diff_pct`` is ``100 * (pred - ref) / ref``; ``None`` when the reference is empty and the
prediction is not, 0.0 when both are empty.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from .errors import InputError

#: BraTS evaluation regions: name -> label values that make up the region (BraTS 2013-2020 labels:
#: 1 necrosis, 2 oedema, 3 non-enhancing tumour, 4 enhancing tumour).
BRATS_REGIONS: dict[str, tuple[int, ...]] = {
    "whole tumour": (1, 2, 3, 4),
    "tumour core": (1, 3, 4),
    "enhancing tumour": (4,),
}

#: 26-connectivity structure used for lesions.
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)

OVERLAP_KEYS = ("dice", "iou", "precision", "sensitivity", "specificity", "hd95_mm", "hd_mm", "assd_mm",
                "volume_pred_ml", "volume_ref_ml", "volume_diff_ml", "volume_diff_pct")


# ----------------------------------------------------------------------------------------------- helpers
def _check_pair(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray,
                                                                                       np.ndarray]:
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise InputError(f"prediction shape {pred.shape} differs from reference shape {ref.shape} "
                         f"(resample the prediction onto the reference grid first)")
    sp = np.asarray(spacing, dtype=float).ravel()
    if sp.size != pred.ndim:
        raise InputError(f"spacing {tuple(sp)} has {sp.size} values for a {pred.ndim}D mask")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise InputError(f"spacing {tuple(sp)} must be positive")
    return pred.astype(bool, copy=False), ref.astype(bool, copy=False), sp[::-1].copy()  # array-axis order


def _ratio(num: float, den: float, when_empty: Optional[float]) -> Optional[float]:
    return float(num) / float(den) if den > 0 else when_empty


def union_bbox(*masks: np.ndarray, margin: int = 1) -> Optional[tuple[slice, ...]]:
    """Slices of the bounding box of the union of ``masks`` grown by ``margin`` (clipped), or ``None``."""
    union = np.logical_or.reduce([np.asarray(m, dtype=bool) for m in masks])
    if not union.any():
        return None
    out = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        out.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + margin + 1, union.shape[axis])))
    return tuple(out)


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Boolean surface of ``mask``: voxels with a face neighbour outside (the border counts as outside)."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray,
                                                                                            np.ndarray]:
    """Directed surface distances in mm: ``(pred surface -> nearest ref surface, ref -> pred)``.

    ``spacing`` is ``(i, j, k)`` order. Works on the union bounding box; both masks must be non-empty.
    """
    pred, ref, sampling = _check_pair(pred, ref, spacing)
    box = union_bbox(pred, ref)
    if box is None or not pred.any() or not ref.any():
        raise InputError("surface distances need two non-empty masks")
    pts = [np.argwhere(surface_voxels(m[box])) * sampling for m in (pred, ref)]
    d_pred = cKDTree(pts[1]).query(pts[0], k=1)[0]
    d_ref = cKDTree(pts[0]).query(pts[1], k=1)[0]
    return d_pred, d_ref


# ------------------------------------------------------------------------------------------ public API
def overlap_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                    distances: bool = True) -> dict:
    """Voxel overlap, surface distance and volume metrics of two boolean masks (``[k, j, i]``).

    ``spacing`` is ``(sx, sy, sz)`` mm in ``(i, j, k)`` order. Returns a dict with the keys
    :data:`OVERLAP_KEYS` plus the voxel counts ``tp, fp, fn, tn`` (empty-mask conventions: see the module
    docstring). ``distances=False`` skips the surface distances (``hd95_mm``, ``hd_mm``, ``assd_mm`` are
    then ``None``): cheaper, e.g. for validation during training.
    """
    pred, ref, sampling = _check_pair(pred, ref, spacing)
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    tp = int(np.count_nonzero(pred & ref))
    fp, fn = n_pred - tp, n_ref - tp
    tn = int(pred.size) - tp - fp - fn
    both_empty = n_pred == 0 and n_ref == 0
    voxel_ml = float(np.prod(sampling)) / 1000.0
    out: dict = {
        "dice": 1.0 if both_empty else 2.0 * tp / (n_pred + n_ref),
        "iou": 1.0 if both_empty else tp / (tp + fp + fn),
        "precision": _ratio(tp, n_pred, 1.0 if both_empty else None),
        "sensitivity": _ratio(tp, n_ref, 1.0 if both_empty else None),
        "specificity": _ratio(tn, tn + fp, None),
        "hd95_mm": None, "hd_mm": None, "assd_mm": None,
        "volume_pred_ml": n_pred * voxel_ml,
        "volume_ref_ml": n_ref * voxel_ml,
        "volume_diff_ml": (n_pred - n_ref) * voxel_ml,
        "volume_diff_pct": 0.0 if both_empty else _ratio(100.0 * (n_pred - n_ref), n_ref, None),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }
    if both_empty:
        out.update(hd95_mm=0.0, hd_mm=0.0, assd_mm=0.0)
    elif distances and n_pred and n_ref:
        d_pred, d_ref = surface_distances(pred, ref, spacing)
        out["hd95_mm"] = float(max(np.percentile(d_pred, 95), np.percentile(d_ref, 95)))
        out["hd_mm"] = float(max(d_pred.max(), d_ref.max()))
        out["assd_mm"] = float((d_pred.sum() + d_ref.sum()) / (d_pred.size + d_ref.size))
    return out


def _components(mask: np.ndarray, min_voxels: int) -> tuple[np.ndarray, int, np.ndarray]:
    """26-connected components; components under ``min_voxels`` are dropped (label 0) and the rest renumbered."""
    labels, n = ndimage.label(mask, structure=CONNECTIVITY_26)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    if min_voxels > 1 and n:
        keep = sizes >= min_voxels
        keep[0] = False
        remap = np.zeros(n + 1, dtype=np.int32)
        remap[keep] = np.arange(1, int(keep.sum()) + 1)
        labels, n = remap[labels], int(keep.sum())
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
    return labels, n, sizes


def _centroids(labels: np.ndarray, n: int, sizes: np.ndarray) -> np.ndarray:
    """``(n, 3)`` centroids in ``(i, j, k)`` voxel order of components 1..n."""
    if n == 0:
        return np.zeros((0, 3))
    idx = np.nonzero(labels)
    lab = labels[idx]
    kji = np.stack([np.bincount(lab, weights=c, minlength=n + 1)[1:] for c in idx], axis=1)
    return (kji / np.maximum(sizes[1:, None], 1))[:, ::-1]


def lesion_detection(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                     min_overlap: float = 0.1, min_volume_mm3: float = 0.0) -> dict:
    """Lesion-wise detection between two boolean masks (``[k, j, i]``; ``spacing`` in ``(i, j, k)`` order).

    Lesions are 26-connected components; components smaller than ``min_volume_mm3`` are ignored in both
    masks. A reference lesion is **detected** when the prediction covers at least ``min_overlap`` of its
    voxels (and at least one voxel: ``min_overlap=0`` means any overlap). A predicted lesion is a **true
    positive** when at least ``min_overlap`` of its voxels (and at least one) lie in the reference, otherwise
    a false positive. ``tp`` counts detected reference lesions, ``fn = n_ref - tp``, ``fp`` counts
    false-positive predicted lesions.

    Returns ``n_ref, n_pred, tp, fp, fn, lesion_sensitivity (tp/n_ref), lesion_precision
    ((n_pred - fp)/n_pred), lesion_f1, fp_per_case`` (= ``fp`` for one case) and the per-lesion lists
    ``ref_lesions`` / ``pred_lesions`` (``volume_ml``, ``voxels``, ``centroid_ijk``, ``overlap_fraction``,
    ``detected`` / ``true_positive``). Ratios with an empty denominator are 1.0 when both masks have no
    lesion, else ``None`` (sensitivity without reference lesions, precision without predicted ones).
    """
    if not 0.0 <= float(min_overlap) <= 1.0:
        raise InputError(f"min_overlap must be in [0, 1], got {min_overlap}")
    pred, ref, sampling = _check_pair(pred, ref, spacing)
    voxel_mm3 = float(np.prod(sampling))
    min_voxels = int(np.ceil(min_volume_mm3 / voxel_mm3)) if min_volume_mm3 > 0 else 0
    ref_lab, n_ref, ref_sizes = _components(ref, min_voxels)
    pred_lab, n_pred, pred_sizes = _components(pred, min_voxels)
    ref_cover = np.bincount(ref_lab[pred_lab > 0], minlength=n_ref + 1)[1:]
    pred_cover = np.bincount(pred_lab[ref_lab > 0], minlength=n_pred + 1)[1:]
    ref_frac = ref_cover / np.maximum(ref_sizes[1:], 1)
    pred_frac = pred_cover / np.maximum(pred_sizes[1:], 1)
    detected = (ref_cover > 0) & (ref_frac >= min_overlap)
    true_pos = (pred_cover > 0) & (pred_frac >= min_overlap)
    tp, fp = int(detected.sum()), int(n_pred - true_pos.sum())
    fn = n_ref - tp
    none_at_all = n_ref == 0 and n_pred == 0
    sens = _ratio(tp, n_ref, 1.0 if none_at_all else None)
    prec = _ratio(n_pred - fp, n_pred, 1.0 if none_at_all else None)
    f1 = (2 * sens * prec / (sens + prec) if sens + prec > 0 else 0.0) if sens is not None and prec is not None \
        else (0.0 if (n_ref or n_pred) else 1.0)

    def lesion_list(n, sizes, lab, frac, flag, key):
        cents = _centroids(lab, n, sizes)
        return [{"index": c + 1, "voxels": int(sizes[c + 1]), "volume_ml": sizes[c + 1] * voxel_mm3 / 1000.0,
                 "centroid_ijk": [round(float(x), 2) for x in cents[c]],
                 "overlap_fraction": float(frac[c]), key: bool(flag[c])} for c in range(n)]

    return {"n_ref": n_ref, "n_pred": n_pred, "tp": tp, "fp": fp, "fn": fn,
            "lesion_sensitivity": sens, "lesion_precision": prec, "lesion_f1": f1, "fp_per_case": float(fp),
            "min_overlap": float(min_overlap), "min_volume_mm3": float(min_volume_mm3), "connectivity": 26,
            "ref_lesions": lesion_list(n_ref, ref_sizes, ref_lab, ref_frac, detected, "detected"),
            "pred_lesions": lesion_list(n_pred, pred_sizes, pred_lab, pred_frac, true_pos, "true_positive")}


def _label_names(labels) -> Optional[dict[int, str]]:
    """``{value: name}`` from a dict, a sequence of LabelInfo-like objects, or ``None``."""
    if labels is None:
        return None
    if isinstance(labels, Mapping):
        return {int(v): str(n) for v, n in labels.items()}
    return {int(lab.value): str(lab.name) for lab in labels}


def evaluate_labels(pred_labels: np.ndarray, ref_labels: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                    labels=None, regions: Optional[Mapping[str, Sequence[int]]] = None,
                    lesionwise: bool = False, distances: bool = True, min_overlap: float = 0.1) -> dict:
    """Per-label and per-region metrics of two integer label maps (``[k, j, i]``, spacing ``(i, j, k)``).

    ``labels``: ``{value: name}`` or a list of :class:`~mrisegassist.labels.LabelInfo`; default: every
    non-zero value present in either map (named ``"label N"``). ``regions``: ``{name: (values...)}`` such as
    :data:`BRATS_REGIONS`; a region is the union of its values. ``lesionwise`` adds
    :func:`lesion_detection` under ``"lesions"`` for every label and region.

    Returns ``{"labels": {name: {"value": v, **overlap_metrics}}, "regions": {name: {"values": [...], ...}},
    "mean_dice": mean over labels, "spacing": [...], "shape": [...]}``.
    """
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    _check_pair(pred_labels, ref_labels, spacing)
    names = _label_names(labels)
    if names is None:
        present = np.union1d(np.unique(pred_labels), np.unique(ref_labels))
        names = {int(v): f"label {int(v)}" for v in present if v != 0}
    box = union_bbox(pred_labels > 0, ref_labels > 0, margin=1)
    # Crop once: every mask below is empty outside the union of the foregrounds.
    p = pred_labels[box] if box is not None else pred_labels[tuple(slice(0, 1) for _ in pred_labels.shape)]
    r = ref_labels[box] if box is not None else ref_labels[tuple(slice(0, 1) for _ in ref_labels.shape)]
    outside = int(pred_labels.size - p.size)  # true negatives outside the crop
    offset_ijk = np.array([b.start for b in box][::-1] if box is not None else [0, 0, 0], dtype=float)

    def metrics(pm: np.ndarray, rm: np.ndarray) -> dict:
        m = overlap_metrics(pm, rm, spacing, distances=distances)
        m["tn"] += outside
        m["specificity"] = _ratio(m["tn"], m["tn"] + m["fp"], None)
        if lesionwise:
            m["lesions"] = les = lesion_detection(pm, rm, spacing, min_overlap=min_overlap)
            for lesion in les["ref_lesions"] + les["pred_lesions"]:
                lesion["centroid_ijk"] = [round(c + o, 2) for c, o in zip(lesion["centroid_ijk"], offset_ijk)]
        return m

    result: dict = {"labels": {}, "regions": {}, "spacing": [float(s) for s in spacing],
                    "shape": list(pred_labels.shape)}
    for value, name in names.items():
        result["labels"][name] = {"value": value, **metrics(p == value, r == value)}
    for name, values in (regions or {}).items():
        vals = [int(v) for v in values]
        result["regions"][name] = {"values": vals, **metrics(np.isin(p, vals), np.isin(r, vals))}
    dices = [m["dice"] for m in result["labels"].values()]
    result["mean_dice"] = float(np.mean(dices)) if dices else None
    return result


def evaluate_files(pred_path: Union[str, Path], ref_path: Union[str, Path], labels=None,
                   regions: Optional[Mapping[str, Sequence[int]]] = None, lesionwise: bool = False,
                   distances: bool = True, min_overlap: float = 0.1) -> dict:
    """:func:`evaluate_labels` on two label-map files (any format :func:`read_volume` reads).

    When the grids differ the prediction is resampled onto the reference grid with nearest neighbour
    and the result says so (``"resampled": True`` and a ``"note"``). Spacing comes from the reference.
    """
    from .volume import read_volume, resample_to

    pred = read_volume(pred_path, kind="label", name=f"prediction {Path(pred_path).name}")
    ref = read_volume(ref_path, kind="label", name=f"reference {Path(ref_path).name}")
    resampled = not pred.geometry.same_as(ref.geometry)
    if resampled:
        pred = resample_to(pred, ref.geometry, "nearest")
    result = evaluate_labels(pred.array, ref.array, ref.geometry.spacing, labels=labels, regions=regions,
                             lesionwise=lesionwise, distances=distances, min_overlap=min_overlap)
    result.update(pred=str(pred_path), ref=str(ref_path), resampled=resampled)
    if resampled:
        result["note"] = ("prediction was on a different grid; resampled onto the reference grid with "
                          "nearest-neighbour interpolation")
    return result


def aggregate(results: Sequence[dict], keys: Sequence[str] = ("dice", "iou", "precision", "sensitivity",
                                                               "hd95_mm", "volume_diff_ml")) -> dict:
    """Summary over cases of :func:`evaluate_labels` results: ``{"labels"|"regions": {name: {key: {"mean",
    "median", "std", "min", "max", "n"}}}, "cases": N}``. ``None`` values (undefined, e.g. HD95 with an
    empty mask) are left out and counted in ``"undefined"``."""
    out: dict = {"labels": {}, "regions": {}, "cases": len(results)}
    for group in ("labels", "regions"):
        names = list(dict.fromkeys(n for r in results for n in r.get(group, {})))
        for name in names:
            entry = {}
            for key in keys:
                values = [r[group][name].get(key) for r in results if name in r.get(group, {})]
                vals = np.array([v for v in values if v is not None], dtype=float)
                stats = {"n": int(vals.size), "undefined": len(values) - int(vals.size)}
                if vals.size:
                    stats.update(mean=float(vals.mean()), median=float(np.median(vals)), std=float(vals.std()),
                                 min=float(vals.min()), max=float(vals.max()))
                entry[key] = stats
            out[group][name] = entry
    return out


# -------------------------------------------------------------------------------------------- reporting
def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_report(result: dict) -> str:
    """A readable text table of an :func:`evaluate_labels` / :func:`evaluate_files` result."""
    cols = ("dice", "iou", "precision", "sensitivity", "hd95_mm", "volume_pred_ml", "volume_ref_ml")
    heads = ("Dice", "IoU", "Prec", "Sens", "HD95 mm", "Pred ml", "Ref ml")
    rows = [(name, m) for name, m in result.get("labels", {}).items()]
    rows += [(f"[{name}]", m) for name, m in result.get("regions", {}).items()]
    width = max([len(n) for n, _ in rows] + [10])
    lines = []
    if result.get("note"):
        lines.append(f"note: {result['note']}")
    lines.append(f"{'label':<{width}}  " + "  ".join(f"{h:>8}" for h in heads))
    for name, m in rows:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{_fmt(m.get(c)):>8}" for c in cols))
    if result.get("mean_dice") is not None:
        lines.append(f"mean Dice over labels: {result['mean_dice']:.3f}")
    lesion_rows = [(n, m["lesions"]) for n, m in rows if "lesions" in m]
    if lesion_rows:
        lines.append("")
        lines.append(f"{'lesion-wise':<{width}}  " + "  ".join(
            f"{h:>8}" for h in ("n_ref", "n_pred", "TP", "FP", "FN", "Sens", "Prec", "F1")))
        for name, les in lesion_rows:
            vals = (les["n_ref"], les["n_pred"], les["tp"], les["fp"], les["fn"], les["lesion_sensitivity"],
                    les["lesion_precision"], les["lesion_f1"])
            lines.append(f"{name:<{width}}  " + "  ".join(f"{_fmt(v):>8}" for v in vals))
        lines.append("(lesions: 26-connected components; detected when >= "
                     f"{lesion_rows[0][1]['min_overlap']:.0%} of the lesion overlaps)")
    return "\n".join(lines)
