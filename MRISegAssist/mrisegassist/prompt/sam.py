"""Segment Anything (official ``segment_anything`` package) as a per-slice :class:`SliceEngine`.

A slice becomes an 8-bit RGB frame through :class:`~.windowing.FrameSource` (percentile window of the
volume); SAM's own ``SamPredictor`` preprocessing (``ResizeLongestSide`` to 1024, pixel normalisation,
padding) and image encoder make its embedding, computed lazily the first time a slice is needed and kept in a
bounded LRU (:class:`~.windowing.SliceCache`) inside the prepared handle, so re-prompting never re-encodes.
:meth:`SamEngine.predict_slice` restores a slice's cached ``features`` / ``original_size`` / ``input_size`` into
the predictor and calls ``SamPredictor.predict(box=..., multimask_output=False, return_logits=True)``: the
logits are exactly those SamPredictor gives for that slice image and box. 3D comes from the shared
slice-to-slice propagation (:mod:`.propagation`). fp32 on every device.

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
from .base import SliceEngine
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


class SamPrepared(PreparedVolume):
    """A volume bound to a :class:`SamEngine` (embeddings: ``(features, original_size, input_size)``)."""


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

    def release(self) -> None:
        """Free the model (and GPU memory); the engine cannot be used afterwards."""
        import torch

        with self._lock:
            setattr(self, self._model_attr, None)
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
    """SAM ViT-B/L/H per slice. ``SamEngine(variant, device="cpu", checkpoint=None)`` loads the verified
    official checkpoint (:func:`~.weights.resolve_checkpoint`; ``download=True`` fetches it);
    :meth:`from_model` wraps an already built model (e.g. seeded random initialisation in tests)."""

    def __init__(self, variant: str = "sam-vit-b", device: str = "cpu",
                 checkpoint: Optional[Union[str, Path]] = None, *, download: bool = False,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, progress: Optional[ProgressFn] = None,
                 cancel: Optional[CancelToken] = None) -> None:
        name, model_type = sam_variant(variant)
        path = resolve_checkpoint(name, checkpoint, download=download, progress=progress, cancel=cancel)
        model = build_sam_model(model_type)
        load_into(model, load_state_dict(path), f"SAM {model_type}", path)
        self._setup(model, name, device, cache_bytes)
        self.checkpoint = path

    @classmethod
    def from_model(cls, model, name: str = "sam-vit-b", device: Optional[str] = None,
                   cache_bytes: int = DEFAULT_CACHE_BYTES) -> "SamEngine":
        """Wrap a built ``segment_anything`` ``Sam`` model (kept on its device unless ``device`` is given)."""
        engine = cls.__new__(cls)
        engine._setup(model, name, device, cache_bytes)
        engine.checkpoint = None
        return engine

    def _setup(self, model, name: str, device: Optional[str], cache_bytes: int) -> None:
        from segment_anything import SamPredictor

        if device is not None:
            model = model.to(device)
        self._init_engine(name, cache_bytes)
        self.model = model.float().eval()
        self.predictor = SamPredictor(self.model)

    @property
    def device(self) -> str:
        return str(self.model.device)

    # ---------------------------------------------------------------------------------------- protocol
    def prepare(self, volume: np.ndarray, *, progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None,
                window: Optional[Union[Window, Sequence[float]]] = None) -> SamPrepared:
        """Bind ``volume`` ``[k, j, i]`` (not copied, never modified); nothing is encoded until needed."""
        return SamPrepared(*self._frames(volume, window, cancel), self._id)

    def predict_slice(self, prepared: SamPrepared, k: int, box: np.ndarray, *,
                      cancel: Optional[CancelToken] = None) -> tuple[np.ndarray, float]:
        """Float32 logits ``[j, i]`` of slice ``k`` for ``box`` and SAM's predicted IoU (clipped to 0..1)."""
        logits, score, _ = self.predict_slice_detailed(prepared, k, box, cancel=cancel)
        return logits, score

    def predict_slice_detailed(self, prepared: SamPrepared, k: int, box: np.ndarray, *,
                               cancel: Optional[CancelToken] = None) -> tuple[np.ndarray, float, np.ndarray]:
        """As :meth:`predict_slice`, plus SAM's low-resolution logits ``[256, 256]``."""
        self._check_prepared(prepared)
        box = check_box(box, prepared.shape)
        check(cancel)
        features, original_size, input_size = self.embedding(prepared, k)
        check(cancel)
        with self._lock:
            p = self.predictor
            p.features, p.original_size, p.input_size, p.is_image_set = features, original_size, input_size, True
            try:
                masks, ious, low_res = p.predict(box=box, multimask_output=False, return_logits=True)
            finally:
                p.reset_image()
        return masks[0].astype(np.float32, copy=False), float(np.clip(ious[0], 0.0, 1.0)), low_res[0]

    def embedding(self, prepared: SamPrepared, k: int) -> tuple:
        """``(features [1, 256, 64, 64], original_size, input_size)`` of slice ``k``, encoded at most once
        while it stays in the prepared handle's LRU cache."""
        self._check_prepared(prepared)
        k = int(k)
        if not 0 <= k < prepared.shape[0]:
            raise InputError(f"slice k={k} is outside the volume (0..{prepared.shape[0] - 1})")

        def encode() -> tuple:
            image = prepared.frames.rgb_uint8(k)
            with self._lock:
                self.predictor.set_image(image)
                entry = (self.predictor.features, self.predictor.original_size, self.predictor.input_size)
                self.predictor.reset_image()
            return entry

        return prepared.cache.get_or_compute(k, encode)


SamEngine._prepared_type = SamPrepared
