"""SAM 2.1 / MedSAM2 engine against the official ``SAM2VideoPredictor`` on real MRI (BraTS 2013 pat0001 FLAIR,
boxes from the expert tumour labels), at seeded random initialisation (no weights can be downloaded here).

What is compared: (1) exact - the reference's own ``init_state`` on a JPEG folder, with its frame tensor
replaced by our frames, then the same boxes, ``propagate_in_video`` forward and backward: our logits must be
identical (to float rounding); (2) our lean loop in exact shapes, in fixed shapes (objects batched, memory
padded and masked: the CUDA-graph layout) and the official loop on our prepared volume, against each other,
bounded and unbounded (early stop); (3) approximate - the unpatched reference reading the JPEG folder
(quality 100), as Slicer plugins run it (in the ``bench prompt`` test): Dice of the masks. The MedSAM2
configuration (hiera-tiny at 512 px; 256 px for the loop comparisons) and 5 to 10 slices keep the run short."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import data_path
from mrisegassist.errors import CheckpointError, InputError
from mrisegassist.prompt.accel import AccelOptions
from mrisegassist.prompt.base import OUTSIDE_LOGIT, Box2D, ObjectPrompt
from mrisegassist.prompt.windowing import FrameSource

pytest.importorskip("sam2")
from mrisegassist.prompt.sam2_engine import Sam2Engine, _Vanish, build_sam2_predictor  # noqa: E402

SIZE = 512
SMALL = 256  # the MedSAM2 configuration at 256 px: the same code paths, a quarter of the work


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return build_sam2_predictor("medsam2")


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return build_sam2_predictor("medsam2", image_size=SMALL)


@pytest.fixture(scope="module")
def flair_labels():
    flair = sitk.GetArrayFromImage(sitk.ReadImage(str(data_path("brats2013-deepmedic", "pat0001", "flair.nii.gz"))))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(data_path("brats2013-deepmedic", "pat0001",
                                                                  "labels.nii.gz")))) > 0
    return flair, labels


def _tumour_box(labels: np.ndarray, k: int) -> Box2D:
    jj, ii = np.nonzero(labels[k])
    return Box2D(k, int(ii.min()), int(jj.min()), int(ii.max()), int(jj.max()))


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
    """A list that receives the batch size of every image-encoder call (its sum = slices encoded)."""
    calls = []
    handle = predictor.image_encoder.register_forward_hook(lambda _m, inputs, _o: calls.append(inputs[0].shape[0]))
    return calls, handle


def _write_jpegs(volume: np.ndarray, folder: Path) -> FrameSource:
    from PIL import Image

    frames = FrameSource(volume)
    for k in range(volume.shape[0]):
        Image.fromarray(frames.rgb_uint8(k)).save(folder / f"{k:05d}.jpg", quality=100, subsampling=0)
    return frames


def _reference(predictor, folder: Path, prompts, frames: FrameSource = None, size: int = SIZE):
    """The official path: init_state on the JPEG folder (frames optionally replaced by ours at ``size`` px), every
    prompted slice's box and points in one ``add_new_points_or_box`` call, then propagate forward and backward
    from the first prompted frame. Returns ({obj_id: logits}, state)."""
    state = predictor.init_state(str(folder))
    if frames is not None:
        state["images"] = torch.stack([frames.sam2_tensor(k, size) for k in range(len(frames))])
        state["cached_features"] = {}
    for p in prompts:
        for sp in p.slice_prompts():
            predictor.add_new_points_or_box(state, frame_idx=sp.k, obj_id=p.object_id, points=sp.point_coords,
                                            labels=sp.point_labels, box=None if sp.box is None else sp.box.xyxy)
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
        assert prepared.encoder_calls == 5 and sum(calls) == 5  # each slice encoded once
        assert len(calls) < 5  # in batches

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
        assert sum(calls) == 0 and prepared.encoder_calls == 5
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
    the reference re-encodes every frame; every goal of issue 12 is reported."""
    import json

    from mrisegassist.cli import main

    data = data_path()
    assert main(["bench", "prompt", "--data", str(data), "--frames", "3", "--sam-slices", "0", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    (variant,) = summary["variants"]
    runs = {r["label"]: r for r in variant["runs"]}
    refs = {r["label"]: r for r in summary["references"]}
    assert runs["re-prompt"]["encoded"] == 0 and runs["object re-prompt"]["encoded"] == 0
    assert runs["z-range"]["encoded"] == runs["z-range"]["slices"] == 3
    assert runs["object"]["slices"] == 3  # --object-slices 100 on a 3-slice volume: all of it
    assert refs["reference re-prompt"]["encoded"] >= 3
    assert runs["z-range"]["dice_in_z_range"] >= 0.98
    goals = {g["name"]: g for g in variant["goals"]}
    assert goals["re-prompt re-encodes no slice"]["met"] is True
    assert len(goals) == 5 and all(isinstance(g["met"], bool) for g in goals.values())
    assert summary["torch"].startswith("torch ") and summary["date"]


# ------------------------------------------------------------------------------------ lean loop and encoding
LOOPS = {"exact": AccelOptions(), "fixed": AccelOptions(shapes="fixed"), "official": AccelOptions(loop="official")}


@pytest.fixture(scope="module")
def window(flair_labels):
    """8 FLAIR slices around the largest tumour slice (expert labels alongside)."""
    flair, labels = flair_labels
    kc = int(np.argmax(labels.sum(axis=(1, 2))))
    return flair[kc - 3:kc + 5], labels[kc - 3:kc + 5]


@pytest.fixture(scope="module")
def absent(small):
    """The small model with its object-score head lowered by 40: every frame is "no object" (empty masks) while
    the scores still follow the memory (sigmoid(logit - 40), compared with a relative tolerance)."""
    import copy

    model = copy.deepcopy(small)
    model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.data -= 40.0
    return model


def _segment(predictor, loop: str, volume, prompts, **kwargs):
    engine = Sam2Engine.from_model(predictor, "medsam2", options=LOOPS[loop], **kwargs)
    prepared = engine.prepare(volume)
    return engine.segment(prepared, prompts), prepared


def _assert_same(ours, reference) -> None:
    for a, b in zip(ours, reference):
        assert a.object_id == b.object_id and a.slices == b.slices
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)
        assert np.array_equal(a.mask, b.mask)
        assert a.scores.keys() == b.scores.keys()
        ks = sorted(a.scores)
        np.testing.assert_allclose([a.scores[k] for k in ks], [b.scores[k] for k in ks], rtol=1e-3, atol=1e-6)


def test_lean_loops_match_the_official_loop_on_bounded_windows(small, window):
    """Several boxes, an object first prompted after another one of its window (followed before its own
    prompt), an in-plane ROI, and an object in a second window: the lean loop in exact and in fixed shapes
    gives the official loop's slices, masks, logits and scores; the windows share the encoded slices."""
    volume, labels = window
    prompts = [ObjectPrompt(1, [_tumour_box(labels, 2), _tumour_box(labels, 5)], z_range=(1, 6)),
               ObjectPrompt(2, [Box2D(4, 20, 30, 70, 90)], z_range=(1, 6), bounds=(10, 20, 120, 140)),
               ObjectPrompt(3, [_tumour_box(labels, 3)], z_range=(2, 7))]
    reference, _ = _segment(small, "official", volume, prompts)
    assert reference[1].slices[:4] == [2, 3, 4, 5] and np.all(reference[1].logits[:, :, 121:] == OUTSIDE_LOGIT)
    for loop in ("exact", "fixed"):
        ours, prepared = _segment(small, loop, volume, prompts)
        _assert_same(ours, reference)
        assert sorted(prepared.cache.computed) == list(range(1, 8))  # each slice of both windows encoded once


def test_lean_loops_match_the_official_early_stop(absent, window):
    """Unbounded window, every mask empty: object 1 (box on 3) is done 2 frames past its prompt, object 2 (boxes
    on 1 and 4) 2 frames past its last one; the walk goes on while one object is left, then stops at slice 6
    (the lean loop checks every 8 frames: it computed slice 7 too and must forget it, or the backward walk's
    object pointers would differ), as the official loop does."""
    volume, labels = window
    prompts = [ObjectPrompt(1, [_tumour_box(labels, 3)]),
               ObjectPrompt(2, [_tumour_box(labels, 1), _tumour_box(labels, 4)])]
    reference, _ = _segment(absent, "official", volume, prompts, vanish_frames=2)
    assert reference[0].slices == [1, 2, 3, 4, 5, 0] and reference[1].slices == [1, 2, 3, 4, 5, 6, 0]
    assert not reference[0].mask.any() and not reference[1].mask.any()
    for loop in ("exact", "fixed"):
        ours, _ = _segment(absent, loop, volume, prompts, vanish_frames=2)
        _assert_same(ours, reference)


@pytest.mark.slow
def test_compiled_step_matches_the_exact_loop(small, window):
    """``torch.compile`` (inductor) of the fixed-shape step, as the GPU check runs it (there under a CUDA graph):
    it compiles without falling back and gives the exact loop's masks."""
    import shutil

    if not (shutil.which("gcc") or shutil.which("cc")):
        pytest.skip("torch.compile's inductor needs a C compiler (gcc or cc) on the CPU")
    volume, labels = window
    prompts = [ObjectPrompt(1, [_tumour_box(labels, 3)], z_range=(2, 5))]
    exact, _ = _segment(small, "exact", volume, prompts)
    engine = Sam2Engine.from_model(small, "medsam2", options=AccelOptions(compile="default"))
    ours = engine.segment(engine.prepare(volume), prompts)
    assert engine.tracker.notes == []  # compiled: no fallback to the eager step
    _assert_same(ours, exact)


def test_batched_device_encoding_matches_one_slice_at_a_time(small, window):
    volume, _ = window
    one = Sam2Engine.from_model(small, "medsam2", options=AccelOptions(encode_batch=1))
    four = Sam2Engine.from_model(small, "medsam2", options=AccelOptions(encode_batch=4))
    p1, p4 = one.prepare(volume), four.prepare(volume)
    calls, handle = _encoder_calls(small)
    try:
        one.encode(p1, range(5))
        assert calls == [1] * 5
        calls.clear()
        four.encode(p4, [4, 3, 2, 1, 0, 3])
        assert calls == [4, 1] and p4.encoder_calls == 5
    finally:
        handle.remove()
    for k in range(5):
        for a, b in zip(p1.cache.get(k), p4.cache.get(k)):
            assert a.shape[0] == 1 and a.shape == b.shape
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-5)


