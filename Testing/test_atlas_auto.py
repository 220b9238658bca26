"""Automatic prompts end to end through the service (``Service.auto``): mask / U-Net components -> prompts ->
engine (real MS lesions, expert labels), atlas prompts -> engine -> cascade -> label map (ITK-SNAP crop), and
the ``atlas`` / ``auto`` commands."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import data_path
from scipy import ndimage

from mrisegassist.atlas import auto
from mrisegassist.atlas.builtin import mricron_dir
from mrisegassist.atlas.references import load_reference_set
from mrisegassist.cli import main
from mrisegassist.errors import InputError
from mrisegassist.labels import LabelMap, read_labelmap
from mrisegassist.prompt.strategies import z_extent
from mrisegassist.service import ATLAS_ENGINE, AtlasBoxesRequest, AutoRequest, AutoSegmentRequest, Service
from mrisegassist.volume import Geometry, Volume, read_volume, resample_to, write_volume


@pytest.fixture(scope="module")
def ms07():
    folder = data_path("ms-lesjak", "patient07")
    return read_volume(folder / "flair.nii.gz", name="flair"), read_volume(folder / "lesions.nii.gz", kind="label")


def _dice(a, b) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def test_mask_components_become_one_prompt_each(ms07):
    flair, lesions = ms07
    structure = np.ones((3, 3, 3), bool)
    comp, n = ndimage.label(lesions.array > 0, structure)
    sizes = np.bincount(comp.ravel())[1:]
    prompts = auto.mask_prompts(lesions, flair, "B", min_voxels=50)
    assert len(prompts) == int((sizes >= 50).sum()) == 10
    assert [p.object_id for p in prompts] == list(range(1, 11))
    for p, label in zip(prompts, np.argsort(-sizes, kind="stable")[:10] + 1):
        obj = comp == label
        assert p.z_range == z_extent(obj) and p.name == f"object-{p.object_id}"
        for b in p.boxes:  # each box is the component's bounding rectangle on its slice
            jj, ii = np.nonzero(obj[b.k])
            assert (b.i0, b.j0, b.i1, b.j1) == (ii.min(), jj.min(), ii.max(), jj.max())
    with pytest.raises(InputError, match="empty"):
        auto.mask_prompts(np.zeros(flair.array.shape, np.uint8), flair)
    with pytest.raises(InputError, match="shape"):
        auto.mask_prompts(np.ones((3, 3, 3), np.uint8), flair)


def test_mask_on_another_grid_is_resampled(ms07):
    flair, lesions = ms07
    g = lesions.geometry
    coarse = Geometry((g.size[0] // 2, g.size[1] // 2, g.size[2] // 2), (2.0, 2.0, 2.0),
                      tuple(np.asarray(g.origin) + 0.5), g.direction)
    small = resample_to(lesions, coarse, "nearest")
    prompts = auto.mask_prompts(small, flair, "A", min_voxels=50)
    assert prompts and all(0 <= p.boxes[0].k < flair.array.shape[0] for p in prompts)


def test_refining_lesion_components_matches_the_expert_mask(ms07):
    flair, lesions = ms07
    ref = lesions.array > 0
    keep = ndimage.label(ref, np.ones((3, 3, 3), bool))[0]
    sizes = np.bincount(keep.ravel())
    sizes[0] = 0
    big = np.isin(keep, np.nonzero(sizes >= 100)[0])  # the 4 largest lesions (107-210 voxels)
    mask = flair.with_array(big.astype(np.uint8), "4 largest lesions")
    result = Service("cpu").auto(AutoRequest(flair, "classical", "D", mask=mask))
    assert isinstance(result.labels, LabelMap) and result.labels.volume.geometry.same_as(flair.geometry)
    assert [o.label for o in result.objects] == [1, 2, 3, 4] and all(o.cascaded for o in result.objects)
    pred = result.labels.volume.array > 0
    assert _dice(pred, big) > 0.5  # expert lesion masks, weights-free engine
    assert result.timings["cascade_s"] > 0


def test_unet_output_components_are_refined(ms07):
    """The shipped MS model's output on a real FLAIR (patient07, not trained on): each of its components becomes
    one prompt of the engine, and the refined label map stays on the FLAIR grid."""
    flair, lesions = ms07
    service = Service("cpu")
    unet = AutoSegmentRequest({"flair": flair}, "ms-lesions-2d")
    try:
        network = service.auto_segment(unet).labels.volume.array > 0
    except InputError as exc:
        pytest.skip(f"the MS model is not usable here: {exc}")
    expected = auto.mask_prompts(flair.with_array(network.astype(np.uint8)), flair, min_voxels=3)
    result = service.auto(AutoRequest(flair, "classical", unet=unet))
    assert result.workflow == "auto" and len(result.objects) == len(expected) > 0
    assert [o.boxes for o in result.objects] == [p.boxes for p in expected]
    assert result.labels.volume.geometry.same_as(flair.geometry)


@pytest.fixture(scope="module")
def crop():
    if not (mricron_dir() / "aal.nii.gz").is_file():
        pytest.skip("Colin27/AAL not installed (apt-get install mricron-data)")
    folder = data_path("itksnap-mricrop")
    return folder, read_volume(folder / "t1.gipl.gz", name="crop")


def test_atlas_prompts_engine_cascade_label_map(crop, tmp_path, monkeypatch):
    monkeypatch.setenv("MRISEGASSIST_CACHE", str(tmp_path))
    _, image = crop
    refset = load_reference_set("builtin:colin27", ["third-ventricle", "hippocampus-left"])
    atlas = AtlasBoxesRequest(image, "builtin:colin27", ["third-ventricle", "hippocampus-left"])
    service = Service("cpu")
    result = service.auto(AutoRequest(image, "classical", "C", atlas=atlas, refine=False))
    labels = result.labels
    assert [(i.value, i.name) for i in labels.labels] == [(1, "third-ventricle"), (2, "hippocampus-left")]
    assert labels.labels[0].color == tuple(refset.structure("third-ventricle").color)
    values = set(np.unique(labels.volume.array).tolist())
    assert values <= {0, 1, 2} and 1 in values
    third, hippo = result.objects
    # the third ventricle is excluded from the cascade (thin): its first pass is kept as is
    assert third.cascaded is False and abs(third.volume_ml - third.first_pass_ml) < 1e-9
    assert hippo.cascaded == (hippo.first_pass_ml > 0)
    assert result.boxes is not None and "atlas_total_s" in result.timings
    # the segmented third ventricle lies inside its atlas z-range
    z = result.boxes.get("third-ventricle").z_range
    ks = np.nonzero((labels.volume.array == 1).any(axis=(1, 2)))[0]
    assert z[0] <= ks.min() and ks.max() <= z[1]
    # with the rules (the default): one reference gives no evidence to learn from, so every structure keeps
    # the atlas's label fusion, whatever the engine found (reported as its first pass)
    ruled = service.auto(AutoRequest(image, "classical", "C", atlas=atlas))
    assert [o.rule for o in ruled.objects] == ["fusion", "fusion"] and "no evidence" in ruled.rules
    fused = service.auto(AutoRequest(image, ATLAS_ENGINE, atlas=atlas)).array
    np.testing.assert_array_equal(ruled.array, fused)
    assert [o.first_pass_ml for o in ruled.objects] == [o.first_pass_ml for o in result.objects]


def test_the_targets_registration_is_kept_for_the_next_request_on_it(crop, tmp_path, monkeypatch):
    """Asking again on the same volume (here with one more structure) reuses its registration; other voxels, a
    request with ``use_cache`` off, another client session's cache and a cleared cache register it again."""
    import mrisegassist.atlas.space as space
    from mrisegassist.service.core import PreparedCache

    monkeypatch.setenv("MRISEGASSIST_CACHE", str(tmp_path))
    _, image = crop
    calls = []
    original = space.register

    def counting(moving, *args, **kwargs):
        calls.append(moving.label)
        return original(moving, *args, **kwargs)

    monkeypatch.setattr(space, "register", counting)
    service = Service("cpu")
    first = service.atlas_boxes(AtlasBoxesRequest(image, "builtin:colin27", ["third-ventricle"]))
    assert calls == ["crop"] and first.timings["target_registration_s"] > 0.5
    again = service.atlas_boxes(AtlasBoxesRequest(image, "builtin:colin27", ["third-ventricle",
                                                                             "hippocampus-left"]))
    assert calls == ["crop"] and again.timings["target_registration_s"] < 0.1
    assert again.boxes.get("third-ventricle") == first.boxes.get("third-ventricle")
    edited = image.with_array(image.array.copy())
    edited.array[0, 0, 0] += 1
    service.atlas_boxes(AtlasBoxesRequest(edited, "builtin:colin27", ["third-ventricle"]))
    service.atlas_boxes(AtlasBoxesRequest(image, "builtin:colin27", ["third-ventricle"], use_cache=False))
    service.atlas_boxes(AtlasBoxesRequest(image, "builtin:colin27", ["third-ventricle"]), cache=PreparedCache())
    assert calls == ["crop"] * 4
    service.cache.clear()  # the scene was closed (the in-process client's forget_volumes)
    service.atlas_boxes(AtlasBoxesRequest(image, "builtin:colin27", ["third-ventricle"]))
    assert calls == ["crop"] * 5


