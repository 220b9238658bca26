"""Evaluate a trained model on cases it was not trained on and install it with a generated ``MODEL_CARD.md``.

Run by ``recipes/train_default_models.sh``::

    python -m mrisegassist.unet.card build/models/glioma-2d --eval ../shared/data/brats2013-deepmedic/pat0001 \\
        --install MRISegAssist/mrisegassist/models/glioma-2d

Every figure in the card comes from :func:`evaluate_model` (full pipeline from the files, label maps on the
reference grid, metrics from :func:`mrisegassist.metrics.evaluate_labels`); nothing is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..metrics import evaluate_labels
from ..volume import read_volume, resample_to
from .data import CaseFiles, find_case_files
from .entries import ModelEntry, get_model
from .inference import UNetSegmenter, load_model_case
from .postprocess import BRATS_REGIONS

# Secondary check: agreement with another model's output (AURORA, NOT expert labels) on a raw int16 case.
AURORA_REGIONS = {"whole tumour": ((1, 2, 3, 4), (1, 2)), "tumour core": ((1, 3, 4), (1,))}


def evaluate_model(entry: ModelEntry, cases: Sequence[CaseFiles], device: str = "cpu") -> dict:
    """Segment each case from its files and score it against its (expert) label file."""
    segmenter = UNetSegmenter(entry, device)
    brats = entry.regions == "brats"
    out = {}
    for files in cases:
        case = load_model_case(segmenter, files.images)
        t0, c0 = time.perf_counter(), time.process_time()
        labelmap = segmenter.segment(case)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        ref = resample_to(read_volume(files.labels, kind="label"), case.geometry, "nearest")
        metrics = evaluate_labels(labelmap.volume.array, ref.array, case.geometry.spacing, labels=labelmap.labels,
                                  regions=BRATS_REGIONS if brats else None, lesionwise=not brats, distances=True)
        out[files.name] = {"seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
                           "threads": torch.get_num_threads(), "load": None if load is None else round(load, 1),
                           "cores": os.cpu_count(), "shape": list(case.geometry.size), "metrics": metrics}
    return out


def aurora_agreement(entry: ModelEntry, folder: Path, device: str = "cpu") -> Optional[dict]:
    """Dice of whole tumour / tumour core against ``brats-met-aurora``'s AURORA model output (not expert)."""
    files = find_case_files(folder)
    ref_path = folder / "model_output_labels.nii.gz"
    if files is None or not ref_path.is_file():
        return None
    segmenter = UNetSegmenter(entry, device)
    case = load_model_case(segmenter, files.images)
    pred = segmenter.segment(case).volume.array
    ref = resample_to(read_volume(ref_path, kind="label"), case.geometry, "nearest").array
    result = {}
    for name, (ours, theirs) in AURORA_REGIONS.items():
        p, r = np.isin(pred, ours), np.isin(ref, theirs)
        result[name] = round(2.0 * float((p & r).sum()) / max(float(p.sum() + r.sum()), 1.0), 3)
    return result


# Provenance and terms of the anatomy inside synthetic training cases (mrisegassist.synth).
TEMPLATE_NOTICE = (
    "Synthetic cases are simulated by `mrisegassist.synth` from the MNI ICBM152 2009a symmetric template (T1 and "
    "grey/white-matter maps) that ships inside the nilearn wheel (nilearn is BSD-3-Clause; its description of the "
    "template lists the licence as \"unknown\"). The template's own terms (COPYING of the ICBM 2009 release): "
    "Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, "
    "McGill University; permission to use, copy, modify and distribute for any purpose and without fee, provided "
    "that this copyright notice appears in all copies; provided \"as is\" without warranty. Cite Fonov et al. "
    "2009/2011 and Collins et al. 1999. No template voxels are stored in the weights.")


