"""The ``mrisegassist`` command line starts without importing the heavy libraries (torch, MONAI, SAM)."""
from __future__ import annotations

import subprocess
import sys


def test_help_and_argument_parsing_import_no_torch_or_monai():
    code = ("import sys; from mrisegassist.cli import build_parser; p = build_parser(); "
            "p.parse_args(['segment', '--model', 'glioma-2d', '-i', 'flair=x.nii.gz', '-o', 'y.nii.gz']); "
            "print(sorted(m for m in ('torch', 'monai', 'sam2', 'segment_anything', 'trame_slicer') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    # the lazy package attributes still resolve
    from mrisegassist import unet

    assert callable(unet.get_model) and "UNetSegmenter" in unet.__all__
