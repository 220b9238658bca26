"""Volumes with geometry on real data: format round trips, a DICOM series, multi-sequence cases on different
grids with co-registration transforms, label maps written back in the reference geometry, atomic writes."""
from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import data_path
from mrisegassist.errors import InputError, WriteError
from mrisegassist.volume import (Geometry, Volume, atomic_write, load_case, read_volume, resample_to,
                                 write_volume)

CASES = [  # (dataset parts, kind)
    (("radiomics-brain", "brain1_image.nrrd"), "image"),        # anisotropic 0.78x0.78x6.5, LPS flips
    (("radiomics-brain", "brain1_label.nrrd"), "label"),
    (("itksnap-mricrop", "t1.gipl.gz"), "image"),                # GIPL
    (("itksnap-mricrop", "labels.gipl.gz"), "label"),
    (("ms-lesjak", "patient07", "flair.nii.gz"), "image"),       # NIfTI, MNI grid
    (("ms-lesjak", "patient07", "lesions.nii.gz"), "label"),
    (("ms-longitudinal", "patient01", "study2_T1W.nii.gz"), "image"),  # oblique, anisotropic
    (("ms-longitudinal", "patient01", "gt.nii.gz"), "label"),
]


def assert_same_geometry(a: Geometry, b: Geometry, exact: bool) -> None:
    assert a.size == b.size
    if exact:  # to double precision (NRRD stores direction x spacing: oblique grids differ in the last bit)
        for x, y in ((a.spacing, b.spacing), (a.origin, b.origin), (a.direction, b.direction)):
            np.testing.assert_allclose(x, y, rtol=1e-13, atol=1e-13)
    else:  # NIfTI stores spacing, offsets and the quaternion as float32
        np.testing.assert_allclose(a.spacing, b.spacing, rtol=1e-6)
        np.testing.assert_allclose(a.origin, b.origin, atol=1e-4)
        np.testing.assert_allclose(a.direction, b.direction, atol=1e-6)


@pytest.mark.parametrize("parts,kind", CASES, ids=["/".join(p) for p, _ in CASES])
def test_round_trips_keep_geometry(parts, kind, tmp_path):
    vol = read_volume(data_path(*parts), kind=kind)
    assert vol.array.dtype == (np.float32 if kind == "image" else np.uint8)
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        out = write_volume(vol, tmp_path / f"copy{suffix}")
        back = read_volume(out, kind=kind)
        assert np.array_equal(back.array, vol.array), suffix
        assert_same_geometry(back.geometry, vol.geometry, exact=suffix != ".nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.mha", "copy.nii.gz", "copy.nrrd"]  # no temp files


