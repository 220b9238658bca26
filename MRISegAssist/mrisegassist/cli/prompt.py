"""``mrisegassist prompt``: box-prompted 3D segmentation with any registered engine.

Boxes are voxel rectangles on axial slices: ``K,X0,Y0,X1,Y1`` with ``K`` the slice index (k) and ``X``/``Y``
the voxel column (i) / row (j), inclusive. Objects:

* ``--box K,X0,Y0,X1,Y1`` (repeatable): each box without a prefix is a new object;
* ``--box ID:K,X0,Y0,X1,Y1``: boxes with the same ``ID`` prefix belong to one object (e.g. three boxes on three
  slices of one lesion, strategy B); ``--object-boxes "K,X0,Y0,X1,Y1;K,X0,Y0,X1,Y1"`` is one object too;
* ``--boxes-from-mask REF --strategy A|B``: one object per connected component (``--mode components``) or per
  label value (``--mode labels``) of a reference mask, boxes from its rectangles (the MedSAM2 seed);
* ``--z-range Z0,Z1`` limits every object to slices Z0..Z1 (``ID:Z0,Z1`` one object only).

The fused label map (uint16, 0 = background, values = object ids) is written in the input's geometry,
atomically and verified, after every input was checked; ``-o`` is refused before any work when it is an input
(or beside one as its sidecar), a folder, not writable, or a two-file format (.mhd, .nhdr). Boxes reaching outside
the volume are clipped with a warning. ``--ref-mask`` adds overlap metrics against a reference.
``--extra SEQ=FILE`` gives other co-registered sequences to engines that use several; ``--server URL --token T``
computes on a segmentation server (``mrisegassist server``) instead of in this process.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputError
from . import add_json_flag, emit

_INT = r"-?\d+"
_BOX = re.compile(rf"^(?:(\d+):)?\s*({_INT}),\s*({_INT}),\s*({_INT}),\s*({_INT}),\s*({_INT})$")
_ZR = re.compile(rf"^(?:(\d+):)?\s*({_INT}),\s*({_INT})$")


def parse_box(text: str):
    """``[ID:]K,X0,Y0,X1,Y1`` -> ``(object id or None, Box2D)``; :class:`InputError` if malformed."""
    from ..prompt.base import Box2D

    m = _BOX.match(text.strip())
    if not m:
        raise InputError(f"--box {text!r}: expected [ID:]K,X0,Y0,X1,Y1 (slice index, then voxel i/j corners)")
    oid = int(m.group(1)) if m.group(1) else None
    k, x0, y0, x1, y1 = (int(g) for g in m.groups()[1:])
    return oid, Box2D(k=k, i0=x0, j0=y0, i1=x1, j1=y1)


def parse_z_range(text: str) -> tuple[Optional[int], tuple[int, int]]:
    """``[ID:]Z0,Z1`` -> ``(object id or None, (z0, z1))``."""
    m = _ZR.match(text.strip())
    if not m:
        raise InputError(f"--z-range {text!r}: expected [ID:]Z0,Z1 (inclusive slice indices)")
    return (int(m.group(1)) if m.group(1) else None), (int(m.group(2)), int(m.group(3)))


def prompts_from_args(args: argparse.Namespace, reference: Optional[np.ndarray]) -> list:
    """Build the :class:`ObjectPrompt` list from ``--box``/``--object-boxes``/``--boxes-from-mask``/``--z-range``."""
    from ..prompt.base import ObjectPrompt
    from ..prompt.strategies import prompts_from_mask

    grouped: dict[int, list] = {}
    loose = [parse_box(b) for b in args.box or []]
    for oid, box in loose:
        if oid is not None:
            grouped.setdefault(oid, []).append(box)
    groups = [[parse_box(b)[1] for b in spec.split(";") if b.strip()] for spec in args.object_boxes or []]
    if any(not g for g in groups):
        raise InputError("--object-boxes: no box given")
    used = set(grouped)
    next_id = iter(i for i in range(1, 65536) if i not in used)
    for oid, box in loose:
        if oid is None:
            grouped[next(next_id)] = [box]
    for boxes in groups:
        grouped[next(next_id)] = boxes
    prompts = [ObjectPrompt(oid, boxes) for oid, boxes in sorted(grouped.items())]
    if reference is not None:
        first = max(grouped, default=0) + 1
        derived = prompts_from_mask(reference, args.strategy, mode=args.mode, min_voxels=args.min_voxels,
                                    margin=args.box_margin, with_z_range=args.with_z_range)
        prompts += [ObjectPrompt(p.object_id + first - 1 if prompts else p.object_id, p.boxes, p.z_range)
                    for p in derived]
    if not prompts:
        raise InputError("no object: give --box, --object-boxes or --boxes-from-mask")
    ids = {p.object_id for p in prompts}
    for spec in args.z_range or []:
        oid, z = parse_z_range(spec)
        if oid is not None and oid not in ids:
            raise InputError(f"--z-range {spec!r}: there is no object {oid} (objects: {sorted(ids)})")
        for p in prompts:
            if oid is None or p.object_id == oid:
                p.z_range = z
    return prompts


def extra_paths(items: Optional[list[str]]) -> list[str]:
    """The files of ``--extra SEQ=FILE`` / ``--input SEQ=FILE`` items (for the output policy; parsed later)."""
    return [item.partition("=")[2].strip() for item in items or [] if "=" in item]


def existing(*paths: Optional[str]) -> list[str]:
    """The given paths that exist (model or reference-set names are not files)."""
    return [p for p in paths if p and not str(p).startswith("builtin:") and Path(p).exists()]


def _read_mask(path: str, geometry, what: str) -> np.ndarray:
    from ..volume import read_volume, resample_to

    vol = read_volume(path, kind="label", name=f"{what} {Path(path).name}")
    if not vol.geometry.same_as(geometry):
        vol = resample_to(vol, geometry, "nearest")
    return vol.array


def add_service_flags(p: argparse.ArgumentParser) -> None:
    """``--server URL --token T``: compute on a segmentation server instead of in this process."""
    p.add_argument("--server", metavar="URL", help="compute on this segmentation server (`mrisegassist server`), "
                                                   "e.g. http://gpu-box:8765; default: in this process")
    p.add_argument("--token", help="the server's access token (or set $MRISEGASSIST_SERVER_TOKEN)")


def service_client(args: argparse.Namespace):
    """The client for ``--server``/``--token`` (in-process without ``--server``)."""
    import os

    from ..service import client_for

    token = args.token or os.environ.get("MRISEGASSIST_SERVER_TOKEN") or None
    return client_for(args.server, token, getattr(args, "device", None))


def read_extras(items: list[str], geometry) -> dict:
    """``--extra SEQ=FILE`` -> ``{sequence: Volume}`` (any grid; the service resamples them)."""
    from ..volume import read_volume

    extra = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise InputError(f"bad --extra {item!r}: expected SEQ=FILE, e.g. t1c=case/t1c.nii.gz")
        if name.strip().lower() in extra:
            raise InputError(f"--extra: sequence {name.strip()!r} given twice")
        extra[name.strip().lower()] = read_volume(path.strip(), name=f"{name.strip()} ({Path(path.strip()).name})")
    return extra


def run_prompt(args: argparse.Namespace) -> dict:
    """Check every input, segment (the service: in-process or ``--server``), write; returns the result document."""
    from ..outputs import Output, guard_outputs
    from ..progress import tqdm_progress
    from ..prompt import engine_spec
    from ..service import PromptRequest
    from ..service.checks import check_device, check_request
    from ..volume import read_volume, write_volume

    if not args.input or not args.output:
        raise InputError("--input and -o/--output are required (or use --list-engines)")
    output = Path(args.output)
    check_device(args.device, used=False, option="--device")
    engine_spec(args.engine)
    guard_outputs([Output(output, "volume", "-o")], [args.input, args.boxes_from_mask, args.ref_mask,
                                                     *extra_paths(args.extra), *existing(args.checkpoint)])
    volume = read_volume(args.input, name=Path(args.input).name)
    reference = _read_mask(args.boxes_from_mask, volume.geometry, "--boxes-from-mask") \
        if args.boxes_from_mask else None
    ref_mask = _read_mask(args.ref_mask, volume.geometry, "--ref-mask") if args.ref_mask else None
    extra = read_extras(args.extra, volume.geometry)
    prompts = prompts_from_args(args, reference)  # validated (boxes clipped, with a warning) by the service
    client = service_client(args)
    request = PromptRequest(volume, prompts, args.engine, extra=extra, checkpoint=args.checkpoint,
                            download=args.download, keep_all_components=args.keep_all_components,
                            device=None if args.server else args.device)
    if args.server:
        check_request(request)  # the server's own warnings stay on the server
    bar, close = tqdm_progress(args.engine, disable=args.json or args.quiet)
    try:
        result = client.call(request, bar)
    finally:
        close()
        client.close()
    write_volume(result.labels.volume, output)

    objects = [{"object_id": o.label, "boxes": [list(b.as_tuple()) for b in o.boxes],
                "z_range": list(o.z_range) if o.z_range else None, "slices": o.slices,
                "slice_range": [min(o.slices), max(o.slices)] if o.slices else None,
                "mean_score": o.mean_score or 0.0, "volume_ml": o.volume_ml} for o in result.objects]
    doc = {"engine": args.engine, "input": str(args.input), "output": str(output), "objects": objects,
           "total_volume_ml": sum(o.volume_ml for o in result.objects),
           "computed": client.where, "timings_s": {k: round(v, 3) for k, v in result.timings.items()}}
    if ref_mask is not None:
        from ..metrics import overlap_metrics

        doc["metrics"] = overlap_metrics(result.array > 0, ref_mask > 0, volume.geometry.spacing)
    return doc


def format_text(doc: dict) -> str:
    lines = [f"{doc['engine']}: wrote {doc['output']} ({len(doc['objects'])} object(s), "
             f"{doc['total_volume_ml']:.3f} ml)"]
    for o in doc["objects"]:
        rng = f"slices {o['slice_range'][0]}..{o['slice_range'][1]} ({len(o['slices'])})" if o["slices"] \
            else "nothing found"
        lines.append(f"  object {o['object_id']}: {rng}, {o['volume_ml']:.3f} ml, mean score {o['mean_score']:.2f}")
    m = doc.get("metrics")
    if m:
        hd = f", HD95 {m['hd95_mm']:.1f} mm" if m.get("hd95_mm") is not None else ""
        lines.append(f"  vs --ref-mask: Dice {m['dice']:.3f}, IoU {m['iou']:.3f}{hd}, "
                     f"volume {m['volume_pred_ml']:.3f} / {m['volume_ref_ml']:.3f} ml")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    if args.list_engines:
        from ..prompt import list_engines

        engines = list_engines()
        emit(args, engines, lambda es: "\n".join(
            f"{e['name']:24s} {'weights' if e['needs_weights'] else 'no weights':10s} {e['description']} "
            f"[{e['licence']}]" for e in es))
        return 0
    emit(args, run_prompt(args), format_text)
    return 0


def register(sub) -> None:
    from ..prompt import DEFAULT_ENGINE

    p = sub.add_parser("prompt", help="box-prompted 3D segmentation (classical, SAM, SAM 2.1, MedSAM2)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default=DEFAULT_ENGINE, help=f"engine name (default {DEFAULT_ENGINE}; "
                   "see --list-engines)")
    p.add_argument("--input", "-i", help="MRI volume (NIfTI, NRRD, MHA, GIPL or DICOM folder)")
    p.add_argument("--output", "-o", help="output label map (.nii.gz, .nrrd, .mha)")
    p.add_argument("--box", action="append", metavar="[ID:]K,X0,Y0,X1,Y1",
                   help="a box on slice K (voxel i/j corners, inclusive); same ID = same object")
    p.add_argument("--object-boxes", action="append", metavar="K,X0,Y0,X1,Y1;K,...",
                   help="several boxes (';'-separated, on different slices) of one object")
    p.add_argument("--z-range", action="append", metavar="[ID:]Z0,Z1", help="limit propagation to slices Z0..Z1")
    p.add_argument("--boxes-from-mask", metavar="REF", help="derive one object per component/label of REF")
    p.add_argument("--strategy", choices=("A", "B"), default="A",
                   help="with --boxes-from-mask: A = one box at the middle slice, B = boxes at 1/4, 1/2, 3/4")
    p.add_argument("--mode", choices=("components", "labels"), default="components",
                   help="with --boxes-from-mask: objects are connected components or label values")
    p.add_argument("--min-voxels", type=int, default=1, help="with --boxes-from-mask: ignore smaller objects")
    p.add_argument("--box-margin", type=int, default=0, help="with --boxes-from-mask: enlarge boxes (voxels)")
    p.add_argument("--with-z-range", action="store_true",
                   help="with --boxes-from-mask: give each object its reference z-range")
    p.add_argument("--extra", action="append", metavar="SEQ=FILE",
                   help="another co-registered sequence of the case (repeatable), for engines that use several")
    p.add_argument("--checkpoint", help="model checkpoint for engines that need weights")
    p.add_argument("--download", action="store_true",
                   help="allow downloading the engine's official checkpoint into the cache if it is missing")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps (foundation models)")
    p.add_argument("--ref-mask", help="reference mask: print overlap metrics of the result against it")
    p.add_argument("--keep-all-components", action="store_true",
                   help="do not reduce each object to its largest connected component")
    p.add_argument("--list-engines", action="store_true", help="list the engines and exit")
    add_service_flags(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    add_json_flag(p)
    p.set_defaults(func=_run)
