"""Shared pytest fixtures. Real MRI comes from ``../shared/data`` beside the checkout (or $MRISEGASSIST_DATA);
tests that need it skip with a clear reason when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MRISEGASSIST_DATA", REPO.parent / "shared" / "data"))


def data_path(*parts: str) -> Path:
    """Path inside the shared data folder; skips the calling test when it is missing."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real MRI not available: {path} is missing (set MRISEGASSIST_DATA or place ../shared/data)")
    return path


@pytest.fixture
def shared_data() -> Path:
    return data_path()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Folder for test artefacts (overlay PNGs, screenshots): ./artifacts/ in the checkout."""
    path = REPO / "artifacts"
    path.mkdir(exist_ok=True)
    return path
