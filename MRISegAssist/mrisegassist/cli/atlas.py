"""``mrisegassist atlas`` (reference set -> boxes JSON) and ``mrisegassist auto`` (automatic prompts ->
promptable engine -> cascade -> label map)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import numpy as np

from . import add_json_flag, emit
from ..errors import InputError


def _add_reference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--structures", help="comma-separated structure names (default: all of the set)")
    p.add_argument("--augment", type=int, metavar="N",
                   help="use N references: the set plus smooth random deformations of it")
    p.add_argument("--threshold", action="append", default=[], metavar="NAME=LEVEL",
                   help="score-map threshold of one structure (repeatable; default: the set's)")
    p.add_argument("--deformable", choices=["bspline", "demons", "none"], default=None,
                   help="deformable stage after the affine (default bspline)")
    p.add_argument("--resolution", type=float, metavar="MM", help="registration working spacing (default 3)")
    p.add_argument("--workers", type=int, help="parallel registrations/warps (default: CPU count)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached reference registrations")


def register(sub) -> None:
    p = sub.add_parser("atlas", help="register reference images with labels onto a target and box each structure")
    p.add_argument("--target", required=True, help="target image (NIfTI, NRRD, MHA, GIPL or DICOM folder)")
    p.add_argument("--references", required=True, metavar="DIR|CSV|JSON|builtin:NAME",
                   help="reference images with label maps (builtin: colin27, mni152, brain)")
    _add_reference_options(p)
    p.add_argument("--strategy", choices=["A", "B"], default="A", help="A: one box, B: three boxes per structure")
    p.add_argument("-o", "--output", required=True, help="boxes JSON (IJK and RAS boxes per structure)")
    add_json_flag(p)
    p.set_defaults(func=cmd_atlas)

    p = sub.add_parser("auto", help="automatic prompts (atlas, U-Net or mask) -> promptable engine -> label map")
    p.add_argument("--target", required=True, help="image the engine segments")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--references", metavar="DIR|CSV|JSON|builtin:NAME", help="atlas prompts from a reference set")
    src.add_argument("--unet", metavar="MODEL", help="prompts from the components of a U-Net's output")
    src.add_argument("--from-mask", metavar="PATH", help="prompts from the components of a mask / label map")
    src.add_argument("--boxes", metavar="JSON", help="prompts from an `mrisegassist atlas` boxes file")
    p.add_argument("--input", "-i", action="append", default=[], metavar="SEQ=PATH",
                   help="U-Net input sequence (repeat; default: the target as the model's first input)")
    _add_reference_options(p)
    p.add_argument("--engine", default="classical",
                   help="promptable engine (default: weights-free classical); 'atlas' (with --references): no "
                        "engine, the thresholded atlas score maps are the label map")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cascade", choices=["C", "D"], help="second pass from the first pass's masks (D: enlarged)")
    p.add_argument("--strategy", choices=["A", "B"], default="A")
    p.add_argument("--min-voxels", type=int, default=3, help="ignore mask components smaller than this")
    p.add_argument("-o", "--output", required=True, help="label map (.nii.gz + names sidecar, or .seg.nrrd)")
    p.add_argument("--boxes-out", metavar="JSON", help="also write the atlas boxes")
    p.add_argument("--ref-mask", help="reference label map: Dice per structure / of the foreground")
    p.add_argument("--ref-labels", metavar="NAME=V[+V],...",
                   help="reference values per structure for --ref-mask (default: the output values)")
    p.add_argument("--png", help="write an overlay PNG of the result")
    add_json_flag(p)
    p.set_defaults(func=cmd_auto)


# ------------------------------------------------------------------------------------------- helpers
def _progress(args, desc: str):
    from ..progress import tqdm_progress

    return tqdm_progress(desc, disable=getattr(args, "json", False))


def _thresholds(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise InputError(f"bad --threshold {item!r}: expected NAME=LEVEL, e.g. third-ventricle=0.4")
    return out


def _settings(args):
    from dataclasses import replace

    from ..atlas.registration import FAST

    changes = {}
    if args.deformable:
        changes["deformable"] = args.deformable
    if args.resolution is not None:
        changes["resolution_mm"] = args.resolution
    return replace(FAST, **changes) if changes else FAST


def _reference_set(args):
    from ..atlas.augment import augment
    from ..atlas.references import load_reference_set

    names = [s.strip() for s in args.structures.split(",") if s.strip()] if args.structures else None
    progress, close = _progress(args, "references")
    try:
        refset = load_reference_set(args.references, names, progress=progress)
        if args.augment:
            refset = augment(refset, args.augment, progress=progress)
    finally:
        close()
    return refset


def _atlas_boxes(args, target):
    from ..atlas.auto import atlas_boxes

    refset = _reference_set(args)
    progress, close = _progress(args, "atlas boxes")
    try:
        return refset, atlas_boxes(target, refset, args.strategy, settings=_settings(args),
                                   thresholds=_thresholds(args.threshold), workers=args.workers,
                                   cache=False if args.no_cache else None, progress=progress)
    finally:
        close()


def _boxes_text(boxes) -> str:
    lines = [f"{len(boxes.found())} of {len(boxes.structures)} structures found on {boxes.target} "
             f"({boxes.n_references} references from {boxes.reference_set}, strategy {boxes.strategy}, "
             f"{boxes.timings.get('total_s', 0):.1f} s)"]
    for s in boxes.structures:
        if s.found:
            b = ", ".join(f"k={x.k} i={x.i0}..{x.i1} j={x.j0}..{x.j1}" for x in s.boxes)
            lines.append(f"  {s.name:28s} z {s.z_range[0]}..{s.z_range[1]}  score {s.score_mean:.2f}  {b}")
        else:
            lines.append(f"  {s.name:28s} NOT FOUND: {s.reason}")
    return "\n".join(lines)


def cmd_atlas(args) -> int:
    from ..volume import read_volume

    target = read_volume(args.target)
    out = Path(args.output)
    if not out.parent.exists():
        raise InputError(f"{out.parent}: output folder does not exist")
    _, boxes = _atlas_boxes(args, target)
    boxes.write(out)
    emit(args, {**boxes.to_json(), "output": str(out)}, lambda _: _boxes_text(boxes) + f"\nwrote {out}")
    return 0


def _ref_values(spec: Optional[str], objects: list[dict]) -> dict[str, list[int]]:
    if not spec:
        return {o["name"]: [o["label"]] for o in objects}
    out = {}
    for item in spec.split(","):
        name, sep, values = item.partition("=")
        try:
            out[name.strip()] = [int(v) for v in values.split("+")]
        except ValueError:
            sep = ""
        if not sep:
            raise InputError(f"bad --ref-labels item {item!r}: expected NAME=V or NAME=V+V")
    return out


def _compare(args, result, target) -> dict:
    from ..metrics import overlap_metrics
    from ..volume import read_volume, resample_to

    ref = read_volume(args.ref_mask, kind="label")
    if not ref.geometry.same_as(target.geometry, atol=1e-4):
        ref = resample_to(ref, target.geometry, "nearest")
    pred = result.labels.volume.array
    spacing = target.geometry.spacing
    if args.references or args.boxes:
        values = _ref_values(args.ref_labels, result.objects)
        rows = {}
        for o in result.objects:
            if o["name"] in values:
                m = overlap_metrics(pred == o["label"], np.isin(ref.array, values[o["name"]]), spacing, distances=False)
                rows[o["name"]] = {"dice": round(m["dice"], 4), "volume_ref_ml": round(m["volume_ref_ml"], 3)}
        return {"per_structure": rows}
    m = overlap_metrics(pred > 0, ref.array > 0, spacing, distances=False)
    return {"foreground": {"dice": round(m["dice"], 4), "volume_pred_ml": round(m["volume_pred_ml"], 3),
                           "volume_ref_ml": round(m["volume_ref_ml"], 3)}}


def cmd_auto(args) -> int:
    from ..atlas import auto
    from ..atlas.boxes import AtlasBoxes
    from ..labels import write_labelmap
    from ..volume import read_volume

    target = read_volume(args.target)
    out = Path(args.output)
    if not out.parent.exists():
        raise InputError(f"{out.parent}: output folder does not exist")
    if args.ref_mask and not Path(args.ref_mask).exists():
        raise InputError(f"{args.ref_mask}: no such reference mask")
    kwargs = dict(cascade=args.cascade, strategy=args.strategy, device=args.device)
    if args.engine == auto.ATLAS_ENGINE and not args.references:
        raise InputError("--engine atlas labels from the atlas score maps: it needs --references")
    boxes = None
    if args.references:
        _, boxes = _atlas_boxes(args, target)
    elif args.boxes:
        boxes = AtlasBoxes.read(args.boxes)
        if not boxes.geometry.same_as(target.geometry, atol=1e-3):
            raise InputError(f"{args.boxes}: the boxes were made for another grid than {target.label}")
    progress, close = _progress(args, "segmenting")
    try:
        if args.engine == auto.ATLAS_ENGINE:
            result = auto.atlas_result(target, boxes)
        elif boxes is not None:
            if not boxes.found():
                raise InputError("no structure was found on the target: "
                                 + "; ".join(f"{s.name}: {s.reason}" for s in boxes.structures))
            found = boxes.found()
            result = auto.segment_objects(target, boxes.prompts(), args.engine,
                                          exclude=[s.value for s in found if not s.cascade],
                                          colors={s.value: s.color for s in found}, progress=progress, **kwargs)
            result.boxes = boxes
        else:
            if args.unet:
                from .unet import parse_inputs

                inputs = parse_inputs(args.input) if args.input else None
                if inputs is None:
                    from ..unet.entries import get_model

                    inputs = {get_model(args.unet).inputs[0]: Path(args.target)}
                mask = auto.unet_mask(args.unet, inputs, target, args.device, progress=progress)
            else:
                mask = read_volume(args.from_mask, kind="label")
            result = auto.auto_from_mask(target, mask, args.engine, min_voxels=args.min_voxels,
                                         progress=progress, **kwargs)
    finally:
        close()
    write_labelmap(result.labels, out)
    if args.boxes_out and result.boxes is not None:
        result.boxes.write(args.boxes_out)
    doc = {"output": str(out), "engine": args.engine, "cascade": args.cascade, **result.summary()}
    if args.ref_mask:
        doc["comparison"] = _compare(args, result, target)
    if args.png:
        from ..viz import overlay_png

        overlay_png(target, result.labels, args.png)
        doc["png"] = args.png
    emit(args, doc, lambda d: _auto_text(d, result))
    return 0


def _auto_text(doc: dict, result) -> str:
    lines = [f"{len(doc['objects'])} object(s) segmented with {doc['engine']}"
             + (f", cascade {doc['cascade']}" if doc["cascade"] else "")]
    dice = doc.get("comparison", {}).get("per_structure", {})
    for o in doc["objects"]:
        extra = f"  Dice {dice[o['name']]['dice']:.3f}" if o["name"] in dice else ""
        lines.append(f"  {o['label']:3d} {o['name']:28s} {o['final_ml']:8.3f} ml{extra}")
    for nf in doc.get("not_found", []):
        lines.append(f"      {nf['name']:28s} NOT FOUND: {nf['reason']}")
    fg = doc.get("comparison", {}).get("foreground")
    if fg:
        lines.append(f"  foreground Dice {fg['dice']:.3f} (pred {fg['volume_pred_ml']:.2f} ml, ref {fg['volume_ref_ml']:.2f} ml)")
    lines.append(f"wrote {doc['output']}")
    return "\n".join(lines)
