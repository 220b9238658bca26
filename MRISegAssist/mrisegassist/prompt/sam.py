"""Segment Anything (official ``segment_anything`` package) as a per-slice :class:`SliceEngine`.

A slice becomes an 8-bit RGB frame through :class:`~.windowing.FrameSource` (percentile window of the
volume); SAM's own ``SamPredictor`` preprocessing (``ResizeLongestSide`` to 1024, pixel normalisation,
padding) and image encoder make its embedding, computed the first time a slice is needed and kept in a
bounded LRU (:class:`~.windowing.SliceCache`) inside the prepared handle, so re-prompting never re-encodes.
On a miss, :meth:`SamEngine.embedding` encodes a *batch*: the slice and the next ones the slice-to-slice walk
will ask for (continuing the direction of the previous request; around the slice for a new walk), one image
encoder call for all (``options.encode_batch``; 0 = from free GPU memory on CUDA, 1 = one slice, elsewhere).
:meth:`SamEngine.predict_slice` restores a slice's cached ``features`` / ``original_size`` / ``input_size`` into
the predictor and calls ``SamPredictor.predict(point_coords=..., point_labels=..., box=..., return_logits=True)``
(one mask, or the best of three for a single point alone): the logits are those SamPredictor gives for that
slice image and prompt. Point prompts (``accepts_points``): a slice's positive and negative points go with its
box, or alone on a slice with no box; a propagated slice carrying points gets them with its propagated box.
3D comes from the shared slice-to-slice propagation (:mod:`.propagation`). Precision (``options.precision``):
the image encoder runs under bf16 autocast on CUDA by default (embeddings stored as float32), fp32 elsewhere;
prompt encoder and mask decoder fp32.

Box coordinates are ``[x0, y0, x1, y1]`` float pixels of the slice (x = i, y = j); logits are ``[j, i]``.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import InputError
from ..progress import CancelToken, ProgressFn, check
from .accel import AccelOptions, autocast, encode_in_batches, resolve_device
from .base import Point2D, SliceEngine, SlicePrompt
from .weights import load_into, load_state_dict, resolve_checkpoint
from .windowing import FrameSource, SliceCache, Window

#: registry name -> segment_anything model type
SAM_VARIANTS = {"sam-vit-b": "vit_b", "sam-vit-l": "vit_l", "sam-vit-h": "vit_h"}
DEFAULT_CACHE_BYTES = 1 << 30  # 256 slice embeddings (256 x 64 x 64 float32 = 4 MiB each)
_engine_ids = itertools.count(1)


def sam_variant(variant: str) -> tuple[str, str]:
    """``(registry name, model type)`` for ``"sam-vit-b"`` or ``"vit_b"`` (and l/h)."""
    for name, model_type in SAM_VARIANTS.items():
        if variant in (name, model_type):
            return name, model_type
    raise InputError(f"unknown SAM variant {variant!r}; use one of {', '.join(SAM_VARIANTS)}")


def default_cache_bytes(device: str, cpu_default: int) -> int:
    """A prepared volume's feature-cache bound: ``cpu_default`` off CUDA; on CUDA up to 4 GiB (at most a tenth
    of the GPU's memory), so a whole walk stays encoded."""
    if not str(device).startswith("cuda"):
        return int(cpu_default)
    import torch

    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return int(max(cpu_default, min(4 << 30, total // 10)))


def build_sam_model(model_type: str):
    """A segment-anything model of ``model_type`` at (seedable) random initialisation, eval mode."""
    from segment_anything import sam_model_registry

    return sam_model_registry[model_type](checkpoint=None).eval()


@dataclass
class PreparedVolume:
    """A volume bound to an engine: lazy windowed frames plus the per-slice encoding cache."""

    frames: FrameSource
    cache: SliceCache
    engine_id: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.frames.shape

    @property
    def encoder_calls(self) -> int:
        """How many slices the image encoder ran on (cache misses) since ``prepare``."""
        return self.cache.misses


@dataclass
class SamPrepared(PreparedVolume):
    """A volume bound to a :class:`SamEngine` (embeddings: ``(features, original_size, input_size)``);
    ``last``: the slice asked for last (the walk's direction for batch encoding)."""

    last: Optional[int] = None


def check_box(box, shape: Sequence[int]) -> np.ndarray:
    """``box`` as float32 ``[x0, y0, x1, y1]``; :class:`InputError` if malformed or outside the slice."""
    arr = np.asarray(box, dtype=np.float32).reshape(-1)
    if arr.shape != (4,) or not np.all(np.isfinite(arr)):
        raise InputError(f"box must be 4 finite numbers [x0, y0, x1, y1], got {box!r}")
    _, nj, ni = shape
    x0, y0, x1, y1 = (float(v) for v in arr)
    if x1 < x0 or y1 < y0:
        raise InputError(f"box {arr.tolist()} is empty (need x0 <= x1 and y0 <= y1)")
    if x1 < 0 or y1 < 0 or x0 > ni - 1 or y0 > nj - 1:
        raise InputError(f"box {arr.tolist()} lies outside the slice (x 0..{ni - 1}, y 0..{nj - 1})")
    return arr


def check_points(points: Sequence[Point2D], shape: Sequence[int], k: int
                 ) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """``(point_coords [n, 2] float32 (x, y), point_labels [n] int32)`` of points on slice ``k`` (``(None, None)``
    without points); :class:`InputError` for a point on another slice or outside the volume."""
    if not points:
        return None, None
    prompt = SlicePrompt(int(k), None, tuple(p.validate(shape) for p in points))
    other = [p.k for p in prompt.points if p.k != prompt.k]
    if other:
        raise InputError(f"points on slice(s) {other} given for slice {k}")
    return prompt.point_coords, prompt.point_labels


class FoundationEngineMixin:
    """What the SAM and SAM 2 engines share: identity of their prepared handles, windowed frame sources,
    release of the model. Subclasses call :meth:`_init_engine` and name their model attribute in ``_model_attr``."""

    _model_attr = "model"
    _prepared_type: type = object

    def _init_engine(self, name: str, cache_bytes: int) -> None:
        self.name = name
        self.cache_bytes = int(cache_bytes)
        self._lock = threading.RLock()
        self._id = next(_engine_ids)

    def _frames(self, volume: np.ndarray, window, cancel: Optional[CancelToken]) -> tuple[FrameSource, SliceCache]:
        self._check_alive()
        check(cancel)
        return FrameSource(volume, window), SliceCache(self.cache_bytes)

    @property
    def encode_batch_size(self) -> int:
        """Slices per image-encoder call (on CUDA with ``encode_batch=0``: 0 until the first batch measured it)."""
        return int(getattr(self, "_batch", 1))

    def release(self) -> None:
        """Free the model (and GPU memory); the engine cannot be used afterwards."""
        import torch

        with self._lock:
            setattr(self, self._model_attr, None)
            tracker = getattr(self, "tracker", None)
            if tracker is not None:
                tracker.clear()
                self.tracker = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _check_alive(self) -> None:
        if getattr(self, self._model_attr) is None:
            raise InputError(f"engine {self.name!r} was released; get a new one")

    def _check_prepared(self, prepared) -> None:
        self._check_alive()
        if not isinstance(prepared, self._prepared_type) or prepared.engine_id != self._id:
            raise InputError("this prepared volume was not made by this engine's prepare()")


class SamEngine(FoundationEngineMixin, SliceEngine):
    """SAM ViT-B/L/H per slice, box and point prompts. ``SamEngine(variant, device="cpu", checkpoint=None)``
    loads the verified official checkpoint (:func:`~.weights.resolve_checkpoint`; ``download=True`` fetches it);
    :meth:`from_model` wraps an already built model (e.g. seeded random initialisation in tests).
    ``device="auto"``: cuda > mps > cpu; ``options``: :class:`~.accel.AccelOptions` (precision, encoder batch)."""

    accepts_points = True
    slice_points = True

    def __init__(self, variant: str = "sam-vit-b", device: str = "cpu",
                 checkpoint: Optional[Union[str, Path]] = None, *, download: bool = False,
                 cache_bytes: Optional[int] = None, options: Optional[AccelOptions] = None,
                 progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> None:
        name, model_type = sam_variant(variant)
        device = resolve_device(device)
        path = resolve_checkpoint(name, checkpoint, download=download, progress=progress, cancel=cancel)
        model = build_sam_model(model_type)
        load_into(model, load_state_dict(path), f"SAM {model_type}", path)
        self._setup(model, name, device, cache_bytes, options)
        self.checkpoint = path

    @classmethod
    def from_model(cls, model, name: str = "sam-vit-b", device: Optional[str] = None,
                   cache_bytes: Optional[int] = None, options: Optional[AccelOptions] = None) -> "SamEngine":
        """Wrap a built ``segment_anything`` ``Sam`` model (kept on its device unless ``device`` is given)."""
        engine = cls.__new__(cls)
        engine._setup(model, name, None if device is None else resolve_device(device), cache_bytes, options)
        engine.checkpoint = None
        return engine

    def _setup(self, model, name: str, device: Optional[str], cache_bytes: Optional[int],
               options: Optional[AccelOptions]) -> None:
        from segment_anything import SamPredictor

        if device is not None:
            model = model.to(device)
        self.model = model.float().eval()
        self._init_engine(name, default_cache_bytes(self.device, DEFAULT_CACHE_BYTES) if cache_bytes is None
                          else cache_bytes)
        self.predictor = SamPredictor(self.model)
        self.options = options or AccelOptions()
        self._batch = self.options.encode_batch  # 0 until the first CUDA batch measured the memory per slice

    @property
    def device(self) -> str:
        return str(self.model.device)

    # ---------------------------------------------------------------------------------------- protocol
    def prepare(self, volume: np.ndarray, *, progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None,
                window: Optional[Union[Window, Sequence[float]]] = None) -> SamPrepared:
        """Bind ``volume`` ``[k, j, i]`` (not copied, never modified); nothing is encoded until needed."""
        return SamPrepared(*self._frames(volume, window, cancel), self._id)

    def predict_slice(self, prepared: SamPrepared, k: int, box: Optional[np.ndarray], *,
                      points: Sequence[Point2D] = (), cancel: Optional[CancelToken] = None) -> tuple[np.ndarray, float]:
        """Float32 logits ``[j, i]`` of slice ``k`` for ``box`` and/or ``points`` (positive and negative, on slice
        ``k``) and SAM's predicted IoU (clipped to 0..1)."""
        logits, score, _ = self.predict_slice_detailed(prepared, k, box, points=points, cancel=cancel)
        return logits, score

    def predict_slice_detailed(self, prepared: SamPrepared, k: int, box: Optional[np.ndarray], *,
                               points: Sequence[Point2D] = (), cancel: Optional[CancelToken] = None
                               ) -> tuple[np.ndarray, float, np.ndarray]:
        """As :meth:`predict_slice`, plus SAM's low-resolution logits ``[256, 256]``. The prompt goes to
        ``SamPredictor.predict(point_coords, point_labels, box)``; one point alone asks for SAM's three masks
        and keeps the best-scored one (an ambiguous prompt, as SAM 2 does for one click), else one mask."""
        self._check_prepared(prepared)
        coords, labels = check_points(points, prepared.shape, k)
        if box is None and coords is None:
            raise InputError(f"slice {k}: a box or a point is needed")
        box = None if box is None else check_box(box, prepared.shape)
        check(cancel)
        features, original_size, input_size = self.embedding(prepared, k, cancel=cancel)
        check(cancel)
        multimask = box is None and len(points) == 1
        with self._lock:
            p = self.predictor
            p.features, p.original_size, p.input_size, p.is_image_set = features, original_size, input_size, True
            try:
                masks, ious, low_res = p.predict(point_coords=coords, point_labels=labels, box=box,
                                                 multimask_output=multimask, return_logits=True)
            finally:
                p.reset_image()
        best = int(np.argmax(ious))
        return masks[best].astype(np.float32, copy=False), float(np.clip(ious[best], 0.0, 1.0)), low_res[best]

    def embedding(self, prepared: SamPrepared, k: int, *, cancel: Optional[CancelToken] = None) -> tuple:
        """``(features [1, 256, 64, 64], original_size, input_size)`` of slice ``k``, encoded at most once
        while it stays in the prepared handle's LRU cache (with the next slices of the walk, see the module)."""
        self._check_prepared(prepared)
        k = int(k)
        n = prepared.shape[0]
        if not 0 <= k < n:
            raise InputError(f"slice k={k} is outside the volume (0..{n - 1})")
        last, prepared.last = prepared.last, k
        entry = prepared.cache.get(k)
        if entry is not None:
            return entry
        step = k - last if last is not None and abs(k - last) == 1 else 0
        ahead = [k + step * i for i in range(1, n)] if step else \
            [k + s * i for i in range(1, n) for s in (1, -1)]
        batch = [k] + [kk for kk in ahead if 0 <= kk < n and kk not in prepared.cache][:max(self._batch, 1) - 1]
        self.encode(prepared, batch, cancel=cancel)
        entry = prepared.cache.get(k)
        if entry is None:
            raise InputError(f"the embedding cache ({prepared.cache.max_bytes} bytes) cannot hold one slice")
        return entry

    def encode(self, prepared: SamPrepared, ks: Sequence[int], *, cancel: Optional[CancelToken] = None) -> None:
        """Encode slices ``ks`` (those not cached) in batches: SamPredictor's own preprocessing per slice
        (``ResizeLongestSide`` on the 8-bit frame), one image-encoder call per batch, embeddings kept as float32."""
        import torch

        self._check_prepared(prepared)
        missing = list(dict.fromkeys(int(k) for k in ks if int(k) not in prepared.cache))
        if not missing:
            return
        device, dtype = self.device, self.options.dtype(self.device)

        def encode(chunk: Sequence[int]) -> None:
            images = [torch.as_tensor(self.predictor.transform.apply_image(prepared.frames.rgb_uint8(k)))
                      for k in chunk]
            batch = torch.stack(images).permute(0, 3, 1, 2).contiguous().to(device)
            with self._lock, torch.inference_mode(), autocast(device, dtype):
                features = self.model.image_encoder(self.model.preprocess(batch)).float()
            original, input_size = tuple(prepared.shape[1:]), tuple(batch.shape[-2:])
            for i, k in enumerate(chunk):
                prepared.cache.add_computed(k, (features[i:i + 1].clone(), original, input_size))

        used = encode_in_batches(missing, encode, device, self._batch, "encoding SAM slices",
                                 check=lambda: check(cancel))
        if self.options.encode_batch == 0 and device.startswith("cuda"):
            self._batch = used


SamEngine._prepared_type = SamPrepared