def test_device_frames_match_the_official_pil_bicubic_resize(flair_labels):
    """``sam2_batch`` (window, resize and normalisation as tensor ops) = PIL's bicubic resize of the windowed
    slice, as ``sam2.utils.misc`` loads frames, on a square BraTS slice and a non-square ms-lesjak one."""
    from PIL import Image

    flair, _ = flair_labels
    lesjak = sitk.GetArrayFromImage(sitk.ReadImage(str(data_path("ms-lesjak", "patient07", "flair.nii.gz"))))
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    for volume, k in ((flair, 80), (lesjak.astype(np.int16), 90)):
        frames = FrameSource(volume)
        for size in (SIZE, 1024, 128):
            grey = Image.fromarray(frames.grey(k)).resize((size, size), Image.BICUBIC)
            expected = (np.asarray(grey, np.float32)[None] / np.float32(255.0) - mean) / std
            ours = frames.sam2_batch([k, k], size, "cpu")
            assert ours.shape == (2, 3, size, size) and ours.dtype == torch.float32
            np.testing.assert_allclose(ours[1].numpy(), expected, atol=2e-5)


def test_cuda_out_of_memory_halves_the_batch_then_explains():
    """``encode_in_batches``: a CUDA out-of-memory error halves the batch and retries; at one item it raises
    DeviceMemoryError with a message saying what to do (device string only: no GPU needed)."""
    from mrisegassist.errors import MRISegAssistError
    from mrisegassist.prompt.accel import DeviceMemoryError, encode_in_batches

    seen = []

    def fits_two(chunk):
        if len(chunk) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        seen.append(list(chunk))

    assert encode_in_batches(list(range(7)), fits_two, "cuda:0", batch=8) == 2
    assert seen == [[0, 1], [2, 3], [4, 5], [6]]

    def never(chunk):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    with pytest.raises(DeviceMemoryError, match="ran out of memory encoding.*one slice at a time.*'cpu'") as info:
        encode_in_batches([0, 1, 2], never, "cuda:0", batch=2, what="encoding test slices")
    assert isinstance(info.value, MRISegAssistError)

    def broken(chunk):
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError):  # other errors are not retried
        encode_in_batches([0, 1], broken, "cuda:0", batch=2)


