"""Shipped U-Net models on real cases they were not trained on: geometry, labels, accuracy, CLI, model cards."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import data_path
from mrisegassist.cli import main
from mrisegassist.errors import Cancelled, InputError
from mrisegassist.labels import BRATS_LABELS, MS_LABELS
from mrisegassist.progress import CancelToken
from mrisegassist.unet import UNetSegmenter, get_model, list_models, segment_files
from mrisegassist.unet.card import fold_members, held_out_member, member_entry
from mrisegassist.unet.data import find_case_files
from mrisegassist.unet.entries import SHIPPED_DIR
from mrisegassist.unet.inference import load_model_case
from mrisegassist.unet.postprocess import region_masks
from mrisegassist.volume import read_volume

SHIPPED = ("glioma-2d", "ms-lesions-2d")
DATASET = {"glioma-2d": "brats2013-deepmedic", "ms-lesions-2d": "ms-lesjak"}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


@pytest.fixture(scope="module")
def glioma() -> UNetSegmenter:
    return UNetSegmenter("glioma-2d")


SCORES = {"glioma-2d": "Dice whole tumour", "ms-lesions-2d": "Dice MS lesion"}


def held_out_models(name: str) -> list[tuple[str, object, float]]:
    """``(case, model, recorded Dice)`` for every real case the shipped model (or, for a cross-validated fold
    ensemble, one of its members) was not trained on, with the held-out Dice its model.json records."""
    entry = get_model(name)
    if "cross_validation" in entry.validation:  # fold ensemble: each member on the case it did not see
        folds = {f["held_out"]: f for f in entry.validation["cross_validation"]["folds"]}
        assert sorted(m["held_out"] for m in fold_members(entry)) == sorted(folds)  # every case held out once
        out = []
        for case, fold in folds.items():
            member = held_out_member(entry, case)
            assert case not in member.training["members"][case]["cases"]
            out.append((case, member, fold["scores"][SCORES[name]]))
        return out
    key = "regions" if name == "glioma-2d" else "dice"  # a single model with its validation case(s)
    label = "whole tumour" if name == "glioma-2d" else "MS lesion"
    return [(case, entry, entry.validation[case][key][label]) for case in entry.training["validation_cases"]
            if case not in entry.training["cases"]]


@pytest.mark.parametrize("name, floor", [("glioma-2d", 0.5), ("ms-lesions-2d", 0.15)])
def test_held_out_dice_recorded_in_model_json_is_reproduced(name, floor):
    """Run from the shipped files on real cases it was not trained on (expert labels), the model gives the Dice
    its model.json (and so its model card) records."""
    cases = held_out_models(name)
    assert cases
    for case, model, recorded in cases:
        files = find_case_files(data_path(DATASET[name], case))
        segmenter = UNetSegmenter(model)
        labelmap = segmenter.segment(load_model_case(segmenter, files.images))
        ref = read_volume(files.labels, kind="label")
        assert labelmap.volume.geometry.same_as(ref.geometry)
        if name == "glioma-2d":
            got = _dice(region_masks(labelmap.volume.array)["whole tumour"], region_masks(ref.array)["whole tumour"])
        else:
            got = _dice(labelmap.volume.array > 0, ref.array > 0)
        assert got == pytest.approx(recorded, abs=0.02), case
        assert got > floor, case


def test_glioma_model_on_a_brats_case(glioma):
    folder = data_path("brats2013-deepmedic", "pat0001")
    steps = []
    case = load_model_case(glioma, {"flair": folder / "flair.nii.gz", "t1c": folder / "t1c.nii.gz"}, "t1c")
    labelmap = glioma.segment(case, progress=lambda f, m: steps.append(f))
    ref = read_volume(folder / "labels.nii.gz", kind="label")
    assert labelmap.volume.geometry.same_as(ref.geometry)
    assert set(np.unique(labelmap.volume.array)) <= {0, 1, 2, 3, 4}
    assert [(lab.value, lab.name) for lab in labelmap.labels] == [(lab.value, lab.name) for lab in BRATS_LABELS]
    assert steps == sorted(steps) and steps[-1] == 1.0
    # nothing where every input is background (slices above/below the brain, the crop margin)
    background = np.ones(ref.array.shape, bool)
    for name in ("flair", "t1c"):
        image = case.images[name]
        background &= image == image[0, 0, 0]
    assert background[:, 0, 0].any() and not labelmap.volume.array[background].any()


def test_glioma_model_on_raw_brats2023_scan_with_other_reference(glioma):
    """brats-gli-00001: raw int16, BraTS-2023 names; label map on the T1c grid (no expert labels here)."""
    folder = data_path("brats-gli-00001")
    inputs = {"flair": folder / "BraTS-GLI-00001-000-t2f.nii.gz", "t1c": folder / "BraTS-GLI-00001-000-t1c.nii.gz",
              "t1": folder / "BraTS-GLI-00001-000-t1n.nii.gz"}  # an extra sequence is ignored
    labelmap = segment_files("glioma-2d", inputs, reference="t1c")
    assert labelmap.volume.geometry.same_as(read_volume(inputs["t1c"]).geometry)
    wt_ml = float((labelmap.volume.array > 0).sum()) * labelmap.volume.geometry.voxel_volume_ml
    assert 10.0 < wt_ml < 400.0  # a glioma is found, not the whole brain
    with pytest.raises(InputError, match="needs sequence"):
        segment_files("glioma-2d", {"flair": inputs["flair"]})


def test_ms_model_on_an_oblique_anisotropic_scan():
    """ms-longitudinal: native anisotropic, slightly oblique uint16 FLAIR -> label map on that grid."""
    seg = UNetSegmenter("ms-lesions-2d")
    assert [lab.name for lab in seg.entry.label_infos()] == [lab.name for lab in MS_LABELS]
    flair = data_path("ms-longitudinal", "patient01", "study1_FLAIR.nii.gz")
    other = seg.segment(load_model_case(seg, {"flair": flair}))
    assert other.volume.geometry.same_as(read_volume(flair).geometry)
    assert set(np.unique(other.volume.array)) <= {0, 1}


def test_cancel_stops_segmentation(glioma):
    folder = data_path("brats2013-deepmedic", "pat0002")
    case = load_model_case(glioma, {"flair": folder / "flair.nii.gz", "t1c": folder / "t1c.nii.gz"})
    token = CancelToken()

    def progress(fraction, message):
        if fraction > 0.2:
            token.cancel()

    with pytest.raises(Cancelled):
        glioma.segment(case, progress=progress, cancel=token)


def test_shipped_models_cards_and_listing(capsys):
    names = {e.name: e for e in list_models()}
    for name in SHIPPED:
        entry = names[name]
        assert entry.folder.parent == SHIPPED_DIR
        members = fold_members(entry) if entry.members else [{"weights": entry.weights, "sha256": entry.sha256}]
        total = sum(member_entry(entry, m).verify().stat().st_size for m in members)  # every sha256 matches
        assert total < 20e6
        card = (entry.folder / "MODEL_CARD.md").read_text()
        assert "NOT FOR CLINICAL USE" in card and entry.licence in card and "expert labels" in card
        for case, _, recorded in held_out_models(name):  # the card shows the figures model.json records
            assert case in card and f"{recorded:.3f}" in card, (case, recorded)
        if "cross_validation" in entry.validation:
            summary = entry.validation["cross_validation"]["summary"]
            assert all(f"{v['mean']:.3f} ± {v['sd']:.3f}" in card for v in summary.values())
    assert main(["models", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert all(listed[n]["installed"] and listed[n]["licence"] for n in SHIPPED)
    assert get_model(SHIPPED_DIR / "glioma-2d").name == "glioma-2d"


def test_demo_on_synthetic_case(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "glioma-2d"
    for key in ("output", "overlay", "metrics_file"):
        assert (out / result[key].split("/")[-1]).is_file()
    assert "whole tumour" in result["metrics"]["regions"]
    labels = read_volume(out / "labels.nii.gz", kind="label")
    assert labels.geometry.same_as(read_volume(out / "case" / "flair.nii.gz").geometry)
