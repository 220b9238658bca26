"""Import direction: engine <- service <- MRML logic <- front ends, checked with import-linter's contracts in
pyproject.toml (``lint-imports``). A wrong-way import fails here, and so in CI."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytest.importorskip("importlinter", reason="import-linter is needed (pip install 'mrisegassist[test]')")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the contracts of ``root/pyproject.toml`` on ``root/MRISegAssist``."""
    env = {**os.environ, "PYTHONPATH": str(root / "MRISegAssist")}
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", script, "--no-cache"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)


def test_contracts_are_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "4 kept, 0 broken" in result.stdout


def test_a_wrong_way_import_is_caught(tmp_path):
    """A copy of the sources where the engine imports the MRML logic breaks the contracts."""
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(REPO / "MRISegAssist", tmp_path / "MRISegAssist",
                    ignore=shutil.ignore_patterns("*.pt", "*.png", "__pycache__", "Resources"))
    volume = tmp_path / "MRISegAssist" / "mrisegassist" / "volume.py"
    volume.write_text(volume.read_text() + "\nfrom MRISegAssistLib import nodes  # wrong way\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "mrisegassist is not allowed to import MRISegAssistLib" in result.stdout
    assert "mrisegassist.volume -> MRISegAssistLib" in result.stdout
