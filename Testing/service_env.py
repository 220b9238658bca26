"""Helpers for the segmentation service tests: a real ``mrisegassist server`` process and real cases."""
from __future__ import annotations

import time

import numpy as np

from conftest import data_path

from mrisegassist.bench.processes import ServerProcess
from mrisegassist.prompt.base import Box2D, ObjectPrompt
from mrisegassist.volume import read_volume

BRATS = ("brats2013-deepmedic", "pat0001")


def server_process(*args: str) -> ServerProcess:
    """A real ``mrisegassist server ARGS`` process on a free port of 127.0.0.1 (``url`` once it listens)."""
    return ServerProcess(*args, module="mrisegassist server", timeout=180.0)


def brats_case():
    """BraTS 2013 pat0001 (240x240x155): FLAIR and T1c volumes, the expert labels, and a box around the whole
    tumour (labels 1-4) on its largest axial slice, 3 voxels margin."""
    folder = data_path(*BRATS)
    flair = read_volume(folder / "flair.nii.gz", name="flair")
    t1c = read_volume(folder / "t1c.nii.gz", name="t1c")
    labels = read_volume(folder / "labels.nii.gz", kind="label").array
    mask = labels > 0
    k = int(np.argmax(mask.sum(axis=(1, 2))))
    jj, ii = np.nonzero(mask[k])
    box = Box2D(k, int(ii.min()) - 3, int(jj.min()) - 3, int(ii.max()) + 3, int(jj.max()) + 3)
    return flair, t1c, labels, ObjectPrompt(1, [box], name="tumour")


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.02):
    """Poll ``predicate()`` until it returns something true; returns it (AssertionError after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
