"""Helpers for the segmentation service tests: a real ``mrisegassist server`` process and real cases."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

from conftest import REPO, data_path

from mrisegassist.prompt.base import Box2D, ObjectPrompt
from mrisegassist.service.protocol import READY_PREFIX
from mrisegassist.volume import read_volume

BRATS = ("brats2013-deepmedic", "pat0001")


class ServerProcess:
    """``python -m mrisegassist server ARGS`` on a free port; ``url`` once it listens, its output in ``log``."""

    def __init__(self, *args: str, timeout: float = 180.0) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "MRISegAssist"),
                                                            os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-X", "faulthandler", "-m", "mrisegassist", "server", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, cwd=tempfile.gettempdir(), bufsize=1)
        self.lines: list[str] = []
        self.url: Optional[str] = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(timeout) or self.url is None:
            self.stop()
            raise RuntimeError(f"server did not start in {timeout:.0f} s:\n{self.log}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith(READY_PREFIX):
                self.url = line[len(READY_PREFIX):].strip()
                self._ready.set()
        self._ready.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


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
