"""``mrisegassist bench service``: the cost of running the segmentation service out of process.

Per workflow (auto-segmentation with the shipped glioma U-Net on FLAIR + T1c, a box prompt around the whole
tumour with the weights-free engine, atlas boxes of three structures with the built-in Colin27 set on the
T1c), on a real case (default BraTS 2013 pat0001, 240x240x155), the same request is run

* **in-process**: :class:`~mrisegassist.service.Service` in this process (the baseline);
* **local worker**: :class:`~mrisegassist.service.LocalWorker`, the worker process the Slicer panel starts
  (request and result sent over loopback, stored);
* **server**: a ``mrisegassist server`` process reached with :class:`~mrisegassist.service.HttpClient` and a
  token, results deflated as a remote client receives them.

Every mode is warmed first by one request, timed and shown as *first* (worker/server started, model loaded,
volumes uploaded and prepared, the references' registrations cached in one shared cache, the target's
registration kept by each mode's service), then the modes take turns for ``--repeats`` rounds (so load from
other processes hits all of them alike); the median wall time per mode is compared with in-process. Goal: at
most +10 % and +0.3 s.

*atlas new case* repeats atlas boxes as on a case each service has not seen: before every request the client
forgets its volumes (a new session on the worker and server), so the volume is uploaded again and its
registration onto the atlas computed again; the references' registrations still come from the disk cache.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

WORKFLOWS = ("auto-segment", "box prompt", "atlas boxes", "atlas new case")
NEW_CASE = {"atlas new case"}  #: workflows timed with the client's volumes forgotten before each request
CASE = "brats2013-deepmedic/pat0001"
ATLAS_STRUCTURES = ["lateral-ventricle-left", "lateral-ventricle-right", "third-ventricle"]
GOAL_RATIO, GOAL_SECONDS = 0.10, 0.3


def register(sub) -> None:
    from ..cli import add_json_flag
    from . import add_data_flag

    p = sub.add_parser("service", help="in-process vs local worker vs server round trip per workflow (real case)")
    add_data_flag(p)
    p.add_argument("--case", default=CASE, help="case folder inside --data with flair, t1c and labels .nii.gz")
    p.add_argument("--workflows", default=",".join(WORKFLOWS), help=f"comma-separated, of {', '.join(WORKFLOWS)}")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per mode (median reported)")
    p.add_argument("--model", default="glioma-2d", help="U-Net model for auto-segmentation")
    add_json_flag(p)
    p.set_defaults(func=run)


def _requests(folder: Path, workflows: list[str], model: str) -> dict:
    import numpy as np

    from ..prompt.base import Box2D, ObjectPrompt
    from ..service import AtlasBoxesRequest, AutoSegmentRequest, PromptRequest
    from ..volume import read_volume

    flair = read_volume(folder / "flair.nii.gz", name="flair")
    mask = read_volume(folder / "labels.nii.gz", kind="label").array > 0
    k = int(np.argmax(mask.sum(axis=(1, 2))))
    jj, ii = np.nonzero(mask[k])
    box = Box2D(k, int(ii.min()) - 3, int(jj.min()) - 3, int(ii.max()) + 3, int(jj.max()) + 3)
    out = {}
    if "auto-segment" in workflows:
        out["auto-segment"] = AutoSegmentRequest({"flair": flair, "t1c": read_volume(folder / "t1c.nii.gz",
                                                                                     name="t1c")}, model)
    if "box prompt" in workflows:
        out["box prompt"] = PromptRequest(flair, [ObjectPrompt(1, [box], name="tumour")])
    atlas = [name for name in ("atlas boxes", "atlas new case") if name in workflows]
    if atlas:
        request = AtlasBoxesRequest(read_volume(folder / "t1c.nii.gz", name="t1c"), "builtin:colin27",
                                    ATLAS_STRUCTURES)
        out.update({name: request for name in atlas})
    return out, flair


def _timed(client, request, new_case: bool) -> tuple[float, object]:
    """``(wall seconds, result)`` of one request; ``new_case``: the client forgets its volumes first (untimed)."""
    if new_case:
        client.forget_volumes()
    t0 = time.perf_counter()
    result = client.call(request)
    return time.perf_counter() - t0, result


def run(args) -> int:
    import os

    from ..cli import emit
    from ..errors import InputError
    from ..service import HttpClient, InProcessClient, LocalWorker
    from .processes import ServerProcess

    workflows = [w.strip() for w in args.workflows.split(",") if w.strip()]
    unknown = [w for w in workflows if w not in WORKFLOWS]
    if unknown:
        raise InputError(f"unknown workflow(s) {', '.join(unknown)}; use {', '.join(WORKFLOWS)}")
    if args.repeats < 1:
        raise InputError("--repeats must be at least 1")
    folder = Path(args.data) / args.case
    if not (folder / "flair.nii.gz").is_file():
        raise InputError(f"{folder}: needs flair, t1c and labels .nii.gz; pass --data / --case")
    requests, flair = _requests(folder, workflows, args.model)
    token = "bench-service-token"
    with tempfile.TemporaryDirectory(prefix="mrisegassist-bench-service-") as cache:
        env = {"MRISEGASSIST_CACHE": cache}
        previous = os.environ.get("MRISEGASSIST_CACHE")
        os.environ["MRISEGASSIST_CACHE"] = cache
        worker = LocalWorker(device="cpu", env=env)
        server = ServerProcess("--host", "127.0.0.1", f"--token={token}", "--device", "cpu",
                               module="mrisegassist server", env=env)
        clients = {"in-process": InProcessClient(device="cpu"), "local worker": worker,
                   "server": HttpClient(server.base, token, compress=True)}
        try:
            t0 = time.perf_counter()
            worker.wait_ready()
            startup = time.perf_counter() - t0
            rows = {}
            for name, request in requests.items():
                first = {}
                for mode, client in clients.items():  # warm: models loaded, volume prepared, registrations kept
                    first[mode], _ = _timed(client, request, name in NEW_CASE)
                times = {mode: [] for mode in clients}
                service_s = {mode: [] for mode in clients}
                for _ in range(args.repeats):
                    for mode, client in clients.items():
                        seconds, result = _timed(client, request, name in NEW_CASE)
                        times[mode].append(seconds)
                        service_s[mode].append(result.timings.get("total_s", float("nan")))
                rows[name] = {mode: {"seconds": statistics.median(times[mode]), "first_seconds": first[mode],
                                     "service_seconds": statistics.median(service_s[mode]), "runs": times[mode]}
                              for mode in clients}
        finally:
            for client in clients.values():
                client.close()
            server.stop()
            if previous is None:
                os.environ.pop("MRISEGASSIST_CACHE", None)
            else:
                os.environ["MRISEGASSIST_CACHE"] = previous
    for row in rows.values():
        base = row["in-process"]["seconds"]
        for mode, r in row.items():
            r["overhead_s"] = r["seconds"] - base
            r["transfer_s"] = r["seconds"] - r["service_seconds"]
            r["overhead_ratio"] = r["seconds"] / base - 1.0
            r["goal_met"] = mode == "in-process" or (r["overhead_ratio"] <= GOAL_RATIO and
                                                      r["overhead_s"] <= GOAL_SECONDS)
    shape = flair.array.shape
    summary = {"case": f"{args.case} (FLAIR {shape[2]}x{shape[1]}x{shape[0]}, {flair.array.dtype}, "
                       f"{flair.array.nbytes / 2 ** 20:.1f} MB per sequence)",
               "cpu_count": os.cpu_count(), "repeats": args.repeats, "worker_start_s": startup, "rows": rows,
               "goal": f"at most +{GOAL_RATIO:.0%} and +{GOAL_SECONDS} s"}
    emit(args, summary, format_table)
    return 0


def format_table(summary: dict) -> str:
    lines = [f"case: {summary['case']}; {summary['cpu_count']} CPU cores; median of {summary['repeats']} warm runs "
             f"per mode, modes interleaved; local worker started in {summary['worker_start_s']:.1f} s",
             "wall seconds per request; service: the computation inside the service; outside: wall - service "
             "(encoding, transfer, polling); overhead: wall vs in-process; first: the mode's first request "
             f"(not in the goal); goal {summary['goal']}",
             f"{'workflow':<16}{'mode':<14}{'wall s':>8}{'service s':>10}{'outside':>9}{'overhead':>10}{'ratio':>8}"
             f"{'first s':>9}  goal"]
    for name, row in summary["rows"].items():
        for mode, r in row.items():
            goal = "-" if mode == "in-process" else ("met" if r["goal_met"] else "NOT met")
            lines.append(f"{name:<16}{mode:<14}{r['seconds']:>8.2f}{r['service_seconds']:>10.2f}"
                         f"{r['transfer_s']:>9.2f}{r['overhead_s']:>+10.2f}{r['overhead_ratio']:>+8.1%}"
                         f"{r['first_seconds']:>9.2f}  {goal}")
    return "\n".join(lines)
