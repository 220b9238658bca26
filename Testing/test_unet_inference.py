"""Shipped U-Net models on real cases they were not trained on: geometry, labels, accuracy, CLI, model cards."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from conftest import data_path
from mrisegassist.cli import main
from mrisegassist.errors import Cancelled, InputError
from mrisegassist.labels import BRATS_LABELS, MS_LABELS
from mrisegassist.progress import CancelToken
from mrisegassist.unet import UNetSegmenter, get_model, list_models, segment_files
from mrisegassist.unet.entries import SHIPPED_DIR
from mrisegassist.unet.inference import load_model_case
from mrisegassist.unet.postprocess import region_masks
from mrisegassist.volume import read_volume

SHIPPED = ("glioma-2d", "ms-lesions-2d")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


@pytest.fixture(scope="module")
def glioma() -> UNetSegmenter:
    return UNetSegmenter("glioma-2d")


def held_out(name: str) -> str:
    """The shipped model's validation case (recorded in its model.json), which it was not trained on."""
    training = get_model(name).training
    case = training["validation_cases"][0]
    assert case not in training["cases"]
    return case


def test_glioma_model_on_held_out_brats_case(glioma):
    folder = data_path("brats2013-deepmedic", held_out("glioma-2d"))
    steps = []
    case = load_model_case(glioma, {"flair": folder / "flair.nii.gz", "t1c": folder / "t1c.nii.gz"}, "t1c")
    labelmap = glioma.segment(case, progress=lambda f, m: steps.append(f))
    ref = read_volume(folder / "labels.nii.gz", kind="label")
    assert labelmap.volume.geometry.same_as(ref.geometry)
    assert set(np.unique(labelmap.volume.array)) <= {0, 1, 2, 3, 4}
    assert [(lab.value, lab.name) for lab in labelmap.labels] == [(lab.value, lab.name) for lab in BRATS_LABELS]
    assert steps == sorted(steps) and steps[-1] == 1.0
    pred, expert = region_masks(labelmap.volume.array), region_masks(ref.array)
    assert _dice(pred["whole tumour"], expert["whole tumour"]) > 0.7
    assert _dice(pred["tumour core"], expert["tumour core"]) > 0.4
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


def test_ms_model_on_held_out_case_and_oblique_scan():
    seg = UNetSegmenter("ms-lesions-2d")
    folder = data_path("ms-lesjak", held_out("ms-lesions-2d"))
    labelmap = seg.segment(load_model_case(seg, {"flair": folder / "flair.nii.gz"}))
    ref = read_volume(folder / "lesions.nii.gz", kind="label")
    assert labelmap.volume.geometry.same_as(ref.geometry)
    assert [lab.name for lab in labelmap.labels] == [lab.name for lab in MS_LABELS]
    assert _dice(labelmap.volume.array > 0, ref.array > 0) > 0.1
    # ms-longitudinal: native anisotropic, slightly oblique uint16 FLAIR -> label map on that grid
    flair = data_path("ms-longitudinal", "patient01", "study1_FLAIR.nii.gz")
    other = seg.segment(load_model_case(seg, {"flair": flair}))
    assert other.volume.geometry.same_as(read_volume(flair).geometry)


def test_cancel_stops_segmentation(glioma):
    folder = data_path("brats2013-deepmedic", held_out("glioma-2d"))
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
        path = entry.verify()  # sha256 matches
        assert path.stat().st_size < 20e6
        card = (entry.folder / "MODEL_CARD.md").read_text()
        assert "NOT FOR CLINICAL USE" in card and entry.licence in card
        for case in entry.training["validation_cases"]:
            assert case not in entry.training["cases"]
            dice = entry.validation[case]["dice"]
            for label, value in dice.items():  # the card shows the figures model.json records
                assert re.search(rf"\| {re.escape(label)} \| {value:.3f} \|", card), (label, value)
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
