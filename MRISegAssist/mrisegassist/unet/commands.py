"""Implementations of the U-Net sub-commands (kept apart from argument parsing in ``cli/unet.py``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import emit
from ..errors import InputError
from ..progress import tqdm_progress


def cmd_train(args: argparse.Namespace) -> int:
    from ..unet.train import TrainConfig, train

    overrides = {k: getattr(args, k) for k in ("cases", "manifest", "dims", "epochs", "steps_per_epoch",
                                                "batch_size", "patch", "lr", "val_fraction", "val_every",
                                                "synthetic", "name", "max_minutes", "threads", "seed", "out",
                                                "resume", "device", "labels")}
    if args.inputs:
        overrides["inputs"] = [s.strip().lower() for s in args.inputs.split(",") if s.strip()]
    if args.val_cases:
        overrides["val_cases"] = [s.strip() for s in args.val_cases.split(",") if s.strip()]
    if args.remap:
        try:
            overrides["remap"] = {int(a): int(b) for a, b in (p.split(":") for p in args.remap.split(","))}
        except ValueError:
            raise InputError(f"bad --remap {args.remap!r}: expected SRC:DST,... e.g. 3:4") from None
    if args.config:
        cfg = TrainConfig.from_json(args.config, **overrides)
    else:
        cfg = TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
    progress, close = tqdm_progress("train", disable=bool(args.json))
    try:
        result = train(cfg, progress=progress, log=(lambda m: None) if args.json else print)
    finally:
        close()
    emit(args, result, lambda r: f"model written to {r['model']} (" + (
        f"best validation score {r['best_score']:.3f}" if r["best_score"] >= 0 else "no validation case: last epoch"
    ) + f" after {r['epochs']} epochs)")
    return 0


def _evaluation(entry, labelmap, ref_path) -> dict:
    """Metrics of ``labelmap`` against a reference label file (resampled onto its grid if needed)."""
    from ..metrics import evaluate_labels
    from ..volume import read_volume, resample_to
    from .postprocess import BRATS_REGIONS

    ref = read_volume(ref_path, kind="label", name=f"reference {Path(ref_path).name}")
    if not ref.geometry.same_as(labelmap.volume.geometry):
        ref = resample_to(ref, labelmap.volume.geometry, "nearest")
    return evaluate_labels(labelmap.volume.array, ref.array, labelmap.volume.geometry.spacing,
                           labels=labelmap.labels, regions=BRATS_REGIONS if entry.regions == "brats" else None,
                           lesionwise=entry.regions != "brats")


def _summary(labelmap) -> dict:
    ml = labelmap.volume.geometry.voxel_volume_ml
    return {lab.name: round(float(labelmap.mask(lab.value).sum()) * ml, 3) for lab in labelmap.labels}


def _text(result: dict) -> str:
    from ..metrics import format_report

    lines = [f"label map written to {result['output']} (model {result['model']}, "
             f"{result['seconds']:.1f} s)"]
    lines += [f"  {name}: {ml:.2f} ml" for name, ml in result["volumes_ml"].items()]
    if result.get("metrics"):
        lines.append(format_report(result["metrics"]))
    for key in ("overlay", "metrics_file", "case"):
        if result.get(key):
            lines.append(f"{key.replace('_', ' ')}: {result[key]}")
    return "\n".join(lines)


def _run(model, inputs: dict, reference, output: Path, device: str, quiet: bool,
         min_component=None, ref_mask=None, download: bool = False, trust_code: bool = False
         ) -> tuple[dict, object, object]:
    import time

    from ..labels import write_labelmap
    from .inference import UNetSegmenter, load_model_case

    progress, close = tqdm_progress("segment", disable=quiet)
    try:
        segmenter = UNetSegmenter(model, device, min_component_mm3=min_component, download=download,
                                  trust_code=trust_code, progress=progress)
    finally:
        close()
    case = load_model_case(segmenter, inputs, reference)
    if not output.parent.exists():
        raise InputError(f"{output.parent}: output folder does not exist")
    progress, close = tqdm_progress("segment", disable=quiet)
    t0 = time.perf_counter()
    try:
        labelmap = segmenter.segment(case, progress)
    finally:
        close()
    seconds = time.perf_counter() - t0
    write_labelmap(labelmap, output)
    result = {"output": str(output), "model": segmenter.entry.name, "seconds": round(seconds, 2),
              "reference": case.reference, "volumes_ml": _summary(labelmap), "timings": segmenter.timings}
    if ref_mask:
        result["metrics"] = _evaluation(segmenter.entry, labelmap, ref_mask)
    return result, labelmap, case


def cmd_segment(args: argparse.Namespace) -> int:
    from ..cli.unet import parse_inputs

    inputs = parse_inputs(args.input)
    for name, path in inputs.items():
        if not path.exists():
            raise InputError(f"--input {name}: {path} does not exist")
    if args.ref_mask and not Path(args.ref_mask).exists():
        raise InputError(f"--ref-mask: {args.ref_mask} does not exist")
    result, _, _ = _run(args.model, inputs, args.reference, Path(args.output), args.device, bool(args.json),
                        args.min_component, args.ref_mask, args.download, args.trust_model_code)
    emit(args, result, _text)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .entries import list_models

    rows = []
    for e in list_models():
        size = e.weights_size()
        row = {"name": e.name, "title": e.title_or_name, "kind": e.kind, "dims": e.dims, "inputs": e.inputs,
               "labels": {int(lab["value"]): lab["name"] for lab in e.labels}, "licence": e.licence,
               "installed": size > 0, "size_mb": round(size / 1e6, 2), "folder": str(e.folder)}
        if e.weights_catalog:
            from ..prompt.weights import catalog_entry

            spec = catalog_entry(e.weights_catalog).as_dict()
            row["download"] = {k: spec[k] for k in ("url", "approx_mb", "md5", "sha256", "source")}
        rows.append(row)

    def text(models: list) -> str:
        if not models:
            return "no models installed"
        out = []
        for m in models:
            labels = ", ".join(f"{v}={n}" for v, n in m["labels"].items())
            state = f"installed, {m['size_mb']} MB" if m["installed"] else "weights missing"
            if not m["installed"] and m.get("download"):
                d = m["download"]
                state = (f"not downloaded ({d['approx_mb'] or '?'} MB from {d['url']}; "
                         f"`mrisegassist segment --model {m['name']} --download ...`)")
            out.append(f"{m['name']}: {m['title']}\n  inputs {', '.join(m['inputs'])} ({m['dims']}); labels {labels}"
                       f"\n  licence: {m['licence'] or 'unknown'}; {state}; {m['folder']}")
        return "\n".join(out)

    emit(args, rows, text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Case (synthetic glioma by default, or a folder) -> shipped model -> label map, metrics, overlay PNG."""
    import json

    from ..viz import overlay_png
    from ..volume import read_volume
    from .data import find_case_files

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.case:
        files = find_case_files(Path(args.case)) if Path(args.case).is_dir() else None
        if files is None:
            raise InputError(f"--case {args.case}: not a folder with flair/t1/t1c/t2 files")
        inputs, ref_mask, case_dir = dict(files.images), files.labels, Path(args.case)
    else:
        from ..synth import make_case, write_case

        case_dir = out / "case"
        written = write_case(make_case("glioma", args.seed), case_dir)
        inputs = {k: v for k, v in written.items() if k not in ("labels", "brainmask")}
        ref_mask = written.get("labels")
    model = args.model or ("glioma-2d" if {"flair", "t1c"} <= set(inputs) else "ms-lesions-2d")
    result, labelmap, case = _run(model, inputs, None, out / "labels.nii.gz", args.device, bool(args.json),
                                  ref_mask=ref_mask)
    result["case"] = str(case_dir)
    if result.get("metrics"):
        result["metrics_file"] = str(out / "metrics.json")
        (out / "metrics.json").write_text(json.dumps(result["metrics"], indent=2, default=str))
    image = case.volume(case.reference)
    reference = read_volume(ref_mask, kind="label").array if ref_mask else None
    if reference is not None and reference.shape != image.array.shape:
        reference = None
    result["overlay"] = str(overlay_png(image, labelmap, out / "overlay.png", reference=reference,
                                        title=f"{result['model']} on {case_dir.name}"))
    emit(args, result, _text)
    return 0
