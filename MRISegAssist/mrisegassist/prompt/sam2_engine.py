"""SAM 2.1 and MedSAM2 through the official ``sam2`` video predictor, fed straight from the volume array.

The axial slices of the volume are the frames of a video (frame ``f`` of a window ``z0..z1`` is slice
``k = z0 + f``). Instead of ``SAM2VideoPredictor.init_state(video_path)`` (which only reads JPEG folders or
MP4 files and loads every frame), :func:`Sam2Engine._state` builds the same inference-state dictionary with

* ``images``: a lazy frame sequence; frame ``f`` is made on demand by :meth:`.windowing.FrameSource.sam2_tensor`,
  only when the predictor asks for it, i.e. on an image-feature cache miss;
* ``cached_features``: sam2 1.1.0's ``_get_image_feature`` looks a frame up with
  ``inference_state["cached_features"].get(frame_idx)`` and, on a miss, runs ``forward_image`` and *replaces*
  the dict with ``{frame_idx: (image, backbone_out)}`` (it keeps one frame). Our state routes that lookup to
  the prepared volume's persistent LRU (:class:`~.windowing.SliceCache`, keyed by slice ``k``) and turns the
  replacement into an insertion, so each slice is encoded once per prepared volume, across prompts, objects,
  windows and :meth:`Sam2Engine.segment` calls. Stored per slice: the three ``backbone_fpn`` levels; the
  ``vision_pos_enc`` (identical for every frame of one size) is kept once; the ``image`` element of the
  tuple, which sam2 1.1.0 never reads after encoding, is a broadcast placeholder.

Encoding: the slices a walk needs are encoded ahead of it in batches (:meth:`Sam2Engine.encode`): the raw
slices are uploaded and windowed, resized and normalised on the device (:meth:`.windowing.FrameSource.sam2_batch`),
the image encoder runs on the batch, and the features stay on the device. Batch size: ``options.encode_batch``
(0 = from free GPU memory on CUDA, :data:`CPU_ENCODE_BATCH` elsewhere), halved on CUDA out-of-memory
(:mod:`.accel`).

Prompts: every prompted slice of every object of a window (a box and/or points) goes into one inference state:
one ``add_new_points_or_box(points=, labels=, box=)`` call per slice with its box and its positive and negative
points, a conditioning frame as in the official predictor (memory not reset between them), and
``propagate_in_video_preflight`` encodes their memories; the objects are then followed forward from the first
prompted slice and backward from it, over the window, by :class:`.sam2_track.Sam2Tracker`
(``options.loop = "lean"``: the official per-frame maths with device-side bookkeeping, fixed shapes and CUDA
graphs on CUDA) or by the official ``propagate_in_video``
(``loop = "official"``, the frame-by-frame reference). An object's ``bounds`` (a 3D ROI's rectangle) mask its
logits outside them. Without a ``z_range`` the window is the whole volume and a direction stops early once
every object has been empty for ``vanish_frames`` frames past its outermost prompt. Prompt state is reset
(``reset_state``) at every call; image features are kept.

MedSAM2 = the packaged ``sam2.1_hiera_t.yaml`` with ``image_size=512`` and memory-attention RoPE
``feat_sizes=[32, 32]``. ``fill_hole_area = 0`` (the ``_C`` extension is not built). Precision
(``options.precision``): fp32 on CPU (bf16 autocast on CPU is ~10x slower), bf16 autocast on CUDA by default.
Logits are full resolution ``[k, j, i]``.
"""
from __future__ import annotations

import contextlib
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..errors import InputError
from ..overrides import SharedOverride
from ..progress import CancelToken, ProgressFn, check, report
from .accel import AccelOptions, autocast, encode_in_batches, resolve_device
from .base import OUTSIDE_LOGIT, ObjectPrompt, ObjectResult, PromptableEngine, SlicePrompt
from .sam import FoundationEngineMixin, PreparedVolume, default_cache_bytes
from .sam2_track import FrameFeatures, Sam2Tracker, Vanish, unsupported_reason
from .weights import load_into, load_state_dict, resolve_checkpoint
from .windowing import Window

DEFAULT_CACHE_BYTES = 3 << 29  # 1.5 GiB: ~370 slices at 512 px, ~90 at 1024 px (fp32)
DEFAULT_VANISH_FRAMES = 3
#: slices per image-encoder call off CUDA (auto): 4 took ~35 % less CPU time per slice than 1 (Hiera-T, 512 px)
CPU_ENCODE_BATCH = 4


