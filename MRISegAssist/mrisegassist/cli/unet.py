"""``mrisegassist segment | models | train | demo``: U-Net auto-segmentation from the command line."""
from __future__ import annotations


from pathlib import Path

from . import add_json_flag
from .prompt import add_service_flags
from ..errors import InputError


def register(sub) -> None:
    from . import unet_commands as cmd

    p = sub.add_parser("segment", help="segment a case with a U-Net model (label map in the reference geometry)")
    p.add_argument("--model", required=True, help="model name (see `mrisegassist models`) or path")
    p.add_argument("--input", "-i", action="append", required=True, metavar="SEQ=PATH",
                   help="one sequence, e.g. flair=case/flair.nii.gz (repeat for each sequence)")
    p.add_argument("--reference", help="sequence whose grid the label map gets (default: the first model input)")
    p.add_argument("-o", "--output", required=True, help="output label map (.nii.gz, .nrrd, .seg.nrrd)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    p.add_argument("--ref-mask", help="reference label map: print Dice / volume metrics against it")
    p.add_argument("--min-component", type=float, default=None, metavar="MM3",
                   help="remove connected components smaller than this (default: the model's setting)")
    p.add_argument("--download", action="store_true",
                   help="download a catalog model's official weights into the cache if they are missing")
    p.add_argument("--trust-model-code", action="store_true",
                   help="let a MONAI bundle folder's config run its own Python ($ expressions, any _target_); "
                        "without it bundles are read as data and such constructs are refused")
    add_service_flags(p)
    add_json_flag(p)
    p.set_defaults(func=cmd.cmd_segment)

    p = sub.add_parser("models", help="list installed U-Net models")
    add_json_flag(p)
    p.set_defaults(func=cmd.cmd_models)

    p = sub.add_parser("train", help="train or fine-tune a U-Net on labelled cases")
    p.add_argument("--config", help="JSON with the options below (command-line flags override it)")
    p.add_argument("--cases", help="folder of case folders (BraTS-style names)")
    p.add_argument("--manifest", help="CSV with columns case, <sequence>..., label")
    p.add_argument("--inputs", help="comma-separated sequences, e.g. flair,t1c")
    p.add_argument("--labels", help="preset (brats2013, ms) or VALUE=NAME,... e.g. 1=lesion")
    p.add_argument("--remap", help="label values to change before training, SRC:DST,... (e.g. 3:4 for BraTS-2023)")
    p.add_argument("--model-dim", dest="dims", choices=["2d", "3d"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--steps-per-epoch", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--patch", type=int, help="patch side in voxels (default 160 in 2D, 96 in 3D)")
    p.add_argument("--lr", type=float)
    p.add_argument("--val-cases", help="comma-separated validation case names")
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--val-every", type=int, help="validate every N epochs (and after the last)")
    p.add_argument("--synthetic", type=int, help="add N synthetic cases (mrisegassist.synth) to training")
    p.add_argument("--name", help="model name written to model.json")
    p.add_argument("--max-minutes", type=float, help="stop (and finish the schedule) after this many minutes")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="output folder (model.json, model.pt, last.pt)")
    p.add_argument("--resume", action="store_true", default=None, help="continue from OUT/last.pt")
    p.add_argument("--device", help="cpu, cuda or mps")
    p.add_argument("--nproc", type=int, help="train in N processes (torch.distributed: gloo on CPU, NCCL on "
                                             "GPU; --batch-size is the global batch); torchrun also works")
    add_json_flag(p)
    p.set_defaults(func=cmd.cmd_train)

    p = sub.add_parser("demo", help="segment a case (synthetic by default) with a shipped model and write "
                                    "the label map, metrics and an overlay PNG")
    p.add_argument("--case", help="case folder (flair/t1c/... files, optional labels); default: synthetic glioma")
    p.add_argument("--model", default=None, help="model name or path (default: chosen from the case)")
    p.add_argument("-o", "--out", default="mrisegassist-demo", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic case")
    p.add_argument("--device", default="cpu")
    add_json_flag(p)
    p.set_defaults(func=cmd.cmd_demo)


def parse_inputs(items: list[str]) -> dict[str, Path]:
    """``["flair=a.nii.gz", ...]`` -> ``{"flair": Path("a.nii.gz")}`` (InputError on bad items)."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise InputError(f"bad --input {item!r}: expected SEQ=PATH, e.g. flair=case/flair.nii.gz")
        if name.strip().lower() in out:
            raise InputError(f"sequence {name.strip()!r} given twice")
        out[name.strip().lower()] = Path(path.strip())
    return out



