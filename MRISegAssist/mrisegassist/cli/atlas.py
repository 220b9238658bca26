"""``mrisegassist atlas`` (reference set -> boxes JSON) and ``mrisegassist auto`` (automatic prompts ->
promptable engine -> cascade -> label map)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import numpy as np

from . import add_json_flag, emit
from .prompt import add_service_flags, existing, extra_paths
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
    add_service_flags(p)
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
    p.add_argument("--no-refine", action="store_true",
                   help="with --references: keep the engine's label map (or, with --engine atlas, fusion at the "
                        "defined thresholds) instead of the per-structure rules learnt on the references")
    p.add_argument("--min-voxels", type=int, default=3, help="ignore mask components smaller than this")
    p.add_argument("-o", "--output", required=True, help="label map (.nii.gz + names sidecar, or .seg.nrrd)")
    p.add_argument("--boxes-out", metavar="JSON", help="also write the atlas boxes")
    p.add_argument("--ref-mask", help="reference label map: Dice per structure / of the foreground")
    p.add_argument("--ref-labels", metavar="NAME=V[+V],...",
                   help="reference values per structure for --ref-mask (default: the output values)")
    p.add_argument("--png", help="write an overlay PNG of the result")
    p.add_argument("--extra", action="append", metavar="SEQ=FILE",
                   help="another co-registered sequence of the target (repeatable), for engines that use several")
    add_service_flags(p)
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


def _atlas_request(args, target):
    from ..service import AtlasBoxesRequest

    names = [s.strip() for s in args.structures.split(",") if s.strip()] if args.structures else None
    return AtlasBoxesRequest(target, args.references, names, args.strategy, _thresholds(args.threshold),
                             args.deformable, args.resolution, args.augment, args.workers, not args.no_cache)


def _call(args, request, desc: str):
    """Run a service request (in-process, or on ``--server``) with a progress bar."""
    from .prompt import service_client

    client = service_client(args)
    progress, close = _progress(args, desc)
    try:
        return client.call(request, progress)
    finally:
        close()
        client.close()


def _boxes_text(boxes, seconds: float) -> str:
    lines = [f"{len(boxes.found())} of {len(boxes.structures)} structures found on {boxes.target} "
             f"({boxes.n_references} references from {boxes.reference_set}, strategy {boxes.strategy}, "
             f"{seconds:.1f} s)"]
    for s in boxes.structures:
        if s.found:
            b = ", ".join(f"k={x.k} i={x.i0}..{x.i1} j={x.j0}..{x.j1}" for x in s.boxes)
            lines.append(f"  {s.name:28s} z {s.z_range[0]}..{s.z_range[1]}  score {s.score_mean:.2f}  {b}")
        else:
            lines.append(f"  {s.name:28s} NOT FOUND: {s.reason}")
    return "\n".join(lines)


def cmd_atlas(args) -> int:
    from ..outputs import Output, guard_outputs
    from ..volume import read_volume

    out = Path(args.output)
    guard_outputs([Output(out, "json", "-o")], [args.target, *existing(args.references)])
    target = read_volume(args.target)
    result = _call(args, _atlas_request(args, target), "atlas boxes")
    boxes = result.boxes
    boxes.write(out)
    seconds = result.timings.get("total_s", 0.0)
    emit(args, {**boxes.to_json(), "output": str(out)}, lambda _: _boxes_text(boxes, seconds) + f"\nwrote {out}")
    return 0


def _ref_values(spec: Optional[str], objects: list) -> dict[str, list[int]]:
    if not spec:
        return {o.name: [o.label] for o in objects}
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


def _reference(path: str, target):
    """``--ref-mask`` on the target's grid (read and checked before computing)."""
    from ..volume import read_volume, resample_to

    ref = read_volume(path, kind="label", name=f"--ref-mask {Path(path).name}")
    if not ref.geometry.same_as(target.geometry, atol=1e-4):
        ref = resample_to(ref, target.geometry, "nearest")
    return ref


def _compare(args, result, target, ref) -> dict:
    from ..metrics import overlap_metrics

    pred = result.array
    spacing = target.geometry.spacing
    if args.references or args.boxes:
        values = _ref_values(args.ref_labels, result.objects)
        rows = {}
        for o in result.objects:
            if o.name in values:
                m = overlap_metrics(pred == o.label, np.isin(ref.array, values[o.name]), spacing, distances=False)
                rows[o.name] = {"dice": round(m["dice"], 4), "volume_ref_ml": round(m["volume_ref_ml"], 3)}
        return {"per_structure": rows}
    m = overlap_metrics(pred > 0, ref.array > 0, spacing, distances=False)
    return {"foreground": {"dice": round(m["dice"], 4), "volume_pred_ml": round(m["volume_pred_ml"], 3),
                           "volume_ref_ml": round(m["volume_ref_ml"], 3)}}


