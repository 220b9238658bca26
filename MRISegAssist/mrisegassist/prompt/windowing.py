"""Model frames from a ``[k, j, i]`` volume, made slice by slice without changing or copying the volume.

SAM, SAM 2.1 and MedSAM2 were trained on 8-bit RGB photographs. An MRI slice becomes a model frame by an
intensity *window*: values ``low..high`` map linearly to ``0..255`` (clipped outside), and the grey slice is
replicated into the three RGB channels.

* :func:`compute_window` picks ``low``/``high`` as percentiles (default 0.5 % and 99.5 %) of the *nonzero*
  voxels of the whole volume (skull-stripped MRI has a zero background that would otherwise dominate), or
  takes an explicit ``(low, high)`` window.
* :class:`FrameSource` holds a reference to the volume and its window and makes one frame on demand:
  :meth:`~FrameSource.grey` (``[j, i]`` float32, 0..255), :meth:`~FrameSource.rgb_uint8` (``[j, i, 3]`` uint8,
  the image SAM's ``SamPredictor.set_image`` takes) and :meth:`~FrameSource.sam2_batch` (``[n, 3, S, S]``
  float32 on any torch device: the slices are uploaded as they are stored, then windowed, resized to the SAM 2
  model size and ImageNet-normalised there as ``sam2.utils.misc``'s frame loaders do: bicubic resize (torch's
  antialiased bicubic = PIL's bicubic filter, within 2e-6 on BraTS slices), ``/255``, ``(x - mean) / std``).
  No full-volume frame stack is ever built.
* :class:`SliceCache` is the bounded LRU (by bytes) that engines use to keep per-slice encodings.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional, Sequence

import numpy as np

from ..errors import InputError
from ..volume import validate_array

#: ImageNet mean / std used by SAM 2's frame loaders (``sam2.utils.misc.load_video_frames``), 0..1 units.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class Window:
    """Intensity window: ``low`` maps to 0 and ``high`` to 255 (values outside are clipped)."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.low) and np.isfinite(self.high)):
            raise InputError(f"intensity window ({self.low}, {self.high}) is not finite")
        if self.high <= self.low:
            raise InputError(f"intensity window ({self.low}, {self.high}) is empty (need low < high)")

    def apply(self, values: np.ndarray) -> np.ndarray:
        """``values`` (any shape) -> float32 in 0..255. Returns a new array."""
        scale = 255.0 / (self.high - self.low)
        out = (np.asarray(values, dtype=np.float32) - np.float32(self.low)) * np.float32(scale)
        return np.clip(out, 0.0, 255.0, out=out)


def compute_window(volume: np.ndarray, percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                   nonzero: bool = True) -> Window:
    """Window from the ``percentiles`` of the volume's voxels (only the nonzero ones when ``nonzero``).

    Falls back to all voxels when fewer than 2 distinct nonzero values exist, and to the full
    min..max range when the percentiles coincide. Raises :class:`InputError` for a constant volume.
    """
    p0, p1 = (float(p) for p in percentiles)
    if not 0.0 <= p0 < p1 <= 100.0:
        raise InputError(f"window percentiles {percentiles} must satisfy 0 <= low < high <= 100")
    values = volume[volume != 0] if nonzero else volume.ravel()
    if values.size < 2 or values.min() == values.max():
        values = volume.ravel()
    low, high = (float(v) for v in np.percentile(values, [p0, p1]))
    if high <= low:
        low, high = float(values.min()), float(values.max())
    return Window(low, high)


