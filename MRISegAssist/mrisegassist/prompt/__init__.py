"""Box-prompted 3D segmentation: the engine registry.

``get_engine(name, device="cpu", checkpoint=None)`` returns a loaded :class:`PromptableEngine`, cached per
``(name, device, checkpoint)`` so models stay loaded between calls; ``release_engines()`` frees them.
Foundation-model engines are imported lazily, so the weights-free ``classical`` engine (the default) works
without segment-anything or sam2 installed.
"""
from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..devices import check_device
from ..errors import CheckpointError, InputError
from .base import OUTSIDE_LOGIT, Box2D, ObjectPrompt, ObjectResult, PromptableEngine, SliceEngine  # noqa: F401

DEFAULT_ENGINE = "classical"


@dataclass(frozen=True)
class EngineSpec:
    """One registry entry: ``module.cls(*args, device, checkpoint)`` builds it (``classical`` takes none)."""

    name: str
    description: str
    needs_weights: bool
    licence: str
    module: str
    cls: str
    variant: Optional[str] = None

    def as_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "needs_weights": self.needs_weights,
                "licence": self.licence}


_SAM = "segment-anything (Apache-2.0); SAM weights Apache-2.0"
_SAM2 = "sam2 (Apache-2.0); SAM 2.1 weights Apache-2.0"
_SPECS = [
    EngineSpec("classical", "weights-free random walker seeded from the box, slice propagation (CPU, default)",
               False, "Apache-2.0 (this project; scikit-image BSD-3)", "classical", "ClassicalEngine"),
    EngineSpec("sam-vit-b", "Segment Anything ViT-B per slice + slice propagation", True, _SAM, "sam",
               "SamEngine", "vit_b"),
    EngineSpec("sam-vit-l", "Segment Anything ViT-L per slice + slice propagation", True, _SAM, "sam",
               "SamEngine", "vit_l"),
    EngineSpec("sam-vit-h", "Segment Anything ViT-H per slice + slice propagation", True, _SAM, "sam",
               "SamEngine", "vit_h"),
    EngineSpec("sam2.1-hiera-tiny", "SAM 2.1 Hiera-T video predictor over the slices", True, _SAM2,
               "sam2_engine", "Sam2Engine", "sam2.1-hiera-tiny"),
    EngineSpec("sam2.1-hiera-small", "SAM 2.1 Hiera-S video predictor over the slices", True, _SAM2,
               "sam2_engine", "Sam2Engine", "sam2.1-hiera-small"),
    EngineSpec("sam2.1-hiera-base-plus", "SAM 2.1 Hiera-B+ video predictor over the slices", True, _SAM2,
               "sam2_engine", "Sam2Engine", "sam2.1-hiera-base-plus"),
    EngineSpec("sam2.1-hiera-large", "SAM 2.1 Hiera-L video predictor over the slices", True, _SAM2,
               "sam2_engine", "Sam2Engine", "sam2.1-hiera-large"),
    EngineSpec("medsam2", "MedSAM2 (SAM 2.1 Hiera-T fine-tuned on medical 3D images, 512 px)", True,
               "sam2 (Apache-2.0); MedSAM2 weights Apache-2.0", "sam2_engine", "Sam2Engine", "medsam2"),
]
ENGINES: dict[str, EngineSpec] = {s.name: s for s in _SPECS}

_cache: dict[tuple[str, str, Optional[str]], PromptableEngine] = {}
_lock = threading.Lock()


def list_engines() -> list[dict]:
    """``[{"name", "description", "needs_weights", "licence"}, ...]`` for every registered engine."""
    return [s.as_dict() for s in _SPECS]


def engine_spec(name: str) -> EngineSpec:
    """The registry entry for ``name``; :class:`InputError` naming the known engines if unknown."""
    spec = ENGINES.get(name)
    if spec is None:
        raise InputError(f"unknown engine {name!r}; known engines: {', '.join(ENGINES)}")
    return spec


def get_engine(name: str = DEFAULT_ENGINE, device: str = "cpu",
               checkpoint: Optional[Union[str, Path]] = None, *, download: bool = False) -> PromptableEngine:
    """A loaded engine, cached per ``(name, device, checkpoint)``.

    ``download=True`` lets a weights engine fetch its official checkpoint into the cache when it is missing.
    Raises :class:`InputError` for an unknown name or device, :class:`CheckpointError` when a given
    ``checkpoint`` file does not exist (engines that need weights resolve ``checkpoint=None`` through
    their own weights catalog and raise :class:`CheckpointError` if it is not available).
    """
    spec = engine_spec(name)
    ckpt = None
    if checkpoint is not None:
        if not spec.needs_weights:
            raise InputError(f"engine {name!r} takes no checkpoint")
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} for engine {name!r} does not exist")
        ckpt = str(path.resolve())
    if spec.needs_weights:
        device = check_device(device)
    key = (name, str(device), ckpt)
    with _lock:
        engine = _cache.get(key)
        if engine is None:
            try:
                module = importlib.import_module(f"{__name__}.{spec.module}")
            except ImportError as exc:
                raise InputError(f"engine {name!r} is not available: {exc} "
                                 f"(install the optional dependencies, e.g. pip install 'mrisegassist[sam,sam2]')"
                                 ) from None
            factory = getattr(module, spec.cls)
            extra = {"download": True} if download else {}
            engine = factory() if spec.variant is None else factory(spec.variant, device, ckpt, **extra)
            engine.name = name
            _cache[key] = engine
    return engine


def cached_engines() -> list[tuple[str, str, Optional[str]]]:
    """Keys ``(name, device, checkpoint)`` of the engines currently loaded."""
    with _lock:
        return list(_cache)


def release_engines() -> None:
    """Release every cached engine (models, GPU memory, per-volume caches) and empty the cache."""
    with _lock:
        engines = list(_cache.values())
        _cache.clear()
    for engine in engines:
        engine.release()
