"""Cascade refinement (strategies C and D): enlargement math and the second pass on real expert labels."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pytest
from conftest import data_path

from mrisegassist.atlas.cascade import (AREA_FACTOR, HEIGHT_FACTOR, cascade_prompt, enlarge_box, enlarge_range,
                                        run_cascade)
from mrisegassist.errors import InputError
from mrisegassist.prompt import get_engine
from mrisegassist.prompt.base import Box2D, ObjectPrompt, ObjectResult
from mrisegassist.prompt.strategies import boxes_for_object, z_extent
from mrisegassist.volume import read_volume


def _area(b: Box2D) -> int:
    return (b.i1 - b.i0 + 1) * (b.j1 - b.j0 + 1)


@pytest.mark.parametrize("w,h", [(40, 60), (25, 31), (100, 7), (3, 3)])
def test_box_enlargement_adds_at_least_ten_percent_area_about_the_centre(w, h):
    box = Box2D(5, 50, 60, 50 + w - 1, 60 + h - 1)
    big = enlarge_box(box, (20, 300, 300))
    ratio = _area(big) / _area(box)
    assert ratio >= AREA_FACTOR - 1e-9
    # rounded up to whole voxels per side: at most one extra voxel per axis beyond the exact growth
    assert (big.i1 - big.i0 + 1) <= math.ceil(w * math.sqrt(AREA_FACTOR)) and \
        (big.j1 - big.j0 + 1) <= math.ceil(h * math.sqrt(AREA_FACTOR))
    if min(w, h) >= 25:
        assert ratio < 1.2
    # centred: the two sides grow by the same amount or differ by one voxel
    assert abs((box.i0 - big.i0) - (big.i1 - box.i1)) <= 1 and abs((box.j0 - big.j0) - (big.j1 - box.j1)) <= 1
    assert big.k == box.k and big.i0 <= box.i0 and big.i1 >= box.i1 and big.j0 <= box.j0 and big.j1 >= box.j1


def test_range_enlargement_adds_twenty_percent_height_and_clips_to_the_volume():
    assert enlarge_range((10, 29), 100) == (8, 31)  # 20 slices -> 24
    lo, hi = enlarge_range((40, 44), 100)            # 5 slices -> 6
    assert hi - lo + 1 == 6 and lo <= 40 and hi >= 44
    assert enlarge_range((0, 49), 60) == (0, 54)     # clipped at 0, the top end still grows
    assert enlarge_range((0, 59), 60) == (0, 59)
    box = enlarge_box(Box2D(0, 0, 0, 99, 9), (1, 10, 100))
    assert (box.i0, box.i1, box.j0, box.j1) == (0, 99, 0, 9)
    for bad in (lambda: enlarge_range((0, 5), 10, 0.9), lambda: enlarge_box(box, (1, 10, 100), 0.5)):
        with pytest.raises(InputError):
            bad()
    assert HEIGHT_FACTOR == pytest.approx(1.2)


@pytest.fixture(scope="module")
def crop():
    folder = data_path("itksnap-mricrop")
    return (read_volume(folder / "t1.gipl.gz"), read_volume(folder / "labels.gipl.gz", kind="label").array)


def _result(oid: int, mask: np.ndarray, name: str = "", weak: Optional[np.ndarray] = None) -> ObjectResult:
    """A result from a full-volume mask (logit 4 inside, -4 outside; 1 on ``weak`` voxels)."""
    logits = np.where(mask, 4.0, -4.0).astype(np.float32)
    if weak is not None:
        logits[weak] = 1.0
    return ObjectResult(oid, logits, mask.copy(), name=name)


def test_cascade_prompts_come_from_the_first_pass_masks(crop):
    _, labels = crop
    ventricle = labels == 3  # fourth ventricle, expert label
    first = _result(3, ventricle, "fourth-ventricle")
    c = cascade_prompt(first, "C")
    assert c.z_range == z_extent(ventricle) and c.boxes == boxes_for_object(ventricle, "A")
    d = cascade_prompt(first, "D", strategy="B")
    assert len(d.boxes) == 3
    z0, z1 = z_extent(ventricle)
    assert d.z_range[1] - d.z_range[0] + 1 >= math.ceil(1.2 * (z1 - z0 + 1)) - 1  # clipped at slice 0 at most
    for big, small in zip(d.boxes, boxes_for_object(ventricle, "B")):
        assert _area(big) >= AREA_FACTOR * _area(small)
    assert cascade_prompt(_result(4, np.zeros_like(ventricle)), "D") is None
    with pytest.raises(InputError):
        cascade_prompt(first, "E")


def test_second_pass_refines_and_keeps_excluded_and_empty_objects(crop):
    image, labels = crop
    engine = get_engine("classical")
    prepared = engine.prepare(image.array)
    names = {3: "fourth-ventricle", 2: "third-ventricle", 4: "hippocampus-right"}
    prompts = [ObjectPrompt(v, boxes_for_object(labels == v, "A"), z_extent(labels == v), n) for v, n in names.items()]
    first = engine.segment(prepared, prompts)
    first.append(_result(9, np.zeros(labels.shape, bool), "empty"))
    second = run_cascade(engine, prepared, first, "D", exclude=[2])
    assert [r.object_id for r in second] == [3, 2, 4, 9]
    assert second[1] is first[1] and second[3] is first[3]  # excluded / empty: first pass kept
    assert second[0] is not first[0]
    m = second[0].full_mask()
    assert m.any()
    # the second pass stays inside its enlarged z-range
    z = cascade_prompt(first[0], "D").z_range
    assert not m[: z[0]].any() and not m[z[1] + 1:].any()
    # the prompted slice of the second pass is segmented inside its (enlarged) box
    box = cascade_prompt(first[0], "D").boxes[0]
    assert m[box.k, box.j0:box.j1 + 1, box.i0:box.i1 + 1].any()
    assert box.k in second[0].slices


class _Recorder:
    """A promptable engine that records the prompts of the second pass and returns empty results."""

    def __init__(self) -> None:
        self.prompts: list[ObjectPrompt] = []

    def segment(self, prepared, prompts, *, progress=None, cancel=None):
        self.prompts = list(prompts)
        return [_result(p.object_id, np.zeros(prepared, bool), p.name) for p in prompts]


def test_cascade_prompts_come_from_the_fused_first_pass(crop):
    """Object 2's raw first-pass mask spills over object 3 (expert third and fourth ventricle), with weaker
    logits there: fused, those voxels are object 3's, so object 2's second-pass box, z-range and bounds come
    from the third ventricle alone, and object 3's from the fourth ventricle."""
    from mrisegassist.prompt.strategies import mask_bounds

    _, labels = crop
    third, fourth = labels == 2, labels == 3
    spill = _result(2, third | fourth, "third-ventricle", weak=fourth)
    first = [spill, _result(3, fourth, "fourth-ventricle")]
    engine = _Recorder()
    run_cascade(engine, labels.shape, first, "C")
    by_id = {p.object_id: p for p in engine.prompts}
    for oid, mask in ((2, third), (3, fourth)):
        assert by_id[oid].z_range == z_extent(mask) and by_id[oid].bounds == mask_bounds(mask)
        assert by_id[oid].boxes == boxes_for_object(mask, "A")
    assert cascade_prompt(spill, "C").z_range == z_extent(third | fourth)  # its raw mask would have said this
    d = cascade_prompt(spill, "D", mask=third)
    i0, j0, i1, j1 = mask_bounds(third)
    assert d.bounds[0] <= i0 and d.bounds[1] <= j0 and d.bounds[2] >= i1 and d.bounds[3] >= j1  # enlarged
    assert (d.bounds[2] - d.bounds[0] + 1) * (d.bounds[3] - d.bounds[1] + 1) >= \
        AREA_FACTOR * (i1 - i0 + 1) * (j1 - j0 + 1)
