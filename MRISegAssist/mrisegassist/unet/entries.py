"""Model entries (``model.json``) and the model registry.

A :class:`ModelEntry` describes one segmentation model: its weights (``kind`` = ``"checkpoint"``: a state
dict + ``network`` spec; ``"bundle"``: a MONAI bundle folder, read as data by :mod:`mrisegassist.unet.bundle`;
``"torchscript"``: a ``.ts``/``.pt`` TorchScript file), the ordered input sequences, the output labels, the
network-class -> label-value mapping, the model grid spacing (mm, x/y/z in LPS; ``null`` keeps the native
spacing), per-sequence normalisation, ``dims`` (``"2d"`` slice-wise or ``"3d"``), ``roi_size`` (3D sliding
windows, ``[S, P, L]`` order) and ``overlap``, ``array_order`` (how the network sees the volume), ``output``
(``softmax`` classes or ``sigmoid-brats`` TC/WT/ET channels), 2.5D ``context``, test-time flips, ensemble
``members``, licence, sha256 of the weights file and optional BraTS ``regions``. ``weights_catalog`` names a
downloadable checkpoint of :data:`mrisegassist.prompt.weights.CATALOG` (official URL, verified hash, cache).

Registry: shipped models in ``mrisegassist/models/<name>/`` plus user models in ``$MRISEGASSIST_MODELS``
(default ``~/.mrisegassist/models``), one folder per model.

Loading never runs code from a model folder: weights with ``torch.load(weights_only=True)`` and the sha256
check, networks only from the allow-list of MONAI classes with literal arguments
(:func:`~mrisegassist.unet.networks.build_network`); MONAI bundle configs are parsed without evaluation unless
the caller passes ``trust_code=True``. The CLI, the Slicer logic and the web app all load through
:func:`get_model` / :meth:`ModelEntry.load_network`.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional, Union

import torch

from ..errors import CheckpointError, InputError
from ..labels import LabelInfo
from ..progress import CancelToken, ProgressFn
from .networks import ARRAY_ORDERS, ArrayOrder, AveragedSoftmax, build_network, load_state
from .postprocess import OUTPUTS

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "models"
KINDS = ("checkpoint", "bundle", "torchscript")
NORMALISATIONS = ("zscore", "nonzero", "none")


def user_models_dir() -> Path:
    return Path(os.environ.get("MRISEGASSIST_MODELS", Path.home() / ".mrisegassist" / "models"))


def sha256_file(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ModelEntry:
    """One model, as described by ``model.json`` (``folder`` is where it was found, not serialised)."""

    name: str
    kind: str = "checkpoint"
    inputs: list[str] = field(default_factory=lambda: ["flair"])
    labels: list[dict] = field(default_factory=list)  # {"value", "name", "color", "terminology"}
    title: str = ""
    label_mapping: dict[str, int] = field(default_factory=dict)  # network class index (str) -> label value
    spacing: list[Optional[float]] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    normalization: dict[str, str] = field(default_factory=dict)  # sequence -> "zscore" | "none"
    dims: str = "2d"
    roi_size: list[int] = field(default_factory=lambda: [128, 128, 128])
    licence: str = ""
    sha256: str = ""
    weights: str = "model.pt"
    description: str = ""
    regions: Optional[str] = None  # "brats": whole tumour / tumour core / enhancing tumour
    min_component_mm3: float = 0.0
    network: dict = field(default_factory=dict)
    context: int = 0  # 2.5D: neighbouring slices on each side as extra channels (2D models)
    tta_flips: list = field(default_factory=list)  # test-time flips: spatial axes of the network input, e.g. [[1]]
    members: list = field(default_factory=list)  # ensemble: further weights [{"weights": file, "sha256": hex}]
    array_order: str = "kji"  # how the network sees a volume, see ARRAY_ORDERS
    output: str = "softmax"  # "softmax" (class logits) | "sigmoid-brats" (TC, WT, ET channels)
    overlap: float = 0.25  # 3D sliding-window overlap
    weights_catalog: str = ""  # weights from the checkpoint catalog (mrisegassist.prompt.weights) by name
    training: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    folder: Optional[Path] = field(default=None, compare=False, repr=False)
    trusted_code: bool = field(default=False, compare=False, repr=False)  # bundle: run its config (not saved)

    # ------------------------------------------------------------------------------------------ JSON
    @classmethod
    def from_dict(cls, data: dict, folder: Optional[Path] = None) -> "ModelEntry":
        known = {f.name for f in fields(cls)} - {"folder", "trusted_code"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{folder or 'model.json'}: unknown model.json field(s): {', '.join(unknown)}")
        if "name" not in data:
            raise CheckpointError(f"{folder or 'model.json'}: model.json has no 'name'")
        entry = cls(**{k: v for k, v in data.items() if k in known}, folder=folder)
        entry.validate()
        return entry

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "ModelEntry":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot read model description ({exc})") from None
        return cls.from_dict(data, path.parent)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("folder")
        data.pop("trusted_code")
        return data

    def write(self, folder: Optional[Union[str, Path]] = None) -> Path:
        """Write ``model.json`` into ``folder`` (default: this entry's folder) atomically, read back and compared
        before it replaces the previous one (:func:`mrisegassist.outputs.write_text`)."""
        from ..outputs import write_text

        return write_text(Path(folder or self.folder) / "model.json", json.dumps(self.to_dict(), indent=2) + "\n")

    def validate(self) -> None:
        where = self.folder or self.name
        if self.kind not in KINDS:
            raise CheckpointError(f"{where}: unknown model kind {self.kind!r} (use one of {', '.join(KINDS)})")
        if self.dims not in ("2d", "3d"):
            raise CheckpointError(f"{where}: dims must be '2d' or '3d', got {self.dims!r}")
        if not self.inputs:
            raise CheckpointError(f"{where}: model has no inputs")
        if len(self.spacing) != 3:
            raise CheckpointError(f"{where}: spacing needs 3 values (x, y, z mm), got {self.spacing}")
        values = {int(lab["value"]) for lab in self.labels}
        for cls_index, value in self.label_mapping.items():
            if int(value) != 0 and int(value) not in values:
                raise CheckpointError(f"{where}: label_mapping {cls_index} -> {value} names no output label")
        if self.array_order not in ARRAY_ORDERS:
            raise CheckpointError(f"{where}: array_order must be one of {', '.join(ARRAY_ORDERS)}, "
                                  f"got {self.array_order!r}")
        if self.array_order != "kji" and self.dims != "3d":
            raise CheckpointError(f"{where}: array_order {self.array_order!r} needs a 3D model")
        if self.output not in OUTPUTS:
            raise CheckpointError(f"{where}: output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")
        if (self.tta_flips or self.members) and self.output != "softmax":
            raise CheckpointError(f"{where}: test-time flips and ensembles need a softmax output")
        if self.context < 0 or (self.context and self.dims != "2d"):
            raise CheckpointError(f"{where}: context (neighbouring slices) must be >= 0 and needs a 2D model")
        bad = sorted(set(self.normalization.values()) - set(NORMALISATIONS))
        if bad:
            raise CheckpointError(f"{where}: unknown normalisation {bad[0]!r} (use one of {', '.join(NORMALISATIONS)})")
        if not all(isinstance(m, dict) and m.get("weights") for m in self.members):
            raise CheckpointError(f"{where}: each ensemble member needs a 'weights' file")

    # ---------------------------------------------------------------------------------------- helpers
    @property
    def title_or_name(self) -> str:
        return self.title or self.name

    def label_infos(self) -> list[LabelInfo]:
        return [LabelInfo(int(lab["value"]), str(lab["name"]), tuple(float(c) for c in lab.get("color", (1, 0, 0))),
                          lab.get("terminology")) for lab in self.labels]

    def class_to_label(self, n_classes: int) -> list[int]:
        """Label value for each network class index (identity where ``label_mapping`` says nothing)."""
        return [int(self.label_mapping.get(str(c), c)) for c in range(n_classes)]

    def member(self, weights: str) -> Optional["ModelEntry"]:
        """The model whose weights file is ``weights`` alone (``weights`` or one of an ensemble's ``members``), with
        that file's sha256; None if no member has that file."""
        for m in [{"weights": self.weights, "sha256": self.sha256}] + list(self.members):
            if m["weights"] == weights:
                return replace(self, weights=m["weights"], sha256=m.get("sha256", ""), members=[])
        return None

    @property
    def weights_path(self) -> Path:
        """The weights file: in the model folder, or (``weights_catalog``) where the catalog keeps it."""
        if self.weights_catalog:
            from ..prompt.weights import catalog_entry, default_cache_dir, extracted_path

            spec = catalog_entry(self.weights_catalog)
            archive = default_cache_dir() / spec.filename
            return extracted_path(archive, spec) if spec.member else archive
        if self.folder is None:
            raise CheckpointError(f"model {self.name!r} has no folder")
        return Path(self.folder) / self.weights

    def weights_size(self) -> int:
        try:
            return self.weights_path.stat().st_size
        except (OSError, CheckpointError, InputError):
            return 0

    def resolve_weights(self, download: bool = False, progress: Optional[ProgressFn] = None,
                        cancel: Optional[CancelToken] = None) -> Path:
        """Path of the verified weights file. Catalog weights are found (or, with ``download=True``, downloaded
        with progress and resumption) and verified by :func:`mrisegassist.prompt.weights.resolve_checkpoint`;
        folder weights must exist and match ``sha256`` (when set)."""
        if self.weights_catalog:
            from ..prompt.weights import resolve_checkpoint

            return resolve_checkpoint(self.weights_catalog, download=download, progress=progress, cancel=cancel)
        return self.verify()

    def verify(self) -> Path:
        """Check that the weights file exists and matches ``sha256`` (when set); return its path."""
        if self.weights_catalog:
            return self.resolve_weights(download=False)
        return _verified(self, self.weights, self.sha256)

    # ------------------------------------------------------------------------------------------ loading
    def build(self) -> torch.nn.Module:
        """The network at random initialisation (allow-listed MONAI class with literal arguments; a trusted
        bundle's own config)."""
        if self.kind == "bundle" and self.trusted_code:
            from .bundle import trusted_network

            return trusted_network(Path(self.folder))
        if not self.network:
            raise CheckpointError(f"model {self.name!r}: model.json has no network spec")
        return build_network(self.network)

    def load_network(self, device: Union[str, torch.device] = "cpu", download: bool = False,
                     progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> torch.nn.Module:
        """The ready-to-run predictor on ``device`` in eval mode: verified weights loaded into the network(s);
        ensemble members and test-time flips averaged; inputs reordered to the network's ``array_order``."""
        path = self.resolve_weights(download, progress, cancel)
        if self.kind == "torchscript":
            try:
                net = torch.jit.load(str(path), map_location=device)
            except RuntimeError as exc:
                raise CheckpointError(f"{path}: not a TorchScript file ({str(exc).splitlines()[0]})") from None
            return net.eval()
        nets = []
        for weights in [path] + [_verified(self, m["weights"], m.get("sha256", "")) for m in self.members]:
            net = self.build()
            load_state(net, _load_state_dict(weights), str(weights))
            nets.append(net)
        model = nets[0] if len(nets) == 1 and not self.tta_flips else AveragedSoftmax(nets, self.tta_flips)
        if self.array_order != "kji":
            model = ArrayOrder(model, self.array_order)
        return model.to(device).eval()


def _verified(entry: ModelEntry, name: str, sha256: str) -> Path:
    if entry.folder is None:
        raise CheckpointError(f"model {entry.name!r} has no folder")
    path = Path(entry.folder) / name
    if not path.is_file():
        raise CheckpointError(f"model {entry.name!r}: weights file {path} is missing")
    if sha256:
        actual = sha256_file(path)
        if actual != sha256.lower():
            raise CheckpointError(f"model {entry.name!r}: sha256 of {path.name} is {actual[:16]}..., expected "
                                  f"{sha256[:16]}... (corrupted or replaced file)")
    return path


def _load_state_dict(path: Path) -> dict:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, unsupported globals
        raise CheckpointError(f"{path}: cannot load as a weights-only checkpoint ({str(exc).splitlines()[0]})") \
            from None
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]  # training checkpoint (model + optimizer)
    elif isinstance(data, dict) and "state_dict" in data:
        data = data["state_dict"]  # {"epoch", "best_acc", "state_dict", ...} (MONAI research checkpoints)
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return data


# ----------------------------------------------------------------------------------------- MONAI bundles
def entry_from_bundle(folder: Path, trust_code: bool = False) -> ModelEntry:
    """A :class:`ModelEntry` for a MONAI bundle folder: ``model.json`` if present, else ``configs/metadata.json``
    plus the conventions its config states literally. The network comes from ``network_def`` parsed without
    evaluation (:func:`mrisegassist.unet.bundle.network_spec`: :class:`~mrisegassist.unet.bundle.UntrustedCodeError`
    for anything but an allow-listed MONAI class with literal arguments), or with ``trust_code=True`` from MONAI's
    ``ConfigParser`` (runs the bundle's code)."""
    from .bundle import brats_channels, config_path, conventions, network_spec, read_config

    folder = Path(folder)
    cfg_path = config_path(folder)
    config = read_config(cfg_path)
    spec = None if trust_code else network_spec(config, cfg_path)
    if (folder / "model.json").is_file():
        entry = ModelEntry.from_json(folder / "model.json")
        entry.kind = "bundle"
    else:
        entry = _entry_from_metadata(folder, config, spec, conventions(config), brats_channels)
    if spec is not None and not entry.network:
        entry.network = spec
    entry.trusted_code = bool(trust_code)
    entry.validate()
    return entry


def _entry_from_metadata(folder: Path, config: dict, spec: Optional[dict], conv: dict, brats_channels) -> ModelEntry:
    from ..labels import BRATS_LABELS
    from .bundle import read_config
    from .data import SEQUENCE_ALIASES

    meta_path = folder / "configs" / "metadata.json"
    meta = read_config(meta_path) if meta_path.is_file() else {}
    fmt = meta.get("network_data_format", {}) if isinstance(meta.get("network_data_format"), dict) else {}
    image = fmt.get("inputs", {}).get("image", {})
    n_in = int(image.get("num_channels", 1))
    names = [str(image.get("channel_def", {}).get(str(c), f"input{c}")).lower() for c in range(n_in)]
    inputs = [SEQUENCE_ALIASES.get(n.replace(" ", ""), n) for n in names]
    pred = fmt.get("outputs", {}).get("pred", {})
    channel_def = pred.get("channel_def", {})
    spatial = image.get("spatial_shape", [])
    dims = "2d" if (spec or {}).get("spatial_dims") == 2 or len(spatial) == 2 else "3d"
    where = folder / "configs"
    if str(conv.get("array_order", "")).startswith("unsupported:"):
        raise CheckpointError(f"{where}: Orientationd axcodes {conv['array_order'][12:]!r} is not supported "
                              f"(RAS, or no reorientation)")
    order = conv.get("array_order", "ijk" if dims == "3d" else "kji")
    output, mapping = "softmax", {}
    brats = brats_channels(channel_def) if channel_def else None
    if conv.get("sigmoid") or brats:
        if brats != ["tc", "wt", "et"]:
            raise CheckpointError(f"{where}: sigmoid multi-label outputs are supported for BraTS TC/WT/ET channels "
                                  f"in that order only (channels: {channel_def})")
        output = "sigmoid-brats"
        labels = [{"value": 1, "name": "necrotic / non-enhancing tumour core", "color": list(BRATS_LABELS[0].color),
                   "terminology": BRATS_LABELS[0].terminology},
                  {"value": 2, "name": BRATS_LABELS[1].name, "color": list(BRATS_LABELS[1].color),
                   "terminology": BRATS_LABELS[1].terminology},
                  {"value": 4, "name": BRATS_LABELS[3].name, "color": list(BRATS_LABELS[3].color),
                   "terminology": BRATS_LABELS[3].terminology}]
        mapping = {"1": 1, "2": 2, "3": 4}
    else:
        labels = [{"value": int(k), "name": str(v), "color": [1.0, 0.0, 0.0]}
                  for k, v in channel_def.items() if int(k) != 0]
    roi = conv.get("roi_size") or [int(s) if isinstance(s, int) else 96 for s in spatial] or [96, 96, 96]
    if order != "kji":
        roi = list(reversed(roi))  # config order [i, j, k] -> pipeline order [S, P, L]
    norm = "nonzero" if conv.get("normalization") == "nonzero" else "zscore"
    return ModelEntry(name=str(meta.get("name", folder.name)), kind="bundle", inputs=inputs, labels=labels,
                      title=str(meta.get("name", folder.name)), dims=dims, licence=str(meta.get("license", "")),
                      description=str(meta.get("description", "")), weights="models/model.pt",
                      roi_size=[int(r) for r in roi][:3], array_order=order, output=output, label_mapping=mapping,
                      spacing=list(conv.get("spacing") or ([1.0, 1.0, None] if dims == "2d" else [None] * 3)),
                      normalization={n: norm for n in inputs}, overlap=float(conv.get("overlap", 0.25)),
                      regions="brats" if output == "sigmoid-brats" else None, folder=folder)


# ------------------------------------------------------------------------------------------- registry
def _entries_in(root: Path) -> list[ModelEntry]:
    """Models in the sub-folders of ``root``; a folder that cannot be read (or a bundle that asks for code to be
    run) is left out with a warning naming it, so one bad folder does not hide the others."""
    if not root.is_dir():
        return []
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            if (sub / "configs").is_dir():
                out.append(entry_from_bundle(sub))
            elif (sub / "model.json").is_file():
                out.append(ModelEntry.from_json(sub / "model.json"))
        except (CheckpointError, InputError) as exc:
            warnings.warn(f"model folder left out: {exc}", stacklevel=2)
    return out


def list_models() -> list[ModelEntry]:
    """Shipped models, then user models (a user model with a shipped model's name overrides it)."""
    by_name: dict[str, ModelEntry] = {}
    for entry in _entries_in(SHIPPED_DIR) + _entries_in(user_models_dir()):
        by_name[entry.name] = entry
    return list(by_name.values())


def _json_beside(path: Path) -> Optional[Path]:
    for candidate in (path.with_suffix(".json"), path.parent / "model.json"):
        if candidate.is_file():
            return candidate
    return None


def get_model(name_or_path: Union[str, Path, ModelEntry], trust_code: bool = False) -> ModelEntry:
    """A model by registry name, or by path: a folder with ``model.json``, a MONAI bundle folder, or a weights
    file (``.pt`` checkpoint / ``.ts`` TorchScript) with a ``<stem>.json`` or ``model.json`` beside it (that file
    alone: the path of one member of an ensemble gives that member, e.g. the fold model that did not see a case).

    MONAI bundles are read without running their code; ``trust_code=True`` lets MONAI's ``ConfigParser`` build
    the network (see :mod:`mrisegassist.unet.bundle`). This is the one loader of the CLI, the Slicer logic and
    the web app."""
    if isinstance(name_or_path, ModelEntry):
        return name_or_path
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "configs").is_dir():
            return entry_from_bundle(path, trust_code)
        if (path / "model.json").is_file():
            return ModelEntry.from_json(path / "model.json")
        raise InputError(f"{path}: folder has neither model.json nor a MONAI bundle configs/ folder")
    if path.is_file():
        if path.suffix == ".json":
            return ModelEntry.from_json(path)
        described = _json_beside(path)
        if described is None:
            raise InputError(f"{path}: no model description beside it (expected {path.with_suffix('.json').name} "
                             f"or model.json)")
        entry = ModelEntry.from_json(described)
        member = entry.member(path.name)  # that file alone, also when it is one member of an ensemble
        if member is not None:
            entry = member
        else:  # another file: no digest, no other members
            entry.weights, entry.sha256, entry.weights_catalog, entry.members = path.name, "", "", []
        if path.suffix == ".ts":
            entry.kind = "torchscript"
        return entry
    names = {e.name: e for e in list_models()}
    if str(name_or_path) in names:
        return names[str(name_or_path)]
    raise InputError(f"unknown model {str(name_or_path)!r}: not a file or folder, and not one of the installed "
                     f"models ({', '.join(sorted(names)) or 'none'})")
