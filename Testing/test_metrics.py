"""Metrics: constructed cases with known answers, and real expert labels cross-checked against SimpleITK
(LabelOverlapMeasures: Dice, Jaccard, false negative/positive errors, false discovery rate; Hausdorff on independently computed contours) and MONAI (DiceMetric, compute_iou,
confusion-matrix metrics, compute_hausdorff_distance)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from conftest import data_path
from mrisegassist.cli import main
from mrisegassist.errors import InputError
from mrisegassist.metrics import (BRATS_REGIONS, aggregate, evaluate_files, evaluate_labels, format_report,
                                  lesion_detection, overlap_metrics, union_bbox)
from mrisegassist.volume import read_volume, write_volume

BRATS_NAMES = {1: "necrosis", 2: "oedema", 3: "non-enhancing tumour", 4: "enhancing tumour"}


# ------------------------------------------------------------------------------------- constructed
def cube(shape, lo, size):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, a + size) for a in lo)] = True
    return m


def test_shifted_cubes_known_answers():
    ref = cube((20, 20, 30), (5, 5, 5), 10)
    pred = cube((20, 20, 30), (5, 5, 7), 10)  # shifted by 2 voxels along i (last array axis)
    m = overlap_metrics(pred, ref, spacing=(2.0, 1.0, 1.0))  # sx = 2 mm along i
    assert m["dice"] == pytest.approx(0.8)
    assert m["iou"] == pytest.approx(800 / 1200)
    assert m["precision"] == pytest.approx(0.8) and m["sensitivity"] == pytest.approx(0.8)
    assert m["specificity"] == pytest.approx(1 - 200 / (20 * 20 * 30 - 1000))
    assert m["volume_pred_ml"] == pytest.approx(2.0) and m["volume_ref_ml"] == pytest.approx(2.0)
    assert m["volume_diff_ml"] == 0 and m["volume_diff_pct"] == 0
    assert m["hd_mm"] == pytest.approx(4.0)  # 2 voxels x 2 mm
    assert 0 < m["hd95_mm"] <= m["hd_mm"]
    # the same shift along k (first array axis) measures sz, not sx: spacing is (i, j, k) order
    pred_k = cube((20, 20, 30), (7, 5, 5), 10)
    assert overlap_metrics(pred_k, ref, spacing=(2.0, 1.0, 3.0))["hd_mm"] == pytest.approx(6.0)


def test_empty_mask_conventions():
    empty = np.zeros((8, 8, 8), bool)
    some = cube((8, 8, 8), (2, 2, 2), 3)
    both = overlap_metrics(empty, empty)
    assert (both["dice"], both["iou"], both["hd95_mm"], both["precision"], both["sensitivity"]) == (1, 1, 0, 1, 1)
    fp_only = overlap_metrics(some, empty)
    assert fp_only["dice"] == 0 and fp_only["hd95_mm"] is None and fp_only["sensitivity"] is None
    assert fp_only["precision"] == 0 and fp_only["volume_diff_pct"] is None
    fn_only = overlap_metrics(empty, some)
    assert fn_only["dice"] == 0 and fn_only["precision"] is None and fn_only["sensitivity"] == 0
    assert fn_only["volume_diff_pct"] == -100
    json.dumps([both, fp_only, fn_only])  # valid JSON: no NaN / inf


def test_bad_metric_input():
    with pytest.raises(InputError, match="differs from reference shape"):
        overlap_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
    with pytest.raises(InputError, match="spacing"):
        overlap_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), spacing=(1, 1))
    with pytest.raises(InputError, match="positive"):
        overlap_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), spacing=(1, 0, 1))


def test_lesion_detection_counts():
    ref = np.zeros((30, 30, 30), bool)
    pred = np.zeros_like(ref)
    ref[2:6, 2:6, 2:6] = pred[2:6, 2:6, 2:6] = True     # A found
    ref[10:14, 10:14, 10:14] = True                      # B: 1 of 64 voxels predicted
    pred[10, 10, 10] = True
    ref[20:23, 20:23, 20:23] = True                      # C missed
    pred[25:28, 2:5, 25:28] = True                       # false positive blob
    ref[2, 20, 20] = ref[3, 21, 21] = True               # corner-touching pair = one lesion (26-connectivity)
    pred[2, 20, 20] = True
    d = lesion_detection(pred, ref, min_overlap=0.1)
    assert (d["n_ref"], d["n_pred"], d["tp"], d["fn"], d["fp"]) == (4, 4, 2, 2, 1)
    assert d["lesion_sensitivity"] == pytest.approx(0.5) and d["lesion_precision"] == pytest.approx(0.75)
    assert d["lesion_f1"] == pytest.approx(2 * 0.5 * 0.75 / 1.25)
    assert [les["detected"] for les in d["ref_lesions"]] == [True, True, False, False]
    any_overlap = lesion_detection(pred, ref, min_overlap=0.0)
    assert (any_overlap["tp"], any_overlap["fn"]) == (3, 1)
    big_only = lesion_detection(pred, ref, min_volume_mm3=20)  # drops the pair, the single voxel
    assert (big_only["n_ref"], big_only["n_pred"]) == (3, 2)
    assert d["ref_lesions"][0]["centroid_ijk"] == [3.5, 3.5, 3.5]
    assert sum(les["volume_ml"] for les in d["ref_lesions"]) == pytest.approx(ref.sum() / 1000)
    none = lesion_detection(np.zeros_like(ref), np.zeros_like(ref))
    assert none["lesion_f1"] == 1.0 and none["n_ref"] == 0


# -------------------------------------------------------------------------------- real expert labels
def _sitk(mask: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing(spacing)
    return img


def _monai_checks(pm: np.ndarray, rm: np.ndarray, spacing_ijk, m: dict) -> None:
    from monai.metrics import (DiceMetric, compute_confusion_matrix_metric, compute_hausdorff_distance,
                               compute_iou, get_confusion_matrix)

    # crop to the union box (margin 2) for speed; only specificity depends on it (true negatives)
    box = union_bbox(pm, rm, margin=2)
    pm, rm = pm[box], rm[box]
    m = {**m, "specificity": overlap_metrics(pm, rm, spacing_ijk, distances=False)["specificity"]}
    yp = torch.from_numpy(pm[None, None].astype(np.float32))
    yt = torch.from_numpy(rm[None, None].astype(np.float32))
    dice = DiceMetric(include_background=True, reduction="none")
    dice(yp, yt)
    assert float(dice.aggregate()) == pytest.approx(m["dice"], abs=1e-6)
    assert float(compute_iou(yp, yt)) == pytest.approx(m["iou"], abs=1e-6)
    cm = get_confusion_matrix(yp, yt)
    for ours, theirs in (("sensitivity", "sensitivity"), ("specificity", "specificity"), ("precision", "precision")):
        assert float(compute_confusion_matrix_metric(theirs, cm)) == pytest.approx(m[ours], abs=1e-6)
    hd95 = compute_hausdorff_distance(yp, yt, percentile=95, spacing=list(spacing_ijk)[::-1])
    assert float(hd95) == pytest.approx(m["hd95_mm"], abs=1e-4)


def _sitk_checks(pm: np.ndarray, rm: np.ndarray, spacing_ijk, m: dict) -> None:
    over = sitk.LabelOverlapMeasuresImageFilter()
    over.Execute(_sitk(pm, spacing_ijk), _sitk(rm, spacing_ijk))
    assert over.GetDiceCoefficient() == pytest.approx(m["dice"], abs=1e-6)
    assert over.GetJaccardCoefficient() == pytest.approx(m["iou"], abs=1e-6)
    assert over.GetFalseNegativeError() == pytest.approx(1 - m["sensitivity"], abs=1e-6)
    assert over.GetFalsePositiveError() == pytest.approx(1 - m["specificity"], abs=1e-6)  # FP / (FP + TN)
    assert over.GetFalseDiscoveryRate() == pytest.approx(1 - m["precision"], abs=1e-6)
    # maximum surface distance = Hausdorff distance between face-connected contours (computed by ITK)
    box = union_bbox(pm, rm, margin=2)
    contours = [sitk.BinaryContour(_sitk(x[box], spacing_ijk), fullyConnected=False) for x in (pm, rm)]
    hd = sitk.HausdorffDistanceImageFilter()
    hd.Execute(*contours)
    assert hd.GetHausdorffDistance() == pytest.approx(m["hd_mm"], abs=1e-4)


def perturbed_brats(ref: np.ndarray) -> np.ndarray:
    """Expert BraTS labels eroded, shifted 3 voxels along i and with label 3 removed."""
    core = ndimage.binary_erosion(ref > 0, iterations=1)
    pred = np.where(core, ref, 0)
    pred = np.roll(pred, 3, axis=2)
    pred[pred == 3] = 0
    return pred.astype(np.uint8)


def test_brats_labels_against_sitk_and_monai():
    ref_vol = read_volume(data_path("brats2013-deepmedic", "pat0001", "labels.nii.gz"), kind="label")
    ref = ref_vol.array
    pred = perturbed_brats(ref)
    before = pred.copy()
    res = evaluate_labels(pred, ref, ref_vol.geometry.spacing, labels=BRATS_NAMES, regions=BRATS_REGIONS)
    assert np.array_equal(pred, before)  # inputs untouched
    assert res["labels"]["non-enhancing tumour"]["dice"] == 0.0  # removed label
    assert res["labels"]["non-enhancing tumour"]["volume_pred_ml"] == 0.0
    for name, value in (("necrosis", 1), ("oedema", 2), ("enhancing tumour", 4)):
        m = res["labels"][name]
        _sitk_checks(pred == value, ref == value, ref_vol.geometry.spacing, m)
    wt = res["regions"]["whole tumour"]
    _monai_checks(pred > 0, ref > 0, ref_vol.geometry.spacing, wt)
    _sitk_checks(pred > 0, ref > 0, ref_vol.geometry.spacing, wt)
    assert wt["volume_ref_ml"] == pytest.approx(np.count_nonzero(ref) / 1000)
    assert 0.5 < wt["dice"] < 0.95 and wt["hd95_mm"] >= 3.0  # 3-voxel shift plus erosion
    report = format_report(res)
    assert "whole tumour" in report and "necrosis" in report


def test_anisotropic_nrrd_labels_distances():
    ref_vol = read_volume(data_path("radiomics-brain", "brain1_label.nrrd"), kind="label")
    sp = ref_vol.geometry.spacing
    assert sp[2] == pytest.approx(6.5)
    ref = ref_vol.array > 0
    pred = np.roll(ndimage.binary_dilation(ref, iterations=1), 1, axis=0)  # one thick slice up
    m = overlap_metrics(pred, ref, sp)
    _monai_checks(pred, ref, sp, m)
    _sitk_checks(pred, ref, sp, m)
    assert m["volume_ref_ml"] == pytest.approx(16.4, abs=0.1)  # README: brain1 lesion 16.4 ml


def test_ms_lesions_lesionwise_real_masks():
    ref_vol = read_volume(data_path("ms-lesjak", "patient07", "lesions.nii.gz"), kind="label")
    ref = ref_vol.array > 0
    cc = sitk.ConnectedComponent(_sitk(ref), True)  # ITK, fully connected = 26-connectivity
    n_itk = int(sitk.GetArrayViewFromImage(cc).max())
    same = lesion_detection(ref, ref, ref_vol.geometry.spacing)
    assert same["n_ref"] == same["n_pred"] == same["tp"] == n_itk
    assert same["fp"] == same["fn"] == 0 and same["lesion_f1"] == 1.0
    # remove the three smallest lesions and add one blob far from every lesion
    lab, n = ndimage.label(ref, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(lab.ravel())[1:]
    smallest = np.argsort(sizes, kind="stable")[:3] + 1
    pred = ref & ~np.isin(lab, smallest)
    dist = ndimage.distance_transform_edt(~ref)
    far = np.argwhere((dist > 20) & (read_volume(data_path("ms-lesjak", "patient07", "flair.nii.gz")).array > 0))[0]
    pred[tuple(slice(c - 1, c + 2) for c in far)] = True
    d = lesion_detection(pred, ref, ref_vol.geometry.spacing)
    assert (d["n_ref"], d["tp"], d["fn"], d["fp"], d["n_pred"]) == (n, n - 3, 3, 1, n - 2)
    missed = sorted(les["voxels"] for les in d["ref_lesions"] if not les["detected"])
    assert missed == sorted(sizes[smallest - 1].tolist())
    res = evaluate_labels(pred.astype(np.uint8), ref.astype(np.uint8), ref_vol.geometry.spacing,
                          labels={1: "MS lesion"}, lesionwise=True)
    les = res["labels"]["MS lesion"]["lesions"]
    assert (les["tp"], les["fp"], les["fn"]) == (n - 3, 1, 3)
    # centroids are reported in the full volume's (i, j, k) indices, not the evaluation crop's
    fp_lesion = next(x for x in les["pred_lesions"] if not x["true_positive"])
    assert fp_lesion["centroid_ijk"] == pytest.approx([far[2], far[1], far[0]])
    assert "lesion-wise" in format_report(res)


def test_evaluate_files_resamples_and_cli(tmp_path, capsys):
    ref_path = data_path("brats2013-deepmedic", "pat0002", "labels.nii.gz")
    ref = read_volume(ref_path, kind="label")
    pred = ref.with_array(perturbed_brats(ref.array))
    same_grid = write_volume(pred, tmp_path / "pred.nii.gz")
    direct = evaluate_files(same_grid, ref_path, labels=BRATS_NAMES, regions=BRATS_REGIONS)
    assert direct["resampled"] is False
    # the same prediction on a cropped grid (different size/origin) gives the same figures after resampling
    from mrisegassist.volume import Volume, Geometry

    g = ref.geometry
    origin = tuple(np.asarray(g.origin) + np.asarray(g.spacing) * np.array([10, 20, 5]))
    crop = Volume(pred.array[5:150, 20:230, 10:235].copy(), Geometry((225, 210, 145), g.spacing, origin, g.direction))
    cropped = write_volume(crop, tmp_path / "pred_crop.nrrd")
    via = evaluate_files(cropped, ref_path, labels=BRATS_NAMES, regions=BRATS_REGIONS)
    assert via["resampled"] is True and "nearest" in via["note"]
    for name in BRATS_REGIONS:
        assert via["regions"][name]["dice"] == pytest.approx(direct["regions"][name]["dice"])
    rc = main(["evaluate", str(cropped), str(ref_path), "--labels", "brats", "--regions", "brats", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["regions"]["tumour core"]["dice"] == pytest.approx(direct["regions"]["tumour core"]["dice"])
    assert set(out["labels"]) == set(BRATS_NAMES.values())
    rc = main(["evaluate", str(same_grid), str(ref_path), "--labels", "1=nec,2=oed,3=net,4=et", "--regions",
               "wt=1+2+3+4", "--lesionwise", "--no-distances", "--image",
               str(data_path("brats2013-deepmedic", "pat0002", "flair.nii.gz")), "--overlay",
               str(tmp_path / "overlay.png")])
    text = capsys.readouterr().out
    assert rc == 0 and "wt" in text and "lesion-wise" in text and "n/a" in text
    assert f"overlay: {tmp_path / 'overlay.png'}" in text and (tmp_path / "overlay.png").stat().st_size > 10000
    assert main(["evaluate", str(same_grid), str(ref_path), "--labels", "1=nec,2"]) == 2
    assert "has no name" in capsys.readouterr().err
    assert main(["evaluate", str(same_grid), str(tmp_path / "missing.nii.gz")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_aggregate_over_cases():
    a = {"labels": {"x": {"dice": 0.5, "hd95_mm": 2.0}}, "regions": {}}
    b = {"labels": {"x": {"dice": 0.9, "hd95_mm": None}, "y": {"dice": 1.0, "hd95_mm": 0.0}}, "regions": {}}
    s = aggregate([a, b], keys=("dice", "hd95_mm"))
    assert s["cases"] == 2
    assert s["labels"]["x"]["dice"] == {"n": 2, "undefined": 0, "mean": 0.7, "median": 0.7,
                                        "std": pytest.approx(0.2), "min": 0.5, "max": 0.9}
    assert s["labels"]["x"]["hd95_mm"]["n"] == 1 and s["labels"]["x"]["hd95_mm"]["undefined"] == 1
    assert s["labels"]["y"]["dice"]["n"] == 1
