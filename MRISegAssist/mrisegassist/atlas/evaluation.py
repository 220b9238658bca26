"""Accuracy of automatic prompts per structure (the seed's Table 2.2, adapted to brain MRI).

For each structure of a target with reference labels: Dice of the direct-warp baseline (each original atlas
registered straight onto the target, affine + B-spline, :func:`direct_warps`), of the label fusion at the
thresholds learnt on the references and of the prompted pipeline (atlas boxes -> engine -> per-structure rules
learnt on the references, :mod:`.refine`); Dice of the promptable engine's result with boxes from
the reference mask, with the automatic (atlas) boxes, and after the cascade (C, D); the Dice of the atlas
alone (score map thresholded at 0.5); and box quality: IoU of the automatic box rectangle vs the reference one (strategy
A, slices may differ: ``box_dk``), IoU of the 3D bounding boxes, fraction of the reference z-range covered.

Datasets (:func:`dataset`):

* ``itksnap``: the ITK-SNAP T1 crop with 8 manually drawn structures (expert labels); its lateral-ventricle
  and caudate labels (both sides in one) are split at the midline (mean ``i`` of the third ventricle);
  references: the built-in Colin27 and MNI152 atlases plus smooth random deformations of them. Not scored:
  temporal horn and corpus callosum (no counterpart in the atlases) and ``vent-4th`` (it covers the CSF above
  the cerebellum, the superior cerebellar / quadrigeminal cisterns, not the anatomical fourth ventricle).
  ``vent-3rd`` also takes in the cisterns around the third ventricle, which the atlas structure does not.
* ``colin27-loo``: target Colin27 with its own labels (AAL atlas labels + derived ventricles); references: only
  MNI152 and deformed copies of it (leave the Colin27 atlas out). MNI152's AAL labels were propagated from
  Colin27, so AAL structures are not independent of the target's labels here; ventricles are.
* ``mni152-loo``: target MNI152 (its derived ventricles; AAL propagated = model-derived); references: Colin27
  and deformed copies.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import InputError
from ..metrics import overlap_metrics
from ..progress import CancelToken, ProgressFn, check, report
from ..prompt import get_engine
from ..prompt.base import ObjectPrompt
from ..prompt.fusion import fuse
from ..prompt.strategies import boxes_for_object, mask_bounds, z_extent
from ..volume import Volume, read_volume
from .augment import augment
from .auto import atlas_boxes
from .boxes import AtlasBoxes
from .cascade import run_cascade
from .references import ReferenceSet
from .refine import Refinement, learn_refinement, refine_labels
from .registration import DIRECT, FAST, RegistrationSettings, register, warp_labels

DATASETS = ("itksnap", "colin27-loo", "mni152-loo")
ITKSNAP_STRUCTURES = {  # atlas structure -> (itksnap label, side: "left" = i above the midline, "right", None)
    "lateral-ventricle-left": (1, "left"), "lateral-ventricle-right": (1, "right"), "third-ventricle": (2, None),
    "hippocampus-right": (4, None), "hippocampus-left": (5, None),
    "caudate-left": (7, "left"), "caudate-right": (7, "right")}


@dataclass
class EvalCase:
    """A target with reference masks (``masks[name]`` bool ``[k, j, i]``) and the references to use."""

    name: str
    target: Volume
    masks: dict[str, np.ndarray]
    refset: ReferenceSet
    label_kind: str
    note: str = ""


def itksnap_masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Expert ITK-SNAP labels -> masks named like the atlas structures (split at the midline, see above).

    The crop is LPS-ordered (``i`` grows towards the patient's left)."""
    if not (labels == 2).any():
        raise InputError("itksnap labels: no third ventricle (label 2) to find the midline")
    mid = float(np.nonzero(labels == 2)[2].mean())
    i = np.arange(labels.shape[2])[None, None, :]
    out = {}
    for name, (value, side) in ITKSNAP_STRUCTURES.items():
        m = labels == value
        if side == "left":
            m = m & (i > mid)
        elif side == "right":
            m = m & (i <= mid)
        out[name] = m
    return out


