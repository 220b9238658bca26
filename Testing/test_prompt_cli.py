"""``mrisegassist prompt`` end to end on a real thick-slice post-contrast T1 with an expert lesion label
(radiomics-brain brain1): outputs in the input's geometry, objects from boxes / a mask, z-range, metrics, and
bad input rejected with a clear message before anything is written."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import data_path

from mrisegassist.cli import main
from mrisegassist.prompt.strategies import boxes_for_object, objects_from_mask
from mrisegassist.volume import read_volume


@pytest.fixture(scope="module")
def case():
    image = data_path("radiomics-brain", "brain1_image.nrrd")
    label = data_path("radiomics-brain", "brain1_label.nrrd")
    lesions = read_volume(label, kind="label").array > 0
    objects = objects_from_mask(lesions, min_voxels=10)
    return image, label, lesions, objects


def _box_arg(box, prefix: str = "") -> str:
    return prefix + ",".join(str(v) for v in box.as_tuple())


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["prompt", "-q", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_one_box_writes_labels_in_the_input_geometry(tmp_path, capsys, case):
    image, label, lesions, objects = case
    (box,) = boxes_for_object(objects[1][1], "A")  # the smaller, well-enhancing lesion
    out = tmp_path / "seg.nrrd"
    code, text, err = _run(capsys, "--input", image, "--box", _box_arg(box), "-o", out, "--ref-mask", label)
    assert code == 0, err
    written, source = sitk.ReadImage(str(out)), sitk.ReadImage(str(image))
    assert written.GetSize() == source.GetSize()
    assert np.allclose(written.GetSpacing(), source.GetSpacing()) and np.allclose(written.GetOrigin(),
                                                                                  source.GetOrigin())
    assert np.allclose(written.GetDirection(), source.GetDirection())
    arr = sitk.GetArrayFromImage(written)
    assert arr.dtype == np.uint16 and set(np.unique(arr)) == {0, 1}
    assert "object 1: slices" in text and "ml" in text and "Dice" in text
    assert arr[box.k, box.j0:box.j1 + 1, box.i0:box.i1 + 1].any()
    assert arr[objects[1][1]].mean() > 0.5  # most of the expert lesion is found


def test_boxes_with_object_ids_and_json(tmp_path, capsys, case):
    image, label, lesions, objects = case
    big, small = objects[0][1], objects[1][1]
    b1 = boxes_for_object(big, "B")
    (b2,) = boxes_for_object(small, "A")
    out = tmp_path / "seg.nii.gz"
    argv = ["--input", image, "-o", out, "--json", "--ref-mask", label, "--box", _box_arg(b2)]
    for b in b1:
        argv += ["--box", _box_arg(b, "7:")]
    code, text, err = _run(capsys, *argv)
    assert code == 0, err
    doc = json.loads(text)
    ids = [o["object_id"] for o in doc["objects"]]
    assert ids == [1, 7]  # the un-prefixed box becomes object 1, the three prefixed boxes object 7
    assert len(doc["objects"][1]["boxes"]) == 3 and doc["objects"][1]["slices"][:3] == [b.k for b in b1]
    arr = read_volume(out, kind="label").array
    assert set(np.unique(arr)) <= {0, 1, 7} and (arr == 7).sum() > (arr == 1).sum() > 0
    assert doc["metrics"]["dice"] > 0.6 and doc["total_volume_ml"] > 0
    # the same object given as one --object-boxes option: same result
    code, text, err = _run(capsys, "--input", image, "-o", out, "--json", "--object-boxes",
                           ";".join(_box_arg(b) for b in b1))
    assert code == 0, err
    (obj,) = json.loads(text)["objects"]
    assert obj["object_id"] == 1 and len(obj["boxes"]) == 3
    assert np.array_equal(read_volume(out, kind="label").array == 1, arr == 7)


def test_boxes_from_mask_strategy_and_z_range(tmp_path, capsys, case):
    image, label, lesions, objects = case
    out = tmp_path / "seg.nii.gz"
    code, text, err = _run(capsys, "--input", image, "--boxes-from-mask", label, "--strategy", "B",
                           "--min-voxels", 10, "-o", out, "--ref-mask", label, "--json")
    assert code == 0, err
    doc = json.loads(text)
    assert len(doc["objects"]) == len(objects) and doc["metrics"]["dice"] > 0.6
    (box,) = boxes_for_object(objects[0][1], "A")
    code, text, err = _run(capsys, "--input", image, "--box", _box_arg(box), "--z-range",
                           f"{box.k},{box.k + 1}", "-o", out, "--json")
    assert code == 0, err
    slices = json.loads(text)["objects"][0]["slices"]
    assert set(slices) <= {box.k, box.k + 1}
    assert not read_volume(out, kind="label").array[:box.k].any()


@pytest.mark.parametrize("extra, message, status", [
    (["--box", "14,150,100,140,110"], "empty", 2),
    (["--box", "40,150,100,160,110"], "outside the volume", 2),
    (["--box", "14,300,300,310,310"], "outside the slice", 2),
    (["--box", "14,150,100,160,110", "--z-range", "15,12"], "zero size", 2),
    (["--box", "14,150,100"], "expected", 2),
    (["--box", "14,150,100,160,110", "--engine", "sam9"], "unknown engine", 2),
    (["--box", "14,150,100,160,110", "--engine", "sam-vit-b", "--checkpoint", "missing.pth"], "does not exist", 1),
    (["--box", "14,150,100,160,110", "--z-range", "4:10,12"], "no object 4", 2),
])
def test_bad_input_is_rejected_and_nothing_written(tmp_path, capsys, case, extra, message, status):
    image = case[0]
    out = tmp_path / "seg.nii.gz"
    code, text, err = _run(capsys, "--input", image, "-o", out, *extra)
    assert code == status and message in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_files_are_rejected(tmp_path, capsys, case):
    image = case[0]
    code, _, err = _run(capsys, "--input", tmp_path / "nope.nii.gz", "--box", "1,1,1,2,2", "-o", tmp_path / "o.nii.gz")
    assert code == 2 and "no such file" in err
    code, _, err = _run(capsys, "--input", image, "--box", "14,150,100,160,110", "-o", tmp_path / "x" / "o.nii.gz")
    assert code == 2 and "does not exist" in err
    code, _, err = _run(capsys, "--input", image, "--box", "14,150,100,160,110", "-o", tmp_path / "o.png")
    assert code == 2 and "format" in err
    assert list(tmp_path.iterdir()) == []


def test_list_engines(capsys):
    code, text, _ = _run(capsys, "--list-engines", "--json")
    names = [e["name"] for e in json.loads(text)]
    assert code == 0 and names[0] == "classical" and "medsam2" in names and "sam2.1-hiera-large" in names