def _training_lines(entry: ModelEntry) -> list[str]:
    """Card lines on the training cases: real (expert labels) and synthetic (exact labels) separately."""
    t = entry.training
    real = [c for c in t.get("cases", []) if not c.startswith("synthetic-")]
    lines = [f"- Cases: {', '.join(real)} (expert labels); validation/model selection on "
             f"{', '.join(t.get('validation_cases', []))} (the best epoch is chosen by its Dice on that case, so "
             f"its figures below are somewhat optimistic)"]
    n_synth = int(t.get("synthetic") or 0)
    if n_synth:
        share = t.get("synthetic_fraction") or 0.0
        options = ", ".join(f"{k}={v}" for k, v in (t.get("synthetic_options") or {}).items())
        lines.append(f"- Plus {n_synth} seeded synthetic {t.get('synthetic_kind', '')} cases (exact labels; "
                     f"`mrisegassist.synth.make_case`{', ' + options if options else ''})"
                     + (f", {share:.0%} of training samples" if share else ""))
        lines.append(f"- {TEMPLATE_NOTICE}")
    return lines


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _case_lines(case: str, res: dict) -> list[str]:
    """Card section of one evaluated case: timing, Dice/HD95/volumes table, lesion-wise detection."""
    m = res["metrics"]
    lines = [f"### {case} ({'x'.join(str(s) for s in res['shape'])})", "",
             f"Full-case inference (reading excluded): {res['seconds']:.1f} s wall, {res['cpu_seconds']:.1f} "
             f"CPU-seconds with {res['threads']} torch threads, on a {res['cores']}-core machine shared with "
             f"other jobs (load average {res['load']}); see `mrisegassist bench unet` for timings.", "",
             "| label | Dice | HD95 mm | predicted ml | reference ml |", "|---|---|---|---|---|"]
    rows = list(m["labels"].items()) + [(f"[{k}]", v) for k, v in m.get("regions", {}).items()]
    for name, v in rows:
        lines.append(f"| {name} | {_fmt(v['dice'])} | {_fmt(v.get('hd95_mm'), 1)} | "
                     f"{_fmt(v.get('volume_pred_ml'), 2)} | {_fmt(v.get('volume_ref_ml'), 2)} |")
    for name, v in m["labels"].items():
        les = v.get("lesions")
        if les:
            lines.append(f"\nLesion-wise detection ({name}, 26-connected, >= {les['min_overlap']:g} overlap): "
                         f"{les['tp']} of {les['n_ref']} reference lesions found (sensitivity "
                         f"{_fmt(les['lesion_sensitivity'])}), {les['fp']} false-positive lesions of "
                         f"{les['n_pred']} predicted (precision {_fmt(les['lesion_precision'])}), "
                         f"lesion-wise F1 {_fmt(les['lesion_f1'])}.")
    lines.append("")
    return lines


