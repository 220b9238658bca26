"""Reference sets: built-in Colin27 atlas (AAL + derived ventricles), folder / CSV / JSON manifests, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import data_path

from mrisegassist.atlas.builtin import VENTRICLE_LABELS, mricron_dir
from mrisegassist.atlas.references import (Structure, builtin_definition, builtin_names, load_reference_set)
from mrisegassist.errors import InputError
from mrisegassist.volume import Volume, read_volume, write_volume


def _need_mricron():
    if not (mricron_dir() / "aal.nii.gz").is_file():
        pytest.skip("Colin27/AAL not installed (apt-get install mricron-data)")


@pytest.fixture(scope="module")
def colin27():
    _need_mricron()
    return load_reference_set("builtin:colin27")


def test_builtin_definitions_are_complete():
    assert {"colin27", "mni152", "brain"} <= set(builtin_names())
    colin = builtin_definition("colin27")
    names = [s["name"] for s in colin["structures"]]
    assert len(names) == len(set(names)) >= 15
    for s in colin["structures"]:
        Structure.from_json(s)  # valid
    # thin or small structures are kept out of the cascade
    excluded = {s["name"] for s in colin["structures"] if not s["cascade"]}
    assert {"third-ventricle", "fourth-ventricle", "amygdala-left", "vermis"} <= excluded
    assert builtin_definition("brain")["structures"] == colin["structures"]
    with pytest.raises(InputError, match="unknown built-in atlas"):
        load_reference_set("builtin:nope")


def test_colin27_has_aal_and_plausible_ventricles(colin27):
    ref = colin27.references[0]
    labels, image = ref.labels, ref.image
    assert labels.geometry.same_as(image.geometry) and labels.geometry.size == (181, 217, 181)
    present = set(np.unique(labels.array).tolist())
    for s in colin27.structures:
        assert present.intersection(s.labels), s.name
    ml = {n: float((labels.array == v).sum()) / 1000 for n, v in VENTRICLE_LABELS.items()}
    # Colin27 is a young healthy adult: lateral ventricles a few ml each, third and fourth around 1-4 ml
    assert 4 < ml["lateral-ventricle-left"] < 25 and 4 < ml["lateral-ventricle-right"] < 25, ml
    assert 0.3 < ml["third-ventricle"] < 5 and 0.3 < ml["fourth-ventricle"] < 6, ml
    # ventricles are dark on T1: well below the brain's median intensity
    brain = image.array[image.array > 0]
    for v in VENTRICLE_LABELS.values():
        assert np.median(image.array[labels.array == v]) < 0.75 * np.median(brain)
    # the left lateral ventricle lies left of the midline (RAS x < 0)
    k, j, i = np.nonzero(labels.array == VENTRICLE_LABELS["lateral-ventricle-left"])
    x = (labels.geometry.ijk_to_ras @ np.array([i.mean(), j.mean(), k.mean(), 1.0]))[0]
    assert x < -5
    assert colin27.select(["caudate-left"]).structure_names == ["caudate-left"]
    with pytest.raises(InputError, match="unknown structure"):
        colin27.select(["corpus-callosum"])


@pytest.fixture
def crop_files(tmp_path):
    folder = data_path("itksnap-mricrop")
    image = read_volume(folder / "t1.gipl.gz")
    labels = read_volume(folder / "labels.gipl.gz", kind="label")
    return image, labels, tmp_path


def test_folder_csv_and_json_manifests(crop_files):
    image, labels, tmp = crop_files
    a = tmp / "refs"
    a.mkdir()
    write_volume(image, a / "s1_image.nii.gz")
    write_volume(labels, a / "s1_labels.nii.gz")
    (a / "s2").mkdir()
    write_volume(image, a / "s2" / "image.nrrd")
    write_volume(labels, a / "s2" / "labels.nrrd")
    rs = load_reference_set(a)
    assert [r.name for r in rs.references] == ["s1", "s2"]
    # without definitions: one structure per label value present
    assert rs.structure_names == [f"label-{v}" for v in range(1, 9)]
    assert rs.references[0].key == rs.references[0].key and rs.references[0].key != ""
    np.testing.assert_array_equal(rs.references[1].labels.array, labels.array)

    (tmp / "refs.csv").write_text("image,labels,name\nrefs/s1_image.nii.gz,refs/s1_labels.nii.gz,one\n")
    (tmp / "refs.json").write_text(json.dumps({"name": "crop", "structures": [
        {"name": "ventricles", "labels": [1, 6], "threshold": 0.4}, {"name": "caudate", "labels": [7]}]}))
    rs = load_reference_set(tmp / "refs.csv")  # the .json beside the CSV gives the structures
    assert rs.name == "crop" and rs.structure_names == ["ventricles", "caudate"]
    assert rs.structure("ventricles").labels == (1, 6) and rs.structure("ventricles").threshold == 0.4
    manifest = {"name": "m", "references": [{"image": "refs/s1_image.nii.gz", "labels": "refs/s1_labels.nii.gz"}],
                "structures": [{"name": "hippocampus", "labels": [4, 5]}]}
    (tmp / "m.json").write_text(json.dumps(manifest))
    assert load_reference_set(tmp / "m.json", ["hippocampus"]).structure_names == ["hippocampus"]


def test_bad_reference_sets_give_clear_errors(crop_files):
    image, labels, tmp = crop_files
    with pytest.raises(InputError, match="no such reference folder"):
        load_reference_set(tmp / "missing")
    (tmp / "empty").mkdir()
    with pytest.raises(InputError, match="no references found"):
        load_reference_set(tmp / "empty")
    (tmp / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_reference_set(tmp / "bad.json")
    (tmp / "nolabels.json").write_text(json.dumps({"references": [{"image": "x.nii.gz"}]}))
    with pytest.raises(InputError, match="needs 'image' and 'labels'"):
        load_reference_set(tmp / "nolabels.json")
    # a reference lacking every label of a structure is refused (its votes would silently count as absent)
    write_volume(image, tmp / "a_image.nii.gz")
    write_volume(labels, tmp / "a_labels.nii.gz")
    no_hippo = labels.with_array(np.where(np.isin(labels.array, [4, 5]), 0, labels.array).astype(np.uint8))
    write_volume(image, tmp / "b_image.nii.gz")
    write_volume(no_hippo, tmp / "b_labels.nii.gz")
    (tmp / "set.json").write_text(json.dumps({"references": [
        {"image": "a_image.nii.gz", "labels": "a_labels.nii.gz"}, {"image": "b_image.nii.gz", "labels": "b_labels.nii.gz"}],
        "structures": [{"name": "hippocampus", "labels": [4, 5]}, {"name": "caudate", "labels": [7]}]}))
    with pytest.raises(InputError, match=r"missing labels.*b_image has none of the labels \[4, 5\] of 'hippocampus'"):
        load_reference_set(tmp / "set.json")
    assert load_reference_set(tmp / "set.json", ["caudate"]).structure_names == ["caudate"]
    with pytest.raises(InputError, match="threshold"):
        Structure("x", (1,), threshold=0)
    with pytest.raises(InputError, match="label values"):
        Structure("x", ())
    float_labels = Volume(labels.array.astype(np.float32) + 0.5, labels.geometry)
    write_volume(float_labels, tmp / "c_labels.nii.gz")
    write_volume(image, tmp / "c_image.nii.gz")
    (tmp / "c.csv").write_text("image,labels\nc_image.nii.gz,c_labels.nii.gz\n")
    with pytest.raises(InputError, match="non-integer"):
        load_reference_set(tmp / "c.csv")
