"""The module as clinicians use it, emulated on slicer-core (real Slicer C++ classes, no application, no Qt):
two-click boxes (Slicer's own padding), thickened boxes, boxes and points in any view through the logic, Slicer
5.8's segment API, the parameter node saved and reloaded with the scene, cancelled placements, and the self-test.

Real data: BraTS 2013 pat0002 FLAIR with its expert tumour (labels > 0, largest component: slices 67-127).
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import data_path
from scipy import ndimage
from slicer_env import SlicerEnv, array_of

from MRISegAssistLib import nodes, selftest
from MRISegAssistLib.logic import MRISegAssistLogic
from MRISegAssistLib.params import Parameters
from mrisegassist.errors import InputError
from mrisegassist.service.views import VIEWS


@pytest.fixture
def env() -> SlicerEnv:
    return SlicerEnv()


@pytest.fixture
def logic(env) -> MRISegAssistLogic:
    return MRISegAssistLogic(env.scene, device="cpu")


@pytest.fixture
def pat0002(env):
    node = env.load_volume(data_path("brats2013-deepmedic", "pat0002", "flair.nii.gz"), "pat0002 flair")
    labels = array_of(env.load_volume(data_path("brats2013-deepmedic", "pat0002", "labels.nii.gz"), "labels", True))
    return node, selftest.largest_component(labels > 0)


def slice_views(volume, roi, drawn_in: str) -> list:
    """Slice-view planes as Slicer's three views show them right after a box was drawn: the drawing view's plane
    through the box's centre, the other two at the volume's centre."""
    centre = np.zeros(3)
    roi.GetCenterWorld(centre)
    middle = (nodes.ijk_to_ras(volume) @ np.r_[(np.array(volume.GetImageData().GetDimensions()) - 1) / 2, 1])[:3]
    return [(np.array(n), centre if view == drawn_in else middle) for view, n in VIEWS.items()]


def dice(a, b) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def segment(logic, volume, prompt_nodes, name="lesion") -> np.ndarray:
    seg = logic.segment_from_rois(volume, [prompt_nodes], names=[name])
    return nodes.read_segments(seg, volume, [seg.GetSegmentation().GetSegmentIdBySegmentName(name)]) > 0


# ------------------------------------------------------------------------------------------------ boxes
def test_two_click_box_reaches_the_lesions_full_extent(env, logic, pat0002):
    """A box drawn with two clicks on the tumour's middle axial slice: Slicer pads its thickness to its shortest
    side (here 45 slices), yet it is a flat box on that slice, so the result follows the tumour over its whole
    extent (slices 67-127), not only the padded slices (the issue measured 75-119 and Dice 0.872)."""
    volume, tumour = pat0002
    roi = selftest.two_click_box(env.scene, volume, tumour, "axial", record=False)
    size = np.array(roi.GetSize())
    assert 2 in nodes.padded_axes(roi) and size[2] == min(size[:2]) and size[2] > 30  # Slicer's own padding
    assert nodes.roi_view(roi, volume) == (None, False)  # not recorded yet: it would bound the object
    assert logic.finish_placement(roi, slice_views(volume, roi, "axial"))  # the panel, when the drawing ends
    normal, flat = nodes.roi_view(roi, volume)
    assert flat and np.allclose(np.abs(normal), VIEWS["axial"])
    mask = segment(logic, volume, [roi])
    ks = np.nonzero(mask.any(axis=(1, 2)))[0]
    print(f"two-click box: slices {ks[0]}-{ks[-1]} (tumour 67-127), Dice {dice(mask, tumour):.3f}")
    assert ks[0] <= 70 and ks[-1] >= 124
    assert dice(mask, tumour) > 0.89


def test_a_thickened_box_bounds_the_object(env, logic, pat0002):
    """The same box, recorded at placement and then thickened by the user to slices 90-110: it now bounds the
    object (its slices and rectangle), as a box drawn around it does."""
    volume, tumour = pat0002
    roi = selftest.two_click_box(env.scene, volume, tumour, "axial")
    assert nodes.roi_view(roi, volume)[1]
    size = list(roi.GetSize())
    size[2] = 21.0
    centre = list(roi.GetCenter())
    centre[2] = float((nodes.ijk_to_ras(volume) @ [0, 0, 100, 1])[2])
    roi.SetCenter(*centre)
    roi.SetSize(*size)
    normal, flat = nodes.roi_view(roi, volume)
    assert not flat and normal is not None
    mask = segment(logic, volume, [roi])
    ks = np.nonzero(mask.any(axis=(1, 2)))[0]
    assert 89 <= ks[0] and ks[-1] <= 111 and len(ks) >= 19


@pytest.mark.parametrize("view", ["coronal", "sagittal"])
def test_boxes_drawn_in_other_views(env, logic, pat0002, view):
    """Two-click boxes in the coronal and sagittal views of the axial volume propagate across that view's slices:
    Dice within 0.05 of the axial view's (the issue measured 0.001 before)."""
    volume, tumour = pat0002
    axial = dice(segment(logic, volume, [selftest.two_click_box(env.scene, volume, tumour, "axial")]), tumour)
    roi = selftest.two_click_box(env.scene, volume, tumour, view)
    mask = segment(logic, volume, [roi], view)
    summary = logic.last_result.objects[0]
    assert summary.slice_axis == {"coronal": "j", "sagittal": "i"}[view]
    print(f"{view} box: Dice {dice(mask, tumour):.3f} (axial {axial:.3f})")
    assert abs(dice(mask, tumour) - axial) <= 0.05


