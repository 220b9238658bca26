"""SAM engine: equivalence with segment-anything's SamPredictor (seeded random weights, real MRI), the
per-slice embedding cache, input and checkpoint errors.

Models are at seeded random initialisation (no weights can be downloaded here): the tests compare our path
with the official predictor on the same slice image and box, not segmentation quality."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import data_path
from mrisegassist.errors import CheckpointError, InputError
from mrisegassist.prompt.accel import AccelOptions
from mrisegassist.prompt.base import OUTSIDE_LOGIT, Box2D, ObjectPrompt
from mrisegassist.prompt.sam import SamEngine, build_sam_model
from mrisegassist.prompt.windowing import FrameSource

segment_anything = pytest.importorskip("segment_anything")
from segment_anything import SamPredictor  # noqa: E402
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer  # noqa: E402


def small_sam(seed: int = 0) -> Sam:
    """A real SAM architecture with a 1-block, 64-wide image encoder (fast on CPU), seeded."""
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(depth=1, embed_dim=64, img_size=1024, mlp_ratio=2, num_heads=2, patch_size=16,
                              qkv_bias=True, use_rel_pos=True, global_attn_indexes=(), window_size=14, out_chans=256,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                           mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256,
                                                                                 mlp_dim=512, num_heads=8),
                          transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    return Sam(encoder, prompt, decoder, pixel_mean=[123.675, 116.28, 103.53],
               pixel_std=[58.395, 57.12, 57.375]).eval()


def _read(*parts: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(data_path(*parts))))


@pytest.fixture(scope="module")
def brats():
    """BraTS 2013 pat0001 FLAIR ``[k, j, i]`` and the tumour box on its largest slice (expert labels)."""
    flair = _read("brats2013-deepmedic", "pat0001", "flair.nii.gz")
    labels = _read("brats2013-deepmedic", "pat0001", "labels.nii.gz") > 0
    k = int(np.argmax(labels.sum(axis=(1, 2))))
    jj, ii = np.nonzero(labels[k])
    return flair, labels, k, np.array([ii.min(), jj.min(), ii.max(), jj.max()], dtype=np.float32)


def _count_calls(module: torch.nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.slow
def test_vit_b_matches_sam_predictor(brats):
    """Full ViT-B (random init): same low-res and upsampled logits, masks and score as SamPredictor."""
    flair, _, k, box = brats
    torch.manual_seed(0)
    model = build_sam_model("vit_b")
    encodes = _count_calls(model.image_encoder)
    engine = SamEngine.from_model(model, "sam-vit-b")
    prepared = engine.prepare(flair)
    logits, score, low = engine.predict_slice_detailed(prepared, k, box)

    reference = SamPredictor(model)
    reference.set_image(FrameSource(flair).rgb_uint8(k))
    ref_masks, ref_iou, ref_low = reference.predict(box=box, multimask_output=False, return_logits=True)
    assert logits.shape == flair.shape[1:] and logits.dtype == np.float32
    np.testing.assert_allclose(low, ref_low[0], atol=1e-4)
    np.testing.assert_allclose(logits, ref_masks[0], atol=1e-4)
    assert np.array_equal(logits > 0, ref_masks[0] > 0)
    assert score == pytest.approx(float(np.clip(ref_iou[0], 0, 1)), abs=1e-5)

    moved = box + np.array([3, -2, 5, 1], dtype=np.float32)  # re-prompt the same slice: no new encoding
    logits2, _ = engine.predict_slice(prepared, k, moved)
    ref2, _, _ = reference.predict(box=moved, multimask_output=False, return_logits=True)
    np.testing.assert_allclose(logits2, ref2[0], atol=1e-4)
    assert prepared.encoder_calls == 1 and len(encodes) == 2  # one for ours, one for the reference


def test_small_sam_matches_predictor_on_non_square_slices():
    """ms-lesjak FLAIR slices are 218 x 182 (ResizeLongestSide pads): equal to SamPredictor."""
    flair = _read("ms-lesjak", "patient07", "flair.nii.gz")
    model = small_sam()
    engine = SamEngine.from_model(model, "sam-small-test")
    prepared = engine.prepare(flair)
    frames = FrameSource(flair)
    reference = SamPredictor(model)
    for k, box in ((90, [10.5, 20.25, 170, 200]),):
        logits, score, low = engine.predict_slice_detailed(prepared, k, np.array(box, np.float32))
        reference.set_image(frames.rgb_uint8(k))
        ref, iou, ref_low = reference.predict(box=np.array(box, np.float32), multimask_output=False,
                                              return_logits=True)
        assert logits.shape == (218, 182)
        np.testing.assert_allclose(logits, ref[0], atol=1e-4)
        np.testing.assert_allclose(low, ref_low[0], atol=1e-4)
        assert score == pytest.approx(float(np.clip(iou[0], 0, 1)), abs=1e-5)


def test_embedding_cache_is_lazy_reused_and_bounded(brats):
    flair, _, k, box = brats
    model = small_sam()
    encodes = _count_calls(model.image_encoder)
    engine = SamEngine.from_model(model, "sam-small-test", cache_bytes=int(2.5 * 256 * 64 * 64 * 4))
    prepared = engine.prepare(flair)
    assert prepared.encoder_calls == 0 and not encodes  # prepare encodes nothing
    first, _ = engine.predict_slice(prepared, k, box)
    again, _ = engine.predict_slice(prepared, k, box)
    assert np.array_equal(first, again) and prepared.encoder_calls == 1 and len(encodes) == 1
    for kk in (k + 1, k + 2):  # the LRU holds two embeddings: k is evicted by the third slice
        engine.predict_slice(prepared, kk, box)
    assert prepared.cache.keys() == [k + 1, k + 2] and prepared.cache.bytes <= prepared.cache.max_bytes
    third, _ = engine.predict_slice(prepared, k, box)
    assert np.array_equal(first, third) and prepared.encoder_calls == 4 and len(encodes) == 4


def test_batched_encoding_follows_the_walk_and_matches_sam_predictor(brats):
    """``encode_batch=3``: a new walk encodes its slice and both neighbours in one encoder call, a walk going up
    encodes the next slices up; every slice's logits equal SamPredictor's on that slice alone."""
    flair, _, k, box = brats
    model = small_sam()
    calls = []
    model.image_encoder.register_forward_hook(lambda _m, inputs, _o: calls.append(inputs[0].shape[0]))
    engine = SamEngine.from_model(model, "sam-small-test", options=AccelOptions(encode_batch=3))
    prepared = engine.prepare(flair)
    ours = {k: engine.predict_slice_detailed(prepared, k, box)}
    assert calls == [3] and sorted(prepared.cache.computed) == [k - 1, k, k + 1]
    for kk in (k + 1, k + 2, k + 3):
        ours[kk] = engine.predict_slice_detailed(prepared, kk, box)
    assert calls == [3, 3] and sorted(prepared.cache.computed) == list(range(k - 1, k + 5))
    reference, frames = SamPredictor(model), FrameSource(flair)
    for kk, (logits, score, low) in ours.items():
        reference.set_image(frames.rgb_uint8(kk))
        ref, iou, ref_low = reference.predict(box=box, multimask_output=False, return_logits=True)
        np.testing.assert_allclose(low, ref_low[0], atol=1e-4)
        np.testing.assert_allclose(logits, ref[0], atol=1e-4)
        assert score == pytest.approx(float(np.clip(iou[0], 0, 1)), abs=1e-5)


def test_segment_3d_through_shared_propagation(brats):
    pytest.importorskip("mrisegassist.prompt.propagation")
    flair, _, k, box = brats
    volume = flair[k - 4:k + 5]
    before = volume.copy()
    engine = SamEngine.from_model(small_sam(), "sam-small-test")
    prepared = engine.prepare(volume)
    i0, j0, i1, j1 = (int(v) for v in box)
    prompt = ObjectPrompt(1, [Box2D(4, i0, j0, i1, j1)], z_range=(3, 5))
    (result,) = engine.segment(prepared, [prompt])
    logits = result.full_logits()
    assert result.shape == volume.shape and np.array_equal(result.full_mask(), logits > 0)
    assert result.slices[0] == 4 and set(result.slices) <= set(range(3, 6))
    outside = [kk for kk in range(volume.shape[0]) if kk not in result.slices]
    assert np.all(logits[outside] == OUTSIDE_LOGIT)
    assert set(result.slices) <= set(prepared.cache.computed) <= set(range(3, 6))  # encoded only in range
    assert np.array_equal(volume, before)  # the input is never modified


def test_bad_inputs_raise_input_error(brats):
    flair, _, k, box = brats
    engine = SamEngine.from_model(small_sam(), "sam-small-test")
    prepared = engine.prepare(flair)
    with pytest.raises(InputError, match="outside the volume"):
        engine.predict_slice(prepared, flair.shape[0], box)
    with pytest.raises(InputError, match="4 finite numbers"):
        engine.predict_slice(prepared, k, np.array([1, 2, 3]))
    with pytest.raises(InputError, match="empty"):
        engine.predict_slice(prepared, k, np.array([50, 50, 40, 60]))
    with pytest.raises(InputError, match="outside the slice"):
        engine.predict_slice(prepared, k, np.array([300, 10, 320, 20]))
    other = SamEngine.from_model(small_sam(), "sam-small-test")
    with pytest.raises(InputError, match="not made by this engine"):
        other.predict_slice(prepared, k, box)
    bad = flair[:3].copy()
    bad[1, 5, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        engine.prepare(bad)
    with pytest.raises(InputError, match="constant|empty"):
        engine.prepare(np.zeros((3, 8, 8), np.float32))
    assert prepared.encoder_calls == 0  # every check ran before any encoding


def test_missing_and_wrong_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MRISEGASSIST_WEIGHTS", raising=False)
    with pytest.raises(CheckpointError, match=r"sam_vit_b_01ec64\.pth.*https://dl\.fbaipublicfiles\.com"):
        SamEngine("sam-vit-b")
    wrong = tmp_path / "small.pth"
    torch.save(small_sam().state_dict(), wrong)
    with pytest.raises(CheckpointError, match="does not fit the SAM vit_b architecture.*(missing|shape)"):
        SamEngine("sam-vit-b", checkpoint=wrong)
    with pytest.raises(InputError, match="unknown SAM variant"):
        SamEngine("sam-vit-x")


def test_device_auto_places_the_model(monkeypatch):
    """``device="auto"`` resolves before the model moves (no CUDA or MPS here: the CPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    engine = SamEngine.from_model(small_sam(), "sam-small-test", device="auto")
    assert engine.device == "cpu" and engine.options.dtype(engine.device) is None  # fp32 on the CPU


# ------------------------------------------------------------------------------------ point prompts
def _points(*spec) -> list:
    from mrisegassist.prompt.base import Point2D

    return [Point2D(k, i, j, positive) for k, i, j, positive in spec]


def test_point_prompts_match_sam_predictor(brats):
    """Positive and negative points with a box, points alone, and one point alone (SAM's three masks, the best
    scored kept) on a real slice: the logits, low-resolution logits and score SamPredictor gives."""
    flair, labels, k, box = brats
    model = small_sam()
    engine = SamEngine.from_model(model, "sam-small-test")
    assert engine.accepts_points
    prepared = engine.prepare(flair)
    jj, ii = np.nonzero(labels[k])
    inside = (int(ii[len(ii) // 2]), int(jj[len(jj) // 2]))
    outside = (int(box[0]) - 6, int(box[1]) - 6)
    reference = SamPredictor(model)
    reference.set_image(FrameSource(flair).rgb_uint8(k))
    cases = [(box, _points((k, *inside, True), (k, *outside, False))),
             (None, _points((k, *inside, True), (k, *outside, False))),
             (box, _points((k, *outside, False))),
             (None, _points((k, *inside, True)))]
    for prompt_box, points in cases:
        logits, score, low = engine.predict_slice_detailed(prepared, k, prompt_box, points=points)
        coords = np.array([[p.i, p.j] for p in points], np.float32)
        point_labels = np.array([int(p.positive) for p in points], np.int32)
        single = prompt_box is None and len(points) == 1
        ref, iou, ref_low = reference.predict(point_coords=coords, point_labels=point_labels, box=prompt_box,
                                              multimask_output=single, return_logits=True)
        best = int(np.argmax(iou))
        assert ref.shape[0] == (3 if single else 1)
        np.testing.assert_allclose(low, ref_low[best], atol=1e-4)
        np.testing.assert_allclose(logits, ref[best], atol=1e-4)
        assert score == pytest.approx(float(np.clip(iou[best], 0, 1)), abs=1e-5)
    assert prepared.encoder_calls == 1  # one slice, encoded once for every prompt
    with pytest.raises(InputError, match="a box or a point"):
        engine.predict_slice(prepared, k, None)
    with pytest.raises(InputError, match="points on slice"):
        engine.predict_slice(prepared, k, box, points=_points((k + 1, *inside, True)))
    with pytest.raises(InputError, match="outside the volume"):
        engine.predict_slice(prepared, k, box, points=_points((k, 500, 5, False)))


def test_points_reach_sam_through_propagation(brats):
    """``segment``: a prompted slice gets its box with its points, a slice with a positive point and no box is
    prompted by its points alone, a walked slice carrying a negative point gets it with its propagated box, other
    slices get boxes only; the prompted slices' logits are SamPredictor's for the same prompt (where kept)."""
    flair, labels, k, box = brats
    volume = flair[k - 3:k + 4]
    model = small_sam()
    engine = SamEngine.from_model(model, "sam-small-test")
    calls, order = {}, []
    original = engine.predict_slice_detailed

    def spy(prepared, kk, b, *, points=(), cancel=None):
        calls.setdefault(kk, []).append((None if b is None else np.asarray(b).tolist(), list(points)))
        order.append(kk)
        return original(prepared, kk, b, points=points, cancel=cancel)

    engine.predict_slice_detailed = spy
    jj, ii = np.nonzero(labels[k])
    centre = (int(ii[len(ii) // 2]), int(jj[len(jj) // 2]))
    i0, j0, i1, j1 = (int(v) for v in box)
    on_box = _points((3, *centre, True), (3, i0 + 1, j0 + 1, False))
    walked = _points((5, i0 + 2, j0 + 2, False))
    alone = _points((1, *centre, True))
    prompt = ObjectPrompt(1, [Box2D(3, i0, j0, i1, j1)], z_range=(0, 6), points=on_box + walked + alone)
    prepared = engine.prepare(volume)
    (result,) = engine.segment(prepared, [prompt])
    assert order[:2] == [1, 3]  # the prompted slices first, by k
    assert calls[3][0] == (Box2D(3, i0, j0, i1, j1).xyxy.tolist(), on_box)
    assert calls[1][0] == (None, alone)
    assert all(points == walked for _, points in calls.get(5, []))
    assert all(points == [] and b is not None for kk in (0, 2, 4, 6) for b, points in calls.get(kk, []))
    reference = SamPredictor(model)
    frames = FrameSource(volume)
    for kk, b, points in ((3, Box2D(3, i0, j0, i1, j1).xyxy, on_box), (1, None, alone)):
        if kk not in result.slices:
            continue
        reference.set_image(frames.rgb_uint8(kk))
        single = b is None and len(points) == 1
        ref, iou, _ = reference.predict(point_coords=np.array([[p.i, p.j] for p in points], np.float32),
                                        point_labels=np.array([int(p.positive) for p in points], np.int32),
                                        box=b, multimask_output=single, return_logits=True)
        best = ref[int(np.argmax(iou))]
        logits = result.full_logits()[kk]
        kept = logits > OUTSIDE_LOGIT  # components away from the prompt are dropped
        np.testing.assert_allclose(logits[kept], best[kept], atol=1e-4)