def test_service_applies_the_rules_shipped_for_a_builtin_set(crop, monkeypatch):
    """``builtin:brain`` (Colin27 + MNI152) with the classical engine: the rules come from the file shipped in
    the package, no learning run; each structure's label is what its shipped rule makes of the engine's own
    result and the score maps (the default cache: the built-in atlases are not rebuilt)."""
    from mrisegassist.atlas import refine

    monkeypatch.setattr(refine, "learn_refinement", lambda *a, **k: pytest.fail("rules learnt at run time"))
    _, image = crop
    names = ["lateral-ventricle-left", "lateral-ventricle-right", "caudate-left", "third-ventricle"]
    path = refine.shipped_path("brain", "classical", "A")
    shipped = refine.Refinement.from_json(json.loads(path.read_text()))
    service = Service("cpu")
    atlas = AtlasBoxesRequest(image, "builtin:brain", names)
    result = service.auto(AutoRequest(image, "classical", atlas=atlas))
    assert result.rules.startswith(f"shipped ({path.name})") and "leave-one-source-out" in result.rules
    assert [o.rule for o in result.objects] == [shipped.rules[o.name].kind for o in result.objects]
    plain = service.auto(AutoRequest(image, "classical", atlas=atlas, refine=False))
    boxes = auto.atlas_boxes(image, load_reference_set("builtin:brain", names))
    np.testing.assert_array_equal(result.array, refine.refine_labels(boxes, plain.array, shipped))
    for o in result.objects:
        assert o.voxels == int((result.array == o.label).sum())
    # --engine atlas: label fusion at the shipped fusion thresholds; a user's threshold replaces its rule
    fusion = service.auto(AutoRequest(image, ATLAS_ENGINE, atlas=atlas))
    atlas_rules = refine.Refinement.from_json(json.loads(refine.shipped_path("brain", "atlas", "A").read_text()))
    np.testing.assert_array_equal(fusion.array, refine.refine_labels(boxes, None, atlas_rules))
    given = service.auto(AutoRequest(image, ATLAS_ENGINE, atlas=AtlasBoxesRequest(
        image, "builtin:brain", names, thresholds={"caudate-left": 1.0})))
    caudate = boxes.score_map("caudate-left")
    np.testing.assert_array_equal(given.array == caudate.value, caudate.mask(1.0))


