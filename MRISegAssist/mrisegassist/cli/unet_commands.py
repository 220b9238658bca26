"""Implementations of the U-Net sub-commands (kept apart from argument parsing in ``cli/unet.py``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from typing import Optional

from . import emit
from .prompt import existing, service_client
from ..errors import CheckpointError, InputError
from ..outputs import Output, guard_output_folder, guard_outputs
from ..progress import tqdm_progress
from ..service.checks import check_device, unused_sequences


def cmd_train(args: argparse.Namespace) -> int:
    check_device(args.device, used=False, option="--device")  # cheap checks first: torch loads in seconds
    if args.config:
        _check_config(args.config)
    from ..unet.train import TrainConfig, train

    overrides = {k: getattr(args, k) for k in ("cases", "manifest", "dims", "epochs", "steps_per_epoch",
                                                "batch_size", "patch", "lr", "val_fraction", "val_every",
                                                "synthetic", "name", "max_minutes", "threads", "seed", "out",
                                                "resume", "device", "labels", "nproc")}
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
    check_device(cfg.device, option="--device" if args.device else f"--config {args.config}: device")
    if not cfg.out:
        raise InputError("no output folder given (--out)")
    out = Path(cfg.out)
    guard_output_folder(out, [Output(out / "model.json", "json", "--out"), Output(out / "model.pt", "any", "--out"),
                              Output(out / "last.pt", "any", "--out")],
                        [cfg.cases or None, cfg.manifest or None, args.config], option="--out")
    if cfg.resume:
        _check_resume(out / "last.pt")
    progress, close = tqdm_progress("train", disable=bool(args.json))
    try:
        result = train(cfg, progress=progress, log=(lambda m: None) if args.json else print)
    finally:
        close()
    emit(args, result, lambda r: f"model written to {r['model']} (" + (
        f"best validation score {r['best_score']:.3f}" if r["best_score"] >= 0 else "no validation case: last epoch"
    ) + f" after {r['epochs']} epochs)")
    return 0


def _check_config(path: str) -> None:
    """``train --config``: an existing JSON file holding one object of training options (else InputError)."""
    import json

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"--config {path}: is a folder, not a JSON file") from None
    except UnicodeDecodeError:
        raise InputError(f"--config {path}: not a text (UTF-8 JSON) file") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"--config {path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
            from None
    if not isinstance(doc, dict):
        raise InputError(f"--config {path}: expected a JSON object of training options "
                         f"({{\"epochs\": 10, ...}}), got a {type(doc).__name__}")


def _check_resume(path: Path) -> None:
    """``train --resume``: ``path`` must load as a weights-only checkpoint (no pickled code) before training."""
    if not path.is_file():
        raise InputError(f"--resume: no checkpoint {path} to resume from")
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on the pickle protocol
            torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc).split("WeightsUnpickler error:", 1)[-1].strip()
        detail = text.splitlines()[0] if text else type(exc).__name__
        raise CheckpointError(f"{path}: refused as a --resume checkpoint: it holds pickled Python objects, not only "
                              f"weights (loading them could run code); not loaded ({detail[:160]})") from None
    except Exception as exc:  # noqa: BLE001 - not a torch checkpoint at all: zip errors, truncation
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({first[:160]})") from None


def _regions(model) -> Optional[str]:
    """The model's evaluation regions (``"brats"`` or ``None``) when it is known here."""
    from ..unet.entries import get_model

    try:
        return get_model(model).regions
    except (InputError, CheckpointError):
        return None


def _read_reference(path):
    """``--ref-mask`` read and checked (before anything is computed)."""
    from ..volume import read_volume

    return read_volume(path, kind="label", name=f"reference {Path(path).name}")


def _reference(ref, geometry):
    """The reference label map (a Volume or a path) on ``geometry``."""
    from ..volume import Volume, resample_to

    ref = ref if isinstance(ref, Volume) else _read_reference(ref)
    return ref if ref.geometry.same_as(geometry) else resample_to(ref, geometry, "nearest")


def _evaluation(regions: Optional[str], labelmap, ref) -> dict:
    """Metrics of ``labelmap`` against a reference label map already on its grid."""
    from ..metrics import evaluate_labels
    from ..unet.postprocess import BRATS_REGIONS

    return evaluate_labels(labelmap.volume.array, ref.array, labelmap.volume.geometry.spacing,
                           labels=labelmap.labels, regions=BRATS_REGIONS if regions == "brats" else None,
                           lesionwise=regions != "brats")


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


def _model_inputs(model, client) -> Optional[list[str]]:
    """The model's input sequences, from the service's model list or the model's own description."""
    from ..service import InProcessClient

    known = {m.name: m.inputs for m in client.info().models}
    if str(model) in known:
        return known[str(model)]
    from ..unet.entries import get_model

    try:
        return list(get_model(model).inputs)
    except InputError:
        if isinstance(client, InProcessClient):
            raise
        return None  # the server names what it lacks


