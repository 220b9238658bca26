"""``mrisegassist evaluate`` (metrics of a label map against a reference) and ``mrisegassist synth``
(synthetic cases with exact labels)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from ..errors import InputError
from . import add_json_flag, emit


def parse_labels(spec: Optional[str]):
    """``--labels``: a label set name (``brats``, ``ms``, ...), ``1=necrosis,2=oedema``, or a path to a
    ``.labels.json`` / ITK-SNAP ``.label`` file. Returns a list of LabelInfo or ``None``."""
    from ..labels import LABEL_SETS, label_set, labels_from_names, read_label_descriptions

    if not spec:
        return None
    if spec in LABEL_SETS:
        return label_set(spec)
    if Path(spec).is_file():
        return read_label_descriptions(spec)
    names = {}
    for item in spec.split(","):
        value, sep, name = item.partition("=")
        try:
            names[int(value)] = name.strip()
        except ValueError:
            raise InputError(f"--labels: cannot parse {item!r}; use a set name ({', '.join(LABEL_SETS)}), "
                             f"'1=name,2=name' or a label file") from None
        if not sep or not name.strip():
            raise InputError(f"--labels: {item!r} has no name (use VALUE=NAME)")
    return labels_from_names(names)


def parse_regions(spec: Optional[str]):
    """``--regions``: ``brats`` or ``"name=1+2+3;other=4"``. Returns ``{name: (values)}`` or ``None``."""
    from ..metrics import BRATS_REGIONS

    if not spec:
        return None
    if spec == "brats":
        return dict(BRATS_REGIONS)
    regions = {}
    for item in spec.split(";"):
        name, sep, values = item.partition("=")
        try:
            regions[name.strip()] = tuple(int(v) for v in values.split("+"))
        except ValueError:
            raise InputError(f"--regions: cannot parse {item!r}; use 'brats' or 'name=1+2+3;name=4'") from None
        if not sep or not name.strip():
            raise InputError(f"--regions: {item!r} needs NAME=VALUES")
    return regions


def _evaluate(args: argparse.Namespace) -> int:
    from ..metrics import evaluate_files, format_report
    from ..outputs import Output, guard_outputs

    if args.overlay:
        if not args.image:
            raise InputError("--overlay needs --image (the MRI to draw the labels on)")
        labels_file = args.labels if args.labels and Path(args.labels).is_file() else None
        guard_outputs([Output(Path(args.overlay), "png", "--overlay")], [args.pred, args.ref, args.image, labels_file])
    result = evaluate_files(args.pred, args.ref, labels=parse_labels(args.labels),
                            regions=parse_regions(args.regions), lesionwise=args.lesionwise,
                            distances=not args.no_distances, min_overlap=args.min_overlap)
    if args.overlay:
        from ..labels import read_labelmap
        from ..viz import overlay_png
        from ..volume import read_volume, resample_to

        image = read_volume(args.image)
        pred = read_labelmap(args.pred, labels=parse_labels(args.labels))
        ref = read_labelmap(args.ref)
        pred_arr = resample_to(pred.volume, ref.geometry, "nearest").array
        image_arr = resample_to(image, ref.geometry, "linear").array
        result["overlay"] = str(overlay_png(ref.volume.with_array(image_arr), pred_arr, args.overlay,
                                            label_info=pred.labels, reference=ref.volume.array,
                                            title=f"{Path(args.pred).name} vs {Path(args.ref).name}"))
    emit(args, result, lambda r: format_report(r) + (f"\noverlay: {r['overlay']}" if "overlay" in r else ""))
    return 0


def _synth(args: argparse.Namespace) -> int:
    from ..outputs import guard_output_folder
    from ..progress import tqdm_progress
    from ..synth import make_case, write_case

    if args.count < 1:
        raise InputError("--count must be >= 1")
    out = Path(args.output)
    guard_output_folder(out, option="-o")
    progress, close = tqdm_progress("synthetic cases", disable=args.json)
    written = []
    try:
        for n in range(args.count):
            seed = args.seed + n
            progress(n / args.count, f"{args.kind} seed {seed}")
            case = make_case(args.kind, seed=seed, grid=args.grid, noise=args.noise, bias_field=args.bias_field,
                             progress=lambda f, m, n=n: progress((n + 0.8 * f) / args.count, m))
            folder = out if args.count == 1 else out / f"synth-{args.kind}-{seed:04d}"
            progress((n + 0.8) / args.count, f"writing {folder}")
            paths = write_case(case, folder, naming=args.naming)
            if args.overlay:
                from ..viz import overlay_png

                paths["overlay"] = overlay_png(case.images["flair"], case.labelmap, folder / "overlay.png",
                                               title=f"synthetic {args.kind}, seed {seed} (FLAIR)")
            volumes = {lab.name: float((case.labels.array == lab.value).sum()) * case.geometry.voxel_volume_ml
                       for lab in case.label_info}
            written.append({"folder": str(folder), "kind": args.kind, "seed": seed, "files": paths,
                            "label_volumes_ml": volumes, "lesions": len(case.lesions)})
        progress(1.0, "done")
    finally:
        close()

    def text(items):
        lines = []
        for item in items:
            vols = ", ".join(f"{k} {v:.1f} ml" for k, v in item["label_volumes_ml"].items()) or "no lesion"
            lines.append(f"{item['folder']}: synthetic {item['kind']} seed {item['seed']} ({vols})")
        return "\n".join(lines)

    emit(args, written, text)
    return 0


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics of a predicted label map against a reference label map",
                       description="Dice, IoU, precision, sensitivity, specificity, HD95 and volumes per label "
                                   "and region; optional lesion-wise detection (26-connected components).")
    p.add_argument("pred", help="predicted label map (NIfTI, NRRD, .seg.nrrd, MHA, ...)")
    p.add_argument("ref", help="reference label map; the prediction is resampled onto its grid if needed")
    p.add_argument("--labels", help="label names: a set (brats, brats2023, metastasis, ms, mricrop), "
                                    "'1=necrosis,2=oedema,...', or a .labels.json / ITK-SNAP .label file")
    p.add_argument("--regions", help="'brats' (whole tumour, tumour core, enhancing tumour) or 'name=1+2;name=4'")
    p.add_argument("--lesionwise", action="store_true", help="add lesion-wise detection counts")
    p.add_argument("--min-overlap", type=float, default=0.1,
                   help="fraction of a lesion that must overlap to count as detected (default 0.1)")
    p.add_argument("--no-distances", action="store_true", help="skip surface distances (HD95)")
    p.add_argument("--image", help="MRI for --overlay")
    p.add_argument("--overlay", help="write an overlay PNG (prediction filled, reference outlined)")
    add_json_flag(p)
    p.set_defaults(func=_evaluate)

    s = sub.add_parser("synth", help="write synthetic MRI cases with exact labels (from the MNI152 template)")
    s.add_argument("--kind", choices=("glioma", "metastases", "ms", "healthy", "lgg", "ms-confluent"), default="glioma")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--count", type=int, default=1, help="number of cases (seeds SEED, SEED+1, ...; one "
                                                        "sub-folder each when > 1)")
    s.add_argument("-o", "--output", required=True, help="output folder")
    s.add_argument("--grid", choices=("brats", "mni"), default="brats")
    s.add_argument("--naming", choices=("brats2013", "brats2023"), default="brats2013")
    s.add_argument("--noise", type=float, default=0.03, help="Rician noise relative to white-matter T1")
    s.add_argument("--bias-field", type=float, default=0.15, help="log bias-field amplitude (0: none)")
    s.add_argument("--overlay", action="store_true", help="also write overlay.png (FLAIR with labels)")
    add_json_flag(s)
    s.set_defaults(func=_synth)
