"""Python dependencies of the engine inside 3D Slicer: checked on first use, installed only when the user agrees.

Nothing is installed at import time. :func:`ensure_dependencies` (main thread, in Slicer) lists what the chosen
workflow is missing (:data:`WORKFLOWS`: the weights-free engine needs numpy, scipy, scikit-image and SimpleITK;
the local worker aiohttp; the U-Net PyTorch, MONAI and einops; ...) with the pinned versions, asks, then installs
PyTorch through the SlicerPyTorch extension (``PyTorchUtils``, which picks the CUDA build matching the driver)
and the rest with ``slicer.util.pip_install``. Every failure raises :class:`DependencyError` for the panel to
show; workflows this Python cannot run (sam2 on Slicer 5.8's Python 3.9) are refused with the reason.

The pins are the engine's ``pyproject.toml`` pins, copied here because Slicer installs the engine as plain
files (no package metadata). ``Testing/test_ui_static.py`` fails when the two lists disagree, so
``pyproject.toml`` stays the one place to change them.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import shutil
import sys
from typing import Iterable, Optional, Sequence

#: ``[project].dependencies`` of pyproject.toml.
REQUIREMENTS: list[str] = [
    "numpy>=1.26,<3",
    "scipy>=1.11,<2",
    "SimpleITK>=2.3,<3",
    "torch>=2.2,<=2.14.1",
    "monai>=1.4,<1.7",
    "nibabel>=5.2,<6",
    "einops==0.8.2",
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
#: Installed with ``--no-deps`` (its own requirement list would replace Slicer's PyTorch with another build) and
#: ``--no-build-isolation`` with ``SAM2_BUILD_CUDA=0`` (it is a source package: an isolated build would download a
#: second PyTorch to build against, and its CUDA extension is optional), after its runtime dependencies (the
#: ``sam2`` group), as ``scripts/setup.sh`` does.
NO_DEPS: list[str] = ["sam2==1.1.0"]
NO_DEPS_ENV = {"SAM2_BUILD_CUDA": "0"}
NO_DEPS_ARGS = ["--no-deps", "--no-build-isolation"]
#: Bundled with Slicer: never reinstalled from here (a different build would break Slicer itself).
BUNDLED = {"numpy", "simpleitk"}
#: Installed through SlicerPyTorch rather than pip.
TORCH_PACKAGES = {"torch", "torchvision"}
#: Engines whose Python packages are optional.
ENGINE_EXTRAS = {"sam": ("sam",), "sam2": ("sam", "sam2"), "medsam2": ("sam", "sam2")}
#: What each workflow needs (distribution names; their pins come from :data:`REQUIREMENTS` / :data:`OPTIONAL`):
#: only these are asked for when that workflow runs. ``worker``: the local worker process (an aiohttp server run
#: with Slicer's Python); ``unet``: auto-segmentation; ``atlas``: registration-atlas boxes.
WORKFLOWS: dict[str, tuple[str, ...]] = {
    "classical": ("numpy", "scipy", "scikit-image", "SimpleITK"),
    "worker": ("aiohttp",),
    "unet": ("numpy", "scipy", "SimpleITK", "torch", "monai", "nibabel", "einops"),  # einops: MONAI SwinUNETR
    "atlas": ("numpy", "scipy", "scikit-image", "SimpleITK", "nilearn"),
    "sam": ("numpy", "scipy", "SimpleITK", "torch", "torchvision", "segment-anything"),
    "sam2": ("numpy", "scipy", "SimpleITK", "torch", "torchvision", "hydra-core", "iopath", "pillow"),
}
#: The oldest Python each workflow runs on (sam2 needs 3.10; Slicer 5.8 ships 3.9).
MIN_PYTHON: dict[str, tuple[int, int]] = {"sam2": (3, 10)}


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


def engine_workflow(engine: str) -> str:
    """The workflow whose packages an engine needs: ``classical``, ``sam`` or ``sam2``."""
    extras = extras_for_engine(engine)
    return "sam2" if "sam2" in extras else "sam" if extras else "classical"


def unavailable_reason(workflow: str, version: Optional[tuple] = None) -> Optional[str]:
    """Why ``workflow`` cannot run on this Python (``version``, default: the running one), or ``None``."""
    need = MIN_PYTHON.get(workflow)
    have = tuple(version or sys.version_info[:2])
    if need is None or have[:2] >= need:
        return None
    return (f"needs Python {need[0]}.{need[1]} or later (the sam2 package); this Slicer runs Python "
            f"{have[0]}.{have[1]} (Slicer 5.8 ships 3.9): use Slicer 5.10 or later, or a remote segmentation server")


def engine_unavailable_reason(engine: str, version: Optional[tuple] = None) -> Optional[str]:
    """Why an engine cannot be offered on this Python, or ``None``."""
    return unavailable_reason(engine_workflow(engine), version)


def _pins() -> dict[str, str]:
    """Distribution name (lower case) -> pinned requirement, from :data:`REQUIREMENTS` and :data:`OPTIONAL`."""
    out = {}
    for text in list(REQUIREMENTS) + [r for group in OPTIONAL.values() for r in group]:
        out.setdefault(_requirement(text).name.lower(), text)
    return out


def workflow_requirements(workflows: Sequence[str]) -> list[str]:
    """The pinned requirements of ``workflows`` (see :data:`WORKFLOWS`), each once, in order."""
    pins, out = _pins(), []
    for workflow in workflows:
        if workflow not in WORKFLOWS:
            raise ValueError(f"unknown workflow {workflow!r}; known: {', '.join(WORKFLOWS)}")
        for name in WORKFLOWS[workflow]:
            text = pins[name.lower()]
            if text not in out:
                out.append(text)
    return out


def plan(workflows: Sequence[str] = ("classical",)) -> dict:
    """What :func:`ensure_dependencies` would install for ``workflows``: ``{"torch": [...], "pip": [...],
    "no_deps": [...], "skipped": [...], "unavailable": [...]}`` (``skipped``: bundled packages at an unpinned
    version, left as they are; ``unavailable``: reasons a workflow cannot run on this Python)."""
    out: dict = {"torch": [], "pip": [], "no_deps": [], "skipped": [], "unavailable": []}
    for workflow in workflows:
        reason = unavailable_reason(workflow)
        if reason:
            out["unavailable"].append(f"{workflow}: {reason}")
    if out["unavailable"]:
        return out
    for text in missing_requirements(workflow_requirements(workflows)):
        name = _requirement(text).name.lower()
        key = "torch" if name in TORCH_PACKAGES else "skipped" if name in BUNDLED else "pip"
        out[key].append(text)
    if "sam2" in workflows:
        out["no_deps"] = missing_requirements(NO_DEPS)
    return out


def workflows_for(action: str, engine: str = "classical", mode: str = "local") -> tuple[str, ...]:
    """The workflows a panel action needs where it computes: ``action`` is ``prompt``, ``auto-segment``,
    ``atlas`` or ``weights``; ``mode`` ``local`` (a worker process run with Slicer's Python: it needs the
    worker's packages too), ``in-process``, or ``remote`` (the server has its own packages: nothing here)."""
    if mode == "remote":
        return ()
    own = {"prompt": (engine_workflow(engine),), "auto-segment": ("unet",), "atlas": ("atlas",),
           "weights": (engine_workflow(engine),)}[action]
    return own + (("worker",) if mode == "local" else ())


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


class DependencyError(RuntimeError):
    """Installing the dependencies failed or was declined; the message says what and why."""


def ensure_dependencies(workflows: Sequence[str] = ("classical",), ask: bool = True) -> None:
    """In Slicer, on the main thread: install what :func:`plan` lists for ``workflows`` after asking.

    Raises :class:`DependencyError` (the caller shows it in an error dialog and the status line) when a workflow
    cannot run on this Python, the user declines, the PyTorch extension is missing or an install fails; returns
    when everything is present."""
    import slicer

    todo = plan(workflows)
    if todo["unavailable"]:
        raise DependencyError("Cannot run here: " + "; ".join(todo["unavailable"]))
    if not (todo["torch"] or todo["pip"] or todo["no_deps"]):
        return
    text = describe(todo)
    if ask and not slicer.util.confirmOkCancelDisplay(
            "MRISegAssist needs these Python packages, which will be downloaded and installed now "
            "(this can take several minutes):\n\n" + text, "MRISegAssist: install dependencies"):
        raise DependencyError("Python packages not installed (declined): " + text.replace("\n", "; "))
    if todo["torch"]:
        try:
            import PyTorchUtils
        except ImportError:
            raise DependencyError("MRISegAssist needs PyTorch: install the 'PyTorch' extension from the Extensions "
                                  "Manager, restart Slicer and try again.") from None
        torch_req = next((r for r in todo["torch"] if _requirement(r).name.lower() == "torch"), None)
        try:
            installed = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False,
                torchVersionRequirement=str(_requirement(torch_req).specifier) if torch_req else None)
        except Exception as exc:  # PyTorchUtils reports download and pip failures as exceptions
            raise DependencyError(f"PyTorch could not be installed: {exc}") from exc
        if installed is None:
            raise DependencyError("PyTorch could not be installed (PyTorch Utils installed nothing)")
    _pip(todo["pip"])
    if todo["no_deps"]:
        _pip(NO_DEPS_ARGS + todo["no_deps"], NO_DEPS_ENV)
    message = torch_gpu_message()
    if message:
        logging.warning(message)
    importlib.invalidate_caches()
    left = plan(workflows)
    missing = left["torch"] + left["pip"] + left["no_deps"]
    if missing:
        raise DependencyError(f"still missing after the install: {', '.join(missing)} (see the Python console)")


def _pip(args: Sequence[str], env: Optional[dict] = None) -> None:
    """``slicer.util.pip_install`` with extra environment variables; a failure raises :class:`DependencyError`."""
    if not args:
        return
    import slicer

    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        slicer.util.pip_install(list(args))
    except Exception as exc:  # CalledProcessError and friends: name what failed
        raise DependencyError(f"pip could not install {' '.join(a for a in args if not a.startswith('-'))}: "
                              f"{exc}") from exc
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