def test_a_stale_shipped_file_is_reported_and_the_rules_learnt(crop, tmp_path, monkeypatch):
    """A shipped rules file stamped for other registration settings is not used: the service warns and learns
    the rules on the references (once; cached), with progress."""
    from mrisegassist.atlas import refine
    from mrisegassist.errors import InputWarning

    _, image = crop
    doc = json.loads(refine.shipped_path("brain", "atlas", "A").read_text())
    doc["made_for"]["settings"] = "0000000000000000"
    (tmp_path / "brain.atlas.json").write_text(json.dumps(doc))
    monkeypatch.setattr(refine, "SHIPPED_DIR", tmp_path)
    calls = []

    def learn(refset, engine, **kw):
        calls.append((engine, kw["strategy"], kw["progress"] is not None))
        return refine.Refinement.fusion_only(refset.structures, "", "stub")

    monkeypatch.setattr(refine, "learn_refinement", learn)
    names = ["caudate-left", "third-ventricle"]
    with pytest.warns(InputWarning, match="brain.atlas.json is stale: learnt for other settings"):
        atlas = AtlasBoxesRequest(image, "builtin:brain", names)
        result = Service("cpu").auto(AutoRequest(image, ATLAS_ENGINE, atlas=atlas), lambda f, m: None)
    assert calls == [(None, "A", True)] and result.rules == "learnt: stub"