def test_points_through_the_logic(env, logic, pat0002):
    """Point lists as prompts: a positive point alone finds the tumour; a negative point list in the same object
    removes the part it is on. Placement records the slice view the points were clicked in."""
    volume, tumour = pat0002
    k = 97
    depth = ndimage.distance_transform_edt(tumour[k])
    j, i = np.unravel_index(int(np.argmax(depth)), depth.shape)
    positive = logic.new_point_list(True)
    positive.AddControlPointWorld(*selftest._world(volume, (i, j, k)))
    axial_plane = [(np.array(VIEWS["axial"]), selftest._world(volume, (0, 0, k)))]
    assert logic.finish_placement(positive, axial_plane)
    assert positive.GetAttribute(nodes.ROI_VIEW) is not None
    prompt = nodes.prompt_from_rois(volume, [positive], 1)
    assert prompt.points[0].positive and prompt.view is not None and not prompt.boxes
    mask = segment(logic, volume, [positive])
    assert dice(mask, tumour) > 0.8
    kk, jj, ii = np.nonzero(mask)
    top = int(kk.max()) - 2
    sel = kk == top
    negative = logic.new_point_list(False)
    negative.AddControlPointWorld(*selftest._world(volume, (int(ii[sel][0]), int(jj[sel][0]), top)))
    cut = segment(logic, volume, [positive, negative])
    assert cut.sum() < mask.sum() and not (cut & ~mask).any()


# ------------------------------------------------------------------------------------- Slicer 5.8's API
def test_workflows_with_slicer_58_segment_api(env, logic, pat0002, tmp_path, monkeypatch):
    """Slicer 5.8 has no vtkSegment.SetTerminology / GetTerminology (5.10+). With the version switch set as on 5.8,
    every call into those methods is recorded by a profiler: auto-segmentation (a U-Net with terminology), a box
    prompt and undo run without any, the terminology lands in the segment's tag, and undo removes what was made."""
    from test_mrml_logic import TUMOUR, tiny_model

    volume, tumour = pat0002
    monkeypatch.setattr(nodes, "SEGMENT_TERMINOLOGY_API", False)
    calls = []

    def audit(frame, event, arg):
        if event == "c_call" and getattr(arg, "__name__", "") in ("SetTerminology", "GetTerminology"):
            calls.append(arg.__name__)

    entry = tiny_model(tmp_path / "tiny")
    count = env.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    sys.setprofile(audit)
    try:
        seg = logic.auto_segment({"flair": volume, "t1": volume}, model=str(entry.folder))
        segment_ = seg.GetSegmentation().GetSegment(seg.GetSegmentation().GetSegmentIdBySegmentName("Tumour"))
        terminology = nodes.segment_terminology(segment_)
        mask = segment(logic, volume, [selftest.two_click_box(env.scene, volume, tumour, "axial")])
        assert logic.undo_last() and logic.undo_last()
    finally:
        sys.setprofile(None)
    assert calls == []
    assert terminology == TUMOUR
    assert dice(mask, tumour) > 0.85
    assert env.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == count