class FrameSource:
    """Lazy model frames of a ``[k, j, i]`` volume (kept by reference, never modified).

    ``window`` is a :class:`Window`, a ``(low, high)`` pair, or ``None`` for :func:`compute_window`'s default.
    """

    def __init__(self, volume: np.ndarray, window: Optional[Window | Sequence[float]] = None,
                 name: str = "volume") -> None:
        if not isinstance(volume, np.ndarray):
            raise InputError(f"{name}: expected a numpy array, got {type(volume).__name__}")
        validate_array(volume, name, "image")
        self.volume = volume
        if window is None:
            window = compute_window(volume)
        elif not isinstance(window, Window):
            low, high = window
            window = Window(float(low), float(high))
        self.window = window

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.volume.shape)

    def __len__(self) -> int:
        return int(self.volume.shape[0])

    def _check(self, k: int) -> int:
        k = int(k)
        if not 0 <= k < len(self):
            raise InputError(f"slice k={k} is outside the volume (0..{len(self) - 1})")
        return k

    def grey(self, k: int) -> np.ndarray:
        """Slice ``k`` windowed: ``[j, i]`` float32 in 0..255."""
        return self.window.apply(self.volume[self._check(k)])

    def rgb_uint8(self, k: int) -> np.ndarray:
        """Slice ``k`` as an 8-bit RGB image ``[j, i, 3]`` (rounded window values, grey replicated)."""
        grey = np.rint(self.grey(k)).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)

    def sam2_tensor(self, k: int, image_size: int):
        """Slice ``k`` as SAM 2 takes a video frame: ``torch.float32 [3, S, S]`` on the CPU (see :meth:`sam2_batch`)."""
        return self.sam2_batch([k], image_size, "cpu")[0]

    def sam2_batch(self, ks: Sequence[int], image_size: int, device="cpu"):
        """Slices ``ks`` as SAM 2 video frames: ``torch.float32 [n, 3, S, S]`` on ``device``, ``S = image_size``.

        Only the raw slices cross to the device (in their stored dtype); the window (:meth:`Window.apply`'s
        float32 arithmetic), the non-uniform resize to a square (bicubic, antialiased: PIL's filter, which
        ``sam2.utils.misc`` uses), ``/255`` and the ImageNet normalisation run there as tensor operations.
        """
        import torch
        import torch.nn.functional as F

        ks = [self._check(k) for k in ks]
        raw = self.volume[ks]
        if raw.dtype.kind not in "fiu" or raw.dtype.itemsize > 4 or raw.dtype == np.uint32:
            raw = raw.astype(np.float32)
        elif raw.dtype.kind == "u" and raw.dtype != np.uint8:  # torch lacks uint16 arithmetic
            raw = raw.astype(np.int32)
        x = torch.from_numpy(np.ascontiguousarray(raw)).to(device, non_blocking=True).float()
        low, scale = np.float32(self.window.low), np.float32(255.0 / (self.window.high - self.window.low))
        x = ((x - float(low)) * float(scale)).clamp_(0.0, 255.0)[:, None]
        if tuple(x.shape[-2:]) != (image_size, image_size):
            x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True, align_corners=False)
        x = x / 255.0
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device)[None, :, None, None]
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device)[None, :, None, None]
        return (x - mean) / std


def tensor_bytes(obj: Any) -> int:
    """Bytes held by the tensors/arrays in ``obj`` (nested tuples, lists and dicts)."""
    if hasattr(obj, "element_size") and hasattr(obj, "nelement"):
        return int(obj.element_size() * obj.nelement())
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class SliceCache:
    """Thread-safe LRU cache of per-slice encodings, bounded by ``max_bytes`` (0 disables caching).

    :meth:`get_or_compute` calls ``compute()`` on a miss, counts it in ``misses`` (= encoder calls) and keeps
    the result unless it alone exceeds the bound; the least recently used entries are evicted first.
    """

    def __init__(self, max_bytes: int, size_of: Callable[[Any], int] = tensor_bytes) -> None:
        self.max_bytes = int(max_bytes)
        self._size_of = size_of
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.RLock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.computed: list[Hashable] = []

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._items)

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return default
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: Any) -> None:
        size = self._size_of(value)
        with self._lock:
            if key in self._items:
                self.bytes -= self._items.pop(key)[1]
            if size > self.max_bytes:
                return
            self._items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes and self._items:
                _, (_, evicted) = self._items.popitem(last=False)
                self.bytes -= evicted

    def add_computed(self, key: Hashable, value: Any) -> None:
        """Keep a freshly computed ``value`` and count it as a miss (one encoder call)."""
        with self._lock:
            self.misses += 1
            self.computed.append(key)
        self.put(key, value)

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        value = self.get(key)
        if value is None:
            value = compute()
            self.add_computed(key, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0
