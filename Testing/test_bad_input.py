"""Bad input gives a specific InputError before anything is written, and leaves files and arrays untouched."""
from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import data_path
from mrisegassist.errors import InputError
from mrisegassist.labels import LabelInfo, LabelMap, read_labelmap, write_labelmap
from mrisegassist.metrics import evaluate_labels
from mrisegassist.volume import Geometry, Volume, load_case, read_volume, validate_array, write_volume


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def flair():
    return read_volume(data_path("ms-lesjak", "patient26", "flair.nii.gz"))


@pytest.fixture(scope="module")
def files(tmp_path_factory, flair):
    """Bad files made from a real FLAIR: 4D (2 time points), NaN voxels, constant, garbage, shifted 1 m."""
    tmp_path = tmp_path_factory.mktemp("bad")
    src = nib.load(str(data_path("ms-lesjak", "patient26", "flair.nii.gz")))
    data = np.asarray(src.dataobj, dtype=np.float32)
    out = {}
    out["4d"] = tmp_path / "flair_4d.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), src.affine), str(out["4d"]))
    nan = data.copy()
    nan[90, 100, 80:83] = np.nan
    out["nan"] = tmp_path / "flair_nan.nii.gz"
    nib.save(nib.Nifti1Image(nan, src.affine), str(out["nan"]))
    out["constant"] = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros_like(data), src.affine), str(out["constant"]))
    out["garbage"] = tmp_path / "garbage.nii.gz"
    out["garbage"].write_bytes(np.random.default_rng(0).bytes(5000))
    shifted = Volume(flair.array, Geometry(flair.geometry.size, flair.geometry.spacing,
                                           tuple(np.add(flair.geometry.origin, (0.0, 0.0, 1000.0))),
                                           flair.geometry.direction), "shifted")
    out["shifted"] = write_volume(shifted, tmp_path / "t1_shifted.nii.gz")
    out["nodicom"] = tmp_path / "not_dicom"
    out["nodicom"].mkdir()
    (out["nodicom"] / "readme.txt").write_text("no images here")
    return out


@pytest.mark.parametrize("key,message", [
    ("4d", r"flair_4d.nii.gz\)?: is 4D with 2 time points; pass one 3D volume"),
    ("nan", r"flair_nan.nii.gz\)?: 3 voxels are NaN or infinite"),
    ("constant", r"empty.nii.gz\)?: volume is empty \(every voxel is 0.0\)"),
    ("garbage", r"garbage.nii.gz\)?: cannot read as an image"),
    ("nodicom", r"not_dicom\)?: folder holds no DICOM series"),
])
def test_bad_files(files, key, message):
    before = {k: sha(p) for k, p in files.items() if p.is_file()}
    with pytest.raises(InputError, match=message):
        read_volume(files[key])
    with pytest.raises(InputError, match=message):  # same message through load_case
        load_case({"t1": data_path("ms-lesjak", "patient26", "t1.nii.gz"), "flair": files[key]})
    assert {k: sha(p) for k, p in files.items() if p.is_file()} == before


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"missing.nii.gz: no such file or folder"):
        read_volume(tmp_path / "missing.nii.gz")
    with pytest.raises(InputError, match=r"flair \(missing.nii.gz\): no such file|missing.nii.gz: no such file"):
        load_case({"flair": tmp_path / "missing.nii.gz"})
    assert list(tmp_path.iterdir()) == []


def test_non_overlapping_sequences(files, flair):
    src = data_path("ms-lesjak", "patient26", "flair.nii.gz")
    before = sha(files["shifted"])
    with pytest.raises(InputError, match=r"t1 \(t1_shifted.nii.gz\): does not overlap the reference grid in physical space"):
        load_case({"flair": src, "t1": files["shifted"]}, reference="flair")
    assert sha(files["shifted"]) == before


def test_missing_reference_and_sequences(flair):
    with pytest.raises(InputError, match=r"reference sequence 't1c' is not among the inputs \(flair\)"):
        load_case({"flair": flair}, reference="t1c")
    with pytest.raises(InputError, match="no input sequences given"):
        load_case({})
    case = load_case({"flair": flair})
    with pytest.raises(InputError, match=r"missing sequence\(s\) t1c, t2; have flair"):
        case.stack(["flair", "t1c", "t2"])


def test_arrays_are_not_modified(flair):
    original = flair.array.copy()
    case = load_case({"flair": flair, "copy": flair.with_array(flair.array * 2)}, reference="flair")
    case.images["flair"][:] = 0  # the case owns copies
    assert np.array_equal(flair.array, original)
    bad = flair.array.copy()
    bad[0, 0, 0] = np.inf
    keep = bad.copy()
    with pytest.raises(InputError, match="1 voxels are NaN or infinite"):
        load_case({"flair": flair.with_array(bad)})
    assert np.array_equal(bad, keep, equal_nan=True)


@pytest.mark.parametrize("array,message", [
    (np.zeros((4, 4)), "expected a 3D volume, got 2D data"),
    (np.zeros((2, 4, 4, 4)), r"got 4D data .* pass one 3D volume per sequence"),
    (np.full((4, 4, 4), 7.0), r"volume is empty \(every voxel is 7.0\)"),
])
def test_validate_array_messages(array, message):
    with pytest.raises(InputError, match=message):
        validate_array(array, "x")


def test_bad_label_maps(tmp_path, flair):
    g = flair.geometry
    with pytest.raises(InputError, match="label map has negative values"):
        write_labelmap(LabelMap(Volume(np.full(g.shape, -1, np.int16), g, "neg")), tmp_path / "x.nii.gz")
    with pytest.raises(InputError, match="label map has non-integer values"):
        write_labelmap(LabelMap(Volume(np.full(g.shape, 0.5, np.float32), g, "half")), tmp_path / "x.nii.gz")
    with pytest.raises(InputError, match="label values repeat"):
        LabelMap(Volume(np.zeros(g.shape, np.uint8), g), [LabelInfo(1, "a"), LabelInfo(1, "b")])
    big = np.zeros(g.shape, np.uint16)
    big[0, 0, 0] = 300
    with pytest.raises(InputError, match=r"\.seg\.nrrd label values must be <= 255"):
        write_labelmap(LabelMap(Volume(big, g)), tmp_path / "x.seg.nrrd")
    assert list(tmp_path.iterdir()) == []
    broken = tmp_path / "labels.nii.gz"
    write_volume(Volume(np.zeros(g.shape, np.uint8), g), broken)
    (tmp_path / "labels.labels.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read label descriptions"):
        read_labelmap(broken)
    with pytest.raises(InputError, match="differs from reference shape"):
        evaluate_labels(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))