def test_atlas_and_auto_commands(crop, tmp_path, capsys, monkeypatch):
    folder, image = crop
    monkeypatch.setenv("MRISEGASSIST_CACHE", str(tmp_path / "cache"))
    boxes = tmp_path / "boxes.json"
    rc = main(["atlas", "--target", str(folder / "t1.gipl.gz"), "--references", "builtin:colin27",
               "--structures", "lateral-ventricle-left,caudate-right", "--strategy", "B", "--deformable", "none",
               "-o", str(boxes), "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in doc["structures"]] == ["lateral-ventricle-left", "caudate-right"]
    assert all(s["found"] and len(s["boxes_ijk"]) == 3 for s in doc["structures"])
    assert json.loads(boxes.read_text())["format"] == "mrisegassist-atlas-boxes"
    out = tmp_path / "labels.nii.gz"
    rc = main(["auto", "--target", str(folder / "t1.gipl.gz"), "--boxes", str(boxes), "-o", str(out),
               "--ref-mask", str(folder / "labels.gipl.gz"), "--ref-labels", "caudate-right=7", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert [o["name"] for o in doc["objects"]] == ["lateral-ventricle-left", "caudate-right"]
    assert set(doc["comparison"]["per_structure"]) == {"caudate-right"}
    written = read_labelmap(out)
    assert written.names == {1: "lateral-ventricle-left", 2: "caudate-right"}
    # mask prompts through the command line, compared with the same mask
    mask = tmp_path / "mask.nii.gz"
    labels = read_volume(folder / "labels.gipl.gz", kind="label")
    write_volume(labels.with_array((labels.array == 3).astype(np.uint8)), mask)
    rc = main(["auto", "--target", str(folder / "t1.gipl.gz"), "--from-mask", str(mask), "-o",
               str(tmp_path / "m.nii.gz"), "--ref-mask", str(mask), "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["objects"]) == 1 and 0 <= doc["comparison"]["foreground"]["dice"] <= 1
    # bad input: clear message, exit status 2, nothing written
    rc = main(["auto", "--target", str(tmp_path / "missing.nii.gz"), "--from-mask", str(mask), "-o",
               str(tmp_path / "x.nii.gz")])
    assert rc == 2 and "no such file" in capsys.readouterr().err and not (tmp_path / "x.nii.gz").exists()
    empty = tmp_path / "empty.nii.gz"
    write_volume(Volume(np.zeros_like(labels.array), labels.geometry), empty)
    rc = main(["auto", "--target", str(folder / "t1.gipl.gz"), "--from-mask", str(empty), "-o",
               str(tmp_path / "y.nii.gz")])
    assert rc == 2 and "empty" in capsys.readouterr().err and not (tmp_path / "y.nii.gz").exists()
    rc = main(["atlas", "--target", str(folder / "t1.gipl.gz"), "--references", "builtin:colin27",
               "--structures", "corpus-callosum", "-o", str(boxes)])
    assert rc == 2 and "unknown structure" in capsys.readouterr().err
    rc = main(["auto", "--target", str(folder / "t1.gipl.gz"), "--boxes", str(boxes), "--engine", "atlas",
               "-o", str(tmp_path / "z.nii.gz")])
    assert rc == 2 and "needs --references" in capsys.readouterr().err


def test_atlas_label_fusion_without_an_engine(crop, tmp_path, monkeypatch):
    monkeypatch.setenv("MRISEGASSIST_CACHE", str(tmp_path))
    folder, image = crop
    names = ["caudate-left", "caudate-right", "third-ventricle"]
    refset = load_reference_set("builtin:colin27", names)
    boxes = auto.atlas_boxes(image, refset)
    result = Service("cpu").auto(AutoRequest(image, ATLAS_ENGINE, atlas=AtlasBoxesRequest(image, "builtin:colin27",
                                                                                          names)))
    fused = result.labels.volume.array
    np.testing.assert_array_equal(fused, auto.atlas_result(image, boxes).volume.array)
    for s in boxes.structures:
        np.testing.assert_array_equal(fused == s.value, boxes.score_map(s.name).mask())  # no overlap here
    expert = read_volume(folder / "labels.gipl.gz", kind="label").array == 7
    assert _dice(np.isin(fused, [1, 2]), expert) > 0.5  # both caudates vs the expert caudate label
