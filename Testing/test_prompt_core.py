"""Shared box-prompt machinery on real expert-labelled lesions: propagation extent/order, strategies A/B,
fusion, registry, validation. Propagation is driven by an "oracle" slice engine that answers each box with the
expert mask inside it, so the walk itself (not a model) is what is tested."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from conftest import data_path
from scipy import ndimage

from mrisegassist.errors import Cancelled, CheckpointError, InputError
from mrisegassist.progress import CancelToken
from mrisegassist.prompt import (ENGINES, cached_engines, get_engine, list_engines, release_engines)
from mrisegassist.prompt.base import OUTSIDE_LOGIT, Box2D, ObjectPrompt, ObjectResult, SliceEngine
from mrisegassist.prompt.fusion import fuse, largest_component
from mrisegassist.prompt.propagation import PropagationConfig, propagate_objects
from mrisegassist.prompt.strategies import (box_slices, boxes_for_object, objects_from_mask, prompts_from_mask,
                                            z_extent)
from mrisegassist.volume import read_volume


@pytest.fixture(scope="module")
def lesions() -> np.ndarray:
    """Expert MS lesion mask of ms-lesjak patient07 (bool [k, j, i])."""
    return read_volume(data_path("ms-lesjak", "patient07", "lesions.nii.gz"), kind="label").array > 0


@pytest.fixture(scope="module")
def components(lesions):
    return objects_from_mask(lesions, mode="components", min_voxels=10)


class OracleEngine(SliceEngine):
    """Answers a box on slice k with the reference mask inside the box (logit +4 / -4); counts calls."""

    name = "oracle"

    def __init__(self, reference: np.ndarray) -> None:
        self.reference = reference
        self.calls: list[tuple[int, tuple[int, ...]]] = []

    def prepare(self, volume, *, progress=None, cancel=None):
        return volume

    def predict_slice(self, prepared, k, box, *, cancel=None):
        self.calls.append((k, tuple(int(v) for v in box)))
        x0, y0, x1, y1 = (int(v) for v in box)
        logits = np.full(self.reference.shape[1:], -4.0, np.float32)
        inside = self.reference[k, y0:y1 + 1, x0:x1 + 1]
        logits[y0:y1 + 1, x0:x1 + 1][inside] = 4.0
        return logits, float(inside.any())


def _walk_one(reference, obj, strategy="A", z_range=None, config=None):
    engine = OracleEngine(reference)
    prompt = ObjectPrompt(1, boxes_for_object(obj, strategy), z_range)
    result = propagate_objects(engine, np.zeros(reference.shape, np.float32), [prompt], config=config)[0]
    return engine, prompt, result


def test_propagation_walks_outward_and_stops_where_the_lesion_vanishes(lesions, components):
    _, obj = components[0]  # the largest real lesion (210 voxels)
    k0, k1 = z_extent(obj)
    engine, prompt, result = _walk_one(obj, obj)
    km = prompt.boxes[0].k
    assert k0 < km < k1
    # processing order: the prompted slice, then downwards to k0, then upwards to k1
    assert result.slices == [km] + list(range(km - 1, k0 - 1, -1)) + list(range(km + 1, k1 + 1))
    assert set(result.scores) == set(result.slices)
    # every slice predicted once, plus one probe beyond each end where the lesion has vanished
    assert [c[0] for c in engine.calls] == result.slices[:km - k0 + 1] + [k0 - 1] + result.slices[km - k0 + 1:] + [k1 + 1]
    np.testing.assert_array_equal(result.mask, obj)
    assert np.all(result.logits[~result.mask] <= 0) and np.all(result.logits[:k0] == OUTSIDE_LOGIT)
    # each propagated box is the previous slice's mask box enlarged by the margin
    k_next, box_next = engine.calls[1]
    jj, ii = np.nonzero(obj[km])
    m = PropagationConfig().min_margin
    assert k_next == km - 1 and box_next == (ii.min() - m, jj.min() - m, ii.max() + m, jj.max() + m)


def test_propagation_respects_a_given_z_range(components):
    _, obj = components[0]
    k0, k1 = z_extent(obj)
    km = boxes_for_object(obj, "A")[0].k
    engine, _, result = _walk_one(obj, obj, z_range=(km - 1, km + 2))
    assert sorted(result.slices) == [km - 1, km, km + 1, km + 2]
    assert all(km - 1 <= c[0] <= km + 2 for c in engine.calls)
    assert not result.mask[:km - 1].any() and not result.mask[km + 3:].any()


def test_strategy_b_fills_gaps_once_from_the_nearer_prompt(components):
    _, obj = components[0]
    k0, k1 = z_extent(obj)
    engine, prompt, result = _walk_one(obj, obj, "B")
    ka, kb, kc = (b.k for b in prompt.boxes)
    assert sorted(result.slices) == list(range(k0, k1 + 1)) and len(set(result.slices)) == len(result.slices)
    assert len(engine.calls) == len(result.slices) + 2  # no slice predicted twice, one probe at each end
    order = result.slices
    assert order[:3] == [ka, kb, kc]
    mid = (ka + kb) // 2
    # slices up to the middle of a gap follow the lower prompt, the rest come from the upper one, walking down
    gap = [k for k in order if ka < k < kb]
    assert gap == list(range(ka + 1, mid + 1)) + list(range(kb - 1, mid, -1))


def test_strategy_b_gap_is_closed_by_the_other_side_when_one_walk_stops(components):
    _, obj = components[0]
    boxes = boxes_for_object(obj, "B")
    boxes = [boxes[0], boxes[-1]]  # two prompts with a gap of more than one slice between them
    ka, kb = (b.k for b in boxes)
    assert kb - ka > 2
    # the lower prompt's walk is blocked right after ka: the first prediction of ka + 1 (made from ka,
    # whose gap walk runs first) sees nothing
    reference = obj.copy()
    engine = OracleEngine(reference)
    blocked = ka + 1
    original = engine.predict_slice

    def predict(prepared, k, box, *, cancel=None):
        logits, score = original(prepared, k, box, cancel=cancel)
        if k == blocked and [c[0] for c in engine.calls].count(k) == 1:
            return np.full_like(logits, -4.0), 0.0
        return logits, score

    engine.predict_slice = predict
    result = propagate_objects(engine, np.zeros(obj.shape, np.float32), [ObjectPrompt(1, boxes)])[0]
    assert set(range(ka, kb + 1)) <= set(result.slices)  # no gap: reached from kb downwards
    assert [c[0] for c in engine.calls].count(blocked) == 2
    assert result.slices.index(blocked) > result.slices.index(kb)


def rule_slice(k0: int, k1: int, f: Fraction) -> int:
    """Independent statement of the A/B rule: the slice nearest to ``k0 + f (k1 - k0)``; a tie goes towards the
    middle of the range, and at the middle itself to the lower slice."""
    position = k0 + f * (k1 - k0)
    lo, hi = math.floor(position), math.ceil(position)
    if position - lo != hi - position:
        return lo if position - lo < hi - position else hi
    middle = Fraction(k0 + k1, 2)
    if abs(lo - middle) != abs(hi - middle):
        return lo if abs(lo - middle) < abs(hi - middle) else hi
    return lo


def test_box_slice_rule_on_every_small_range():
    """The one A/B rule (``box_slices``) on all 132 (k0, k1, strategy) cases with 0 <= k0 <= k1 <= 10, and the
    ROI -> prompt conversion of the front ends (``service.prompt_from_extents``) follows it."""
    from mrisegassist.service import prompt_from_extents

    fractions = {"A": (Fraction(1, 2),), "B": (Fraction(1, 4), Fraction(1, 2), Fraction(3, 4))}
    cases = 0
    for k0 in range(11):
        for k1 in range(k0, 11):
            for strategy, fs in fractions.items():
                expected = sorted({rule_slice(k0, k1, f) for f in fs})
                assert box_slices((k0, k1), strategy) == expected, (k0, k1, strategy)
                prompt = prompt_from_extents([(3, 9, 4, 8, k0, k1)], 1, (12, 16, 16), strategy)
                assert [b.k for b in prompt.boxes] == expected
                cases += 1
    assert cases == 132
    assert box_slices((0, 3), "A") == [1] and box_slices((0, 3), "B") == [1, 2]
    assert box_slices((8, 14), "B") == [10, 11, 12] and box_slices((80, 100), "B") == [85, 90, 95]
    with pytest.raises(InputError, match="strategy"):
        box_slices((0, 3), "C")


def test_strategies_a_b_put_boxes_at_middle_and_quartiles(components):
    for _, obj in components[:6]:
        k0, k1 = z_extent(obj)
        (a,) = boxes_for_object(obj, "A")
        assert a.k == box_slices((k0, k1), "A")[0] == (k0 + k1) // 2
        b = boxes_for_object(obj, "B")
        assert [x.k for x in b] == box_slices((k0, k1), "B")
        for box in b + [a]:
            jj, ii = np.nonzero(obj[box.k])
            assert box.as_tuple() == (box.k, ii.min(), jj.min(), ii.max(), jj.max())
        m = boxes_for_object(obj, "A", margin=2)[0]
        assert (m.i0, m.j1) == (a.i0 - 2, a.j1 + 2)


def test_strategy_b_deduplicates_boxes_of_thin_lesions(lesions):
    thin = [m for _, m in objects_from_mask(lesions, min_voxels=1) if z_extent(m)[1] - z_extent(m)[0] <= 1]
    assert thin, "patient07 has lesions on one or two slices"
    for obj in thin:
        ks = [b.k for b in boxes_for_object(obj, "B")]
        assert len(ks) == len(set(ks)) <= 2


def test_objects_from_mask_labels_and_components():
    labels = read_volume(data_path("brats2013-deepmedic", "pat0001", "labels.nii.gz"), kind="label").array
    objs = objects_from_mask(labels, mode="labels")
    assert [i for i, _ in objs] == [int(v) for v in np.unique(labels) if v > 0]
    for i, m in objs:
        assert np.array_equal(m, labels == i)
    comps = objects_from_mask(labels > 0, mode="components", min_voxels=1)
    big = objects_from_mask(labels > 0, mode="components", min_voxels=10)
    assert len(big) < len(comps) and all(m.sum() >= 10 for _, m in big)
    prompts = prompts_from_mask(labels, "B", mode="labels", with_z_range=True)
    for p, (_, m) in zip(prompts, objs):
        assert p.z_range == z_extent(m) and 1 <= len(p.boxes) <= 3
    with pytest.raises(InputError, match="mode"):
        objects_from_mask(labels, mode="blobs")
    with pytest.raises(InputError, match="strategy"):
        boxes_for_object(labels == 1, "C")


def _result(oid: int, mask: np.ndarray, logit: float) -> ObjectResult:
    logits = np.where(mask, logit, OUTSIDE_LOGIT).astype(np.float32)
    return ObjectResult(oid, logits, mask)


def test_fusion_softmax_argmax_and_largest_component(lesions, components):
    _, a = components[0]
    _, island = components[-1]  # a small real lesion elsewhere in the brain
    grown = ndimage.binary_dilation(a, iterations=2)
    r1 = _result(1, a, 3.0)
    r2 = _result(2, grown | island, 1.0)
    labels = fuse([r1, r2])
    assert labels.dtype == np.uint16 and labels.shape == a.shape
    assert np.all(labels[a] == 1)  # overlap: the higher logit wins
    assert np.all(labels[grown & ~a] == 2)
    assert not labels[island].any()  # object 2's island (smaller than its main part) is removed
    kept = fuse([r1, r2], keep_largest_component=False)
    assert np.all(kept[island] == 2)
    # negative logits never win against the background
    r3 = _result(3, island, -0.5)
    assert not fuse([r3]).any()
    # only positive voxels matter: no voxel outside the objects is labelled
    assert set(np.unique(labels)) == {0, 1, 2} and np.count_nonzero(labels) == grown.sum()


def test_fusion_component_filtering_on_real_lesions(lesions):
    """One object covering every lesion of patient07: only the largest lesion survives the filter."""
    res = _result(1, lesions, 2.0)
    fused = fuse([res])
    assert np.array_equal(fused > 0, largest_component(lesions))
    assert fused.sum() < lesions.sum()
    with pytest.raises(InputError, match="unique"):
        fuse([res, res])


def test_validation_errors_come_before_any_prediction(lesions, components):
    _, obj = components[0]
    engine = OracleEngine(obj)
    vol = np.zeros(obj.shape, np.float32)
    nk, nj, ni = obj.shape
    bad = [
        ([ObjectPrompt(1, [Box2D(80, 50, 50, 40, 60)])], "empty"),
        ([ObjectPrompt(1, [Box2D(nk + 3, 50, 50, 60, 60)])], "outside the volume"),
        ([ObjectPrompt(1, [Box2D(80, ni + 5, 10, ni + 9, 20)])], "outside the slice"),
        ([ObjectPrompt(1, [Box2D(80, 50, 50, 60, 60)], z_range=(90, 85))], "zero size"),
        ([ObjectPrompt(1, [Box2D(80, 50, 50, 60, 60)], z_range=(82, 90))], "outside z-range"),
        ([ObjectPrompt(1, [Box2D(80, 50, 50, 60, 60)]), ObjectPrompt(1, [Box2D(70, 5, 5, 9, 9)])], "more than once"),
        ([ObjectPrompt(2, [Box2D(80, 50, 50, 60, 60)]), ObjectPrompt(3, [])], "no box"),
        ([], "no object"),
        ([ObjectPrompt(1, [Box2D(80, 50, 50, 60, 60)], bounds=(70, 40, 60, 90))], "bounds .* are empty"),
        ([ObjectPrompt(1, [Box2D(80, 50, 50, 60, 60)], bounds=(ni + 2, 0, ni + 9, 9))], "lie outside the slice"),
        ([ObjectPrompt(1, [Box2D(80, 50, 50, 60, 60)], bounds=(70, 40, 90, 90))], "outside its bounds"),
    ]
    for prompts, message in bad:
        with pytest.raises(InputError, match=message):
            propagate_objects(engine, vol, prompts)
    assert engine.calls == []


def test_cancel_and_progress(components):
    _, obj = components[0]
    engine = OracleEngine(obj)
    token = CancelToken()
    seen = []

    def progress(fraction, message):
        seen.append(fraction)
        if len(seen) == 3:
            token.cancel()

    with pytest.raises(Cancelled):
        propagate_objects(engine, np.zeros(obj.shape, np.float32),
                          [ObjectPrompt(1, boxes_for_object(obj, "A"))], progress=progress, cancel=token)
    assert 0 < len(engine.calls) < 4
    seen.clear()
    propagate_objects(engine, np.zeros(obj.shape, np.float32), [ObjectPrompt(1, boxes_for_object(obj, "A"))],
                      progress=lambda f, m: seen.append(f))
    assert seen[-1] == 1.0 and seen == sorted(seen)


def test_registry_names_cache_and_errors(tmp_path):
    names = [e["name"] for e in list_engines()]
    assert names == ["classical", "sam-vit-b", "sam-vit-l", "sam-vit-h", "sam2.1-hiera-tiny", "sam2.1-hiera-small",
                     "sam2.1-hiera-base-plus", "sam2.1-hiera-large", "medsam2"]
    assert {e["name"]: e["needs_weights"] for e in list_engines()}["classical"] is False
    assert all(e["licence"] and e["description"] for e in list_engines())
    release_engines()
    engine = get_engine("classical")
    assert get_engine("classical", "cpu") is engine and cached_engines() == [("classical", "cpu", None)]
    release_engines()
    assert cached_engines() == [] and get_engine("classical") is not engine
    with pytest.raises(InputError, match="unknown engine 'sam3'.*classical"):
        get_engine("sam3")
    with pytest.raises(CheckpointError, match="does not exist"):
        get_engine("sam-vit-b", checkpoint=tmp_path / "missing.pth")
    with pytest.raises(InputError, match="device"):
        get_engine("sam-vit-b", device="tpu")
    assert set(ENGINES) == set(names)
    release_engines()


def test_bounds_clip_propagated_boxes_and_masks(components):
    """A lesion (expert mask) next to a made-up neighbour that joins it on every slice: without bounds the
    oracle's answers leak into the neighbour slice after slice; with the lesion's 3D ROI rectangle as
    ``bounds`` every box the engine is asked about and every kept voxel stays inside the rectangle."""
    from mrisegassist.prompt.strategies import mask_bounds

    _, obj = components[0]
    i0, j0, i1, j1 = mask_bounds(obj)
    ks = np.nonzero(obj.any(axis=(1, 2)))[0]
    reference = obj.copy()
    reference[ks.min():ks.max() + 1, j0:j1 + 1, i1 + 1:i1 + 30] = True  # the neighbour, touching the lesion
    prompt = ObjectPrompt(1, boxes_for_object(obj, "A"), (int(ks.min()), int(ks.max())))
    volume = np.zeros(obj.shape, np.float32)
    free = propagate_objects(OracleEngine(reference), volume, [prompt])[0]
    assert free.mask[:, :, i1 + 1:].any()  # the leak

    engine = OracleEngine(reference)
    bounded_prompt = ObjectPrompt(1, prompt.boxes, prompt.z_range, "lesion", (i0, j0, i1, j1))
    bounded = propagate_objects(engine, volume, [bounded_prompt])[0]
    assert not bounded.mask[:, :, i1 + 1:].any() and not (bounded.logits[:, :, i1 + 1:] > 0).any()
    assert all(i0 <= b[0] and b[2] <= i1 and j0 <= b[1] and b[3] <= j1 for _, b in engine.calls)
    assert not (bounded.mask & ~obj).any() and bounded.mask.sum() >= 0.9 * obj.sum()  # the lesion, all of it
    # validation clips the prompted boxes to the bounds
    wide = ObjectPrompt(1, [Box2D(int(ks.min()), i0 - 5, j0 - 5, i1 + 5, j1 + 5)], bounds=(i0, j0, i1, j1))
    assert wide.validate(obj.shape).boxes == [Box2D(int(ks.min()), i0, j0, i1, j1)]


def test_consensus_walks_each_gap_from_both_prompts_and_blends_them(components):
    """``PropagationConfig(consensus=True)``: every gap slice is predicted by the walks from both prompts; where
    they disagree, the walk from the nearer prompt wins (distance-weighted mean logits), neither overrides."""
    # the largest lesion whose three boxes leave a gap of at least two slices between two of them
    obj = next(o for _, o in components if np.diff([b.k for b in boxes_for_object(o, "B")]).max(initial=0) >= 3)
    prompt = ObjectPrompt(1, boxes_for_object(obj, "B"))
    ks = [b.k for b in prompt.boxes]
    ka, kb = max(zip(ks, ks[1:]), key=lambda pair: pair[1] - pair[0])
    engine = OracleEngine(obj)
    original = engine.predict_slice
    band = {}

    def predict(prepared, k, box, *, cancel=None):  # the walk down from kb (second call) claims a 1-voxel band
        logits, score = original(prepared, k, box, cancel=cancel)
        if ka < k < kb and [c[0] for c in engine.calls].count(k) == 2:
            x0, y0, x1, y1 = (int(v) for v in box)
            inside = np.zeros(obj.shape[1:], bool)
            inside[y0:y1 + 1, x0:x1 + 1] = True
            band[k] = ndimage.binary_dilation(obj[k]) & ~obj[k] & inside
            logits = np.where(band[k], 4.0, logits).astype(np.float32)
        return logits, score

    engine.predict_slice = predict
    result = propagate_objects(engine, np.zeros(obj.shape, np.float32), [prompt],
                               config=PropagationConfig(consensus=True))[0]
    k0, k1 = z_extent(obj)
    assert sorted(result.slices) == list(range(k0, k1 + 1)) and len(set(result.slices)) == len(result.slices)
    calls = [c[0] for c in engine.calls]
    assert all(calls.count(k) == 2 for k in range(ka + 1, kb))  # both walks, every gap slice
    assert band and all(band[k].any() for k in band)
    for k in band:
        claimed = (result.mask[k] & band[k]).any()
        assert claimed == (k - ka > kb - k), k  # kept only nearer kb, the walk that claimed it
        assert np.array_equal(result.mask[k] & ~band[k], obj[k])  # where both agree, the object
    assert np.all(result.logits[~result.mask] <= 0)


def test_growth_checks_on_area_and_outline():
    """``extent="area+hull"``: a leak grows both the mask and its outline; a ring closing over its core grows in
    area only, a thin structure turning a corner in outline only; the prompted box's inscribed ellipse is its
    extent."""
    cfg = PropagationConfig(max_growth=1.5, max_area_ratio=1.5, extent="area+hull")
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 32, xx - 32)
    ring, disc = (r >= 12) & (r < 15), r < 15
    bar, bent = np.zeros((64, 64), bool), np.zeros((64, 64), bool)
    bar[30:33, 10:40] = True
    bent[30:33, 10:30] = True
    bent[12:33, 27:30] = True  # the same thin structure turning a corner
    big = r < 25
    ring_e, disc_e = cfg.extents(ring), cfg.extents(disc)
    assert disc_e[0] > 2 * ring_e[0] and disc_e[1] <= 1.1 * ring_e[1]  # area jumps, outline does not
    assert not cfg.leaks(disc_e, ring_e, disc_e, bounded=False)
    bar_e, bent_e = cfg.extents(bar), cfg.extents(bent)
    assert bent_e[1] > 1.5 * bar_e[1] + 9 and not cfg.leaks(bent_e, bar_e, bent_e, bounded=False)
    assert cfg.leaks(cfg.extents(big), disc_e, cfg.extents(big), bounded=False)  # both grew: a leak
    assert PropagationConfig(max_growth=1.5).leaks((int(disc.sum()),), (int(ring.sum()),), (0,), bounded=True)
    box = Box2D(0, 10, 10, 29, 49)  # 20 x 40: ellipse ~628 voxels
    assert cfg.extents(np.zeros((64, 64), bool) | (r < 2), box)[1] == int(np.pi / 4 * 20 * 40)
