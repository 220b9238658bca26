"""``mrisegassist bench unet``: U-Net inference speed and memory on a real 4x240x240x155 case (CPU).

Compares our pipeline (:class:`~mrisegassist.unet.inference.UNetSegmenter`: foreground crop, batched slices
or sliding window, probabilities back to the reference grid) with plain MONAI
``sliding_window_inference`` over the whole volume on the *same* network (seeded random weights), for a 3D
U-Net and a 2D U-Net; then the shipped models' full-case times (goal <= 15 s on 2 cores). Both runs start
from the same case arrays in memory (normalisation is part of each run; reading the files is not).

Time: median wall seconds of ``--repeats`` runs, ours and baseline alternated in this process.
Memory: each variant also runs once in a fresh child process; the figure is that process's peak resident
memory during the run minus its resident memory just before it (Linux ``VmHWM`` after resetting it through
``/proc/self/clear_refs``), i.e. the extra RAM the inference itself needed.
"""
from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import add_data_flag

GLI = "brats-gli-00001"
GLI_FILES = {"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f"}


def register(sub) -> None:
    from ..cli import add_json_flag

    p = sub.add_parser("unet", help="U-Net inference time and memory vs plain MONAI sliding_window_inference")
    add_data_flag(p)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-memory", action="store_true", help="skip the per-run child processes")
    p.add_argument("--plot", help="write a PNG bar chart of the times here")
    add_json_flag(p)
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------- memory
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _child(variant: str, data: str, queue) -> None:
    import torch

    torch.set_num_threads(2)
    fn = _variants(Path(data))[variant]
    prepared = fn(None)  # load inputs and build the network; returns the run callable
    before = _rss_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM (peak RSS) to the current RSS
        reset = True
    except OSError:
        reset = False
    prepared()
    peak = _rss_kb("VmHWM")
    queue.put({"peak_extra_mb": (peak - before) / 1024 if reset else None, "peak_rss_mb": peak / 1024})


def peak_memory(variant: str, data: Path) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(variant, str(data), queue))
    proc.start()
    proc.join()
    return queue.get() if not queue.empty() else {"peak_extra_mb": None, "peak_rss_mb": None}


# ------------------------------------------------------------------------------------------ variants
def _gli_case(data: Path):
    from ..volume import load_case

    folder = data / GLI
    return load_case({seq: folder / f"BraTS-GLI-00001-000-{suffix}.nii.gz" for seq, suffix in GLI_FILES.items()},
                     reference="flair")


def _random_model(dims: str):
    import torch

    from ..unet.entries import ModelEntry
    from ..unet.networks import build_network, default_spec

    torch.manual_seed(0)
    spec = default_spec(dims, 4, 5)
    entry = ModelEntry(name=f"random-{dims}", inputs=list(GLI_FILES), labels=[
        {"value": v, "name": f"class {v}"} for v in range(1, 5)], dims=dims, network=spec,
        spacing=[1.0, 1.0, None] if dims == "2d" else [1.0, 1.0, 1.0], roi_size=[128, 128, 128])
    return entry, build_network(spec).eval()


def _ours(dims: str, data: Path) -> Callable[[], object]:
    from ..unet.inference import UNetSegmenter

    entry, net = _random_model(dims)
    segmenter = UNetSegmenter(entry, "cpu", network=net)
    case = _gli_case(data)
    return lambda: segmenter.segment(case)


def _plain(dims: str, data: Path) -> Callable[[], object]:
    """Plain MONAI: whole-volume z-score, ``sliding_window_inference`` on everything, argmax (no foreground
    crop, no post-processing)."""
    import torch
    from monai.inferers import sliding_window_inference

    _, net = _random_model(dims)
    case = _gli_case(data)

    @torch.inference_mode()
    def go():  # from the case's arrays to a label map, as ours: the z-score is part of the run
        x = case.stack(list(GLI_FILES))
        x = (x - x.mean(axis=(1, 2, 3), keepdims=True)) / x.std(axis=(1, 2, 3), keepdims=True)
        if dims == "3d":
            logits = sliding_window_inference(torch.from_numpy(x[None]), (128, 128, 128), 1, net, overlap=0.25,
                                              mode="gaussian")
            return torch.argmax(logits, 1)[0].numpy()
        slices = torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2, 3)))  # (K, C, J, I)
        logits = sliding_window_inference(slices, (240, 240), 16, net, overlap=0.0)
        return torch.argmax(logits, 1).numpy()

    return go


def _shipped(name: str, inputs: dict) -> Callable[[], object]:
    from ..unet.inference import UNetSegmenter, load_model_case

    segmenter = UNetSegmenter(name, "cpu")
    case = load_model_case(segmenter, inputs)
    return lambda: segmenter.segment(case)


