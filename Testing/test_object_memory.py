"""Per-object results kept on each object's box (issue 14): crop rules (volume border, empty, whole volume),
memory proportional to the box, and fusion of overlapping objects giving the same label map as whole volumes,
on a real BraTS case with the weights-free engine."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import data_path

from mrisegassist.prompt.base import CROP_MARGIN, OUTSIDE_LOGIT, Box2D, ObjectPrompt, ObjectResult
from mrisegassist.prompt.classical import ClassicalEngine
from mrisegassist.prompt.fusion import fuse, largest_component
from mrisegassist.volume import read_volume

SHAPE = (20, 30, 40)


def _full(mask: np.ndarray, inside: float = 3.0, around: float = -2.0) -> np.ndarray:
    """Logits: ``inside`` on the mask, ``around`` elsewhere (negative: not the object)."""
    return np.where(mask, inside, around).astype(np.float32)


def test_crop_on_the_volume_border_keeps_every_voxel_and_the_margin():
    mask = np.zeros(SHAPE, bool)
    mask[0:3, 27:30, 36:40] = True  # touches k = 0, j = 29, i = 39
    logits = _full(mask)
    r = ObjectResult(1, logits, mask)
    assert r.shape == SHAPE and r.origin == (0, 27 - CROP_MARGIN, 36 - CROP_MARGIN)
    assert r.mask.shape == (3 + CROP_MARGIN, 3 + CROP_MARGIN, 4 + CROP_MARGIN)  # clipped where the volume ends
    assert np.array_equal(r.full_mask(), mask) and np.array_equal(r.mask, mask[r.box])
    full = r.full_logits()
    np.testing.assert_array_equal(full[r.box], logits[r.box])  # the margin keeps the engine's logits
    outside = np.ones(SHAPE, bool)
    outside[r.box] = False
    assert np.all(full[outside] == OUTSIDE_LOGIT)
    assert r.contains(0, 29, 39) and not r.contains(5, 29, 39) and not r.contains(0, 0, 0)
    assert np.array_equal(r.slice_mask(1), mask[1]) and not r.slice_mask(10).any()
    labels = r.paste_into(np.zeros(SHAPE, np.uint16), 7)
    assert np.array_equal(labels == 7, mask)
    assert r.compact() is r  # already tight


def test_positive_logits_outside_the_mask_are_kept():
    mask = np.zeros(SHAPE, bool)
    mask[5:7, 5:7, 5:7] = True
    logits = _full(mask)
    logits[15, 25, 35] = 0.5  # positive but not in the mask (an engine's stray): still inside the box
    r = ObjectResult(2, logits, mask)
    assert r.box[0].stop > 15 and r.full_logits()[15, 25, 35] == 0.5


def test_empty_result_has_a_zero_size_box():
    r = ObjectResult(3, np.full(SHAPE, -5.0, np.float32), np.zeros(SHAPE, bool))
    assert r.mask.size == 0 and r.nbytes == 0 and r.voxels == 0 and r.shape == SHAPE
    assert not r.full_mask().any() and np.all(r.full_logits() == OUTSIDE_LOGIT)
    assert not r.contains(0, 0, 0) and not r.slice_mask(0).any()
    assert not fuse([r]).any() and fuse([r]).shape == SHAPE
    blank = ObjectResult.blank(4, SHAPE)  # an engine's full grid before it writes: compacts to nothing
    assert blank.mask.shape == SHAPE and blank.compact().mask.size == 0


def test_object_spanning_the_whole_volume():
    mask = np.ones(SHAPE, bool)
    r = ObjectResult(5, _full(mask), mask)
    assert r.origin == (0, 0, 0) and r.mask.shape == SHAPE and r.box == tuple(slice(0, n) for n in SHAPE)
    assert np.array_equal(fuse([r]), np.full(SHAPE, 5, np.uint16))


def test_transposed_box_matches_the_transposed_volume():
    mask = np.zeros(SHAPE, bool)
    mask[2:5, 10:20, 30:33] = True
    r = ObjectResult(6, _full(mask), mask)
    t = r.transposed((2, 0, 1))
    assert np.array_equal(t.full_mask(), np.transpose(mask, (2, 0, 1))) and t.shape == (40, 20, 30)


def test_result_memory_is_proportional_to_the_box_not_the_volume():
    """The same object in a small and a large volume holds the same bytes: 5 per box voxel (float32 + bool)."""
    sizes = {}
    for shape in (SHAPE, (155, 240, 240)):
        for side in (2, 8):
            mask = np.zeros(shape, bool)
            mask[10:10 + side, 12:12 + side, 14:14 + side] = True
            r = ObjectResult(1, _full(mask), mask)
            box_voxels = (side + 2 * CROP_MARGIN) ** 3
            assert r.nbytes == 5 * box_voxels == 5 * r.mask.size
            sizes[shape, side] = r.nbytes
    assert sizes[SHAPE, 2] == sizes[(155, 240, 240), 2] and sizes[SHAPE, 8] == sizes[(155, 240, 240), 8]


@pytest.fixture(scope="module")
def brats():
    folder = data_path("brats2013-deepmedic", "pat0001")
    flair = read_volume(folder / "flair.nii.gz").array
    tumour = read_volume(folder / "labels.nii.gz", kind="label").array > 0
    return flair, tumour


def _whole_volume_fuse(results, keep_largest_component: bool = True) -> np.ndarray:
    """The fusion rule on whole-volume logits (the behaviour before cropping): argmax over a background logit
    of 0 and every object's logits (ties: background, then the earlier object), then each object's largest
    26-connected component."""
    stack = np.stack([np.zeros(results[0].shape, np.float32)] + [r.full_logits() for r in results])
    ids = np.array([0] + [r.object_id for r in results], np.uint16)
    labels = ids[np.argmax(stack, axis=0)]
    if keep_largest_component:
        for oid in ids[1:]:
            m = labels == oid
            labels[m & ~largest_component(m)] = 0
    return labels


def test_fusion_of_overlapping_real_objects_equals_whole_volume_fusion(brats):
    """Five objects on the BraTS 2013 pat0001 tumour whose boxes overlap (the whole tumour, its halves, a
    shifted box) and one apart: the label map from cropped results equals the whole-volume rule's, voxel for
    voxel, and the objects really compete for voxels."""
    flair, tumour = brats
    ks = np.nonzero(tumour.any(axis=(1, 2)))[0]
    k = int(ks[len(ks) // 2])
    jj, ii = np.nonzero(tumour[k])
    i0, i1, j0, j1 = int(ii.min()), int(ii.max()), int(jj.min()), int(jj.max())
    im, jm = (i0 + i1) // 2, (j0 + j1) // 2
    z = (k - 5, k + 5)
    boxes = [(i0, j0, i1, j1), (i0, j0, im + 4, j1), (im - 4, j0, i1, j1), (i0 + 6, j0 - 6, i1 + 6, jm + 4),
             (20, 100, 40, 120)]
    prompts = [ObjectPrompt(n + 1, [Box2D(k, *b)], z) for n, b in enumerate(boxes)]
    engine = ClassicalEngine()
    results = engine.segment(engine.prepare(flair), prompts)
    full_bytes = flair.size * 5
    assert all(r.shape == flair.shape and r.nbytes < full_bytes / 20 for r in results)  # cropped, not whole
    claimed = sum(r.full_mask().astype(np.int32) for r in results)
    assert (claimed >= 2).sum() > 500  # the objects overlap: fusion has something to decide
    for keep in (True, False):
        fused = fuse(results, keep_largest_component=keep)
        expected = _whole_volume_fuse(results, keep)
        assert np.array_equal(fused, expected)
    assert len(np.unique(fused)) >= 4  # several objects win voxels


def test_bench_memory_command_reports_peaks_and_the_whole_volume_baseline(capsys):
    """``mrisegassist bench memory`` with small counts: one fresh process per row, figures for both modes; the
    whole-volume emulation costs tens of MB per object (float32 logits alone are 36 MB on this volume)."""
    import json

    from conftest import DATA

    from mrisegassist.cli import main

    data_path("brats2013-deepmedic", "pat0001", "brainmask.nii.gz")
    code = main(["bench", "memory", "--data", str(DATA), "--counts", "1,4", "--old-counts", "1,2", "--json"])
    doc = json.loads(capsys.readouterr().out)
    rows = doc["rows"]
    assert [(r["objects"], r["full"]) for r in rows] == [(1, False), (4, False), (1, True), (2, True)]
    assert all(r["shape"] == [155, 240, 240] and r["peak_rss_mb"] > 100 for r in rows)
    assert rows[1]["segmented"] >= 1 and rows[1]["labelled_voxels"] > 0
    assert doc["old_mb_per_object"] > 20 and code == (0 if doc["goal_met"] else 1)
