"""``mrisegassist bench batch``: cohort throughput of Ray workers against a plain serial loop, same run, same studies.

The studies are the shared data's BraTS 2013 pat0001-0004 and ms-lesjak patient07/26 (``--copies`` times each,
as distinct studies, no prepared volume kept between studies), segmented by ``--workflow``: ``mask`` (default: the weights-free engine prompted from each
study's expert mask) or ``unet`` (the shipped model of each data set: glioma-2d, ms-lesions-2d). Modes, each
into its own fresh results folder, all through the same per-study code (read, service, atomic writes,
metrics):

* **serial**: one :class:`~mrisegassist.batch.workflow.StudyProcessor` in this process, all cores as torch
  threads (the baseline);
* **ray xN** for each N of ``--workers`` (default 1 and 2): N Ray actors on one local cluster (started once,
  its start time reported apart), the cores split evenly between them (threads per worker = cores / N).

Throughput = studies / (wall time - worker start-up), in studies per hour; each mode's ratio to the serial
loop's is printed, and the scaling from the first to the last worker count. On a cluster, run it with
``--address`` (and ``--device cuda``: one worker per GPU, ``num_gpus`` 1 each).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

CASES = [("brats2013-deepmedic", "pat0001", "labels", "glioma-2d"), ("brats2013-deepmedic", "pat0002", "labels",
         "glioma-2d"), ("brats2013-deepmedic", "pat0003", "labels", "glioma-2d"),
         ("brats2013-deepmedic", "pat0004", "labels", "glioma-2d"),
         ("ms-lesjak", "patient07", "lesions", "ms-lesions-2d"), ("ms-lesjak", "patient26", "lesions", "ms-lesions-2d")]


def register(sub) -> None:
    from ..cli import add_json_flag
    from . import add_data_flag

    p = sub.add_parser("batch", help="cohort throughput: Ray with 1..N workers vs a serial loop (shared data)")
    add_data_flag(p)
    p.add_argument("--workflow", choices=("mask", "unet"), default="mask",
                   help="mask: weights-free engine from the expert masks (default); unet: shipped models")
    p.add_argument("--copies", type=int, default=2, help="each of the 6 cases this many times (default 2)")
    p.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts (default 1,2)")
    p.add_argument("--address", help="an existing Ray cluster instead of a local one")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="worker device (default: cuda if any)")
    p.add_argument("--no-serial", action="store_true", help="skip the serial baseline (e.g. on a cluster)")
    add_json_flag(p)
    p.set_defaults(func=run)


def manifest(data: Path, folder: Path, copies: int) -> Path:
    """A CSV manifest of the benchmark's studies (inputs stay in the shared data, never copied)."""
    from ..errors import InputError

    rows = ["case,flair,t1c,reference,model,site"]
    for n in range(copies):
        for dataset, case, ref, model in CASES:
            d = data / dataset / case
            if not d.is_dir():
                raise InputError(f"bench batch needs the shared data: {d} is missing (--data)")
            t1c = d / ("t1c.nii.gz" if (d / "t1c.nii.gz").exists() else "t1post.nii.gz")
            rows.append(f"{case}-{n},{d / 'flair.nii.gz'},{t1c},{d / (ref + '.nii.gz')},{model},{dataset}")
    path = folder / "studies.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def run(args) -> int:
    from ..batch import BatchConfig, WorkflowOptions, run_batch
    from ..batch.runner import connect_ray
    from ..cli import emit
    from ..errors import InputError

    from ..atlas.space import cpu_count

    cores = cpu_count()
    counts = [int(n) for n in args.workers.split(",") if n.strip()]
    if not counts or min(counts) < 1:
        raise InputError("--workers: give worker counts >= 1, e.g. 1,2")
    options = WorkflowOptions("mask", mask_from="reference", target="flair", distances=False) \
        if args.workflow == "mask" else WorkflowOptions("unet", distances=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        studies = manifest(Path(args.data), Path(tmp), args.copies)

        def one(name: str, **kw) -> None:
            summary = run_batch(BatchConfig(studies, Path(tmp) / name.replace(" ", "-"), options,
                                            progress=not args.json, **kw))
            if summary.failed or summary.pending:
                raise InputError(f"bench batch: {name}: {summary.failed} failed, {summary.pending} not run")
            energy = summary.energy_studies.energy_kwh
            rows.append({"mode": name, "workers": summary.workers, "studies": summary.done,
                         "threads_per_worker": kw.get("cpus_per_worker", cores), "wall_s": summary.wall_s,
                         "startup_s": summary.startup_s, "studies_per_hour": summary.studies_per_hour,
                         "wh_per_study": None if energy is None else 1000 * energy / summary.done})

        if not args.no_serial:
            one("serial", serial=True)
        import time

        t0 = time.perf_counter()
        started = connect_ray(args.address, num_cpus=cores)
        cluster_s = time.perf_counter() - t0
        try:
            for n in counts:
                per = max(1, cores // n) if not args.address else 1
                one(f"ray x{n}", workers=n, cpus_per_worker=per, address=args.address, device=args.device)
        finally:
            if started:
                import ray

                ray.shutdown()
    base = next((r["studies_per_hour"] for r in rows if r["mode"] == "serial"), None)
    for r in rows:
        r["vs_serial"] = r["studies_per_hour"] / base if base else None
    ray_rows = [r for r in rows if r["mode"].startswith("ray")]
    scaling = ray_rows[-1]["studies_per_hour"] / ray_rows[0]["studies_per_hour"] if len(ray_rows) > 1 else None
    doc = {"data": str(args.data), "workflow": args.workflow, "studies": rows[0]["studies"] if rows else 0,
           "cores": cores, "ray_cluster_start_s": cluster_s, "modes": rows, "scaling": scaling,
           "scaling_from_to": [ray_rows[0]["workers"], ray_rows[-1]["workers"]] if len(ray_rows) > 1 else None}
    emit(args, doc, _text)
    return 0


def _text(doc: dict) -> str:
    lines = [f"{doc['studies']} studies ({doc['workflow']} workflow; BraTS 2013 pat0001-0004 + ms-lesjak "
             f"patient07/26 from {doc['data']}), {doc['cores']} cores; Ray cluster started in "
             f"{doc['ray_cluster_start_s']:.1f} s (not counted)",
             f"{'mode':10s} {'workers':>7s} {'threads':>7s} {'wall s':>8s} {'start s':>8s} {'studies/h':>10s} "
             f"{'vs serial':>9s} {'Wh/study':>9s}"]
    for r in doc["modes"]:
        ratio = f"{r['vs_serial']:.2f}x" if r["vs_serial"] else "-"
        wh = f"{r['wh_per_study']:.3f}" if r["wh_per_study"] is not None else "n/a"
        lines.append(f"{r['mode']:10s} {r['workers']:7d} {r['threads_per_worker']:7g} {r['wall_s']:8.1f} "
                     f"{r['startup_s']:8.1f} {r['studies_per_hour']:10.0f} {ratio:>9s} {wh:>9s}")
    if doc["scaling"]:
        a, b = doc["scaling_from_to"]
        lines.append(f"scaling {a} -> {b} workers: {doc['scaling']:.2f}x")
    return "\n".join(lines)