# --------------------------------------------------------------------------------- state in the scene
def test_parameter_node_saved_and_reloaded_with_the_scene(env, logic, pat0002, tmp_path):
    """Inputs, objects (a two-click box and positive/negative point lists), atlas boxes and settings are written
    with the scene (.mrml + data files) and come back in a new scene; the reloaded objects segment the same
    mask. The server token is not saved."""
    volume, tumour = pat0002
    state = logic.parameters()
    state.flair = volume
    state.engine, state.strategy, state.cascade = "classical", "B", False
    state.zRangeEnabled, state.zMin, state.zMax = True, 60, 130
    state.computeMode, state.serverUrl, state.device = "remote", "http://gpu-box:8765", "cpu"
    roi = selftest.two_click_box(env.scene, volume, tumour, "axial", "tumour box")
    negative = logic.new_point_list(False, "not tumour")
    negative.AddControlPointWorld(*selftest._world(volume, (120, 120, 70)))
    atlas_roi = nodes.roi_from_extent(env.scene, volume, (10, 20, 10, 20, 5, 9), "atlas box")
    state.add_to_object(0, roi)
    state.add_to_object(0, negative)
    state.add_to_object(1, logic.new_point_list(True, "second"))
    state.set_atlas_boxes([atlas_roi])
    before = segment(logic, volume, state.objects[0], "before")
    mrml = env.save_scene(tmp_path / "scene")
    assert "gpu-box" in mrml.read_text() and "token" not in mrml.read_text().lower()

    other = SlicerEnv()
    other.load_scene(mrml)
    reloaded = Parameters.of_scene(other.scene)
    assert reloaded.flair is not None and reloaded.flair.GetName() == "pat0002 flair"
    assert (reloaded.engine, reloaded.strategy, reloaded.cascade) == ("classical", "B", False)
    assert reloaded.z_range() == (60, 130) and reloaded.computeMode == "remote"
    assert reloaded.serverUrl == "http://gpu-box:8765" and reloaded.device == "cpu"
    assert [[n.GetName() for n in group] for group in reloaded.objects] == [["tumour box", "not tumour"], ["second"]]
    assert [n.GetName() for n in reloaded.atlas_boxes] == ["atlas box"]
    box, points = reloaded.objects[0]
    assert np.allclose(box.GetSize(), roi.GetSize()) and nodes.roi_view(box, reloaded.flair)[1]
    assert not nodes.point_polarity(points) and points.GetNumberOfControlPoints() == 1
    again = MRISegAssistLogic(other.scene, device="cpu")
    state2 = reloaded
    state2.zRangeEnabled = False
    after = segment(again, reloaded.flair, reloaded.objects[0], "after")
    assert np.array_equal(after, before)


def test_cancelled_placement_leaves_nothing(env, logic, pat0002):
    """A box or point list whose placement was cancelled is removed from the scene and the objects; an unplaced
    ROI is refused instead of being segmented into an empty segment; a placed one gets its view recorded."""
    volume, tumour = pat0002
    state = logic.parameters()
    roi = logic.new_box("Object 1 box")
    state.add_to_object(0, roi)
    points = logic.new_point_list(True)
    state.add_to_object(0, points)
    with pytest.raises(InputError, match="not been drawn"):
        logic.segment_from_rois(volume, [[roi]])
    assert not logic.finish_placement(roi) and not logic.finish_placement(points)
    assert env.scene.GetNodeByID(roi.GetID()) is None and env.scene.GetNodeByID(points.GetID()) is None
    assert state.objects == [[]]
    placed = selftest.two_click_box(env.scene, volume, tumour, "coronal", record=False)
    assert logic.finish_placement(placed, slice_views(volume, placed, "coronal"))
    assert np.allclose(np.abs(nodes._vector_attribute(placed, nodes.ROI_VIEW)), VIEWS["coronal"])
    state.remove_object(0, env.scene)
    assert state.objects == []


# ------------------------------------------------------------------------------------------- self-test
def test_self_test_never_passes_without_checking():
    expected = {"tolerance": 0.05, "dice": {"a": {"value": 0.9}, "b": {"value": 1.0}}}
    assert selftest.compare({}, expected) == ["no workflow ran: nothing was checked"]
    assert selftest.compare({"a": 0.9}, expected, ["a", "b"]) == ["b: not run (expected Dice {'value': 1.0})"]
    assert selftest.compare({"a": 0.8, "b": 1.0}, expected, ["a", "b"])  # below its expectation
    assert selftest.compare({"a": 0.88, "b": 1.0}, expected, ["a", "b"]) == []
    stored = selftest.load_expected()
    assert set(selftest.SYNTH_RESULTS) <= set(stored["dice"])
    assert {"sample/storage order", "sample/undo"} <= set(stored["dice"])


@pytest.mark.slow
def test_self_test_workflows_on_the_synthetic_case(env, logic, tmp_path):
    """The self-test's logic-level part on slicer-core: every workflow on the case it builds, checked against the
    stored expectations (exact synthetic labels; the atlas check against the case's CSF), and the storage-order
    invariant it runs on Slicer's Sample Data, run here on the synthetic FLAIR."""
    pytest.importorskip("nilearn", reason="the synthetic case is built on the MNI152 template nilearn ships")
    results = selftest.run_synthetic(logic, lambda p, n, lab: env.load_volume(p, n, lab), tmp_path / "synth")
    flair = env.load_volume(tmp_path / "synth" / "flair.nii.gz", "flair again")
    results.update(selftest.run_invariants(logic, flair))
    print(results)
    required = list(selftest.SYNTH_RESULTS) + ["sample/storage order", "sample/undo"]
    assert selftest.compare(results, selftest.load_expected(), required) == []