def _variants(data: Path) -> dict[str, Callable[[Optional[object]], Callable[[], object]]]:
    b13 = data / "brats2013-deepmedic" / "pat0004"
    ms = data / "ms-lesjak" / "patient07"
    return {
        "3d ours": lambda _: _ours("3d", data),
        "3d plain MONAI": lambda _: _plain("3d", data),
        "2d ours": lambda _: _ours("2d", data),
        "2d plain MONAI": lambda _: _plain("2d", data),
        "glioma-2d (shipped)": lambda _: _shipped("glioma-2d", {"flair": b13 / "flair.nii.gz",
                                                                "t1c": b13 / "t1c.nii.gz"}),
        "ms-lesions-2d (shipped)": lambda _: _shipped("ms-lesions-2d", {"flair": ms / "flair.nii.gz"}),
    }


def _median_time(fn: Callable[[], object], repeats: int, cpu: Optional[list] = None) -> float:
    """Median wall seconds of ``repeats`` calls; the process CPU seconds of each call go to ``cpu``."""
    times = []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(time.process_time() - c0)
    return statistics.median(times)


def run(args) -> int:
    import torch

    if args.plot:  # the output policy, before any work
        from ..outputs import Output, guard_outputs

        guard_outputs([Output(Path(args.plot), "png", "--plot")], [args.data])

    from ..cli import emit
    from ..errors import InputError

    data = Path(args.data)
    if not (data / GLI).is_dir():
        raise InputError(f"{data / GLI}: benchmark case missing (pass --data to the shared data folder)")
    torch.set_num_threads(2)
    variants = _variants(data)
    results: dict[str, dict] = {}
    for dims in ("3d", "2d"):
        ours, plain = variants[f"{dims} ours"](None), variants[f"{dims} plain MONAI"](None)
        ours(), plain()  # warm-up
        t_ours, t_plain, c_ours, c_plain = [], [], [], []
        for _ in range(max(args.repeats, 1)):  # alternate so both see the same machine load
            t_ours.append(_median_time(ours, 1, c_ours))
            t_plain.append(_median_time(plain, 1, c_plain))
        results[f"{dims} ours"] = {"seconds": statistics.median(t_ours), "cpu_seconds": statistics.median(c_ours)}
        results[f"{dims} plain MONAI"] = {"seconds": statistics.median(t_plain),
                                          "cpu_seconds": statistics.median(c_plain)}
        results[f"{dims} ours"]["speedup_vs_plain"] = results[f"{dims} plain MONAI"]["seconds"] / \
            results[f"{dims} ours"]["seconds"]
    for name in ("glioma-2d (shipped)", "ms-lesions-2d (shipped)"):
        fn = variants[name](None)
        fn()
        cpu: list = []
        results[name] = {"seconds": _median_time(fn, max(args.repeats, 1), cpu), "cpu_seconds": statistics.median(cpu)}
        results[name]["goal_15s_met"] = results[name]["seconds"] <= 15.0
    if not args.no_memory:
        for name in results:
            results[name].update(peak_memory(name, data))
    summary = {"case": f"{GLI} (4x240x240x155, int16 raw; shipped models on brats2013 pat0004 / ms-lesjak "
                       f"patient07)", "threads": torch.get_num_threads(), "repeats": args.repeats,
               "memory": "peak RSS during the run minus RSS before it, fresh child process per variant",
               "load_average": round(os.getloadavg()[0], 1), "cores": os.cpu_count(),
               "results": results}
    if args.plot:
        from ..viz import plot_benchmark

        plot_benchmark({k: v["seconds"] for k, v in results.items()}, args.plot, title="U-Net inference (CPU)")
        summary["plot"] = args.plot
    emit(args, summary, _table)
    return 0


def _table(summary: dict) -> str:
    lines = [f"U-Net inference on {summary['case']}, {summary['threads']} CPU threads, median of "
             f"{summary['repeats']} (load average {summary['load_average']} on {summary['cores']} cores)",
             f"memory: {summary['memory']}", "",
             f"{'run':<26}{'seconds':>9}{'CPU s':>8}{'vs plain':>10}{'extra MB':>10}{'peak RSS MB':>13}"]
    for name, r in summary["results"].items():
        ratio = f"{r['speedup_vs_plain']:.2f}x" if "speedup_vs_plain" in r else ""
        extra = f"{r['peak_extra_mb']:.0f}" if r.get("peak_extra_mb") is not None else "-"
        peak = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "-"
        goal = (" (goal <= 15 s: " + ("met" if r["goal_15s_met"] else "NOT met") + ")") if "goal_15s_met" in r else ""
        lines.append(f"{name:<26}{r['seconds']:>9.2f}{r['cpu_seconds']:>8.1f}{ratio:>10}{extra:>10}{peak:>13}{goal}")
    return "\n".join(lines)
