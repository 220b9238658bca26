"""``mrisegassist batch STUDIES -o OUT``: segment a cohort (a folder of case folders or a CSV manifest) through
the segmentation service on a Ray cluster (local by default; ``--address`` joins one) or serially.

Each study gets ``OUT/studies/<case>/labels.nii.gz`` (+ names sidecar) and ``study.json``; ``OUT/results.parquet``
and ``OUT/results.csv`` hold one row per finished study (volumes, Dice against the reference, timings, device,
energy, errors); ``OUT/runs.json`` one summary per run. A re-run skips finished studies. ``mrisegassist report
OUT`` turns the table into an HTML page.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import add_json_flag, emit


def register(sub) -> None:
    p = sub.add_parser("batch", help="segment a cohort (case folders or a CSV manifest) on Ray, resumable, with "
                                     "a results table", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("studies", help="folder of case folders, or a CSV manifest (case, sequences, reference, "
                                   "model, mask, boxes, grouping columns such as site or scanner)")
    p.add_argument("-o", "--out", required=True, help="results folder (created; re-use it to resume)")
    w = p.add_argument_group("workflow (one service request per study)")
    w.add_argument("--workflow", choices=("unet", "mask", "boxes", "atlas"), default="unet",
                   help="unet: U-Net auto-segmentation; mask: prompts from the components of a mask; boxes: "
                        "prompts from an atlas boxes JSON; atlas: registration-atlas prompts (default unet)")
    w.add_argument("--model", help="U-Net model (a manifest 'model' column overrides it per study)")
    w.add_argument("--reference-sequence", help="U-Net: the sequence whose grid the label map gets")
    w.add_argument("--min-component", type=float, metavar="MM3", help="U-Net: drop smaller components")
    w.add_argument("--target", help="prompt workflows: the sequence segmented (default flair, else the first)")
    w.add_argument("--engine", default="classical",
                   help="promptable engine (default classical; 'atlas' with --workflow atlas: label fusion)")
    w.add_argument("--cascade", choices=("C", "D"), help="second pass from the first pass's masks")
    w.add_argument("--strategy", choices=("A", "B"), default="A", help="A: one box, B: three boxes per object")
    w.add_argument("--min-voxels", type=int, default=3, help="mask workflow: ignore smaller components")
    w.add_argument("--mask-from", choices=("mask", "reference"), default="mask",
                   help="mask workflow: the manifest's 'mask' column, or each study's reference mask")
    w.add_argument("--references", help="atlas workflow: builtin:NAME or a reference folder/manifest")
    w.add_argument("--structures", help="atlas workflow: comma-separated structure names (default: all)")
    w.add_argument("--extra-sequences", action="store_true",
                   help="prompt workflows: give the study's other sequences to engines that use several")
    w.add_argument("--no-distances", action="store_true", help="skip surface distances (HD95) in the metrics")
    x = p.add_argument_group("execution")
    x.add_argument("--serial", action="store_true", help="no Ray: one study after another in this process")
    x.add_argument("--address", help="join this Ray cluster (e.g. auto, HOST:6379, ray://HOST:10001); default: "
                                     "start a local one on this machine")
    x.add_argument("--workers", type=int, help="number of workers (default: one per GPU, else per "
                                               "--cpus-per-worker cores)")
    x.add_argument("--device", choices=("cpu", "cuda", "mps"),
                   help="device of the workers (default: cuda when the cluster has GPUs)")
    x.add_argument("--cpus-per-worker", type=float, default=1.0, help="cores (and torch threads) per worker")
    x.add_argument("--gpus-per-worker", type=float, help="GPUs each worker requests (default 1 on cuda)")
    x.add_argument("--max-attempts", type=int, default=3,
                   help="times a study is tried when its worker dies (default 3)")
    x.add_argument("--retry-failed", action="store_true",
                   help="re-run studies that failed on bad input too (default: only when their inputs changed)")
    e = p.add_argument_group("energy (CodeCarbon, offline)")
    e.add_argument("--country", metavar="ISO3", help="country of the grid for emissions, e.g. CHE, DEU, USA "
                                                     "(default: CodeCarbon's world average)")
    e.add_argument("--no-energy", action="store_true", help="do not measure energy")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_json_flag(p)
    p.set_defaults(func=cmd_batch)


def config_from_args(args: argparse.Namespace):
    from ..batch import BatchConfig, WorkflowOptions

    options = WorkflowOptions(
        args.workflow, args.model, args.reference_sequence, args.min_component, args.target, args.engine,
        args.cascade, args.strategy, args.min_voxels, args.mask_from, args.references,
        [s.strip() for s in args.structures.split(",") if s.strip()] if args.structures else None,
        args.extra_sequences, not args.no_distances)
    return BatchConfig(Path(args.studies), Path(args.out), options, args.serial, args.workers, args.address,
                       args.device, args.cpus_per_worker, args.gpus_per_worker, args.max_attempts,
                       args.retry_failed, args.country, not args.no_energy,
                       progress=not (args.quiet or args.json))


def summary_text(summary) -> str:
    def fmt(value, unit: str, scale: float = 1.0, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value * scale:.{digits}g} {unit}"

    lines = [f"{summary.done} done, {summary.failed} failed, {summary.skipped} skipped (finished before), "
             f"{summary.pending} not run, of {summary.studies} studies"
             + (" - CANCELLED" if summary.cancelled else ""),
             f"{summary.mode}: {summary.workers} worker(s) on {summary.device or 'n/a'}"
             + (f" at {summary.address}" if summary.address else "")
             + f"; {summary.wall_s:.1f} s wall ({summary.startup_s:.1f} s to start the workers)"
             + (f", {summary.studies_per_hour:.0f} studies/hour" if summary.studies_per_hour else "")]
    if summary.retried:
        lines.append(f"retried after a worker died: {', '.join(summary.retried)} ({summary.worker_deaths} "
                     f"worker death(s))")
    es, er = summary.energy_studies, summary.energy_run
    lines.append(f"energy: studies {fmt(es.energy_kwh, 'Wh', 1000)} ({fmt(es.emissions_kg, 'g CO2e', 1000)}), "
                 f"whole machine over the run {fmt(er.energy_kwh, 'Wh', 1000)}; {er.method}")
    for r in summary.records:
        if r.status == "failed":
            lines.append(f"  FAILED {r.case}: {r.error_kind}: {r.error}")
    lines.append(f"results: {Path(summary.out) / 'results.parquet'} and results.csv")
    return "\n".join(lines)


def cmd_batch(args: argparse.Namespace) -> int:
    from ..batch import run_batch

    summary = run_batch(config_from_args(args))
    emit(args, summary.to_json(), lambda _: summary_text(summary))
    return 130 if summary.cancelled else (1 if summary.failed else 0)
