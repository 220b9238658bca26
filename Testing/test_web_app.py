"""The browser front end's application in-process (no browser): page state and callbacks on real data, with the
real Slicer views and the MRML logic underneath. The browser-driven tests are in test_web_browser.py."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from conftest import data_path

pytest.importorskip("trame_slicer", reason="trame-slicer is needed for the browser front end")
from MRISegAssistWeb.app import MRISegAssistWebApp  # noqa: E402

from mrisegassist.labels import read_labelmap  # noqa: E402
from mrisegassist.metrics import overlap_metrics  # noqa: E402


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from trame.app import get_server

    root = data_path()
    out = tmp_path_factory.mktemp("web-out")
    application = MRISegAssistWebApp(get_server("test_web_app", client_type="vue3"), data_dir=root, output_dir=out)
    yield application
    application.close()


def lesion_box(reference: np.ndarray, margin: int = 2):
    """The largest reference lesion (26-connected): its mask and a box around it on its middle slice
    (extent ``(i0, i1, j0, j1, k, k)``)."""
    labels, n = ndimage.label(reference > 0, structure=np.ones((3, 3, 3)))
    sizes = ndimage.sum(reference > 0, labels, range(1, n + 1))
    comp = int(np.argmax(sizes)) + 1
    mask = labels == comp
    ks = np.nonzero(mask.any(axis=(1, 2)))[0]
    k = int((ks.min() + ks.max()) // 2)
    js, is_ = np.nonzero(mask[k])
    return mask, (int(is_.min()) - margin, int(is_.max()) + margin, int(js.min()) - margin,
                  int(js.max()) + margin, k, k)


def test_load_study_guesses_inputs_and_reference(app):
    app.load_study("ms-lesjak/patient07")
    s = app.state
    assert s.error == "" and s.study_loaded and s.study_label == "ms-lesjak/patient07"
    names = {v["value"]: v["title"] for v in s.volumes}
    assert sorted(names.values()) == ["flair", "t1", "t1post", "t2"]
    assert names[s.input_flair] == "flair" and names[s.input_t1c] == "t1post" and names[s.base_volume] == "flair"
    assert s.reference_file == "lesions.nii.gz"
    ref = app.reference.array
    assert ref.shape == (182, 218, 182) and set(np.unique(ref)) == {0, 1}
    # the reference on the node's grid has the expert mask's volume (1.3 ml per the data README)
    assert abs(np.count_nonzero(ref) * app.reference.geometry.voxel_volume_ml - 1.3) < 0.1
    # the views show the volume
    for view in app._slice_views():
        assert view.get_background_volume_id() == s.base_volume


def test_default_model_is_the_shipped_ready_one(app):
    """The page selects the logic's default model: the shipped glioma ensemble, whose weights are here, not a
    catalog model listed first alphabetically that would need a download."""
    listed = [m["value"] for m in app.state.models]
    catalog = [c["name"] for c in app.logic.model_choices() if c["catalog"]]
    assert catalog and catalog[0] in listed and listed.index(catalog[0]) < listed.index("glioma-2d")
    assert app.state.model == app.logic.default_model() == "glioma-2d"


def test_paths_outside_the_data_folder_are_refused(app):
    app.load_study("ms-lesjak/patient07")
    for bad in ("..", "../..", "/etc", "ms-lesjak/../../..", "/tmp"):
        app.load_study(bad)
        assert "outside the data folder" in app.state.error or "'..' is not allowed" in app.state.error, bad
        assert app.state.study_label == "ms-lesjak/patient07"  # the loaded study is untouched


def test_box_propagate_metrics_undo_save(app, tmp_path):
    app.load_study("brats2013-deepmedic/pat0004")  # glioma: the box is drawn around the whole tumour on FLAIR
    assert app.state.reference_file == "labels.nii.gz"
    lesion, extent = lesion_box(app.reference.array)
    app.add_box_from_extent(extent)
    assert app.state.boxes[0]["extent"] == f"i {extent[0]}-{extent[1]}, j {extent[2]}-{extent[3]}, slice {extent[4]}"

    app.propagate()
    assert app.state.busy and app.jobs.wait(300)
    s = app.state
    assert s.error == "" and not s.busy and "1 object(s) segmented with classical" in s.info
    assert 0 < s.timing["engine_s"] <= s.timing["step_s"] and s.timing["apply_s"] > 0  # the logic's phases
    assert [seg["name"] for seg in s.segments] == ["Box 1"] and s.can_undo
    labelmap = app.current_labelmap()
    seg = labelmap.volume.array > 0
    # one box on one slice, propagated in 3D: Dice against the whole tumour (expert labels 1-4)
    dice = overlap_metrics(seg, lesion, labelmap.geometry.spacing)["dice"]
    print(f"web in-process: classical engine, brats2013 pat0004 whole tumour (expert), Dice {dice:.3f}")
    assert dice > 0.75
    # the page's metrics are the engine's metrics of the whole segmentation vs the whole reference
    row = s.metrics[0]
    expected = overlap_metrics(seg, app.reference.array > 0, labelmap.geometry.spacing)
    assert row["name"] == "All segments" and row["dice"] == round(expected["dice"], 3)
    assert "reference lesions found" in s.metrics_note

    for fmt, suffix in (("seg.nrrd", ".seg.nrrd"), ("nii.gz", ".nii.gz")):
        s.save_format, s.save_name = fmt, "../../web test"  # a hostile name stays inside the output folder
        path = app.save()
        assert path is not None and s.error == "", s.error
        assert path.endswith(f"web_test{suffix}") and str(app.output_dir) in path
        saved = read_labelmap(path)
        assert [lab.name for lab in saved.labels] == ["Box 1"]
        assert saved.volume.geometry.same_as(labelmap.geometry)
        np.testing.assert_array_equal(saved.volume.array, labelmap.volume.array)

    assert app.undo() is None and s.error == ""
    assert s.segments == [] and not s.can_undo and "undone" in s.info
    app.undo()
    assert "nothing to undo" in s.error


def test_errors_are_shown_not_raised(app):
    app.load_study("ms-lesjak/patient07")
    app.propagate()
    assert "no box yet" in app.state.error
    app.state.engine = "sam-vit-b"  # no weights here: the job fails in the worker, the page shows why
    app.add_box_from_extent((90, 100, 90, 100, 120, 120))
    app.propagate()
    app.jobs.wait(300)
    assert not app.state.busy and app.state.error and app.state.segments == []
    app.state.engine = "classical"
    app.save()
    assert "no segmentation to save" in app.state.error


def test_cancel_leaves_nothing_written(app):
    app.load_study("ms-lesjak/patient07")
    app.add_box_from_extent((90, 100, 90, 100, 120, 120))
    app.propagate()
    app.cancel()
    assert app.jobs.wait(300)
    assert app.state.info.endswith("cancelled") and app.state.error == ""
    assert app.state.segments == [] and not app.state.can_undo


def test_upload_loads_a_study_and_respects_the_limit(app):
    folder = data_path("itksnap-mricrop")
    files = [{"name": name, "size": (folder / name).stat().st_size, "content": (folder / name).read_bytes()}
             for name in ("t1.gipl.gz", "labels.gipl.gz")]
    app.upload_chunk(files[:1])
    app.upload_chunk(files[1:])
    app.upload_chunk([])
    s = app.state
    assert s.error == "" and s.study_label == "uploaded files" and s.reference_file == "labels.gipl.gz"
    assert [v["title"] for v in s.volumes] == ["t1"]
    assert sorted(np.unique(app.reference.array)) == list(range(9))  # 8 structures + background

    limit = app.uploads.budget.limit_bytes
    app.uploads.budget.limit_bytes = 100_000
    try:
        app.upload_chunk(files[:1])
        assert "exceeds the server's limit" in s.error
        assert s.study_label == "uploaded files" and app.uploads.folder is None
    finally:
        app.uploads.budget.limit_bytes = limit