def test_accel_options_parse_and_check():
    from mrisegassist.prompt.accel import resolve_device

    opts = AccelOptions.parse("precision=bf16,encode_batch=8,graphs=off")
    assert (opts.precision, opts.encode_batch, opts.graphs, opts.loop) == ("bf16", 8, "off", "lean")
    assert AccelOptions().dtype("cpu") is None and AccelOptions().dtype("cuda") == torch.bfloat16
    assert not AccelOptions().fixed_shapes("cpu") and AccelOptions().fixed_shapes("cuda")
    assert AccelOptions(compile="default").fixed_shapes("cpu")
    for bad in ("precision=fp16", "graphs=maybe", "speed=11", "loop", "shapes=exact,compile=default"):
        with pytest.raises(InputError):
            AccelOptions.parse(bad)
    assert resolve_device("auto") in ("cuda", "mps", "cpu") and resolve_device("cpu") == "cpu"
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu")


def _fake_cuda(monkeypatch, free: int, per_item: int, seen: list) -> None:
    """A CUDA allocator stand-in on the CPU: ``free`` bytes free; each encoded item raises the peak by
    ``per_item`` bytes (what ``encode_in_batches`` measures on its one-item probe)."""
    peak = {"now": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: peak.update(now=0))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak["now"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 4 * free))

    def record(chunk):
        peak["now"] = per_item * len(chunk)
        seen.append(list(chunk))

    return record


