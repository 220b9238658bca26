"""Automatic prompts -> promptable engine -> cascade -> label map.

Prompts come from a registered reference set (:func:`atlas_boxes`: one object per structure) or from a mask
(:func:`mask_prompts`: one object per 26-connected component of a U-Net output or any label map). The engine
(``prompt.get_engine``, weights-free ``classical`` by default) segments every object at once; an optional
cascade (:mod:`.cascade`, ``C`` or ``D``) re-prompts each object from its first-pass mask; ``prompt.fusion``
turns the per-object results into one label map on the target grid (``[k, j, i]``, uint16).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from ..errors import InputError
from ..labels import LabelInfo, LabelMap, default_color
from ..progress import CancelToken, ProgressFn, check, report
from ..prompt import get_engine
from ..prompt.base import ObjectPrompt, ObjectResult, PromptableEngine
from ..prompt.fusion import fuse
from ..prompt.strategies import prompts_from_mask
from ..volume import PathLike, Volume, resample_to
from .boxes import AtlasBoxes, boxes_from_scores, fuse_scores, score_maps
from .cascade import CASCADES, run_cascade
from .references import ReferenceSet
from .refine import Refinement, learn_refinement, refine_result
from .registration import FAST, RegistrationSettings
from .space import CommonSpace


#: engine name meaning "no promptable engine: the atlas score maps are the segmentation"
ATLAS_ENGINE = "atlas"


def _sub(progress: Optional[ProgressFn], a: float, b: float) -> Optional[ProgressFn]:
    return None if progress is None else (lambda f, m: progress(a + (b - a) * f, m))


def atlas_boxes(target: Volume, refset: ReferenceSet, strategy: str = "A", *,
                settings: RegistrationSettings = FAST, thresholds: Optional[dict[str, float]] = None,
                workers: Optional[int] = None, cache=None, space: Optional[CommonSpace] = None,
                progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> AtlasBoxes:
    """Register ``refset`` onto ``target`` and box every structure (strategy A or B).

    ``space`` reuses a :class:`CommonSpace` (and its in-memory transforms) across targets. Structures whose
    thresholded score map is empty are returned with ``found=False`` and a reason.
    """
    t0 = time.perf_counter()
    space = space or CommonSpace(refset, settings, workers, cache)
    warped = space.warp(target, _sub(progress, 0.0, 0.9), cancel)
    check(cancel)
    report(progress, 0.9, "score maps and boxes")
    t1 = time.perf_counter()
    scores = score_maps(warped.labels, refset.structures)
    result = boxes_from_scores(scores, target.geometry, strategy, thresholds, reference_set=refset.name,
                               n_references=len(refset.references), label_kind=refset.label_kind,
                               target=target.label)
    result.timings = {**warped.timings, "scores_boxes_s": time.perf_counter() - t1,
                      "total_s": time.perf_counter() - t0}
    report(progress, 1.0, f"{len(result.found())} of {len(result.structures)} structures found")
    return result


def mask_prompts(mask: Union[np.ndarray, Volume], target: Optional[Volume] = None, strategy: str = "A",
                 min_voxels: int = 3) -> list[ObjectPrompt]:
    """One prompt per 26-connected component of ``mask > 0`` (ids 1..n, largest first, z-range = the
    component's). A :class:`Volume` on another grid is resampled onto ``target`` (nearest neighbour)."""
    if isinstance(mask, Volume):
        if target is not None and not mask.geometry.same_as(target.geometry, atol=1e-4):
            mask = resample_to(mask, target.geometry, "nearest")
        array = mask.array
    else:
        array = np.asarray(mask)
    if target is not None and array.shape != target.array.shape:
        raise InputError(f"mask shape {array.shape} differs from the target's {target.array.shape}")
    if not (array > 0).any():
        raise InputError("the mask is empty: no object to refine")
    prompts = prompts_from_mask(array > 0, strategy, mode="components", min_voxels=min_voxels, with_z_range=True)
    return [ObjectPrompt(p.object_id, p.boxes, p.z_range, f"object-{p.object_id}") for p in prompts]


@dataclass
class AutoResult:
    """Output of :func:`segment_objects`: the fused label map, per-object summaries and the first pass."""

    labels: LabelMap
    objects: list[dict]
    first_pass: list[ObjectResult]
    final: list[ObjectResult]
    boxes: Optional[AtlasBoxes] = None
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        d = {"objects": self.objects, "timings_s": {k: round(v, 3) for k, v in self.timings.items()}}
        if self.boxes is not None:
            d["not_found"] = [{"name": s.name, "reason": s.reason} for s in self.boxes.not_found()]
        return d


def segment_objects(target: Volume, prompts: Sequence[ObjectPrompt], engine: Union[str, PromptableEngine] = "classical",
                    cascade: Optional[str] = None, *, strategy: str = "A", exclude: Sequence[int] = (),
                    colors: Optional[Mapping[int, tuple]] = None, device: str = "cpu",
                    progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> AutoResult:
    """Segment every prompted object on ``target`` at once, optionally cascade, and fuse into a label map.

    ``exclude``: object ids kept out of the cascade. Label values = object ids, names = prompt names.
    """
    if cascade is not None and cascade not in CASCADES:
        raise InputError(f"unknown cascade {cascade!r}; use C or D")
    if not prompts:
        raise InputError("no object to segment (no structure found / no mask component)")
    eng = get_engine(engine, device) if isinstance(engine, str) else engine
    t0 = time.perf_counter()
    report(progress, 0.0, f"preparing {eng.name or 'engine'}")
    prepared = eng.prepare(target.array, cancel=cancel)
    second_share = 0.45 if cascade else 0.0
    first = eng.segment(prepared, list(prompts), progress=_sub(progress, 0.05, 0.95 - second_share), cancel=cancel)
    t1 = time.perf_counter()
    final = first
    if cascade:
        report(progress, 0.95 - second_share, f"cascade {cascade}")
        final = run_cascade(eng, prepared, first, cascade, strategy, exclude,
                            progress=_sub(progress, 0.95 - second_share, 0.95), cancel=cancel)
    t2 = time.perf_counter()
    fused = fuse(final)
    names = {p.object_id: p.name or f"object-{p.object_id}" for p in prompts}
    infos = [LabelInfo(oid, names[oid], tuple((colors or {}).get(oid, default_color(oid)))) for oid in names]
    labelmap = LabelMap(target.with_array(fused, f"{target.label} labels"), infos)
    ml = target.geometry.voxel_volume_ml
    objects = []
    for p, a, b in zip(prompts, first, final):
        objects.append({"label": p.object_id, "name": names[p.object_id], "boxes": len(p.boxes),
                        "z_range": list(p.z_range) if p.z_range else None,
                        "first_pass_ml": round(float(a.mask.sum()) * ml, 4),
                        "final_ml": round(float((fused == p.object_id).sum()) * ml, 4),
                        "cascaded": bool(cascade) and p.object_id not in set(exclude) and bool(a.mask.any())})
    report(progress, 1.0, "done")
    return AutoResult(labelmap, objects, list(first), list(final), None,
                      {"first_pass_s": t1 - t0, "cascade_s": t2 - t1, "engine_total_s": time.perf_counter() - t0})


def auto_from_atlas(target: Volume, refset: ReferenceSet, engine: Union[str, PromptableEngine] = "classical",
                    cascade: Optional[str] = None, *, strategy: str = "A",
                    settings: RegistrationSettings = FAST, thresholds: Optional[dict[str, float]] = None,
                    workers: Optional[int] = None, cache=None, device: str = "cpu",
                    refinement: Union[str, Refinement, None] = "learn",
                    progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> AutoResult:
    """Atlas boxes -> engine -> cascade (structures with ``cascade=False`` excluded) -> refinement -> label map.

    ``engine="atlas"`` skips the promptable engine: the label map is the thresholded score maps themselves
    (multi-atlas label fusion, :func:`.boxes.fuse_scores`). ``refinement``: ``"learn"`` combines the engine's
    masks with the score maps per structure by rules learnt on the references (:mod:`.refine`, cached),
    a :class:`~.refine.Refinement` applies given rules, ``None`` keeps the engine's (or fusion's) label map.
    """
    if refinement == "learn":
        refinement = learn_refinement(refset, None if engine == ATLAS_ENGINE else engine, settings=settings,
                                      strategy=strategy, workers=workers, cache=cache, device=device,
                                      progress=_sub(progress, 0.0, 0.2), cancel=cancel)
    boxes = atlas_boxes(target, refset, strategy, settings=settings, thresholds=thresholds, workers=workers,
                        cache=cache, progress=_sub(progress, 0.0, 0.9 if engine == ATLAS_ENGINE else 0.5),
                        cancel=cancel)
    if engine == ATLAS_ENGINE:
        result = atlas_result(target, boxes)
        return result if refinement is None else refine_result(result, refinement)
    if not boxes.found():
        raise InputError("no structure was found on the target: " +
                         "; ".join(f"{s.name}: {s.reason}" for s in boxes.structures))
    found = boxes.found()
    result = segment_objects(target, boxes.prompts(), engine, cascade, strategy=strategy,
                             exclude=[s.value for s in found if not s.cascade],
                             colors={s.value: s.color for s in found}, device=device,
                             progress=_sub(progress, 0.5, 1.0), cancel=cancel)
    result.boxes = boxes
    result.timings.update({f"atlas_{k}": v for k, v in boxes.timings.items()})
    return result if refinement is None else refine_result(result, refinement)


def atlas_result(target: Volume, boxes: AtlasBoxes) -> AutoResult:
    """The label map of the atlas alone (score-map fusion) as an :class:`AutoResult`."""
    if boxes.scores is None:
        raise InputError("the atlas label map needs score maps: run with --references (boxes read from JSON "
                         "carry none)")
    fused = fuse_scores(boxes.scores)
    ml = target.geometry.voxel_volume_ml
    found = boxes.found()
    infos = [LabelInfo(s.value, s.name, tuple(s.color)) for s in found]
    objects = [{"label": s.value, "name": s.name, "boxes": len(s.boxes), "z_range": list(s.z_range),
                "first_pass_ml": round(s.volume_ml, 4), "final_ml": round(float((fused == s.value).sum()) * ml, 4),
                "cascaded": False} for s in found]
    labels = LabelMap(target.with_array(fused, f"{target.label} atlas labels"), infos)
    return AutoResult(labels, objects, [], [], boxes, {f"atlas_{k}": v for k, v in boxes.timings.items()})


def auto_from_mask(target: Volume, mask: Union[Volume, np.ndarray], engine: Union[str, PromptableEngine] = "classical",
                   cascade: Optional[str] = None, *, strategy: str = "A", min_voxels: int = 3, device: str = "cpu",
                   progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> AutoResult:
    """Connected components of ``mask`` (e.g. a U-Net output) -> one object each -> engine -> label map."""
    prompts = mask_prompts(mask, target, strategy, min_voxels)
    return segment_objects(target, prompts, engine, cascade, strategy=strategy, device=device,
                           progress=progress, cancel=cancel)


def unet_mask(model: str, inputs: Mapping[str, Union[PathLike, Volume]], target: Volume, device: str = "cpu",
              progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> Volume:
    """Run a U-Net (``unet.segment_files``) and return its foreground (any label) on the target grid."""
    from ..unet.inference import segment_files

    labelmap = segment_files(model, inputs, device=device, progress=progress, cancel=cancel)
    fg = labelmap.volume.with_array((labelmap.volume.array > 0).astype(np.uint8), f"{model} foreground")
    if not fg.geometry.same_as(target.geometry, atol=1e-4):
        fg = resample_to(fg, target.geometry, "nearest")
    return fg