@dataclass(frozen=True)
class Sam2Variant:
    """A registry name's packaged config, image size, extra Hydra overrides and catalog checkpoint."""

    config: str
    image_size: int
    weights: str
    overrides: tuple[str, ...] = ()


def rope_overrides(image_size: int) -> tuple[str, ...]:
    """Hydra overrides for another input size: ``image_size`` and the memory-attention RoPE feature size."""
    side = image_size // 16
    return (f"++model.image_size={image_size}",
            f"++model.memory_attention.layer.self_attention.feat_sizes=[{side},{side}]",
            f"++model.memory_attention.layer.cross_attention.feat_sizes=[{side},{side}]")


SAM2_VARIANTS = {
    "sam2.1-hiera-tiny": Sam2Variant("configs/sam2.1/sam2.1_hiera_t.yaml", 1024, "sam2.1-hiera-tiny"),
    "sam2.1-hiera-small": Sam2Variant("configs/sam2.1/sam2.1_hiera_s.yaml", 1024, "sam2.1-hiera-small"),
    "sam2.1-hiera-base-plus": Sam2Variant("configs/sam2.1/sam2.1_hiera_b+.yaml", 1024, "sam2.1-hiera-base-plus"),
    "sam2.1-hiera-large": Sam2Variant("configs/sam2.1/sam2.1_hiera_l.yaml", 1024, "sam2.1-hiera-large"),
    "medsam2": Sam2Variant("configs/sam2.1/sam2.1_hiera_t.yaml", 512, "medsam2", rope_overrides(512)),
}


def sam2_variant(variant: str) -> Sam2Variant:
    spec = SAM2_VARIANTS.get(variant)
    if spec is None:
        raise InputError(f"unknown SAM 2 variant {variant!r}; use one of {', '.join(SAM2_VARIANTS)}")
    return spec


def build_sam2_predictor(variant: str, device: str = "cpu", image_size: Optional[int] = None,
                         vos_optimized: bool = False):
    """An official ``SAM2VideoPredictor`` for ``variant`` at (seedable) random initialisation, eval mode,
    ``fill_hole_area = 0``. ``image_size`` overrides the variant's input size (multiple of 16).
    ``vos_optimized``: sam2's ``SAM2VideoPredictorVOS`` (``torch.compile`` of the memory attention, memory
    encoder, prompt encoder and mask decoder, mode ``max-autotune``, compiled on first use; and of the image
    encoder, except Hiera-T's, which sam2's config says does not support compilation)."""
    from sam2.build_sam import build_sam2_video_predictor

    spec = sam2_variant(variant)
    overrides = list(spec.overrides)
    if image_size is not None and image_size != spec.image_size:
        if image_size % 16:
            raise InputError(f"SAM 2 image size must be a multiple of 16, got {image_size}")
        overrides = [o for o in overrides if "image_size" not in o and "feat_sizes" not in o]
        overrides += rope_overrides(image_size)
    if vos_optimized and spec.config.endswith("_t.yaml"):
        overrides.append("++model.compile_image_encoder=False")
    with contextlib.redirect_stdout(sys.stderr):  # the VOS build prints a notice; stdout may carry --json
        predictor = build_sam2_video_predictor(spec.config, None, device=device, hydra_overrides_extra=overrides,
                                               vos_optimized=vos_optimized)
    predictor.fill_hole_area = 0
    return predictor


@dataclass
class Sam2Prepared(PreparedVolume):
    """A volume bound to a :class:`Sam2Engine`: the per-slice image-feature cache (kept across
    :meth:`Sam2Engine.segment` calls) and the inference states per frame window (reset on each call)."""

    image_size: int = 1024
    pos_enc: Optional[list] = None
    states: dict = field(default_factory=dict)


class _LazyFrames:
    """``inference_state["images"]``: frame ``f`` -> ``[3, S, S]`` normalised tensor of slice ``z0 + f``."""

    def __init__(self, prepared: Sam2Prepared, z0: int, count: int, device) -> None:
        self.prepared, self.z0, self.count, self.device = prepared, z0, count, device

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, f: int):
        if not 0 <= f < self.count:
            raise IndexError(f)
        return self.prepared.frames.sam2_tensor(self.z0 + f, self.prepared.image_size).to(self.device)


