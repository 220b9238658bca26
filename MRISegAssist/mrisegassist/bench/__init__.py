"""Benchmarks (``mrisegassist bench ...``). Each prints figures against a baseline run in the same process."""

import contextlib
import ctypes
import gc
import os
import time
from pathlib import Path

#: The shared data folder benchmarks read real MRI from: $MRISEGASSIST_DATA, else ../shared/data beside the checkout.
DATA = Path(os.environ.get("MRISEGASSIST_DATA", Path(__file__).resolve().parents[3].parent / "shared" / "data"))


def add_data_flag(parser) -> None:
    """``--data DIR``: the shared data folder (default :data:`DATA`)."""
    parser.add_argument("--data", default=str(DATA), help="shared data folder (default ../shared/data)")


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` memory field in kB (``VmRSS``, ``VmHWM``); 0 where unavailable."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@contextlib.contextmanager
def measure(out: dict, device: str = "cpu"):
    """Wall seconds, CPU seconds of this process (all threads; steadier than wall time on a shared machine) and
    peak extra memory of the block into ``out``: ``peak_extra_mb`` = peak resident memory
    during the block minus resident memory before it (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``,
    freed heap returned with ``malloc_trim`` first; ``None`` where unsupported); on CUDA also ``peak_gpu_mb``."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    cuda = str(device).startswith("cuda")
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    before = status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        reset = True
    except OSError:
        reset = False
    t0, c0 = time.perf_counter(), time.process_time()
    yield out
    if cuda:
        torch.cuda.synchronize()
        out["peak_gpu_mb"] = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
    out["seconds"] = time.perf_counter() - t0
    out["cpu_seconds"] = time.process_time() - c0
    out["peak_extra_mb"] = (status_kb("VmHWM") - before) / 1024 if reset else None