def dataset(name: str, data_root, n_references: int = 6, seed: int = 0,
            progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> EvalCase:
    """Build one evaluation case (see the module docstring); ``data_root`` = the shared data folder."""
    from pathlib import Path

    from .builtin import builtin_reference_set

    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
    if name == "itksnap":
        folder = Path(data_root) / "itksnap-mricrop"
        target = read_volume(folder / "t1.gipl.gz", name="itksnap-mricrop t1")
        labels = read_volume(folder / "labels.gipl.gz", kind="label").array
        refset = builtin_reference_set("brain", progress=progress, cancel=cancel)
        refset = refset.select(list(ITKSNAP_STRUCTURES))
        return EvalCase(name, target, itksnap_masks(labels), augment(refset, n_references, seed=seed, cancel=cancel),
                        "expert (manual ITK-SNAP labels)",
                        "references: Colin27 + MNI152 built-in atlases and smooth random deformations of them")
    held, other = ("colin27", "mni152") if name == "colin27-loo" else ("mni152", "colin27")
    target_set = builtin_reference_set(held, progress=progress, cancel=cancel)
    ref = target_set.references[0]
    target = Volume(ref.image.array, ref.image.geometry, held)
    masks = {s.name: np.isin(ref.labels.array, s.labels) for s in target_set.structures}
    others = builtin_reference_set(other, cancel=cancel)
    refset = augment(others, n_references, seed=seed, cancel=cancel)
    kind = ("atlas labels (AAL on Colin27) + ventricles derived from Colin27 intensities" if held == "colin27"
            else "model-derived (AAL propagated from Colin27) + ventricles derived from MNI152 tissue maps")
    note = (f"leave-one-atlas-out: target {held}, references {other} + deformed copies"
            + ("; MNI152's AAL labels come from Colin27, so AAL rows are not independent" if held == "colin27"
               else ""))
    return EvalCase(name, target, masks, refset, kind, note)


# ------------------------------------------------------------------------------------------ evaluation
def _iou_2d(a, b) -> float:
    i0, j0, i1, j1 = max(a.i0, b.i0), max(a.j0, b.j0), min(a.i1, b.i1), min(a.j1, b.j1)
    inter = max(0, i1 - i0 + 1) * max(0, j1 - j0 + 1)
    area = lambda x: (x.i1 - x.i0 + 1) * (x.j1 - x.j0 + 1)  # noqa: E731
    return inter / float(area(a) + area(b) - inter)


def _bbox(mask: np.ndarray) -> tuple[int, ...]:
    idx = [np.flatnonzero(mask.any(axis=tuple(x for x in range(3) if x != a))) for a in range(3)]
    return tuple(int(v[0]) for v in idx) + tuple(int(v[-1]) for v in idx)


def _iou_3d(a: Sequence[int], b: Sequence[int]) -> float:
    inter, va, vb = 1, 1, 1
    for d in range(3):
        lo, hi = max(a[d], b[d]), min(a[d + 3], b[d + 3])
        inter *= max(0, hi - lo + 1)
        va *= a[d + 3] - a[d] + 1
        vb *= b[d + 3] - b[d] + 1
    return inter / float(va + vb - inter)


def box_quality(auto_boxes: AtlasBoxes, masks: dict[str, np.ndarray], strategy: str = "A") -> dict[str, dict]:
    """Per structure in both: ``box_iou`` (rectangles), ``box_dk`` (slice offset), ``bbox_iou_3d``, ``z_coverage``."""
    out = {}
    for s in auto_boxes.structures:
        name, ref = s.name, masks.get(s.name)
        if ref is None:
            continue
        if not s.found or not ref.any():
            out[name] = {"box_iou": 0.0, "box_dk": None, "bbox_iou_3d": 0.0, "z_coverage": 0.0}
            continue
        ref_boxes = boxes_for_object(ref, strategy)
        ref_box = ref_boxes[len(ref_boxes) // 2]
        auto_box = s.boxes[len(s.boxes) // 2]
        z0, z1 = z_extent(ref)
        covered = max(0, min(z1, s.z_range[1]) - max(z0, s.z_range[0]) + 1)
        rb = _bbox(ref)
        ab = (s.bbox[2], s.bbox[1], s.bbox[0], s.bbox[5], s.bbox[4], s.bbox[3])  # (k, j, i) order
        out[name] = {"box_iou": round(_iou_2d(auto_box, ref_box), 4), "box_dk": auto_box.k - ref_box.k,
                     "bbox_iou_3d": round(_iou_3d(ab, rb), 4), "z_coverage": round(covered / (z1 - z0 + 1), 4)}
    return out


def direct_warps(case: EvalCase, names: Sequence[str], settings: RegistrationSettings = DIRECT,
                 progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> dict:
    """The direct-warp baseline: each original atlas of ``case.refset`` (the first reference of every source;
    deformed copies are not atlases of their own) registered straight onto the target with ``settings``
    (affine + B-spline, no common space, no fusion), its labels warped (nearest neighbour).

    Returns ``{"atlases": {name: {"dice": {structure: d}, "mean": m, "seconds": s}}, "best": name}``; ``best`` is
    the atlas with the highest mean Dice (chosen on the target's labels: the strongest single-atlas baseline)."""
    structures = [case.refset.structure(n) for n in names]
    seen, atlases = set(), []
    for ref in case.refset.references:
        if ref.source not in seen:
            seen.add(ref.source)
            atlases.append(ref)
    spacing = case.target.geometry.spacing
    out: dict[str, dict] = {}
    for n, ref in enumerate(atlases):
        check(cancel)
        report(progress, n / len(atlases), f"direct warp of {ref.name}")
        t0 = time.perf_counter()
        transform = register(case.target, ref.image, settings, cancel=cancel, names=(case.target.label, ref.name))
        labels = warp_labels(ref.labels, case.target.geometry, transform)
        dice = {s.name: round(overlap_metrics(np.isin(labels, s.labels), case.masks[s.name], spacing,
                                              distances=False)["dice"], 4) for s in structures}
        out[ref.name] = {"dice": dice, "mean": round(float(np.mean(list(dice.values()))), 4),
                         "seconds": round(time.perf_counter() - t0, 1)}
    report(progress, 1.0, "direct warps done")
    return {"atlases": out, "best": max(out, key=lambda k: out[k]["mean"])}


def evaluate(case: EvalCase, engine: str = "classical", strategy: str = "A", cascades: Sequence[str] = ("C", "D"),
             settings: RegistrationSettings = FAST, device: str = "cpu",
             baseline: Optional[RegistrationSettings] = DIRECT, refinement: Union[str, Refinement, None] = "learn",
             progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> dict:
    """Run every condition on ``case``; returns ``{"rows": [...], "timings_s": {...}, ...}``.

    Besides the engine conditions: ``dice_direct`` (the direct-warp baseline, :func:`direct_warps` with
    ``baseline``; ``None`` skips it), ``dice_fusion`` (label fusion at the thresholds learnt on the references,
    what ``--engine atlas`` outputs) and ``dice_prompted`` (atlas boxes -> engine -> refinement, the prompted
    pipeline). ``refinement``: ``"learn"`` learns the rules on ``case.refset`` only (:mod:`.refine`; the
    target's labels are never used), or given rules, or ``None`` (fusion at the defined thresholds, prompted =
    the engine's first pass)."""
    t0 = time.perf_counter()
    masks = {n: m for n, m in case.masks.items() if m.any()}
    names = [s.name for s in case.refset.structures if s.name in masks]
    if not names:
        raise InputError(f"{case.name}: no structure of the reference set has a reference mask")
    refset = case.refset.select(names)
    sub = (lambda a, b: None if progress is None else (lambda f, m: progress(a + (b - a) * f, m)))
    direct = direct_warps(case, names, baseline, sub(0.0, 0.15), cancel) if baseline is not None else None
    t_direct = time.perf_counter() - t0
    t1 = time.perf_counter()
    if refinement == "learn":
        refinement = learn_refinement(refset, engine, settings=settings, strategy=strategy, device=device,
                                      progress=sub(0.15, 0.35), cancel=cancel)
    t_learn = time.perf_counter() - t1
    t1 = time.perf_counter()
    boxes = atlas_boxes(case.target, refset, strategy, settings=settings, progress=sub(0.35, 0.45), cancel=cancel)
    t_boxes = time.perf_counter() - t1
    eng = get_engine(engine, device)
    prepared = eng.prepare(case.target.array, cancel=cancel)
    spacing = case.target.geometry.spacing
    values = {s.name: s.value for s in boxes.structures}

    def dice_of(results) -> dict[str, float]:
        fused = fuse(results) if results else np.zeros(case.target.array.shape, np.uint16)
        return {n: overlap_metrics(fused == values[n], masks[n], spacing, distances=False)["dice"] for n in names}

    report(progress, 0.45, "engine with boxes from the reference masks")
    ref_prompts = [ObjectPrompt(values[n], boxes_for_object(masks[n], strategy), z_extent(masks[n]), n,
                                mask_bounds(masks[n])) for n in names]
    dice_ref = dice_of(eng.segment(prepared, ref_prompts, progress=sub(0.45, 0.6), cancel=cancel))
    check(cancel)
    report(progress, 0.6, "engine with automatic boxes")
    first = eng.segment(prepared, boxes.prompts(), progress=sub(0.6, 0.75), cancel=cancel) if boxes.found() else []
    dice_auto = dice_of(first)
    rules = refinement or Refinement.fusion_only(refset.structures, engine, "defined thresholds")
    engine_labels = fuse(first) if first else np.zeros(case.target.array.shape, np.uint16)
    fusion_map = refine_labels(boxes, None, rules)
    prompted_map = refine_labels(boxes, engine_labels, rules) if refinement is not None else engine_labels
    excluded = [s.value for s in boxes.found() if not s.cascade]
    dice_cascade = {}
    for n, mode in enumerate(cascades):
        report(progress, 0.75 + 0.25 * n / max(len(cascades), 1), f"cascade {mode}")
        dice_cascade[mode] = dice_of(run_cascade(eng, prepared, first, mode, strategy, excluded, cancel=cancel)
                                     if first else [])
    quality = box_quality(boxes, masks, strategy)
    rows = []
    for n in names:
        s = boxes.get(n)
        atlas_dice = overlap_metrics(boxes.score_map(n).mask(s.threshold), masks[n], spacing,
                                     distances=False)["dice"]
        row = {"structure": n, "found": s.found, "cascade": s.cascade, "ref_ml": round(float(masks[n].sum()) *
               case.target.geometry.voxel_volume_ml, 3), "dice_ref_boxes": round(dice_ref[n], 4),
               "dice_auto_boxes": round(dice_auto[n], 4), "dice_atlas_only": round(atlas_dice, 4)}
        for mode in cascades:
            row[f"dice_cascade_{mode}"] = round(dice_cascade[mode][n], 4)
        rule = rules.rule(refset.structure(n))
        if direct is not None:
            row["dice_direct"] = direct["atlases"][direct["best"]]["dice"][n]
        row.update({"dice_fusion": round(overlap_metrics(fusion_map == s.value, masks[n], spacing,
                                                         distances=False)["dice"], 4),
                    "dice_prompted": round(overlap_metrics(prompted_map == s.value, masks[n], spacing,
                                                           distances=False)["dice"], 4),
                    "fusion_threshold": rule.fusion_threshold, "rule": rule.kind if refinement else "engine"})
        row.update(quality[n])
        rows.append(row)
    report(progress, 1.0, "done")
    mean = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]
            if k.startswith("dice") or k in ("box_iou", "bbox_iou_3d", "z_coverage")}
    goals = {"prompted_ge_fusion": mean["dice_prompted"] >= mean["dice_fusion"]}
    if direct is not None:
        goals["fusion_ge_direct"] = mean["dice_fusion"] >= mean["dice_direct"]
    return {"dataset": case.name, "target": case.target.label, "labels": case.label_kind, "note": case.note,
            "references": len(refset.references), "reference_names": [r.name for r in refset.references],
            "engine": engine, "strategy": strategy, "cascades": list(cascades), "rows": rows, "mean": mean,
            "goals": goals,
            "direct": None if direct is None else {
                "settings": "rigid -> affine -> B-spline (%g mm control points), %g mm working spacing, %d levels"
                            % (baseline.bspline_spacing_mm, baseline.resolution_mm, len(baseline.levels)),
                "atlases": {k: {"mean": v["mean"], "seconds": v["seconds"]} for k, v in direct["atlases"].items()},
                "best": direct["best"]},
            "refinement": {"evidence": rules.evidence, "folds": rules.folds, "seconds": round(t_learn, 1)},
            "timings_s": {"direct": round(t_direct, 2), "learn": round(t_learn, 2), "boxes": round(t_boxes, 2),
                          "total": round(time.perf_counter() - t0, 2),
                          **{k: round(v, 2) for k, v in boxes.timings.items()}}}