class _FeatureView:
    """``inference_state["cached_features"]`` routed to the prepared volume's persistent slice cache."""

    def __init__(self, prepared: Sam2Prepared, z0: int, device) -> None:
        self.prepared, self.z0 = prepared, z0
        size = prepared.image_size
        self.placeholder = torch.zeros(1, 1, 1, 1, device=device).expand(1, 3, size, size)

    def get(self, f: int, default=(None, None)):
        fpn = self.prepared.cache.get(self.z0 + f)
        if fpn is None:
            return default
        return self.placeholder, {"backbone_fpn": list(fpn), "vision_pos_enc": list(self.prepared.pos_enc)}

    def store(self, computed: dict) -> None:
        for f, (_image, backbone_out) in computed.items():
            if self.prepared.pos_enc is None:
                self.prepared.pos_enc = list(backbone_out["vision_pos_enc"])
            self.prepared.cache.add_computed(self.z0 + f, list(backbone_out["backbone_fpn"]))


class _InferenceState(dict):
    """The predictor's state dict; assigning ``cached_features`` (a fresh one-frame dict) stores into the view."""

    def __setitem__(self, key, value) -> None:
        view = self.get("cached_features")
        if key == "cached_features" and isinstance(view, _FeatureView) and not isinstance(value, _FeatureView):
            view.store(value)
        else:
            super().__setitem__(key, value)


def _silence_tqdm():
    import sam2.sam2_video_predictor as module

    original = module.tqdm
    module.tqdm = lambda iterable, *args, **kwargs: iterable
    return original


def _restore_tqdm(original) -> None:
    import sam2.sam2_video_predictor as module

    module.tqdm = original


#: Silences the tqdm bar ``propagate_in_video`` draws (``sam2.sam2_video_predictor.tqdm``) while any engine call
#: runs: the engine reports through its ``progress`` callback instead.
_quiet_sam2_progress = SharedOverride(_silence_tqdm, _restore_tqdm)


def _upcast_memory(state: dict, frame: Optional[int] = None) -> None:
    """Store the memory features of ``frame`` (all frames if ``None``) as fp32 instead of sam2's bf16.

    sam2 1.1.0 keeps ``maskmem_features`` in bf16 and relies on ``torch.cat`` with the fp32 object pointers to
    promote them before memory attention. An object followed on frames before its first prompted frame (another
    object of the same state was prompted earlier) has no past pointers there, the memory stays bf16 and fp32
    inference fails with a dtype error. bf16 -> fp32 is exact, so where the official path works the numbers are
    the same ones it promotes to.
    """
    for outputs in state["output_dict_per_obj"].values():
        for frames in (outputs["cond_frame_outputs"], outputs["non_cond_frame_outputs"]):
            for out in (frames.values() if frame is None else [frames.get(frame)]):
                feats = None if out is None else out.get("maskmem_features")
                if feats is not None and feats.dtype == torch.bfloat16:
                    out["maskmem_features"] = feats.float()


_Vanish = Vanish  # the early-stop rule lives in sam2_track; kept importable under its old name


