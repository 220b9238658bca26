"""The logic's jobs run in a worker process while the main thread holds Python's lock, as Slicer's does.

Slicer's main thread holds the GIL while Qt waits for events (PythonQt is built without thread support), so
a computation in a Python thread of Slicer's process only advances while the main thread runs Python. The
emulation here: the main thread sits in C code holding the GIL (``ctypes.PyDLL(None).usleep``: PyDLL keeps
the lock) for 100 ms between timer ticks, and polls the runner on each tick. Through the local worker each
workflow (auto-segmentation with the shipped U-Net, a box prompt, atlas boxes) must finish within 1.5x of the
same job run directly in this process, both sides warm (worker started, models loaded, volumes prepared). Atlas
boxes are timed on a case new to both sides (each side keeps a volume's target registration, so a repeat on the
same volume takes milliseconds, less than one 100 ms tick): the references' registrations come from the disk
cache, the target's registration is computed again.
Real data: BraTS 2013 pat0001 (240x240x155) and the ITK-SNAP T1 crop with its manual labels.
"""
from __future__ import annotations

import ctypes
import time

import numpy as np
import pytest

from conftest import data_path
from slicer_env import SlicerEnv

from MRISegAssistLib import nodes
from MRISegAssistLib.logic import MRISegAssistLogic
from MRISegAssistLib.tasks import BackgroundRunner
from mrisegassist.service import InProcessClient, LocalWorker
from mrisegassist.volume import read_volume

LIBC = ctypes.PyDLL(None)  # calls keep the GIL held


def emulated_slicer_loop(job) -> tuple[object, float]:
    """Run ``job`` with :class:`BackgroundRunner` while the main thread holds the GIL in C between 100 ms
    ticks; returns the job's result and the seconds it took."""
    runner = BackgroundRunner(interval_ms=100)
    done, errors = [], []
    t0 = time.perf_counter()
    runner.start(job, on_done=done.append, on_error=errors.append)
    while not runner.poll():
        LIBC.usleep(100_000)
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return done[0], seconds


@pytest.fixture(scope="module")
def scene():
    env = SlicerEnv()
    folder = data_path("brats2013-deepmedic", "pat0001")
    flair = env.load_volume(folder / "flair.nii.gz", "flair")
    t1c = env.load_volume(folder / "t1c.nii.gz", "t1c")
    labels = read_volume(folder / "labels.nii.gz", kind="label").array > 0
    k = int(np.argmax(labels.sum(axis=(1, 2))))
    jj, ii = np.nonzero(labels[k])
    roi = nodes.roi_from_extent(env.scene, flair, (int(ii.min()) - 3, int(ii.max()) + 3, int(jj.min()) - 3,
                                                   int(jj.max()) + 3, k, k), "tumour")
    t1_path = data_path("itksnap-mricrop", "t1.gipl.gz")
    crop = env.load_volume(t1_path, "crop t1")
    return env, {"flair": flair, "t1c": t1c}, roi, crop


@pytest.fixture(scope="module")
def atlas_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("atlas-cache"))


@pytest.fixture(scope="module")
def logics(scene, atlas_cache):
    env = scene[0]
    direct = MRISegAssistLogic(env.scene, device="cpu", client=InProcessClient())
    worker = MRISegAssistLogic(env.scene, device="cpu",
                               client=LocalWorker(device="cpu", env={"MRISEGASSIST_CACHE": atlas_cache}))
    worker.client.wait_ready()
    yield direct, worker
    worker.close()


def _manifest(tmp_path_factory):
    folder = data_path("itksnap-mricrop")
    path = tmp_path_factory.mktemp("refs") / "refs.csv"
    path.write_text(f"image,labels,name\n{folder / 't1.gipl.gz'},{folder / 'labels.gipl.gz'},mricrop\n")
    return str(path)


@pytest.mark.parametrize("workflow", ["auto-segment", "box prompt", "atlas boxes"])
def test_workflow_through_worker_with_main_thread_holding_the_gil(scene, logics, workflow, atlas_cache,
                                                                  tmp_path_factory, monkeypatch):
    env, inputs, roi, crop = scene
    direct, worker = logics
    monkeypatch.setenv("MRISEGASSIST_CACHE", atlas_cache)
    manifest = _manifest(tmp_path_factory)

    def make_job(logic):
        if workflow == "auto-segment":
            return logic.auto_segment_job(inputs, model="glioma-2d")
        if workflow == "box prompt":
            return logic.segment_from_rois_job(inputs["flair"], [roi])
        return logic.atlas_boxes_job(crop, manifest, structures=["label-2", "label-4"])

    make_job(direct).run()  # warm: model loaded, volume prepared, registration cached
    emulated_slicer_loop(make_job(worker))
    if workflow == "atlas boxes":  # a new case: the kept target registration goes, the disk cache stays
        direct.forget_scene()
        worker.forget_scene()
    t0 = time.perf_counter()
    expected = make_job(direct).run()
    direct_s = time.perf_counter() - t0
    expected_result = direct.last_result
    got, worker_s = emulated_slicer_loop(make_job(worker))
    print(f"{workflow}: direct {direct_s:.2f} s, worker with the GIL held between 100 ms ticks {worker_s:.2f} s "
          f"({worker_s / direct_s:.2f}x)")
    if workflow == "atlas boxes":
        assert [r.GetName() for r in got] == [r.GetName() for r in expected] == ["label-2", "label-4"]
        assert [nodes.roi_extent(r, crop) for r in got] == [nodes.roi_extent(r, crop) for r in expected]
    else:
        assert np.array_equal(worker.last_result.array, expected_result.array)
        assert got.GetSegmentation().GetNumberOfSegments() == expected.GetSegmentation().GetNumberOfSegments()
    assert worker_s <= 1.5 * direct_s
