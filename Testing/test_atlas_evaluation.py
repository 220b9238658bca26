"""The accuracy evaluation behind ``mrisegassist bench atlas-eval``: expert ITK-SNAP masks, box quality, and one
end-to-end run where the reference is the target itself (registration must then reproduce the expert labels)."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import data_path

from mrisegassist.atlas.boxes import boxes_from_scores, score_maps
from mrisegassist.atlas.evaluation import ITKSNAP_STRUCTURES, EvalCase, box_quality, evaluate, itksnap_masks
from mrisegassist.atlas.references import Reference, ReferenceSet, Structure
from mrisegassist.atlas.registration import RegistrationSettings
from mrisegassist.bench.atlas import format_table, write_png
from mrisegassist.volume import read_volume


@pytest.fixture(scope="module")
def crop():
    folder = data_path("itksnap-mricrop")
    return read_volume(folder / "t1.gipl.gz", name="crop"), read_volume(folder / "labels.gipl.gz", kind="label")


def test_itksnap_masks_split_both_sided_labels_at_the_midline(crop):
    _, labels = crop
    masks = itksnap_masks(labels.array)
    assert set(masks) == set(ITKSNAP_STRUCTURES)
    lv = labels.array == 1
    np.testing.assert_array_equal(masks["lateral-ventricle-left"] | masks["lateral-ventricle-right"], lv)
    assert not (masks["lateral-ventricle-left"] & masks["lateral-ventricle-right"]).any()
    # LPS-ordered crop: the patient's left has the larger i; each side holds roughly half
    left_i = np.nonzero(masks["caudate-left"])[2].mean()
    right_i = np.nonzero(masks["caudate-right"])[2].mean()
    assert left_i > right_i
    assert 0.3 < masks["caudate-left"].sum() / (labels.array == 7).sum() < 0.7
    np.testing.assert_array_equal(masks["hippocampus-right"], labels.array == 4)


def test_box_quality_is_perfect_for_the_reference_itself_and_drops_when_shifted(crop):
    image, labels = crop
    masks = itksnap_masks(labels.array)
    structures = [Structure(n, (v,)) for n, v in (("hippocampus-right", 4), ("hippocampus-left", 5))]
    same = boxes_from_scores(score_maps([labels.array], structures), image.geometry)
    q = box_quality(same, masks)
    for name in ("hippocampus-right", "hippocampus-left"):
        assert q[name] == {"box_iou": 1.0, "box_dk": 0, "bbox_iou_3d": 1.0, "z_coverage": 1.0}
    shifted = np.roll(labels.array, 6, axis=2)
    q = box_quality(boxes_from_scores(score_maps([shifted], structures), image.geometry), masks)
    assert 0 < q["hippocampus-right"]["box_iou"] < 0.8 and q["hippocampus-right"]["z_coverage"] == 1.0


def test_evaluation_end_to_end_with_the_target_as_its_own_reference(crop, tmp_path, monkeypatch):
    monkeypatch.setenv("MRISEGASSIST_CACHE", str(tmp_path))
    image, labels = crop
    masks = itksnap_masks(labels.array)
    names = ["lateral-ventricle-left", "hippocampus-left"]
    structures = [Structure("lateral-ventricle-left", (1,)), Structure("hippocampus-left", (5,), cascade=False)]
    left = labels.with_array(np.where(masks["lateral-ventricle-right"], 0, labels.array).astype(np.uint8))
    refset = ReferenceSet("self", [Reference("crop", image, left)], structures, "expert")
    case = EvalCase("self", image, {n: masks[n] for n in names}, refset, "expert (manual ITK-SNAP labels)", "test")
    affine = RegistrationSettings(deformable="none")
    result = evaluate(case, settings=affine, baseline=affine)
    rows = {r["structure"]: r for r in result["rows"]}
    assert set(rows) == set(names) and result["references"] == 1
    for r in rows.values():
        assert r["found"] and r["dice_atlas_only"] > 0.9 and r["box_iou"] > 0.8 and r["z_coverage"] > 0.9
        # the direct warp of the target onto itself, and fusion of one reference (no fold to learn from:
        # fusion at the defined threshold, the prompted pipeline keeps it)
        assert r["dice_direct"] > 0.9 and r["dice_fusion"] == r["dice_atlas_only"] and r["rule"] == "fusion"
        assert r["dice_prompted"] == r["dice_fusion"]
        for key in ("dice_ref_boxes", "dice_auto_boxes", "dice_cascade_C", "dice_cascade_D"):
            assert 0.0 <= r[key] <= 1.0
    assert result["direct"]["best"] == "crop" and result["goals"]["prompted_ge_fusion"]
    assert result["refinement"]["folds"] == []
    # hippocampus is excluded from the cascade: it keeps its first-pass result (test_atlas_cascade checks the
    # objects); in the fused label map only voxels the refined ventricle (temporal horn) now claims can change
    h = rows["hippocampus-left"]
    for key in ("dice_cascade_C", "dice_cascade_D"):
        assert abs(h[key] - h["dice_auto_boxes"]) <= 0.02
    text = format_table(result)
    assert "lateral-ventricle-left" in text and "expert (manual ITK-SNAP labels)" in text
    assert "goal fusion >= direct warp: " in text and "goal prompted >= fusion: met" in text
    png = write_png([result], tmp_path / "eval.png")
    assert png.stat().st_size > 5000