def _run(model, inputs: dict, reference, output: Path, device: str, quiet: bool,
         min_component=None, ref_mask=None, client=None, download: bool = False,
         trust_code: bool = False) -> tuple[dict, object, object]:
    """Read the model's sequences, segment through the service (in-process unless ``client``), write."""
    import time

    from ..labels import write_labelmap
    from ..service import AutoSegmentRequest, InProcessClient
    from ..volume import read_volume

    client = client or InProcessClient(device=device)
    needed = _model_inputs(model, client)
    if needed is not None:
        missing = [n for n in needed if n not in inputs]
        if missing:
            raise InputError(f"model {model!r} needs sequence(s) {', '.join(missing)}; "
                             f"given {', '.join(inputs) or 'none'}")
    reference = reference or (needed[0] if needed else next(iter(inputs)))
    if reference not in inputs:
        raise InputError(f"reference sequence {reference!r} is not among the inputs ({', '.join(inputs)})")
    if needed is not None:
        unused_sequences([n for n in inputs if n != reference], needed, f"model {str(model)!r}")
    wanted = [reference] + [n for n in (needed or inputs) if n != reference]
    volumes = {n: inputs[n] if not isinstance(inputs[n], (str, Path)) else
               read_volume(inputs[n], name=f"{n} ({Path(inputs[n]).name})") for n in wanted}
    ref = _reference(ref_mask, volumes[reference].geometry) if ref_mask is not None else None
    remote = not isinstance(client, InProcessClient)
    request = AutoSegmentRequest(volumes, str(model), reference, min_component, None if remote else device,
                                 download=download, trust_code=trust_code)
    progress, close = tqdm_progress("segment", disable=quiet)
    t0 = time.perf_counter()
    try:
        result = client.call(request, progress)
    finally:
        close()
    seconds = time.perf_counter() - t0
    out = {"output": str(output), "model": result.model, "seconds": round(seconds, 2), "reference": reference,
           "volumes_ml": {o.name: round(o.volume_ml, 3) for o in result.objects}, "timings": result.timings,
           "computed": client.where}
    if ref is not None:
        out["metrics"] = _evaluation(_regions(model), result.labels, ref)
    write_labelmap(result.labels, output)
    return out, result.labels, volumes[reference]


def cmd_segment(args: argparse.Namespace) -> int:
    from .unet import parse_inputs

    inputs = parse_inputs(args.input)
    for name, path in inputs.items():
        if not path.exists():
            raise InputError(f"--input {name}: {path} does not exist")
    if args.ref_mask and not Path(args.ref_mask).exists():
        raise InputError(f"--ref-mask: {args.ref_mask} does not exist")
    check_device(args.device, used=not args.server, option="--device")
    guard_outputs([Output(Path(args.output), "labelmap", "-o")],
                  [*inputs.values(), args.ref_mask, *existing(args.model)])
    ref = _read_reference(args.ref_mask) if args.ref_mask else None
    client = service_client(args)
    try:
        result, _, _ = _run(args.model, inputs, args.reference, Path(args.output), args.device, bool(args.json),
                            args.min_component, ref, client, args.download, args.trust_model_code)
    finally:
        client.close()
    emit(args, result, _text)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ..unet.entries import list_models

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

    check_device(args.device, option="--device")
    from ..outputs import write_json
    from ..viz import overlay_png
    from ..volume import read_volume
    from ..unet.data import find_case_files

    out = Path(args.out)
    outputs = [Output(out / "labels.nii.gz", "labelmap", "-o"), Output(out / "metrics.json", "json", "-o"),
               Output(out / "overlay.png", "png", "-o")]
    if args.case:
        files = find_case_files(Path(args.case)) if Path(args.case).is_dir() else None
        if files is None:
            raise InputError(f"--case {args.case}: not a folder with flair/t1/t1c/t2 files")
        inputs, ref_mask, case_dir = dict(files.images), files.labels, Path(args.case)
        guard_output_folder(out, outputs, [*inputs.values(), ref_mask, *existing(args.model)], [case_dir])
    else:
        guard_output_folder(out, outputs + [Output(out / "case", "folder", "-o")], existing(args.model))
        from ..synth import make_case, write_case

        case_dir = out / "case"
        written = write_case(make_case("glioma", args.seed), case_dir)
        inputs = {k: v for k, v in written.items() if k not in ("labels", "brainmask")}
        ref_mask = written.get("labels")
    model = args.model or ("glioma-2d" if {"flair", "t1c"} <= set(inputs) else "ms-lesions-2d")
    result, labelmap, image = _run(model, inputs, None, out / "labels.nii.gz", args.device, bool(args.json),
                                   ref_mask=ref_mask)
    result["case"] = str(case_dir)
    if result.get("metrics"):
        result["metrics_file"] = str(write_json(out / "metrics.json", json.loads(json.dumps(result["metrics"],
                                                                                           default=str))))
    reference = read_volume(ref_mask, kind="label").array if ref_mask else None
    if reference is not None and reference.shape != image.array.shape:
        reference = None
    result["overlay"] = str(overlay_png(image, labelmap, out / "overlay.png", reference=reference,
                                        title=f"{result['model']} on {case_dir.name}"))
    emit(args, result, _text)
    return 0
