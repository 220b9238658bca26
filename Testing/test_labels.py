"""Label maps with names: .seg.nrrd read by Slicer's own segmentation storage (slicer-core), Slicer-written
.seg.nrrd (cropped, multi-layer) read back, sidecar JSON forms, ITK-SNAP label files, standard label sets."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import data_path
from mrisegassist.labels import (BRATS2023_LABELS, BRATS_LABELS, LABEL_SETS, METASTASIS_LABELS, MRICROP_LABELS,
                                 MS_LABELS, LabelInfo, LabelMap, label_set, read_itksnap_labels, read_labelmap,
                                 sidecar_path, write_labelmap)
from mrisegassist.volume import Volume, read_volume


@pytest.fixture(scope="module")
def brats_labelmap() -> LabelMap:
    vol = read_volume(data_path("brats2013-deepmedic", "pat0003", "labels.nii.gz"), kind="label")
    return LabelMap(vol, list(BRATS_LABELS))


def test_label_sets_are_well_formed():
    assert [lab.value for lab in BRATS_LABELS] == [1, 2, 3, 4]
    assert [lab.name for lab in BRATS2023_LABELS] == ["necrotic tumour core", "oedema", "enhancing tumour"]
    assert [lab.value for lab in METASTASIS_LABELS] == [1, 2] and MS_LABELS[0].name == "MS lesion"
    for name, labels in LABEL_SETS.items():
        assert label_set(name) == list(labels)
        colors = [lab.color for lab in labels]
        assert all(len(c) == 3 and all(0 <= x <= 1 for x in c) for c in colors)
        for lab in labels:
            if lab.terminology:
                parts = lab.terminology.split("~")
                assert len(parts) == 7, lab
                for code in (parts[1], parts[2]):
                    scheme, value, meaning = code.split("^")
                    assert scheme == "SCT" and value.isdigit() and meaning, lab
    assert len({lab.color for lab in BRATS_LABELS}) == 4  # distinct display colours


@pytest.mark.parametrize("suffix", [".seg.nrrd", ".nii.gz", ".nrrd", ".mha"])
def test_round_trip_names_colours_terminology(brats_labelmap, tmp_path, suffix):
    out = write_labelmap(brats_labelmap, tmp_path / f"labels{suffix}")
    back = read_labelmap(out)
    assert np.array_equal(back.volume.array, brats_labelmap.volume.array)
    assert back.geometry.same_as(brats_labelmap.geometry, atol=1e-5)
    assert [(lab.value, lab.name, lab.terminology) for lab in back.labels] == [
        (lab.value, lab.name, lab.terminology) for lab in BRATS_LABELS]
    for got, want in zip(back.labels, BRATS_LABELS):  # colours go through text with 4-6 digits
        assert got.color == pytest.approx(want.color, abs=1e-4)
    files = sorted(p.name for p in tmp_path.iterdir())
    if suffix == ".seg.nrrd":
        assert files == ["labels.seg.nrrd"]
    else:
        assert files == sorted([out.name, "labels.labels.json"])
        doc = json.loads(sidecar_path(out).read_text())
        assert [d["name"] for d in doc["labels"]] == [lab.name for lab in BRATS_LABELS]


def test_unnamed_values_get_defaults(tmp_path):
    vol = read_volume(data_path("itksnap-mricrop", "labels.gipl.gz"), kind="label")
    lm = read_labelmap(data_path("itksnap-mricrop", "labels.gipl.gz"))  # no sidecar: default names
    assert [lab.value for lab in lm.labels] == lm.present_values() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert lm.labels[0].name == "label 1"
    partial = LabelMap(vol, [LabelInfo(7, "caudate", (1.0, 0.0, 0.0))])
    back = read_labelmap(write_labelmap(partial, tmp_path / "x.seg.nrrd"))
    assert back.names[7] == "caudate" and back.names[1] == "label 1" and len(back.labels) == 8


def test_itksnap_label_file():
    path = data_path("itksnap-mricrop", "labels.label")
    labels = read_itksnap_labels(path)
    assert [lab.value for lab in labels] == list(range(1, 12))  # "Clear" (0) skipped
    assert labels[0].name == "vent-lat" and labels[7].name == "corpus-callosum"
    assert labels[3].color == pytest.approx((1.0, 1.0, 0.0))
    for lab, std in zip(labels[:8], MRICROP_LABELS):  # the named set keeps the file's colours
        assert lab.color == pytest.approx(std.color) and lab.value == std.value
    lm = read_labelmap(data_path("itksnap-mricrop", "labels.gipl.gz"), labels=path)
    assert lm.names[4] == "hippo-R" and lm.info(5).name == "hippo-L"


# --------------------------------------------------------------------------------- Slicer interop
@pytest.fixture(scope="module")
def slicer():
    return pytest.importorskip("slicer", reason="slicer-core (trame-slicer[standalone]) not installed")


def _slicer_scene(slicer):
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    return scene, logic


def test_slicer_opens_our_seg_nrrd(slicer, brats_labelmap, tmp_path):
    import vtk

    path = write_labelmap(brats_labelmap, tmp_path / "brats.seg.nrrd")
    scene, logic = _slicer_scene(slicer)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    seg = node.GetSegmentation()
    got = []
    for n in range(seg.GetNumberOfSegments()):
        segment = seg.GetNthSegment(n)
        term = vtk.reference("")
        assert segment.GetTag("TerminologyEntry", term)
        got.append((segment.GetLabelValue(), segment.GetName(), tuple(round(c, 4) for c in segment.GetColor()),
                    str(term)))
    assert got == [(lab.value, lab.name, tuple(round(c, 4) for c in lab.color), lab.terminology)
                   for lab in BRATS_LABELS]
    # Slicer's labelmap export: same voxels per label at the same physical place (Slicer crops to the extent)
    out = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert logic.ExportAllSegmentsToLabelmapNode(node, out, 0)
    exported = slicer.util.arrayFromVolume(out)
    ref = brats_labelmap.volume.array
    for value in (1, 2, 3, 4):
        assert np.count_nonzero(exported == value) == np.count_nonzero(ref == value)
    m = vtk.vtkMatrix4x4()
    out.GetIJKToRASMatrix(m)
    origin_ras = np.array([m.GetElement(r, 3) for r in range(3)])
    lo = np.argwhere(ref > 0).min(axis=0)[::-1]  # (i, j, k) of the foreground box corner
    expected = (brats_labelmap.geometry.ijk_to_ras @ np.array([*lo, 1.0]))[:3]
    np.testing.assert_allclose(origin_ras, expected, atol=1e-6)


def _oriented(slicer, array: np.ndarray, spacing, origin_ras):
    import vtk
    from vtk.util import numpy_support

    img = slicer.vtkOrientedImageData()
    img.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    img.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    img.GetPointData().GetScalars().DeepCopy(numpy_support.numpy_to_vtk(array.ravel().astype(np.uint8)))
    img.SetSpacing(*spacing)
    img.SetOrigin(*origin_ras)
    return img


def test_read_slicer_written_multilayer_seg_nrrd(slicer, tmp_path):
    """Overlapping segments: Slicer writes two layers (a vector NRRD) cropped to the segments' extent."""
    shape, spacing, origin_ras = (10, 12, 14), (1.0, 1.0, 2.0), (-5.0, 3.0, 7.0)
    a = np.zeros(shape, np.uint8)
    a[2:6, 3:7, 4:9] = 1
    b = np.zeros(shape, np.uint8)
    b[4:8, 5:9, 6:11] = 1
    scene, _ = _slicer_scene(slicer)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    for name, arr, color in (("first", a, (1.0, 0.0, 0.0)), ("second", b, (0.0, 1.0, 0.0))):
        segment = slicer.vtkSegment()
        segment.SetName(name)
        segment.SetColor(*color)
        segment.AddRepresentation("Binary labelmap", _oriented(slicer, arr, spacing, origin_ras))
        node.GetSegmentation().AddSegment(segment)
    assert node.GetSegmentation().GetNumberOfLayers() == 2
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    path = tmp_path / "overlap.seg.nrrd"
    storage.SetFileName(str(path))
    assert storage.WriteData(node)
    lm = read_labelmap(path)
    assert [(lab.value, lab.name, lab.color) for lab in lm.labels] == [(1, "first", (1.0, 0.0, 0.0)),
                                                                      (2, "second", (0.0, 1.0, 0.0))]
    assert lm.volume.metadata["flattened_layers"] == 2
    arr = lm.volume.array
    assert np.count_nonzero(arr == 2) == b.sum() and np.count_nonzero(arr == 1) == (a & ~b).sum()
    # every voxel of "first" sits at the same physical point in our LPS geometry
    kji = np.argwhere(a > 0)
    ras = np.c_[kji[:, 2] * spacing[0] + origin_ras[0], kji[:, 1] * spacing[1] + origin_ras[1],
                kji[:, 0] * spacing[2] + origin_ras[2]]
    lps = ras * [-1, -1, 1]
    ijk = np.rint(lm.geometry.lps_to_continuous_ijk(lps)).astype(int)
    assert np.all(np.isin(arr[ijk[:, 2], ijk[:, 1], ijk[:, 0]], [1, 2]))


def test_empty_label_map_round_trip(tmp_path):
    """A label map without any label still writes (empty segmentation) and reads back."""
    vol = Volume(np.zeros((4, 5, 6), np.uint8), read_volume(data_path("itksnap-mricrop", "labels.gipl.gz"),
                                                            kind="label").geometry.subgrid((0, 0, 0), (6, 5, 4)))
    back = read_labelmap(write_labelmap(LabelMap(vol, []), tmp_path / "empty.seg.nrrd"))
    assert back.labels == [] and not back.volume.array.any()
