"""SAM 2.1 / MedSAM2 engine against the official ``SAM2VideoPredictor`` on real MRI (BraTS 2013 pat0001 FLAIR,
boxes from the expert tumour labels), at seeded random initialisation (no weights can be downloaded here).

What is compared: (1) exact - the reference's own ``init_state`` on a JPEG folder, with its frame tensor
replaced by our frames, then the same boxes, ``propagate_in_video`` forward and backward: our logits must be
identical; (2) approximate - the unpatched reference reading the JPEG folder (quality 100), as Slicer plugins
run it (in the ``bench prompt`` test): Dice of the masks. The MedSAM2 configuration (hiera-tiny at 512 px) and
5 (3) slices keep the run short."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import data_path
from mrisegassist.errors import CheckpointError, InputError
from mrisegassist.prompt.base import OUTSIDE_LOGIT, Box2D, ObjectPrompt
from mrisegassist.prompt.windowing import FrameSource

pytest.importorskip("sam2")
from mrisegassist.prompt.sam2_engine import Sam2Engine, _Vanish, build_sam2_predictor  # noqa: E402

SIZE = 512


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return build_sam2_predictor("medsam2")


@pytest.fixture(scope="module")
def case():
    """5 FLAIR slices around the largest tumour slice; tumour boxes (expert labels) on local slices 1..3."""
    flair = sitk.GetArrayFromImage(sitk.ReadImage(str(data_path("brats2013-deepmedic", "pat0001", "flair.nii.gz"))))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(data_path("brats2013-deepmedic", "pat0001",
                                                                  "labels.nii.gz")))) > 0
    kc = int(np.argmax(labels.sum(axis=(1, 2))))
    volume, tumour = flair[kc - 2:kc + 3], labels[kc - 2:kc + 3]
    boxes = []
    for k in (1, 2, 3):
        jj, ii = np.nonzero(tumour[k])
        boxes.append(Box2D(k, int(ii.min()), int(jj.min()), int(ii.max()), int(jj.max())))
    return volume, boxes


def _encoder_calls(predictor) -> list:
    calls = []
    handle = predictor.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def _write_jpegs(volume: np.ndarray, folder: Path) -> FrameSource:
    from PIL import Image

    frames = FrameSource(volume)
    for k in range(volume.shape[0]):
        Image.fromarray(frames.rgb_uint8(k)).save(folder / f"{k:05d}.jpg", quality=100, subsampling=0)
    return frames


def _reference(predictor, folder: Path, prompts, frames: FrameSource = None):
    """The official path: init_state on the JPEG folder (frames optionally replaced by ours), all boxes, then
    propagate forward and backward from the first prompted frame. Returns ({obj_id: logits}, state)."""
    state = predictor.init_state(str(folder))
    if frames is not None:
        state["images"] = torch.stack([frames.sam2_tensor(k, SIZE) for k in range(len(frames))])
        state["cached_features"] = {}
    for p in prompts:
        for b in p.boxes:
            predictor.add_new_points_or_box(state, frame_idx=b.k, obj_id=p.object_id, box=b.xyxy)
    n = state["num_frames"]
    out = {p.object_id: np.full((n, state["video_height"], state["video_width"]), OUTSIDE_LOGIT, np.float32)
           for p in prompts}
    for reverse in (False, True):
        for f, ids, masks in predictor.propagate_in_video(state, reverse=reverse):
            for idx, oid in enumerate(ids):
                out[oid][f] = masks[idx, 0].float().numpy()
    return out, state


def test_matches_video_predictor_multi_box_multi_object_and_reprompt(predictor, case, tmp_path):
    volume, boxes = case
    before = volume.copy()
    other = Box2D(1, 20, 30, 70, 90)  # a second object elsewhere, first prompted on the same slice
    prompts = [ObjectPrompt(1, boxes, z_range=(0, 4)), ObjectPrompt(2, [other], z_range=(0, 4))]
    calls, handle = _encoder_calls(predictor)
    try:
        engine = Sam2Engine.from_model(predictor, "medsam2")
        prepared = engine.prepare(volume)
        ours = {r.object_id: r for r in engine.segment(prepared, prompts)}
        assert prepared.encoder_calls == 5 and len(calls) == 5  # each slice encoded once

        frames = _write_jpegs(volume, tmp_path)
        exact, ref_state = _reference(predictor, tmp_path, prompts, frames)
        assert set(prepared.states[(0, 4)]) == set(ref_state)  # our state has init_state's keys
        for oid in (1, 2):
            result = ours[oid]
            assert result.logits.shape == volume.shape and np.array_equal(result.mask, result.logits > 0)
            np.testing.assert_allclose(result.logits, exact[oid], atol=1e-5)
            assert np.array_equal(result.mask, exact[oid] > 0)
            assert sorted(result.slices) == [0, 1, 2, 3, 4]  # both directions from the first prompt
            assert all(0.0 <= s <= 1.0 for s in result.scores.values())
        assert ours[1].slices[:4] == [1, 2, 3, 4] and ours[1].slices[-1] == 0  # forward, then backward
        assert ours[2].slices[:4] == [1, 2, 3, 4]

        calls.clear()  # re-prompt (box moved) on the prepared volume: no image encoding at all
        moved = [ObjectPrompt(1, [Box2D(b.k, b.i0 + 3, b.j0 - 2, b.i1 + 4, b.j1 + 1) for b in boxes], (0, 4))]
        again = engine.segment(prepared, moved)[0]
        assert len(calls) == 0 and prepared.encoder_calls == 5
        exact_moved, _ = _reference(predictor, tmp_path, moved, frames)
        np.testing.assert_allclose(again.logits, exact_moved[1], atol=1e-5)
    finally:
        handle.remove()
    assert np.array_equal(volume, before)  # the input volume is never modified


def test_z_range_respected_and_frames_encoded_lazily(predictor, case):
    volume, boxes = case
    engine = Sam2Engine.from_model(predictor, "medsam2")
    prepared = engine.prepare(volume)
    seen = []
    # object 8 is first prompted on slice 3, after object 7 (slice 2): in the shared state it is followed on
    # slice 2 before its own prompt (sam2 1.1.0 alone fails there in fp32, see sam2_engine._upcast_memory)
    result, late = engine.segment(prepared, [ObjectPrompt(7, [boxes[1]], z_range=(1, 3)),
                                             ObjectPrompt(8, [Box2D(3, 20, 30, 70, 90)], z_range=(1, 3))],
                                  progress=lambda f, m: seen.append(f))
    assert sorted(prepared.cache.computed) == [1, 2, 3]  # only the z-range was encoded
    assert result.slices == [2, 3, 1] and late.slices == [2, 3, 1]  # forward from the first prompt, backward
    for r in (result, late):
        assert np.all(r.logits[[0, 4]] == OUTSIDE_LOGIT) and not r.mask[[0, 4]].any()
        assert np.all(np.isfinite(r.logits))
    assert seen[-1] == 1.0 and seen == sorted(seen)


def test_vanish_rule_stops_each_direction_after_the_outermost_prompt():
    forward = _Vanish(2, {1: 3, 2: 1}, reverse=False)
    for f, (a, b) in enumerate([(1, 1), (0, 0), (0, 1), (1, 0), (0, 0), (0, 0)]):
        forward.update(f, 1, bool(a))
        forward.update(f, 2, bool(b))
    # object 1: empties at 1, 2 are before its last prompt (3) and do not count; 4, 5 end it
    # object 2: empty at 3 and 4 (after prompt 1) ends it
    assert forward.done == {1, 2} and forward.all_done
    backward = _Vanish(2, {1: 3}, reverse=True)
    for f in (3, 2, 1):
        backward.update(f, 1, f == 3)
    assert backward.done == {1}
    assert not _Vanish(2, {1: 3}, reverse=True).all_done


def test_bad_prompts_raise_before_any_encoding(predictor, case):
    volume, boxes = case
    engine = Sam2Engine.from_model(predictor, "medsam2")
    prepared = engine.prepare(volume)
    with pytest.raises(InputError, match="unique"):
        engine.segment(prepared, [ObjectPrompt(1, [boxes[0]]), ObjectPrompt(1, [boxes[1]])])
    with pytest.raises(InputError, match="outside the volume"):
        engine.segment(prepared, [ObjectPrompt(1, [Box2D(9, 1, 1, 5, 5)])])
    with pytest.raises(InputError, match="outside z-range"):
        engine.segment(prepared, [ObjectPrompt(1, [boxes[0]], z_range=(2, 4))])
    with pytest.raises(InputError, match="not made by this engine"):
        Sam2Engine.from_model(predictor, "medsam2").segment(prepared, [ObjectPrompt(1, [boxes[0]])])
    assert prepared.encoder_calls == 0


def test_missing_and_wrong_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MRISEGASSIST_WEIGHTS", raising=False)
    with pytest.raises(CheckpointError, match=r"MedSAM2_latest\.pt.*huggingface\.co/wanglab/MedSAM2"):
        Sam2Engine("medsam2")
    torch.manual_seed(1)
    wrong = tmp_path / "sam2.1_hiera_small.pt"
    torch.save({"model": build_sam2_predictor("sam2.1-hiera-small").state_dict()}, wrong)
    with pytest.raises(CheckpointError, match="does not fit the medsam2 architecture.*(missing|unexpected)"):
        Sam2Engine("medsam2", checkpoint=wrong)
    cut = tmp_path / "cut.pt"
    with open(wrong, "rb") as fh:
        cut.write_bytes(fh.read(5_000_000))  # a truncated transfer
    with pytest.raises(CheckpointError, match="cannot be read as PyTorch weights.*truncated or corrupted"):
        Sam2Engine("medsam2", checkpoint=cut)
    os.remove(wrong)
    with pytest.raises(InputError, match="unknown SAM 2 variant"):
        Sam2Engine("sam2.1-hiera-huge")


def test_bench_prompt_reports_reprompt_without_reencoding(capsys):
    """``mrisegassist bench prompt`` on 3 real slices: figures printed as JSON; our masks agree with the official
    predictor reading the JPEG folder (Dice); re-prompting our prepared volume runs the image encoder 0 times,
    the reference re-encodes every frame."""
    import json

    from mrisegassist.cli import main

    data = data_path()
    assert main(["bench", "prompt", "--data", str(data), "--frames", "3", "--sam-slices", "0", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = summary["rows"]
    assert rows["ours re-prompt"]["encoder_calls"] == 0
    assert rows["ours (z-range)"]["encoder_calls"] == rows["ours (z-range)"]["slices"] == 3
    assert rows["reference re-prompt"]["encoder_calls"] >= 3
    assert rows["ours (z-range)"]["dice_in_z_range"] >= 0.98
    assert summary["ratios"]["goal_reprompt_no_reencoding_met"] is True
