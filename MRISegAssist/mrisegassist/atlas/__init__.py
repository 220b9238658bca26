"""Automatic prompts: registration-atlas boxes, mask/U-Net-derived boxes, cascade refinement.

Typical use::

    refset = load_reference_set("builtin:colin27")            # or a folder / CSV / JSON manifest
    boxes = atlas_boxes(target_volume, refset, strategy="A")   # AtlasBoxes (IJK + RAS boxes, JSON)
    prompts = mask_prompts(unet_output_volume, target_volume)  # one prompt per connected component

The whole pipeline (prompts -> engine -> cascade -> label map) is ``mrisegassist.service.Service.auto``.

Arrays are ``[k, j, i]``; boxes are axial (constant ``k``); physical coordinates LPS mm (RAS in the JSON boxes).
"""
from .auto import atlas_boxes, atlas_result, mask_prompts  # noqa: F401
from .boxes import AtlasBoxes, ScoreMap, StructureBoxes, boxes_from_scores, ras_box, score_maps  # noqa: F401
from .cascade import cascade_prompt, enlarge_box, enlarge_range, run_cascade  # noqa: F401
from .references import (Reference, ReferenceSet, Structure, builtin_names, cache_dir,  # noqa: F401
                         load_reference_set)
from .registration import FAST, FULL, RegistrationSettings, register, warp_labels  # noqa: F401
from .space import CommonSpace, TargetScores, WarpedReferences  # noqa: F401