class Sam2Engine(FoundationEngineMixin, PromptableEngine):
    """SAM 2.1 (tiny/small/base-plus/large) or MedSAM2 video propagation over the slices.

    ``Sam2Engine(variant, device="cpu", checkpoint=None)`` loads the verified catalog checkpoint
    (``download=True`` fetches it); :meth:`from_model` wraps an already built ``SAM2VideoPredictor``.
    ``device="auto"``: cuda > mps > cpu. ``vanish_frames``: empty frames after which an unbounded propagation
    stops. ``options``: :class:`~.accel.AccelOptions` (precision, encoder batch, CUDA graphs, compile, loop).
    ``cache_bytes``: bound of a prepared volume's feature cache (default: 1.5 GiB; on CUDA up to 4 GiB).
    """

    accepts_points = True

    _model_attr = "predictor"

    def __init__(self, variant: str = "sam2.1-hiera-tiny", device: str = "cpu",
                 checkpoint: Optional[Union[str, Path]] = None, *, download: bool = False,
                 cache_bytes: Optional[int] = None, vanish_frames: int = DEFAULT_VANISH_FRAMES,
                 options: Optional[AccelOptions] = None,
                 progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> None:
        spec = sam2_variant(variant)
        device = resolve_device(device)
        path = resolve_checkpoint(spec.weights, checkpoint, download=download, progress=progress, cancel=cancel)
        predictor = build_sam2_predictor(variant, "cpu")
        load_into(predictor, load_state_dict(path), variant, path)
        self._setup(predictor.to(device), variant, cache_bytes, vanish_frames, options)
        self.checkpoint = path

    @classmethod
    def from_model(cls, predictor, name: str = "sam2.1-hiera-tiny", cache_bytes: Optional[int] = None,
                   vanish_frames: int = DEFAULT_VANISH_FRAMES,
                   options: Optional[AccelOptions] = None) -> "Sam2Engine":
        """Wrap a built ``SAM2VideoPredictor`` (e.g. :func:`build_sam2_predictor` after ``torch.manual_seed``)."""
        engine = cls.__new__(cls)
        engine._setup(predictor, name, cache_bytes, vanish_frames, options)
        engine.checkpoint = None
        return engine

    def _setup(self, predictor, name: str, cache_bytes: Optional[int], vanish_frames: int,
               options: Optional[AccelOptions]) -> None:
        if int(vanish_frames) < 1:
            raise InputError(f"vanish_frames must be >= 1, got {vanish_frames}")
        predictor.fill_hole_area = 0
        self.predictor = predictor.eval()
        device = str(self.predictor.device)
        self._init_engine(name, default_cache_bytes(device, DEFAULT_CACHE_BYTES) if cache_bytes is None
                          else cache_bytes)
        self.vanish_frames = int(vanish_frames)
        self.options = options or AccelOptions()
        #: why the lean loop cannot run this model (then the official loop runs), ``None`` when it can
        self.lean_unsupported = unsupported_reason(self.predictor)
        self.tracker = Sam2Tracker(self.predictor, self.options) if self.lean_unsupported is None else None
        # 0 on CUDA until the first batch measured the memory per slice
        self._batch = self.options.encode_batch or (0 if device.startswith("cuda") else CPU_ENCODE_BATCH)

    @property
    def device(self):
        return self.predictor.device

    @property
    def image_size(self) -> int:
        return int(self.predictor.image_size)

    @property
    def dtype(self):
        """The autocast dtype (``None``: fp32)."""
        return self.options.dtype(str(self.device))

    # ---------------------------------------------------------------------------------------- protocol
    def prepare(self, volume: np.ndarray, *, progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None,
                window: Optional[Union[Window, Sequence[float]]] = None) -> Sam2Prepared:
        """Bind ``volume`` ``[k, j, i]`` (not copied, never modified); frames are encoded when a walk needs them."""
        return Sam2Prepared(*self._frames(volume, window, cancel), self._id, self.image_size)

    def segment(self, prepared: Sam2Prepared, prompts: Sequence[ObjectPrompt], *,
                progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None) -> list[ObjectResult]:
        """Segment every object in 3D; objects sharing a frame window share one inference state."""
        self._check_prepared(prepared)
        shape = prepared.shape
        prompts = [p.validate(shape) for p in prompts]
        ids = [p.object_id for p in prompts]
        if len(set(ids)) != len(ids):
            raise InputError(f"object ids must be unique, got {ids}")
        groups: OrderedDict[tuple[int, int, bool], list[ObjectPrompt]] = OrderedDict()
        for p in prompts:
            z0, z1 = p.z_range if p.z_range is not None else (0, shape[0] - 1)
            groups.setdefault((z0, z1, p.z_range is None), []).append(p)
        results = {p.object_id: ObjectResult.blank(p.object_id, shape, p.name) for p in prompts}  # full grid
        total = sum(z1 - z0 + 2 for z0, z1, _ in groups)
        done = [0]

        def tick(k: int) -> None:
            done[0] += 1
            report(progress, done[0] / total, f"slice {k}")

        lean = self.options.loop == "lean" and self.tracker is not None
        with self._lock, torch.inference_mode(), autocast(self.device, self.dtype), _quiet_sam2_progress():
            for (z0, z1, unbounded), group in groups.items():
                state = self._prompted_state(prepared, z0, z1, group, cancel)
                run = self._run_lean if lean else self._run_official
                run(prepared, state, z0, z1, unbounded, group, results, tick, cancel)
                self.predictor.reset_state(state)  # free the per-frame outputs; the image features stay cached
        report(progress, 1.0, "done")
        for r in results.values():
            r.mask = r.logits > 0
        return [results[i] for i in ids]

    # ------------------------------------------------------------------------------------ encoding
    def encode(self, prepared: Sam2Prepared, ks: Sequence[int], cancel: Optional[CancelToken] = None) -> None:
        """Encode the slices ``ks`` not cached yet, in batches on the device (features kept there)."""
        self._check_prepared(prepared)
        missing = list(dict.fromkeys(int(k) for k in ks if int(k) not in prepared.cache))
        if not missing:
            return
        device = self.device

        def run(chunk: Sequence[int]) -> None:
            images = prepared.frames.sam2_batch(chunk, prepared.image_size, device)
            out = self.predictor.forward_image(images)
            if prepared.pos_enc is None:
                prepared.pos_enc = [p[:1].clone() for p in out["vision_pos_enc"]]
            for i, k in enumerate(chunk):
                prepared.cache.add_computed(k, [level[i:i + 1].clone() for level in out["backbone_fpn"]])

        with self._lock, torch.inference_mode(), autocast(device, self.dtype):
            used = encode_in_batches(missing, run, str(device), self._batch, "encoding SAM 2 frames",
                                     check=lambda: check(cancel))
        if self.options.encode_batch == 0 and str(device).startswith("cuda"):
            self._batch = used

    def _features(self, prepared: Sam2Prepared, k: int) -> FrameFeatures:
        fpn = prepared.cache.get(k)
        if fpn is None:  # evicted (cache smaller than the walk): encode it again
            self.encode(prepared, [k])
            fpn = prepared.cache.get(k)
            if fpn is None:
                raise InputError(f"the feature cache ({prepared.cache.max_bytes} bytes) cannot hold one slice")
        return FrameFeatures(fpn, prepared.pos_enc[-1])

    def _lookahead(self, prepared: Sam2Prepared, z0: int, z1: int, frames: Sequence[int]) -> list[int]:
        """Slices of ``frames`` (window-relative, in walk order) and, when one of them is not encoded yet, the
        next ones in the walk's direction, up to one encoder batch, limited by what half the feature cache holds."""
        ks = [z0 + f for f in frames]
        if all(k in prepared.cache for k in ks):
            return []
        want = max(self._batch, len(ks))
        if want > len(ks) and len(prepared.cache):
            per_slice = prepared.cache.bytes / len(prepared.cache)
            want = min(want, max(len(ks), int(prepared.cache.max_bytes // 2 // max(per_slice, 1))))
        step = -1 if len(ks) > 1 and ks[1] < ks[0] else 1
        k = ks[-1]
        while len(ks) < want and z0 <= k + step <= z1:
            k += step
            ks.append(k)
        return ks

    # ------------------------------------------------------------------------------------ internals
    def _state(self, prepared: Sam2Prepared, z0: int, z1: int) -> dict:
        """The inference state of frames ``z0..z1`` (as ``init_state`` makes it), prompts reset."""
        state = prepared.states.get((z0, z1))
        if state is not None:
            self.predictor.reset_state(state)
            return state
        device = self.predictor.device
        state = _InferenceState()
        state["cached_features"] = _FeatureView(prepared, z0, device)
        state["images"] = _LazyFrames(prepared, z0, z1 - z0 + 1, device)
        state["num_frames"] = z1 - z0 + 1
        state["offload_video_to_cpu"] = False
        state["offload_state_to_cpu"] = False
        state["video_height"], state["video_width"] = prepared.shape[1], prepared.shape[2]
        state["device"] = device
        state["storage_device"] = device
        state["point_inputs_per_obj"] = {}
        state["mask_inputs_per_obj"] = {}
        state["constants"] = {}
        state["obj_id_to_idx"] = OrderedDict()
        state["obj_idx_to_id"] = OrderedDict()
        state["obj_ids"] = []
        state["output_dict_per_obj"] = {}
        state["temp_output_dict_per_obj"] = {}
        state["frames_tracked_per_obj"] = {}
        prepared.states[(z0, z1)] = state
        return state

    def _prompted_state(self, prepared: Sam2Prepared, z0: int, z1: int, group: list[ObjectPrompt],
                        cancel: Optional[CancelToken]) -> dict:
        """The window's state with every prompted slice added and the prompted frames' memories encoded."""
        prompted = sorted({sp.k for p in group for sp in self._frame_prompts(p, z0, z1)})
        self.encode(prepared, self._lookahead(prepared, z0, z1, [k - z0 for k in prompted]), cancel)
        state = self._state(prepared, z0, z1)
        for p in group:
            for sp in self._frame_prompts(p, z0, z1):
                check(cancel)
                self.predictor.add_new_points_or_box(
                    state, frame_idx=sp.k - z0, obj_id=p.object_id, points=sp.point_coords, labels=sp.point_labels,
                    box=None if sp.box is None else sp.box.xyxy)
        self.predictor.propagate_in_video_preflight(state)  # encodes the prompted frames' memory
        return state

    def _run_lean(self, prepared: Sam2Prepared, state: dict, z0: int, z1: int, unbounded: bool,
                  group: list[ObjectPrompt], results: dict, tick, cancel: Optional[CancelToken]) -> None:
        outside = {p.object_id: p.outside_bounds(prepared.shape[1:]) for p in group}
        tracked = self.tracker.track(
            state, lambda f: self._features(prepared, z0 + f),
            prefetch=lambda frames: self.encode(prepared, self._lookahead(prepared, z0, z1, frames), cancel),
            vanish_frames=self.vanish_frames if unbounded else None, outside=outside,
            tick=lambda f: tick(z0 + f), cancel=cancel)
        for obj in tracked:
            result = results[obj.obj_id]
            ks = [z0 + f for f in obj.slices]
            if ks:
                result.logits[ks] = obj.logits
            for k, f in zip(ks, obj.slices):
                if k not in result.scores:
                    result.slices.append(k)
                result.scores[k] = obj.scores[f]

    def _run_official(self, prepared: Sam2Prepared, state: dict, z0: int, z1: int, unbounded: bool,
                      group: list[ObjectPrompt], results: dict, tick, cancel: Optional[CancelToken]) -> None:
        """``propagate_in_video`` frame by frame (the reference; image features encoded lazily, one by one)."""
        predictor = self.predictor
        upcast = self.dtype is None  # under bf16 autocast the dtypes already agree
        if upcast:
            _upcast_memory(state)
        outside = {p.object_id: p.outside_bounds(prepared.shape[1:]) for p in group}
        for reverse in (False, True):
            outermost = {p.object_id: (min if reverse else max)(sp.k for sp in self._frame_prompts(p, z0, z1)) - z0
                         for p in group}
            vanish = Vanish(self.vanish_frames, outermost, reverse)
            for f, obj_ids, masks in predictor.propagate_in_video(state, reverse=reverse):
                check(cancel)
                if upcast:
                    _upcast_memory(state, f)
                k = z0 + f
                logits = masks[:, 0].float().cpu().numpy()
                for idx, oid in enumerate(obj_ids):
                    if oid in vanish.done:
                        continue
                    result = results[oid]
                    result.logits[k] = logits[idx]
                    if outside[oid] is not None:  # the object's bounds (a 3D ROI): nothing outside is kept
                        result.logits[k][outside[oid]] = OUTSIDE_LOGIT
                    if k not in result.scores:
                        result.slices.append(k)
                    result.scores[k] = self._presence(state, idx, f)
                    if unbounded:
                        vanish.update(f, oid, bool((result.logits[k] > 0).any()))
                tick(k)
                if unbounded and vanish.all_done:
                    break

    @staticmethod
    def _frame_prompts(prompt: ObjectPrompt, z0: int, z1: int) -> list[SlicePrompt]:
        """The object's prompted frames in window ``z0..z1``: every slice with a box or points (a negative point
        outside the window is left out: no frame there)."""
        return [sp for sp in prompt.slice_prompts() if z0 <= sp.k <= z1]

    @staticmethod
    def _presence(state: dict, obj_idx: int, f: int) -> float:
        """SAM 2's object-presence probability (sigmoid of ``object_score_logits``) on frame ``f``."""
        outputs = state["output_dict_per_obj"][obj_idx]
        out = outputs["cond_frame_outputs"].get(f) or outputs["non_cond_frame_outputs"].get(f)
        if out is None or out.get("object_score_logits") is None:
            return float("nan")
        return float(out["object_score_logits"].float().sigmoid().reshape(-1)[0])


Sam2Engine._prepared_type = Sam2Prepared
