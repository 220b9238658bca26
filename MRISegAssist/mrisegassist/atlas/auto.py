"""Automatic prompts: registration-atlas boxes, mask components, and the atlas's own label map.

Building blocks of the service's automatic pipeline (``mrisegassist.service``: prompts -> engine -> cascade ->
(atlas rules) -> label map): :func:`atlas_boxes` (a registered reference set, one object per structure),
:func:`mask_prompts` (one object per 26-connected component of a U-Net output or any label map) and
:func:`atlas_result` (the thresholded score maps fused into a label map, no engine). The per-structure rules
learnt on the references are in :mod:`.refine`. Arrays are ``[k, j, i]``.
"""
from __future__ import annotations

import time
from typing import Optional, Union

import numpy as np

from ..errors import InputError
from ..labels import LabelInfo, LabelMap
from ..progress import CancelToken, ProgressFn, check, report
from ..prompt.base import ObjectPrompt
from ..prompt.strategies import prompts_from_mask
from ..volume import Volume, resample_to
from .boxes import AtlasBoxes, boxes_from_scores, fuse_scores
from .references import ReferenceSet
from .refine import Refinement, refine_labels
from .registration import FAST, RegistrationSettings
from .space import CommonSpace, Memo


def _sub(progress: Optional[ProgressFn], a: float, b: float) -> Optional[ProgressFn]:
    return None if progress is None else (lambda f, m: progress(a + (b - a) * f, m))


def atlas_boxes(target: Volume, refset: ReferenceSet, strategy: str = "A", *,
                settings: RegistrationSettings = FAST, thresholds: Optional[dict[str, float]] = None,
                workers: Optional[int] = None, cache=None, space: Optional[CommonSpace] = None,
                progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
                memo: Optional[Memo] = None) -> AtlasBoxes:
    """Register ``refset`` onto ``target`` and box every structure (strategy A or B): the references' score maps
    on the target (:meth:`.space.CommonSpace.target_scores`) thresholded and boxed (:func:`.boxes.boxes_from_scores`).

    ``space`` reuses a :class:`CommonSpace` (and its in-memory transforms) across targets; ``memo`` keeps the
    target's registration for the next request on the same volume (:meth:`.space.CommonSpace.register_target`).
    Structures whose thresholded score map is empty are returned with ``found=False`` and a reason.
    """
    t0 = time.perf_counter()
    space = space or CommonSpace(refset, settings, workers, cache)
    scores = space.target_scores(target, refset.structures, _sub(progress, 0.0, 0.9), cancel, memo)
    check(cancel)
    report(progress, 0.9, "boxes")
    t1 = time.perf_counter()
    result = boxes_from_scores(scores.scores, target.geometry, strategy, thresholds, reference_set=refset.name,
                               n_references=len(refset.references), label_kind=refset.label_kind,
                               target=target.label)
    result.timings = {**scores.timings, "boxes_s": time.perf_counter() - t1, "total_s": time.perf_counter() - t0}
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


def atlas_result(target: Volume, boxes: AtlasBoxes, rules: Optional[Refinement] = None) -> LabelMap:
    """The label map of the atlas alone on ``target``'s grid, one label per found structure (its value, name and
    colour): score-map fusion at the structures' defined thresholds (:func:`.boxes.fuse_scores`), or with
    ``rules`` at the thresholds learnt on the references (:func:`.refine.refine_labels` without an engine)."""
    if boxes.scores is None:
        raise InputError("the atlas label map needs score maps: run with --references (boxes read from JSON "
                         "carry none)")
    infos = [LabelInfo(s.value, s.name, tuple(s.color)) for s in boxes.found()]
    array = fuse_scores(boxes.scores) if rules is None else refine_labels(boxes, None, rules)
    return LabelMap(target.with_array(array, f"{target.label} atlas labels"), infos)
