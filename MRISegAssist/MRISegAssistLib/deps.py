"""Python dependencies of the engine inside 3D Slicer: checked on first use, installed only when the user agrees.

Nothing is installed at import time. :func:`ensure_dependencies` (main thread, in Slicer) lists what is missing
with the pinned versions, asks, then installs PyTorch through the SlicerPyTorch extension (``PyTorchUtils``,
which picks the CUDA build matching the driver) and the rest with ``slicer.util.pip_install``.

The pins are the engine's ``pyproject.toml`` pins, copied here because Slicer installs the engine as plain
files (no package metadata). ``Testing/test_ui_static.py`` fails when the two lists disagree, so
``pyproject.toml`` stays the one place to change them.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
import shutil
from typing import Iterable, Optional, Sequence

#: ``[project].dependencies`` of pyproject.toml.
REQUIREMENTS: list[str] = [
    "numpy>=1.26,<3",
    "scipy>=1.11,<2",
    "SimpleITK>=2.3,<3",
    "torch>=2.2,<=2.14.1",
    "monai>=1.4,<1.7",
    "nibabel>=5.2,<6",
    "tqdm>=4.66,<5",
    "matplotlib>=3.8,<4",
    "scikit-image>=0.22,<0.27",
    "aiohttp>=3.9,<4",
]
#: ``[project.optional-dependencies]`` groups the Slicer module can install on demand.
OPTIONAL: dict[str, list[str]] = {
    "sam": ["segment-anything==1.0", "torchvision>=0.17,<=0.29.1"],
    "sam2": ["hydra-core>=1.3.2,<1.4", "iopath>=0.1.10,<0.2", "pillow>=10"],
    "atlas": ["nilearn>=0.10,<0.15"],
}
#: Installed with ``--no-deps`` (its own requirements would replace Slicer's PyTorch with another build).
NO_DEPS: list[str] = ["sam2==1.1.0"]
#: Bundled with Slicer: never reinstalled from here (a different build would break Slicer itself).
BUNDLED = {"numpy", "simpleitk"}
#: Installed through SlicerPyTorch rather than pip.
TORCH_PACKAGES = {"torch", "torchvision"}
#: Engines whose Python packages are optional.
ENGINE_EXTRAS = {"sam": ("sam",), "sam2": ("sam", "sam2"), "medsam2": ("sam", "sam2")}


def _requirement(text: str):
    try:
        from packaging.requirements import Requirement
    except ImportError:  # Slicer's Python always has pip, which vendors packaging
        from pip._vendor.packaging.requirements import Requirement
    return Requirement(text)


def _installed_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_requirements(requirements: Iterable[str]) -> list[str]:
    """The requirements not installed, or installed at a version outside their pin (local version labels such
    as ``+cu121`` are ignored when comparing)."""
    missing = []
    for text in requirements:
        req = _requirement(text)
        version = _installed_version(req.name)
        if version is None or not req.specifier.contains(version.split("+")[0], prereleases=True):
            missing.append(text)
    return missing


def extras_for_engine(engine: str) -> tuple[str, ...]:
    """Optional dependency groups an engine name needs (``sam-vit-b`` -> ``("sam",)``; classical -> ``()``)."""
    if engine.startswith("sam2") or engine == "medsam2":
        return ENGINE_EXTRAS["sam2"]
    if engine.startswith("sam-"):
        return ENGINE_EXTRAS["sam"]
    return ()


def plan(extras: Sequence[str] = ()) -> dict:
    """What :func:`ensure_dependencies` would install: ``{"torch": [...], "pip": [...], "no_deps": [...],
    "skipped": [...]}`` (``skipped``: bundled packages at an unpinned version, left as they are)."""
    wanted = list(REQUIREMENTS) + [r for e in extras for r in OPTIONAL[e]]
    out: dict = {"torch": [], "pip": [], "no_deps": [], "skipped": []}
    for text in missing_requirements(wanted):
        name = _requirement(text).name.lower()
        key = "torch" if name in TORCH_PACKAGES else "skipped" if name in BUNDLED else "pip"
        out[key].append(text)
    if "sam2" in extras:
        out["no_deps"] = missing_requirements(NO_DEPS)
    return out


def torch_gpu_message() -> Optional[str]:
    """A message when PyTorch cannot use an NVIDIA GPU that this machine has (CPU-only build or old CUDA
    driver), else ``None``."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        import torch
    except ImportError:
        return None
    if torch.cuda.is_available():
        return None
    build = torch.version.cuda
    if build is None:
        return (f"PyTorch {torch.__version__} is a CPU-only build but this machine has an NVIDIA GPU: reinstall "
                f"PyTorch from the PyTorch Utils module (Slicer's SlicerPyTorch extension) to use the GPU.")
    return (f"PyTorch {torch.__version__} (CUDA {build}) cannot use the NVIDIA GPU: update the NVIDIA driver or "
            f"reinstall PyTorch from the PyTorch Utils module with a matching CUDA version.")


def describe(todo: dict) -> str:
    lines = []
    if todo["torch"]:
        lines.append("PyTorch (through the PyTorch extension): " + ", ".join(todo["torch"]))
    if todo["pip"] or todo["no_deps"]:
        lines.append("Python packages (pip): " + ", ".join(todo["pip"] + todo["no_deps"]))
    return "\n".join(lines)


def ensure_dependencies(extras: Sequence[str] = (), ask: bool = True) -> bool:
    """In Slicer, on the main thread: install what :func:`plan` lists after asking. Returns ``True`` when
    everything is present afterwards, ``False`` when the user declined or PyTorch is unavailable."""
    import slicer

    todo = plan(extras)
    if not (todo["torch"] or todo["pip"] or todo["no_deps"]):
        return True
    text = describe(todo)
    if ask and not slicer.util.confirmOkCancelDisplay(
            "MRISegAssist needs these Python packages, which will be downloaded and installed now "
            "(this can take several minutes):\n\n" + text, "MRISegAssist: install dependencies"):
        return False
    if todo["torch"]:
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay("MRISegAssist needs PyTorch: install the 'PyTorch' extension from the "
                                     "Extensions Manager, restart Slicer and try again.")
            return False
        torch_req = next((r for r in todo["torch"] if _requirement(r).name.lower() == "torch"), None)
        torch_logic = PyTorchUtils.PyTorchUtilsLogic()
        if torch_logic.installTorch(askConfirmation=False,
                                    torchVersionRequirement=str(_requirement(torch_req).specifier)
                                    if torch_req else None) is None:
            return False
    if todo["pip"]:
        slicer.util.pip_install(todo["pip"])
    if todo["no_deps"]:
        slicer.util.pip_install(["--no-deps"] + todo["no_deps"])
    message = torch_gpu_message()
    if message:
        logging.warning(message)
    importlib.invalidate_caches()
    left = plan(extras)
    return not (left["torch"] or left["pip"] or left["no_deps"])
