"""Score maps, thresholds, boxes and their JSON: exact on small label maps, and on the real ITK-SNAP crop with
Colin27 references (AAL + derived ventricles) compared with its expert labels."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import data_path

from mrisegassist.atlas.augment import Deformation, deformed_reference
from mrisegassist.atlas.auto import atlas_boxes
from mrisegassist.atlas.boxes import AtlasBoxes, boxes_from_scores, ras_box, score_maps
from mrisegassist.atlas.builtin import mricron_dir
from mrisegassist.atlas.references import ReferenceSet, Structure, load_reference_set
from mrisegassist.atlas.registration import RegistrationSettings
from mrisegassist.atlas.space import CommonSpace
from mrisegassist.errors import InputError
from mrisegassist.prompt.strategies import boxes_for_object, z_extent
from mrisegassist.volume import Geometry, read_volume

ITKSNAP = ["lateral-ventricle-left", "lateral-ventricle-right", "caudate-left", "caudate-right"]


def test_score_maps_are_the_fraction_of_references_agreeing():
    a = np.zeros((4, 5, 6), np.uint8)
    b, c = a.copy(), a.copy()
    a[1:3, 1:3, 1:3] = 1
    b[1:3, 1:4, 1:3] = 1
    c[2, 2, 2] = 2
    c[0, 0, 0] = 9  # a label no structure uses
    structures = [Structure("one", (1,)), Structure("both", (1, 2), threshold=0.3), Structure("two", (2,)),
                  Structure("absent", (5,))]
    maps = {m.structure.name: m for m in score_maps([a, b, c], structures)}
    np.testing.assert_allclose(maps["one"].full(), ((a == 1).astype(float) + (b == 1) + (c == 1)) / 3)
    np.testing.assert_allclose(maps["both"].full(), (np.isin(a, [1, 2]).astype(float) + np.isin(b, [1, 2])
                                                     + np.isin(c, [1, 2])) / 3)
    assert maps["one"].full().max() == pytest.approx(2 / 3) and maps["absent"].max == 0
    assert [m.value for m in maps.values()] == [1, 2, 3, 4]
    assert maps["two"].array.shape == (1, 1, 1)  # stored cropped to the structure's bounding box
    geometry = Geometry((6, 5, 4), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    boxes = boxes_from_scores(list(maps.values()), geometry, "A", thresholds={"one": 0.6})
    one, both, two, absent = boxes.structures
    assert one.found and one.z_range == (1, 2) and one.volume_ml == pytest.approx(8 * 2 / 1000)
    assert both.found and both.threshold == 0.3
    assert not two.found and "below threshold 0.5" in two.reason and "max 0.33" in two.reason
    assert not absent.found and "no reference label" in absent.reason
    assert [p.object_id for p in boxes.prompts()] == [1, 2]
    with pytest.raises(InputError, match="not found"):
        two.prompt()
    with pytest.raises(InputError, match="unknown structure"):
        boxes_from_scores(list(maps.values()), geometry, "A", thresholds={"nope": 0.5})
    with pytest.raises(InputError, match="strategy"):
        boxes_from_scores(list(maps.values()), geometry, "Z")


def test_ras_boxes_follow_oblique_geometry():
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    direction = (rot @ np.diag([1, -1, 1])).ravel()  # oblique and left-handed
    g = Geometry((50, 60, 30), (0.8, 0.9, 3.0), (10.0, -20.0, 5.0), tuple(direction))
    box = ras_box(g, 10, 20, 7, 19, 35, 7)
    o = np.asarray(box["orientation"]).reshape(3, 3)
    np.testing.assert_allclose(o.T @ o, np.eye(3), atol=1e-5)
    assert np.linalg.det(o) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(box["size"], [10 * 0.8, 16 * 0.9, 3.0])
    # the box's RAS corners are the IJK block's outer corners
    corners_ijk = np.array([[i, j, k, 1] for i in (9.5, 19.5) for j in (19.5, 35.5) for k in (6.5, 7.5)])
    ras = (g.ijk_to_ras @ corners_ijk.T).T[:, :3]
    local = (ras - np.asarray(box["center"])) @ o  # coordinates along the box axes
    np.testing.assert_allclose(np.abs(local), np.tile(np.asarray(box["size"]) / 2, (8, 1)), atol=1e-3)


@pytest.fixture(scope="module")
def crop_boxes(tmp_path_factory):
    if not (mricron_dir() / "aal.nii.gz").is_file():
        pytest.skip("Colin27/AAL not installed (apt-get install mricron-data)")
    folder = data_path("itksnap-mricrop")
    image = read_volume(folder / "t1.gipl.gz", name="itksnap crop")
    labels = read_volume(folder / "labels.gipl.gz", kind="label").array
    colin = load_reference_set("builtin:colin27", ITKSNAP)
    base = colin.references[0]
    refs = [base] + [deformed_reference(base, Deformation(seed=s, magnitude_mm=3.0)) for s in (1, 2)]
    # the paracentral lobule (AAL 69, 70) lies above the crop: it must come back as "not found"
    outside = Structure("paracentral-lobule", (69, 70))
    refset = ReferenceSet("colin27x3", refs, colin.structures + [outside], colin.label_kind)
    # affine only (fast); the deformed copies then still disagree, so scores take every value 0, 1/3, 2/3, 1
    space = CommonSpace(refset, RegistrationSettings(deformable="none"),
                        cache=tmp_path_factory.mktemp("registrations"))
    boxes = atlas_boxes(image, refset, "A", space=space)
    return image, labels, boxes, space


def test_real_score_maps_and_boxes_on_the_itksnap_crop(crop_boxes):
    image, labels, boxes, _ = crop_boxes
    assert boxes.n_references == 3 and boxes.geometry.same_as(image.geometry)
    mid = float(np.nonzero(labels == 2)[2].mean())  # midline: the third ventricle (expert label)
    i = np.arange(labels.shape[2])[None, None, :]
    expert = {"lateral-ventricle-left": (labels == 1) & (i > mid), "lateral-ventricle-right": (labels == 1) & (i <= mid),
              "caudate-left": (labels == 7) & (i > mid), "caudate-right": (labels == 7) & (i <= mid)}
    outside = boxes.get("paracentral-lobule")
    assert not outside.found and outside.boxes == [] and "no reference label lands" in outside.reason
    assert "paracentral-lobule" not in [p.name for p in boxes.prompts()]
    for s in boxes.found():
        score = boxes.score_map(s.name)
        full = score.full()
        # the common-space counts (0..3 of 3 references) interpolated linearly onto the target: every level
        # 1/3, 2/3, 1 is reached, values between them only where the references' borders meet
        assert full.min() >= 0 and full.max() <= 1
        assert all(np.isclose(full, level / 3, atol=1e-3).any() for level in (1, 2, 3))
        mask = score.mask()
        assert s.z_range == z_extent(mask) and s.boxes == boxes_for_object(mask, "A")
        # the box holds the thresholded map on its slice, and it lies on the expert structure
        b = s.boxes[0]
        assert mask[b.k].sum() == mask[b.k, b.j0:b.j1 + 1, b.i0:b.i1 + 1].sum()
        ref = expert[s.name]
        inside = ref[b.k, b.j0:b.j1 + 1, b.i0:b.i1 + 1].sum()
        assert inside > 0.5 * ref[b.k].sum(), s.name
        z0, z1 = z_extent(ref)
        overlap = min(z1, s.z_range[1]) - max(z0, s.z_range[0]) + 1
        assert overlap > 0.5 * (z1 - z0 + 1), (s.name, s.z_range, (z0, z1))


def test_boxes_json_round_trip_and_not_found(crop_boxes, tmp_path):
    image, _, boxes, space = crop_boxes
    doc = json.loads(json.dumps(boxes.to_json()))
    again = AtlasBoxes.from_json(doc)
    assert again.geometry.same_as(boxes.geometry) and again.strategy == "A"
    for a, b in zip(again.structures, boxes.structures):
        assert (a.name, a.value, a.found, a.z_range, a.boxes, a.bbox) == (b.name, b.value, b.found, b.z_range,
                                                                         b.boxes, b.bbox)
    entry = doc["structures"][0]
    k = entry["boxes_ijk"][0]
    centre = image.geometry.ijk_to_ras @ [(k["i0"] + k["i1"]) / 2, (k["j0"] + k["j1"]) / 2, k["k"], 1]
    np.testing.assert_allclose(entry["boxes_ras"][0]["center"], centre[:3], atol=1e-3)
    assert set(entry["roi_ras"]) == {"center", "size", "orientation"}
    path = boxes.write(tmp_path / "boxes.json")
    assert [p.object_id for p in AtlasBoxes.read(path).prompts()] == [p.object_id for p in boxes.prompts()]
    with pytest.raises(InputError, match="not an atlas boxes"):
        AtlasBoxes.from_json({"format": "other"})
    # "structure not found" is explicit in the JSON too, never an empty box
    entry = next(e for e in doc["structures"] if e["name"] == "paracentral-lobule")
    assert entry["found"] is False and "structure not found" in entry["reason"] and "boxes_ijk" not in entry
    assert [s.name for s in again.not_found()] == ["paracentral-lobule"]
    # strategy B: three boxes on distinct slices inside the z-range
    b = boxes_from_scores(boxes.scores, image.geometry, "B")
    for s in b.found():
        assert len(s.boxes) == 3 and all(s.z_range[0] <= x.k <= s.z_range[1] for x in s.boxes)
    # reusing the common space: the references are not registered again
    assert space.missing() == []


def test_score_maps_from_the_common_space_match_the_exact_warp(crop_boxes):
    """The fast path (score maps computed once in the common space, resampled onto the target through the
    target's registration) agrees with warping every reference label map onto the target through the composed
    transforms, then scoring: same structures found, thresholded maps with Dice > 0.95."""
    image, _, boxes, space = crop_boxes
    exact = score_maps(space.warp(image).labels, space.refset.structures)
    for fast, slow in zip(boxes.scores, exact):
        assert fast.structure.name == slow.structure.name and fast.value == slow.value
        a, b = fast.mask(), slow.mask()
        assert a.any() == b.any(), fast.structure.name
        if b.any():
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.95, fast.structure.name