def test_auto_batch_comes_from_free_gpu_memory_then_halves_on_out_of_memory(monkeypatch):
    """``batch=0`` on CUDA: one probe slice measures the memory per slice, then batches fill half the free
    memory (1 GiB free, 100 MiB per slice -> 5); an allocator error at 5 halves to 3, and at one slice the
    error says what to do (no GPU needed: torch.cuda's memory functions are replaced)."""
    from mrisegassist.prompt.accel import FREE_FRACTION, DeviceMemoryError, cuda_batch_size, encode_in_batches

    seen = []
    record = _fake_cuda(monkeypatch, 2**30, 100 * 2**20, seen)
    assert FREE_FRACTION == 0.5 and cuda_batch_size("cuda:0", 100 * 2**20) == 5
    assert cuda_batch_size("cuda:0", 2**40) == 1 and cuda_batch_size("cuda:0", 1) == 32  # clipped to 1..MAX_BATCH
    assert encode_in_batches(list(range(12)), record, "cuda:0", batch=0) == 5
    assert seen == [[0], [1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11]]

    seen.clear()

    def fails_above_three(chunk):
        if len(chunk) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")
        record(chunk)

    assert encode_in_batches(list(range(9)), fails_above_three, "cuda:0", batch=0) == 3
    assert seen == [[0], [1, 2, 3], [4, 5, 6], [7, 8]]

    def allocator_error(chunk):  # an older torch's message without the OutOfMemoryError type
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 0 bytes free)")

    with pytest.raises(DeviceMemoryError, match=r"cuda:0 ran out of memory encoding SAM slices even one slice at a "
                                                 r"time \(1024 MiB free of 4096 MiB\).*'cpu'"):
        encode_in_batches([0, 1], allocator_error, "cuda:0", batch=0, what="encoding SAM slices")
    cpu_seen = []
    assert encode_in_batches([0, 1, 2], lambda c: cpu_seen.append(list(c)), "cpu", batch=0) == 1  # CPU: one by one
    assert cpu_seen == [[0], [1], [2]]


def test_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    from mrisegassist.prompt.accel import resolve_device

    mps = torch.backends.mps
    for cuda, apple, expected in ((True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(mps, "is_available", lambda apple=apple: apple)
        assert resolve_device("auto") == resolve_device(None) == expected
    with pytest.raises(InputError, match="CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(InputError, match="MPS is not available"):
        resolve_device("mps")


def test_point_prompts_match_the_video_predictor(small, window, tmp_path):
    """Native point prompts, as ``add_new_points_or_box(points=, labels=, box=)`` takes them: object 1 has a box
    with a positive and a negative point on slice 2 and a negative point alone on slice 5, object 2 positive and
    negative points without a box on slice 2 (an object followed before its first prompt trips sam2 1.1.0 in
    fp32, see ``test_z_range_respected...``); each prompted slice is a conditioning frame. The official
    predictor's ``init_state`` (its frames replaced by ours) and ``propagate_in_video`` both ways give the
    logits of our lean loop in exact and in fixed shapes; the engine takes the points itself (the service gives them to engines that read them)."""
    from mrisegassist.prompt.base import Point2D

    volume, labels = window
    box = _tumour_box(labels, 2)
    jj, ii = np.nonzero(labels[2])
    centre = (int(ii[len(ii) // 2]), int(jj[len(jj) // 2]))
    prompts = [ObjectPrompt(1, [box], z_range=(0, 7),
                            points=[Point2D(2, *centre, True), Point2D(2, box.i0 + 1, box.j0 + 1, False),
                                    Point2D(5, box.i0 + 2, box.j1 - 2, False)]),
               ObjectPrompt(2, [], z_range=(0, 7), points=[Point2D(2, 40, 50, True), Point2D(2, 60, 45, False)])]
    frames = _write_jpegs(volume, tmp_path)
    official, state = _reference(small, tmp_path, prompts, frames, SMALL)
    assert sorted(state["output_dict_per_obj"][0]["cond_frame_outputs"]) == [2, 5]
    assert sorted(state["output_dict_per_obj"][1]["cond_frame_outputs"]) == [2]
    for loop in ("exact", "fixed"):
        engine = Sam2Engine.from_model(small, "medsam2", options=LOOPS[loop])
        assert engine.accepts_points  # points go through add_new_points_or_box
        for result in engine.segment(engine.prepare(volume), prompts):
            np.testing.assert_allclose(result.full_logits(), official[result.object_id], atol=1e-4)
            assert np.array_equal(result.full_mask(), official[result.object_id] > 0)
            assert sorted(result.slices) == list(range(8))