def test_known_geometries():
    aniso = read_volume(data_path("radiomics-brain", "brain1_image.nrrd"))
    assert aniso.geometry.spacing == pytest.approx((0.78125, 0.78125, 6.5))
    assert aniso.geometry.direction == (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    # IJK->RAS negates x and y of IJK->LPS (Slicer's convention)
    np.testing.assert_allclose(aniso.geometry.ijk_to_ras[:2], -aniso.geometry.ijk_to_lps[:2])
    oblique = read_volume(data_path("ms-longitudinal", "patient01", "study1_FLAIR.nii.gz"))
    d = oblique.geometry.direction_matrix
    assert abs(d[0, 1]) > 0.01  # oblique slices
    np.testing.assert_allclose(d @ d.T, np.eye(3), atol=1e-5)
    back = Geometry.from_ijk_to_ras(oblique.geometry.ijk_to_ras, oblique.geometry.size)
    assert back.same_as(oblique.geometry, atol=1e-9)
    crop = oblique.geometry.subgrid((10, 20, 3), (50, 60, 7))
    np.testing.assert_allclose(crop.ijk_to_lps @ [0, 0, 0, 1], oblique.geometry.ijk_to_lps @ [10, 20, 3, 1])
    assert Geometry.from_dict(crop.to_dict()) == crop


def _write_dicom_series(vol: Volume, folder) -> None:
    """A CT-like DICOM series from a volume, one file per axial slice (SimpleITK's GDCM writer)."""
    image = sitk.Cast(vol.to_sitk(), sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = f"2.25.{uuid.uuid4().int}"  # unique per series (a per-second stamp let two series share UIDs)
    d = image.GetDirection()
    common = {"0008|0060": "MR", "0020|000d": uid + ".1", "0020|000e": uid + ".2", "0008|103e": "test series",
              "0020|0037": "\\".join(f"{v:.9f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))}
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        for tag, value in common.items():
            slice_.SetMetaData(tag, value)
        slice_.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        slice_.SetMetaData("0020|0013", str(k + 1))
        slice_.SetMetaData("0008|0018", f"{uid}.3.{k + 1}")
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)


def test_dicom_series_folder(tmp_path):
    vol = read_volume(data_path("itksnap-mricrop", "t1.gipl.gz"))  # int16, identity direction
    _write_dicom_series(vol, tmp_path)
    back = read_volume(tmp_path)
    assert back.array.shape == vol.array.shape
    assert np.array_equal(back.array, vol.array)
    assert_same_geometry(back.geometry, vol.geometry, exact=False)
    # a left-handed grid (radiomics: y flipped) comes back as the same physical voxels, slices re-sorted
    aniso = read_volume(data_path("radiomics-brain", "brain2_image.nrrd"))
    folder = tmp_path / "aniso"
    folder.mkdir()
    _write_dicom_series(aniso, folder)
    back = read_volume(folder)
    assert back.geometry.spacing == pytest.approx(aniso.geometry.spacing, abs=1e-4)
    on_grid = resample_to(back, aniso.geometry, "nearest")
    assert np.array_equal(on_grid.array, aniso.array)
    np.testing.assert_allclose(np.sort(back.geometry.corners_lps(), axis=0),
                               np.sort(aniso.geometry.corners_lps(), axis=0), atol=1e-3)
    second = tmp_path / "two"
    second.mkdir()
    for f in list(tmp_path.glob("slice*.dcm"))[:3] + list(folder.glob("slice*.dcm"))[:3]:
        (second / f"{f.parent.name}_{f.name}").write_bytes(f.read_bytes())
    with pytest.raises(InputError, match="holds 2 DICOM series"):
        read_volume(second)


LONGITUDINAL = ("ms-longitudinal", "patient01")


def _mi(fixed: np.ndarray, moving: np.ndarray) -> float:
    """Mattes mutual information (ITK's metric value: lower = better aligned)."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(50)
    reg.SetMetricSamplingStrategy(reg.REGULAR)
    reg.SetMetricSamplingPercentage(0.2, 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetInitialTransform(sitk.TranslationTransform(3))
    reg.SetOptimizerAsGradientDescent(1.0, 1)
    return reg.MetricEvaluate(sitk.GetImageFromArray(fixed), sitk.GetImageFromArray(moving))


@pytest.mark.parametrize("study", ["study1", "study2"])
def test_load_case_different_grids_with_transforms(study):
    paths = {s: data_path(*LONGITUDINAL, f"{study}_{s.upper()}.nii.gz") for s in ("flair", "t1w", "t2w")}
    txs = {s: data_path(*LONGITUDINAL, f"{study}_{s.upper()}_intrastudy_to_FLAIR.txt") for s in ("t1w", "t2w")}
    flair = read_volume(paths["flair"])
    plain = load_case(paths, reference="flair")
    reg = load_case(paths, reference="flair", transforms=txs)
    for case in (plain, reg):
        assert case.geometry == flair.geometry and case.reference == "flair"
        assert set(case.images) == {"flair", "t1w", "t2w"} and case.resampled == ["t1w", "t2w"]
        assert np.array_equal(case.images["flair"], flair.array)  # the reference is not resampled
        assert case.stack(["t2w", "flair"]).shape == (2, *flair.geometry.shape)
    # the transform is applied as ITK's Resample does (reference points -> sequence points) ...
    moving = sitk.ReadImage(str(paths["t1w"]), sitk.sitkFloat32)
    manual = sitk.Resample(moving, flair.to_sitk(), sitk.ReadTransform(str(txs["t1w"])), sitk.sitkLinear, 0.0)
    np.testing.assert_allclose(reg.images["t1w"], sitk.GetArrayViewFromImage(manual), rtol=1e-5, atol=1e-3)
    # ... and improves the alignment with FLAIR over the scanner geometry alone
    assert _mi(flair.array, reg.images["t1w"]) < _mi(flair.array, plain.images["t1w"])
    assert not np.array_equal(reg.images["t2w"], plain.images["t2w"])


def test_load_case_transform_errors(tmp_path):
    paths = {s: data_path(*LONGITUDINAL, f"study1_{s}.nii.gz") for s in ("FLAIR", "T1W")}
    with pytest.raises(InputError, match="unknown sequence"):
        load_case(paths, transforms={"T2W": sitk.Transform()})
    with pytest.raises(InputError, match="takes no transform"):
        load_case(paths, reference="FLAIR", transforms={"FLAIR": sitk.Transform()})
    bad = tmp_path / "bad.txt"
    bad.write_text("not a transform\n")
    with pytest.raises(InputError, match="cannot read .* as an ITK transform"):
        load_case(paths, transforms={"T1W": bad})
    with pytest.raises(InputError, match="does not exist"):
        load_case(paths, transforms={"T1W": tmp_path / "missing.txt"})
    far = sitk.TranslationTransform(3, (0.0, 0.0, 1000.0))  # maps the reference 1 m away from the T1W scan
    with pytest.raises(InputError, match=r"T1W \(study1_T1W.nii.gz\): does not overlap"):
        load_case(paths, transforms={"T1W": far})


def test_labels_written_back_in_reference_geometry(tmp_path):
    """A label map made on a resampled grid goes back to the reference grid with nearest neighbour."""
    ref = read_volume(data_path("radiomics-brain", "brain1_label.nrrd"), kind="label")
    iso = Geometry((200, 200, 120), (1.0, 1.0, 1.0), ref.geometry.origin, ref.geometry.direction)
    on_iso = resample_to(ref, iso, "nearest")
    back = resample_to(on_iso, ref.geometry, "nearest")
    out = write_volume(back, tmp_path / "labels.nrrd")
    again = read_volume(out, kind="label")
    assert again.geometry == ref.geometry
    inter = np.count_nonzero(again.array & ref.array)
    assert 2 * inter / (np.count_nonzero(again.array) + np.count_nonzero(ref.array)) > 0.9
    with pytest.raises(InputError, match="unknown interpolation"):
        resample_to(ref, iso, "cubic")


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    vol = read_volume(data_path("itksnap-mricrop", "labels.gipl.gz"), kind="label")
    target = write_volume(vol, tmp_path / "labels.nii.gz")
    before = target.read_bytes()
    mode = os.stat(target).st_mode & 0o777
    assert mode & 0o044  # readable by others as usual (not mkstemp's 0600)

    def failing(image, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter: disk full")

    monkeypatch.setattr(sitk, "WriteImage", failing)
    with pytest.raises(WriteError, match=r"labels\.nii\.gz: cannot write \(.*disk full\); the previous file is kept"):
        write_volume(vol.with_array(vol.array * 0), target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["labels.nii.gz"]
    with pytest.raises(InputError, match="cannot write this format"):
        write_volume(vol, tmp_path / "labels.png")
    with pytest.raises(InputError, match="two-file formats"):
        write_volume(vol, tmp_path / "labels.mhd")
    with pytest.raises(InputError, match=r"output folder .*nope does not exist"):
        write_volume(vol, tmp_path / "nope" / "labels.nii.gz")
    with pytest.raises(ZeroDivisionError):
        atomic_write(tmp_path / "x.txt", lambda tmp: 1 / 0)
    assert [p.name for p in tmp_path.iterdir()] == ["labels.nii.gz"]
