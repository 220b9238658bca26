"""Device, precision and batch-size choices shared by the SAM and SAM 2 engines.

* :func:`resolve_device`: ``"auto"`` -> ``cuda`` > ``mps`` > ``cpu``; anything else is checked and returned.
* :class:`AccelOptions`: the speed options of an engine (precision, encoder batch size, CUDA graphs,
  ``torch.compile``), each with an ``"auto"`` value that picks what measured best on the device type
  (see ``mrisegassist bench prompt`` and README).
* :func:`encode_in_batches`: runs an encoder over items in batches; on CUDA the batch size comes from the free
  GPU memory (:func:`cuda_batch_size`, after one probe batch measures the bytes per item) and a CUDA
  out-of-memory error halves the batch and retries; at batch 1 it raises :class:`DeviceMemoryError` with a
  message saying what to do.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence, TypeVar

from ..devices import check_device
from ..errors import InputError, MRISegAssistError

T = TypeVar("T")
PRECISIONS = ("auto", "fp32", "bf16")
#: most slices one encoder call takes (beyond this the GPU is saturated; more only costs memory)
MAX_BATCH = 32
#: fraction of the free GPU memory a batch may use (the rest stays for the tracking step and other programs)
FREE_FRACTION = 0.5


class DeviceMemoryError(MRISegAssistError, RuntimeError):
    """The accelerator ran out of memory even at the smallest batch."""


def resolve_device(device: Optional[str] = "auto") -> str:
    """``"auto"``/``None`` -> the best available torch device (``cuda`` > ``mps`` > ``cpu``); others are checked by
    :func:`mrisegassist.devices.check_device`: :class:`InputError` if unknown or not available here."""
    import torch

    device = "auto" if device is None else str(device)
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    return check_device(device)  # the one device rule (mrisegassist.devices)


@dataclass(frozen=True)
class AccelOptions:
    """Speed options of a foundation-model engine; every choice keeps the official model's maths.

    ``precision``: ``"fp32"``, ``"bf16"`` (autocast) or ``"auto"`` (bf16 on CUDA, fp32 elsewhere: bf16 autocast
    on CPU is ~10x slower). ``encode_batch``: slices per image-encoder call, 0 = auto (from free GPU memory on
    CUDA, the engine's default elsewhere: 4 for SAM 2, 1 for SAM). ``graphs``: replay the SAM 2 per-frame tracking step
    as a CUDA graph (``"auto"``: on CUDA). ``compile``: ``torch.compile`` the tracking step (``"off"``,
    ``"default"``, ``"max-autotune-no-cudagraphs"``). ``loop``: ``"lean"`` (this package's tracking loop) or
    ``"official"`` (``SAM2VideoPredictor.propagate_in_video`` frame by frame, the reference). ``shapes``: the
    lean loop's ``"exact"`` official shapes (one object at a time) or ``"fixed"`` ones (objects batched, memory
    padded and masked: what CUDA graphs and compilation need); ``"auto"``: fixed with graphs or compile.
    """

    precision: str = "auto"
    encode_batch: int = 0
    graphs: str = "auto"
    compile: str = "off"
    loop: str = "lean"
    shapes: str = "auto"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if int(self.encode_batch) < 0:
            raise InputError(f"encode_batch must be >= 0, got {self.encode_batch}")
        if str(self.graphs) not in ("auto", "on", "off"):
            raise InputError(f"graphs must be auto, on or off, got {self.graphs!r}")
        if self.compile not in ("off", "default", "max-autotune-no-cudagraphs"):
            raise InputError(f"compile must be off, default or max-autotune-no-cudagraphs, got {self.compile!r}")
        if self.loop not in ("lean", "official"):
            raise InputError(f"loop must be lean or official, got {self.loop!r}")
        if self.shapes not in ("auto", "fixed", "exact"):
            raise InputError(f"shapes must be auto, fixed or exact, got {self.shapes!r}")
        if self.shapes == "exact" and (self.compile != "off" or self.graphs == "on"):
            raise InputError("CUDA graphs and compile need fixed shapes (shapes=fixed or auto)")

    @classmethod
    def parse(cls, text: str) -> "AccelOptions":
        """``"precision=bf16,graphs=off,encode_batch=8"`` -> options (unnamed keys keep their defaults)."""
        values = {}
        for part in filter(None, (p.strip() for p in str(text).split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in cls.__dataclass_fields__:
                raise InputError(f"bad accelerator option {part!r}; keys: {', '.join(cls.__dataclass_fields__)}")
            values[key] = int(value) if key == "encode_batch" else value
        return cls(**values)

    def with_(self, **changes) -> "AccelOptions":
        return replace(self, **changes)

    def dtype(self, device: str):
        """The autocast dtype on ``device`` (``None`` = fp32, no autocast)."""
        import torch

        bf16 = self.precision == "bf16" or (self.precision == "auto" and str(device).startswith("cuda"))
        return torch.bfloat16 if bf16 else None

    def use_graphs(self, device: str) -> bool:
        return str(device).startswith("cuda") and self.graphs != "off" and self.shapes != "exact"

    def fixed_shapes(self, device: str) -> bool:
        if self.shapes != "auto":
            return self.shapes == "fixed"
        return self.use_graphs(device) or self.compile != "off"

    def describe_encoder(self, device: str, batch_used: int = 0) -> str:
        dtype = self.dtype(device)
        batch = f"{self.encode_batch}" if self.encode_batch else f"auto ({batch_used or 'not measured yet'})"
        return f"{'bf16' if dtype is not None else 'fp32'} encoder, batch {batch}"

    def describe(self, device: str) -> str:
        dtype = self.dtype(device)
        if self.loop == "official":
            return f"official loop, {'bf16' if dtype is not None else 'fp32'}"
        return (f"lean loop, {'bf16' if dtype is not None else 'fp32'}, encode batch {self.encode_batch or 'auto'}, "
                f"{'fixed' if self.fixed_shapes(device) else 'exact'} shapes, CUDA graphs "
                f"{'on' if self.use_graphs(device) else 'off'}, compile {self.compile}")


def autocast(device: str, dtype, cache_enabled: bool = True):
    """``torch.autocast`` on ``device`` for ``dtype`` (a null context for ``None``)."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(str(device).split(":")[0], dtype=dtype, cache_enabled=cache_enabled)


def is_cuda_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", RuntimeError)
    return isinstance(exc, oom) or "CUDA out of memory" in str(exc)


def cuda_batch_size(device: str, bytes_per_item: float, limit: int = MAX_BATCH) -> int:
    """Items per batch that fit in :data:`FREE_FRACTION` of the free memory of CUDA ``device`` (1..limit)."""
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(max(1, min(limit, (free * FREE_FRACTION) // max(bytes_per_item, 1.0))))


def oom_message(device: str, what: str) -> str:
    import torch

    try:
        free, total = torch.cuda.mem_get_info(torch.device(device))
        state = f" ({free / 2**20:.0f} MiB free of {total / 2**20:.0f} MiB)"
    except Exception:  # noqa: BLE001 - the message must not fail
        state = ""
    return (f"{device} ran out of memory {what} even one slice at a time{state}: close other programs using the "
            f"GPU, use a smaller model, or choose the device 'cpu'")


def encode_in_batches(items: Sequence[T], encode: Callable[[Sequence[T]], None], device: str, batch: int = 0,
                      what: str = "encoding slices", check: Optional[Callable[[], None]] = None) -> int:
    """Call ``encode(chunk)`` over ``items`` in chunks; returns the batch size used last.

    ``batch`` > 0 is used as given (halved on CUDA out-of-memory); 0 = auto: on CUDA a first chunk of one item
    measures the peak memory per item, then :func:`cuda_batch_size` sizes the rest; 1 elsewhere. ``check`` runs
    before each chunk (cancellation).
    """
    import torch

    items = list(items)
    cuda = str(device).startswith("cuda")
    if batch <= 0 and not cuda:
        batch = 1
    pos, size = 0, batch
    while pos < len(items):
        if check is not None:
            check()
        probe = size <= 0
        n = 1 if probe else min(size, len(items) - pos)
        if probe:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        try:
            encode(items[pos:pos + n])
        except Exception as exc:  # noqa: BLE001 - only CUDA OOM is handled, everything else re-raised
            if not (cuda and is_cuda_oom(exc)):
                raise
            torch.cuda.empty_cache()
            if n == 1:
                raise DeviceMemoryError(oom_message(device, what)) from None
            size = (n + 1) // 2  # half of what failed (rounded up), down to one item
            continue
        if probe:
            peak = torch.cuda.max_memory_allocated(device) - base
            size = cuda_batch_size(device, peak)
        pos += n
    return max(size, 1)
