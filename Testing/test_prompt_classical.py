"""The weights-free classical engine on real MRI with expert labels: accuracy (through the accuracy
benchmark), bright and dark objects, thick slices, re-prompting without re-preparing, input left untouched."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import DATA, data_path

from mrisegassist.bench.prompt_accuracy import CASES, run_case
from mrisegassist.cli import main
from mrisegassist.prompt.base import Box2D, ObjectPrompt
from mrisegassist.prompt.classical import ClassicalEngine
from mrisegassist.prompt.fusion import fuse
from mrisegassist.prompt.strategies import boxes_for_object, objects_from_mask, prompts_from_mask
from mrisegassist.volume import read_volume


def _dice(a, b) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def ms07():
    flair = read_volume(data_path("ms-lesjak", "patient07", "flair.nii.gz"))
    lesions = read_volume(data_path("ms-lesjak", "patient07", "lesions.nii.gz"), kind="label").array > 0
    return flair, lesions


def test_accuracy_on_expert_ms_lesions(ms07):
    """MS lesions (FLAIR, expert consensus): one box per lesion; a broken engine scores near 0."""
    data_path("ms-lesjak", "patient07")
    result = run_case(CASES["ms07"], DATA, ClassicalEngine(), strategies=("A", "B"))
    a, b = result.strategies["A"], result.strategies["B"]
    print(f"ms07 classical Dice vs expert: A {a.dice:.3f} (lesion median {a.lesion_dice_median:.2f}), "
          f"B {b.dice:.3f} (lesion median {b.lesion_dice_median:.2f}), {result.lesions} lesions")
    assert result.labels == "expert" and result.lesions >= 20 and result.sequences == ["flair"]
    assert a.dice >= 0.5 and b.dice >= 0.65
    assert b.lesion_dice_median >= 0.65 and b.lesions_dice_ge_half >= 0.75
    assert a.slices_segmented > result.lesions  # propagation went beyond the prompted slices


def test_accuracy_command_on_thick_slice_lesions(artifacts, capsys):
    """``mrisegassist bench prompt-accuracy`` on the 6.5 mm post-contrast T1 lesions (expert labels)."""
    data_path("radiomics-brain", "brain1_image.nrrd")
    out = artifacts / "prompt_accuracy"
    shutil.rmtree(out, ignore_errors=True)  # no stale PNG from an earlier run
    code = main(["bench", "prompt-accuracy", "--cases", "radiomics1", "--data", str(DATA), "--out",
                 str(out), "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    case = doc["cases"][0]
    assert doc["labels"] == "expert" and case["case"] == "radiomics1" and case["lesions"] == 2
    assert case["strategies"]["A"]["dice"] >= 0.4 and case["strategies"]["B"]["dice"] >= 0.6
    # one sequence only: its multi-sequence row is the single-sequence one, counted once in the timings
    assert [c["mode"] for c in doc["cases"]] == ["single", "multi"] and doc["cases"][1]["reused"]
    assert doc["b_ge_a"] == {"single": True, "multi": True}
    assert (out / "prompt_accuracy_dice.png").stat().st_size > 10_000
    assert (out / "prompt_accuracy_radiomics1_B.png").is_file()


def test_bright_tumour_on_flair():
    """BraTS whole tumour on FLAIR (expert), one box on the middle slice: good 3D extent from propagation."""
    flair = read_volume(data_path("brats2013-deepmedic", "pat0002", "flair.nii.gz"))
    labels = read_volume(data_path("brats2013-deepmedic", "pat0002", "labels.nii.gz"), kind="label").array
    tumour = labels > 0
    engine = ClassicalEngine()
    prompts = prompts_from_mask(tumour, "A", min_voxels=1000)
    result = engine.segment(engine.prepare(flair.array), prompts)
    fused = fuse(result)
    assert _dice(fused > 0, tumour) >= 0.8
    ks = np.nonzero(tumour.any(axis=(1, 2)))[0]
    got = sorted(result[0].slices)
    assert got[0] <= ks[0] + 5 and got[-1] >= ks[-1] - 5


def test_dark_structure_is_found_without_being_told():
    """Temporal horns of the lateral ventricles are dark on T1 (manual labels): polarity found automatically."""
    t1 = read_volume(data_path("itksnap-mricrop", "t1.gipl.gz"))
    labels = read_volume(data_path("itksnap-mricrop", "labels.gipl.gz"), kind="label").array
    horns = labels == 6
    engine = ClassicalEngine()
    prepared = engine.prepare(t1.array)
    fused = fuse(engine.segment(prepared, prompts_from_mask(horns, "B", min_voxels=50)))
    assert _dice(fused > 0, horns) >= 0.75
    assert np.median(t1.array[fused > 0]) < np.median(t1.array[labels > 0])


def test_intermediate_intensity_structure():
    """Caudate nuclei (grey matter between bright white matter and dark CSF on T1, manual labels): neither
    brighter nor darker than all their surroundings; the engine follows the box centre's intensity."""
    t1 = read_volume(data_path("itksnap-mricrop", "t1.gipl.gz"))
    caudate = read_volume(data_path("itksnap-mricrop", "labels.gipl.gz"), kind="label").array == 7
    engine = ClassicalEngine()
    fused = fuse(engine.segment(engine.prepare(t1.array), prompts_from_mask(caudate, "B", min_voxels=50)))
    assert _dice(fused > 0, caudate) >= 0.55


