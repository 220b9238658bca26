"""Python 3.9 check (Slicer 5.8's Python): byte-compile every module, import every engine, service and logic-level
module that needs no package absent here, and name the ones that cannot be imported and why.

Absent on purpose in the 3.9 job (heavy, or not published for Python 3.9): torch, monai, segment-anything, sam2,
nilearn, matplotlib, trame-slicer, and slicer-core (PyPI has no Python 3.9 wheel of it), so the MRML logic
modules that import ``slicer`` (logic, nodes, selftest, headless) and the Slicer module itself are byte-compiled
only. Any other failure (a syntax or runtime construct newer than 3.9, such as ``X | Y`` evaluated at import, a
``match`` statement, ``zip(strict=...)``) fails the job.
"""
from __future__ import annotations

import compileall
import importlib
import pkgutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "MRISegAssist"
#: Top-level packages whose absence is expected here (see the module docstring).
ABSENT = {"torch", "monai", "segment_anything", "sam2", "nilearn", "matplotlib", "trame", "trame_slicer",
          "slicer", "vtk", "vtkmodules", "qt", "hydra", "iopath", "torchvision", "playwright", "ctk"}


def main() -> int:
    assert sys.version_info[:2] == (3, 9), f"run with Python 3.9, not {sys.version.split()[0]}"
    if not compileall.compile_dir(str(ROOT), quiet=1, force=True):
        print("FAIL: byte-compilation failed under Python 3.9")
        return 1
    sys.path.insert(0, str(ROOT))
    imported, absent, failed = [], [], []
    names = ["mrisegassist"] + [m.name for m in pkgutil.walk_packages([str(ROOT / "mrisegassist")], "mrisegassist.")]
    names += [f"MRISegAssistLib.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "MRISegAssistLib")])]
    names += ["MRISegAssistWeb"] + [f"MRISegAssistWeb.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "MRISegAssistWeb")])]
    for name in names:
        if name.endswith(".__main__"):  # runs the command line when imported
            continue
        try:
            importlib.import_module(name)
            imported.append(name)
        except ImportError as exc:
            top = (exc.name or "").split(".")[0]
            (absent if top in ABSENT else failed).append((name, f"{type(exc).__name__}: {exc}"))
        except Exception as exc:  # noqa: BLE001 - anything else is a 3.9 incompatibility
            failed.append((name, f"{type(exc).__name__}: {exc}"))
    print(f"Python {sys.version.split()[0]}: byte-compiled {ROOT}; imported {len(imported)} modules:")
    print("  " + ", ".join(imported))
    print(f"not importable here ({len(absent)}, a package absent on purpose):")
    for name, why in absent:
        print(f"  {name}: {why}")
    for name, why in failed:
        print(f"FAIL {name}: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