def cmd_auto(args) -> int:
    from ..atlas.boxes import AtlasBoxes
    from ..labels import write_labelmap
    from ..outputs import Output, guard_outputs
    from ..service import ATLAS_ENGINE, AutoRequest, AutoSegmentRequest
    from ..service.checks import check_device, check_request
    from ..volume import read_volume
    from .prompt import read_extras

    out = Path(args.output)
    if args.ref_mask and not Path(args.ref_mask).exists():
        raise InputError(f"{args.ref_mask}: no such reference mask")
    if args.engine == ATLAS_ENGINE and not args.references:
        raise InputError("--engine atlas labels from the atlas score maps: it needs --references")
    check_device(args.device, used=False, option="--device")
    outputs = [Output(out, "labelmap", "-o")]
    outputs += [Output(Path(args.boxes_out), "json", "--boxes-out")] if args.boxes_out else []
    outputs += [Output(Path(args.png), "png", "--png")] if args.png else []
    guard_outputs(outputs, [args.target, args.from_mask, args.boxes, args.ref_mask, *extra_paths(args.input),
                            *extra_paths(args.extra), *existing(args.references, args.unet)])
    target = read_volume(args.target)
    ref = _reference(args.ref_mask, target) if args.ref_mask else None
    request = AutoRequest(target, args.engine, args.cascade, args.strategy, min_voxels=args.min_voxels,
                          extra=read_extras(args.extra, target.geometry), device=None if args.server else args.device,
                          refine=not args.no_refine)
    if args.references:
        request.atlas = _atlas_request(args, target)
    elif args.boxes:
        request.boxes = AtlasBoxes.read(args.boxes)
        if not request.boxes.geometry.same_as(target.geometry, atol=1e-3):
            raise InputError(f"{args.boxes}: the boxes were made for another grid than {target.label}")
    elif args.unet:
        from .unet import parse_inputs

        paths = parse_inputs(args.input) if args.input else None
        inputs = {n: read_volume(p, name=f"{n} ({Path(p).name})") for n, p in paths.items()} if paths else None
        if inputs is None:
            from ..unet.entries import get_model

            inputs = {get_model(args.unet).inputs[0]: target}
        request.unet = AutoSegmentRequest(inputs, args.unet, device=request.device)
    else:
        request.mask = read_volume(args.from_mask, kind="label")
    if args.server:
        check_request(request)  # the server's own warnings stay on the server
    result = _call(args, request, "segmenting")
    comparison = _compare(args, result, target, ref) if ref is not None else None
    write_labelmap(result.labels, out)
    if args.boxes_out and result.boxes is not None:
        result.boxes.write(args.boxes_out)
    objects = [{"label": o.label, "name": o.name, "boxes": len(o.boxes), "z_range": list(o.z_range) if o.z_range
                else None, "first_pass_ml": round(o.first_pass_ml or 0.0, 4), "final_ml": round(o.volume_ml, 4),
                "cascaded": o.cascaded, **({"rule": o.rule} if o.rule else {})} for o in result.objects]
    doc = {"output": str(out), "engine": args.engine, "cascade": args.cascade, "objects": objects,
           "timings_s": {k: round(v, 3) for k, v in result.timings.items()}}
    if result.rules:
        doc["rules"] = result.rules
    if result.boxes is not None:
        doc["not_found"] = [{"name": n.name, "reason": n.reason} for n in result.not_found]
    if comparison is not None:
        doc["comparison"] = comparison
    if args.png:
        from ..viz import overlay_png

        overlay_png(target, result.labels, args.png)
        doc["png"] = args.png
    emit(args, doc, _auto_text)
    return 0


def _auto_text(doc: dict) -> str:
    lines = [f"{len(doc['objects'])} object(s) segmented with {doc['engine']}"
             + (f", cascade {doc['cascade']}" if doc["cascade"] else "")]
    dice = doc.get("comparison", {}).get("per_structure", {})
    for o in doc["objects"]:
        extra = f"  Dice {dice[o['name']]['dice']:.3f}" if o["name"] in dice else ""
        rule = f"  [{o['rule']}]" if o.get("rule") else ""
        lines.append(f"  {o['label']:3d} {o['name']:28s} {o['final_ml']:8.3f} ml{extra}{rule}")
    for nf in doc.get("not_found", []):
        lines.append(f"      {nf['name']:28s} NOT FOUND: {nf['reason']}")
    fg = doc.get("comparison", {}).get("foreground")
    if fg:
        lines.append(f"  foreground Dice {fg['dice']:.3f} (pred {fg['volume_pred_ml']:.2f} ml, ref {fg['volume_ref_ml']:.2f} ml)")
    if doc.get("rules"):
        lines.append(f"  atlas rules: {doc['rules']}")
    lines.append(f"wrote {doc['output']}")
    return "\n".join(lines)