def test_box_on_normal_white_matter_finds_nothing(ms07):
    flair, lesions = ms07
    engine = ClassicalEngine()
    box = Box2D(80, 120, 80, 128, 88)
    assert not lesions[75:86, 75:94, 115:134].any()
    result = engine.segment(engine.prepare(flair.array), [ObjectPrompt(1, [box])])[0]
    assert result.full_mask().sum() == 0 and result.slices == []


def test_reprompting_reuses_the_prepared_volume(ms07):
    flair, lesions = ms07
    before = flair.array.copy()
    engine = ClassicalEngine()
    prepared = engine.prepare(flair.array)
    assert engine.prepare(flair.array) is prepared and engine.normalisations == 1
    assert np.array_equal(flair.array, before)  # the input is never modified
    edited = flair.array.copy()
    edited.flat[edited.size // 2 + 1] += 1  # one voxel changed (off any sampling stride): a new volume
    assert engine.prepare(edited) is not prepared and engine.normalisations == 2
    _, lesion = objects_from_mask(lesions, min_voxels=10)[0]
    (box,) = boxes_for_object(lesion, "A")
    first = engine.segment(prepared, [ObjectPrompt(1, [box])])[0]
    misses, hits = prepared.slice_misses, prepared.slice_hits
    moved = Box2D(box.k, box.i0 + 1, box.j0, box.i1 + 1, box.j1 + 1)  # the user nudges the box
    second = engine.segment(prepared, [ObjectPrompt(1, [moved])])[0]
    assert engine.normalisations == 2
    assert prepared.slice_hits > hits
    new_slices = set(second.slices) - set(first.slices)
    assert prepared.slice_misses - misses <= len(new_slices) + 2
    assert _dice(first.full_mask(), second.full_mask()) > 0.7


def test_prepare_rejects_bad_volumes():
    engine = ClassicalEngine()
    from mrisegassist.errors import InputError

    with pytest.raises(InputError, match="empty"):
        engine.prepare(np.zeros((4, 16, 16), np.float32))
    with pytest.raises(InputError, match="3D"):
        engine.prepare(np.ones((16, 16), np.float32))
    bad = np.ones((4, 16, 16), np.float32)
    bad[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        engine.prepare(bad)


def test_service_reprompts_without_re_encoding(ms07):
    """Re-prompting the same voxels (moved box, other objects, a copy of the array) never prepares the volume
    again; other voxels do. The result is the engine's own on the same prompts."""
    from mrisegassist.errors import InputError
    from mrisegassist.prompt.fusion import fuse
    from mrisegassist.service import PromptRequest, Service
    from mrisegassist.service.core import PreparedCache

    flair, lesions = ms07
    service = Service("cpu")
    (_, a), (_, b) = objects_from_mask(lesions, min_voxels=10)[:2]
    box_b = boxes_for_object(b, "A")[0]
    prompts = [ObjectPrompt(1, boxes_for_object(a, "B")), ObjectPrompt(2, [box_b])]
    labels = service.prompt(PromptRequest(flair, prompts)).array
    assert _dice(labels > 0, a | b) > 0.5  # expert lesion masks
    engine = ClassicalEngine()
    assert np.array_equal(labels, fuse(engine.segment(engine.prepare(flair.array), prompts)))
    moved = Box2D(box_b.k, box_b.i0 - 1, box_b.j0 - 1, box_b.i1 + 1, box_b.j1 + 1)
    again = service.prompt(PromptRequest(flair.with_array(flair.array.copy()), [ObjectPrompt(2, [moved])]))
    assert service.cache.prepared == 1 and set(np.unique(again.array)) == {0, 2}
    with pytest.raises(InputError, match="outside"):
        service.prompt(PromptRequest(flair, [ObjectPrompt(2, [Box2D(500, 1, 1, 5, 5)])]))
    service.prompt(PromptRequest(flair.with_array(flair.array * 2.0), [ObjectPrompt(2, [moved])]))
    assert service.cache.prepared == 2
    # a client session's own cache (the server's), used even while empty: nothing shared with the service's
    session = PreparedCache()
    service.prompt(PromptRequest(flair, [ObjectPrompt(2, [moved])]), cache=session)
    assert session.prepared == 1 and len(session) == 1 and service.cache.prepared == 2


def test_curved_dark_structure_over_a_bounded_z_range():
    """ITK-SNAP crop, left lateral ventricle (manual label) on T1: on its middle slice the ventricle is a thin
    crescent off the box centre, and on other slices it is up to 4.6x larger than there. The box of the
    reference mask on that slice plus the structure's z-range (as an atlas box gives them) must find it."""
    from mrisegassist.atlas.evaluation import itksnap_masks
    from mrisegassist.prompt.strategies import z_extent

    t1 = read_volume(data_path("itksnap-mricrop", "t1.gipl.gz"))
    mask = itksnap_masks(read_volume(data_path("itksnap-mricrop", "labels.gipl.gz"), kind="label").array)[
        "lateral-ventricle-left"]
    boxes = boxes_for_object(mask, "A", 0)
    (box,) = boxes
    core = np.zeros(mask.shape[1:], bool)
    h, w = box.j1 - box.j0, box.i1 - box.i0
    core[box.j0 + h // 4:box.j1 - h // 4 + 1, box.i0 + w // 4:box.i1 - w // 4 + 1] = True
    assert (mask[box.k] & core).sum() < 0.2 * mask[box.k].sum()  # the crescent avoids the box centre
    engine = ClassicalEngine()
    (result,) = engine.segment(engine.prepare(t1.array), [ObjectPrompt(1, boxes, z_extent(mask))])
    dice = _dice(result.full_mask(), mask)
    print(f"itksnap lateral ventricle (left), classical, reference box + z-range: Dice {dice:.3f}")
    assert dice > 0.6


@pytest.fixture(scope="module")
def itksnap():
    """ITK-SNAP T1 crop and its manual structure masks (expert), the engine's prepared volume."""
    from mrisegassist.atlas.evaluation import itksnap_masks

    t1 = read_volume(data_path("itksnap-mricrop", "t1.gipl.gz"))
    masks = itksnap_masks(read_volume(data_path("itksnap-mricrop", "labels.gipl.gz"), kind="label").array)
    engine = ClassicalEngine()
    return engine, engine.prepare(t1.array), {n: m.astype(bool) for n, m in masks.items()}


def test_roi_bounds_keep_propagation_inside_the_roi(itksnap):
    """Each manual structure prompted as a 3D ROI gives it (reference box on the middle slice, z-range and the
    in-plane rectangle of the mask): without bounds the walk leaks into neighbouring CSF and tissue far outside
    the ROI; with them nothing leaves it and every structure's Dice is at least as good."""
    from mrisegassist.prompt.strategies import mask_bounds, z_extent

    engine, prepared, masks = itksnap
    gains = []
    for name, mask in masks.items():
        boxes, z, bounds = boxes_for_object(mask, "A"), z_extent(mask), mask_bounds(mask)
        (free,) = engine.segment(prepared, [ObjectPrompt(1, boxes, z, name)])
        (bounded,) = engine.segment(prepared, [ObjectPrompt(1, boxes, z, name, bounds)])
        outside = np.ones(mask.shape[1:], bool)
        outside[bounds[1]:bounds[3] + 1, bounds[0]:bounds[2] + 1] = False
        assert not bounded.full_mask()[:, outside].any() and not (bounded.full_logits()[:, outside] > 0).any(), name
        d_free, d_bounded = _dice(free.full_mask(), mask), _dice(bounded.full_mask(), mask)
        print(f"itksnap {name} (manual label): Dice {d_free:.3f} unbounded, {d_bounded:.3f} inside the ROI; "
              f"{int(free.full_mask()[:, outside].sum())} voxels outside it unbounded")
        assert d_bounded >= d_free - 0.02, name  # hippocampus-right: 0.576 inside the ROI, 0.587 without
        gains.append(d_bounded - d_free)
    assert np.mean(gains) > 0.1  # measured: +0.21 (e.g. right lateral ventricle 0.47 -> 0.80)


def test_box_around_the_caudate_with_a_ventricle_sliver_finds_the_caudate(itksnap):
    """A loose box around the right caudate (grey matter between white matter and the ventricle) takes in a
    sliver of the lateral ventricle along its edge, darker than everything around the box. The object is the
    caudate (intermediate intensity), not the sliver: the old rule turned the 4-voxel-margin box dark."""
    engine, prepared, masks = itksnap
    caudate, ventricle = masks["caudate-right"], masks["lateral-ventricle-right"]
    k = 40
    jj, ii = np.nonzero(caudate[k])
    for margin in range(5):
        box = np.array([ii.min() - margin, jj.min() - margin, ii.max() + margin, jj.max() + margin])
        logits, _ = engine.predict_slice(prepared, k, box)
        found = logits > 0
        assert (found & caudate[k]).sum() >= 0.7 * caudate[k].sum(), margin
        assert not (found & ventricle[k]).any(), margin
    in_box = ventricle[k, box[1]:box[3] + 1, box[0]:box[2] + 1].sum()
    assert in_box > 50  # the widest box really holds a piece of ventricle


def test_propagated_slices_keep_the_prompted_slice_polarity(itksnap):
    """The same caudate box propagated over the caudate's slices: every propagated slice is judged with the
    polarity the prompted slice was segmented with (intermediate), so the walk follows the caudate instead of
    stopping after the prompted slice (it did when the polarity was re-estimated around the mask)."""
    from mrisegassist.prompt.strategies import mask_bounds, z_extent

    engine, prepared, masks = itksnap
    caudate = masks["caudate-right"]
    k = 40
    jj, ii = np.nonzero(caudate[k])
    box = Box2D(k, int(ii.min()) - 4, int(jj.min()) - 4, int(ii.max()) + 4, int(jj.max()) + 4)
    (result,) = engine.segment(prepared, [ObjectPrompt(1, [box], z_extent(caudate), "caudate", mask_bounds(caudate))])
    dice = _dice(result.full_mask(), caudate)
    print(f"itksnap right caudate (manual label), loose box + z-range + bounds: Dice {dice:.3f} over "
          f"{len(result.slices)} slices")
    assert len(result.slices) >= 20 and dice > 0.6


# ------------------------------------------------------------------------- synthetic failure cases (issue 15)
# Each case reproduces a failure of the engine before issue 15 on real scans it had never seen; the figures in
# the comments are what the previous engine (main at 1344e1e) scored on the same case and seed.
def _synthetic(factory, *args, **kwargs):
    pytest.importorskip("nilearn", reason="the synthetic cases need the MNI152 template shipped with nilearn")
    return factory(*args, **kwargs)


@pytest.fixture(scope="module")
def dark_core():
    from mrisegassist.synth_prompt_cases import dark_core_tumour

    return _synthetic(dark_core_tumour, 0)


def test_dark_core_inside_a_bright_rim_is_part_of_the_tumour(dark_core):
    """A glioma whose cystic core is dark on FLAIR (CSF-like) inside a bright rim and oedema, by a ventricle; one
    box around the whole tumour on its middle slice. The core is enclosed by the object, so it is the object:
    previous engine Dice 0.72 (61 % of the volume, the core left out), with or without the tumour's z-range."""
    case = dark_core
    tumour, cyst = case.target, case.labels == 1
    engine = ClassicalEngine()
    for name, volume in (("FLAIR", case.images["flair"]), ("FLAIR+T1c", case.stack(("flair", "t1c")))):
        prepared = engine.prepare(volume)
        for z in (False, True):
            prompts = prompts_from_mask(tumour, "A", min_voxels=100, with_z_range=z)
            (result,) = engine.segment(prepared, prompts)
            dice, ratio = _dice(result.full_mask(), tumour), result.full_mask().sum() / tumour.sum()
            cyst_in = (result.full_mask() & cyst).sum() / cyst.sum()
            print(f"synthetic dark-core glioma, {name}, one box{' + z-range' if z else ''}: Dice {dice:.3f}, "
                  f"volume {ratio:.2f} x, cyst covered {cyst_in:.2f}")
            assert dice >= 0.9 and 0.9 <= ratio <= 1.1 and cyst_in >= 0.95, (name, z)
            assert result.full_mask().shape == tumour.shape


@pytest.fixture(scope="module")
def confluent():
    from mrisegassist.synth_prompt_cases import confluent_ms

    return _synthetic(confluent_ms, 0)


def test_confluent_lesions_three_boxes_never_worse_than_one(confluent):
    """A large MS lesion load with confluent periventricular lesions (FLAIR): three boxes per lesion are at least
    as good as one, and every confluent lesion (>= 1 ml) is found with three boxes: previous engine 0.62 and 0.61
    on the two largest-but-one (a quartile box spanning lesion pieces on both sides of a ventricle)."""
    case = confluent
    objects = dict(objects_from_mask(case.target, min_voxels=10))
    engine = ClassicalEngine()
    prepared = engine.prepare(case.images["flair"])
    fused, per_lesion = {}, {}
    for strategy in ("A", "B"):
        results = engine.segment(prepared, prompts_from_mask(case.target, strategy, min_voxels=10))
        fused[strategy] = _dice(fuse(results) > 0, case.target)
        per_lesion[strategy] = {r.object_id: _dice(r.full_mask(), objects[r.object_id]) for r in results}
    large = [i for i, m in objects.items() if m.sum() >= 1000]
    print(f"synthetic confluent MS ({case.description}): Dice A {fused['A']:.3f}, B {fused['B']:.3f}; lesions "
          f">= 1 ml with B: {[round(float(per_lesion['B'][i]), 2) for i in large]}")
    assert len(large) >= 4
    assert fused["B"] >= fused["A"] and fused["B"] >= 0.78
    assert min(per_lesion["B"][i] for i in large) >= 0.7


def test_contrast_drift_along_z_neither_stops_nor_leaks():
    """A FLAIR-bright lesion over ~40 slices under a x0.67..x1.49 intensity drift along k, its own contrast fading
    to 55 % towards the bright end, beside the cortex; one box on the middle slice. Previous engine: Dice 0.79,
    the walk stopped 13 slices before the lesion's end and 5.9 % of its volume leaked into the cortex."""
    from mrisegassist.synth_prompt_cases import drifting_lesion

    case = _synthetic(drifting_lesion, 1)
    engine = ClassicalEngine()
    result = engine.segment(engine.prepare(case.images["flair"]), prompts_from_mask(case.target, "A", min_voxels=100))[0]
    ks, got = np.nonzero(case.target.any(axis=(1, 2)))[0], sorted(result.slices)
    dice = _dice(result.full_mask(), case.target)
    outside = (result.full_mask() & ~case.target).sum() / case.target.sum()
    print(f"synthetic drifting lesion: Dice {dice:.3f}, slices {got[0]}..{got[-1]} for {ks[0]}..{ks[-1]}, "
          f"{outside:.1%} of the volume outside the lesion")
    assert dice >= 0.9 and got[0] <= ks[0] + 2 and outside < 0.02


# ------------------------------------------------------------------------------ several co-registered sequences
def test_prepare_takes_coregistered_sequences():
    """``[c, k, j, i]`` input (channel 0 = the prompted sequence): boxes and results stay ``[k, j, i]``; one
    channel as 4D is the 3D volume; bad channels are refused by name; the input is never modified."""
    from mrisegassist.errors import InputError
    from mrisegassist.prompt.base import PromptableEngine

    flair = read_volume(data_path("brats2013-deepmedic", "pat0004", "flair.nii.gz")).array
    t1c = read_volume(data_path("brats2013-deepmedic", "pat0004", "t1c.nii.gz")).array
    tumour = read_volume(data_path("brats2013-deepmedic", "pat0004", "labels.nii.gz"), kind="label").array > 0
    assert PromptableEngine.accepts_channels is False and ClassicalEngine.accepts_channels is True
    stack = np.stack([flair, t1c])
    before = stack.copy()
    engine = ClassicalEngine()
    prompts = prompts_from_mask(tumour, "A", min_voxels=1000)
    prepared = engine.prepare(stack)
    assert prepared.n_channels == 2 and prepared.shape == flair.shape
    (multi,) = engine.segment(prepared, prompts)
    assert multi.full_logits().shape == flair.shape and multi.full_mask().shape == flair.shape
    assert np.array_equal(stack, before)
    (single,) = engine.segment(engine.prepare(flair), prompts)
    (one,) = engine.segment(engine.prepare(flair[None]), prompts)
    assert np.array_equal(one.full_mask(), single.full_mask())
    d_multi, d_single = _dice(multi.full_mask(), tumour), _dice(single.full_mask(), tumour)
    print(f"brats2013 pat0004 whole tumour (expert), one box: Dice {d_single:.3f} FLAIR, {d_multi:.3f} FLAIR+T1c")
    assert d_multi >= 0.85 and d_single >= 0.85
    bad = stack.copy()
    bad[1, 3, 4, 5] = np.nan
    with pytest.raises(InputError, match="channel 1.*NaN"):
        engine.prepare(bad)
    with pytest.raises(InputError, match="channel 1.*empty"):
        engine.prepare(np.stack([flair, np.zeros_like(flair)]))
    with pytest.raises(InputError, match="3D"):
        engine.prepare(stack[None])