def render_card(entry: ModelEntry, evaluation: dict, aurora: Optional[dict] = None) -> str:
    """Markdown model card from ``model.json`` and :func:`evaluate_model` results."""
    t = entry.training
    spec = entry.network
    n_params = t.get("parameters")
    lines = [f"# {entry.title_or_name}", "", "**NOT FOR CLINICAL USE.** Research and demonstration model, trained on "
             "very few cases; it will miss or invent lesions on scans unlike its training data.", "",
             entry.description, "", "## Model", "",
             f"- Name: `{entry.name}`; weights `{entry.weights}` (sha256 `{entry.sha256}`)",
             f"- Architecture: MONAI `UNet`, {entry.dims.upper()} slice-wise early fusion, channels "
             f"{spec.get('channels')}, strides {spec.get('strides')}, {spec.get('num_res_units')} residual units, "
             f"{spec.get('norm')} norm" + (f", {n_params / 1e6:.2f} M parameters" if n_params else ""),
             f"- Inputs (channel order): {', '.join(entry.inputs)}; each z-scored inside its own foreground "
             f"(non-background voxels), background 0, clipped to [-8, 8]",
             f"- Model grid: axis-aligned LPS at {entry.spacing} mm (null = native slice spacing); outputs "
             f"resampled back to the reference sequence's grid",
             "- Labels: " + ", ".join(f"{lab['value']} {lab['name']}" for lab in entry.labels),
             f"- Post-processing: connected components smaller than {entry.min_component_mm3:g} mm³ removed",
             f"- Licence: {entry.licence}", "", "## Training", "",
             *_training_lines(entry),
             f"- Recipe: `recipes/train_default_models.sh` (`mrisegassist train --config "
             f"recipes/{t.get('recipe', entry.name + '.json')}`), seed {t.get('seed')}",
             f"- Best epoch {t.get('epoch')} ({t.get('steps_per_epoch')} steps of batch {t.get('batch_size')}, "
             f"{t.get('patch')}² patches, AdamW lr {t.get('lr')} with cosine decay, DiceCE loss); "
             f"{t.get('minutes')} min on 2 shared CPU cores",
             "- Augmentation: class-balanced crops, left-right and anterior-posterior flips, rotation and scaling, "
             "bias field, gamma, intensity scale/shift, Gaussian noise", "",
             "## Validation (cases NOT used for training; expert labels)", ""]
    for case, res in evaluation.items():
        lines += _case_lines(case, res)
    if aurora:
        lines += ["### Secondary check: raw int16 BraTS-METS case (brats-met-aurora)", "",
                  "Dice against the AURORA model's output, which is NOT expert ground truth (a metastasis case, "
                  "unlike the glioma training data): " + ", ".join(f"{k} {v:.3f}" for k, v in aurora.items()), ""]
    lines += ["## Limitations", "",
              "- Trained on very few cases from one dataset; expect lower accuracy on other scanners, protocols, "
              "resolutions and pathologies. Figures above come from a single held-out case each.",
              "- 2D slice-wise: no through-plane context; thick-slice scans are segmented on their native slices.",
              "- Needs co-registered, skull-stripped inputs (BraTS-style preprocessing).",
              "- NOT FOR CLINICAL USE.", ""]
    return "\n".join(lines)


def install(model_dir: Path, target: Path, evaluation: dict, aurora: Optional[dict], recipe: str) -> ModelEntry:
    """Copy weights into ``target`` with ``model.json`` (validation = ``evaluation``) and ``MODEL_CARD.md``."""
    entry = get_model(model_dir)
    entry.verify()
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(entry.weights_path, target / entry.weights)
    state = torch.load(str(target / entry.weights), map_location="cpu", weights_only=True)
    entry.training = dict(entry.training, recipe=recipe, parameters=int(sum(v.numel() for v in state.values())))
    entry.validation = {case: {"seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"],
                               "dice": {k: v["dice"] for k, v in r["metrics"]["labels"].items()},
                               "regions": {k: v["dice"] for k, v in r["metrics"].get("regions", {}).items()},
                               "lesions": {k: {kk: v["lesions"].get(kk) for kk in
                                               ("n_ref", "n_pred", "tp", "fp", "lesion_sensitivity",
                                                "lesion_precision", "lesion_f1")}
                                           for k, v in r["metrics"]["labels"].items() if "lesions" in v}}
                        for case, r in evaluation.items()}
    if aurora:
        entry.validation["brats-met-aurora (vs AURORA model output, not expert)"] = aurora
    entry.folder = target
    entry.write(target)
    (target / "MODEL_CARD.md").write_text(render_card(entry, evaluation, aurora))
    return entry


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="trained model folder (model.json + model.pt)")
    parser.add_argument("--eval", action="append", required=True, help="held-out case folder (repeatable)")
    parser.add_argument("--aurora", help="brats-met-aurora folder for the secondary (non-expert) check")
    parser.add_argument("--install", required=True, help="target folder, e.g. MRISegAssist/mrisegassist/models/X")
    parser.add_argument("--recipe", default="", help="recipe config file name recorded in the card")
    args = parser.parse_args(argv)
    entry = get_model(args.model)
    cases = [find_case_files(Path(p)) for p in args.eval]
    evaluation = evaluate_model(entry, [c for c in cases if c is not None])
    aurora = aurora_agreement(entry, Path(args.aurora)) if args.aurora else None
    installed = install(Path(args.model), Path(args.install), evaluation, aurora, args.recipe)
    print(json.dumps(installed.validation, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
