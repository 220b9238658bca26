"""Model entries (``model.json``) and the model registry.

A :class:`ModelEntry` describes one segmentation model: its weights (``kind`` = ``"checkpoint"``: this
project's state dict + ``network`` spec; ``"bundle"``: a MONAI bundle folder; ``"torchscript"``: a
``.ts``/``.pt`` TorchScript file), the ordered input sequences, the output labels, the network-class ->
label-value mapping, the model grid spacing (mm, x/y/z in LPS; ``null`` keeps the native spacing),
per-sequence normalisation, ``dims`` (``"2d"`` slice-wise or ``"3d"``), ``roi_size`` for 3D sliding windows,
licence, sha256 of the weights file and optional BraTS ``regions``.

Registry: shipped models in ``mrisegassist/models/<name>/`` plus user models in ``$MRISEGASSIST_MODELS``
(default ``~/.mrisegassist/models``), one folder per model.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

import torch

from ..errors import CheckpointError, InputError
from ..labels import LabelInfo
from .networks import build_network, load_state

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "models"
KINDS = ("checkpoint", "bundle", "torchscript")


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
    training: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    folder: Optional[Path] = field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------------------------------------ JSON
    @classmethod
    def from_dict(cls, data: dict, folder: Optional[Path] = None) -> "ModelEntry":
        known = {f.name for f in fields(cls)} - {"folder"}
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
        return data

    def write(self, folder: Optional[Union[str, Path]] = None) -> Path:
        """Write ``model.json`` into ``folder`` (default: this entry's folder) atomically."""
        from ..volume import atomic_write

        target = Path(folder or self.folder) / "model.json"
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        return atomic_write(target, lambda tmp: Path(tmp).write_text(text))

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

    @property
    def weights_path(self) -> Path:
        if self.folder is None:
            raise CheckpointError(f"model {self.name!r} has no folder")
        return Path(self.folder) / self.weights

    def weights_size(self) -> int:
        try:
            return self.weights_path.stat().st_size
        except (OSError, CheckpointError):
            return 0

    def verify(self) -> Path:
        """Check that the weights file exists and matches ``sha256`` (when set); return its path."""
        path = self.weights_path
        if not path.is_file():
            raise CheckpointError(f"model {self.name!r}: weights file {path} is missing")
        if self.sha256:
            actual = sha256_file(path)
            if actual != self.sha256.lower():
                raise CheckpointError(f"model {self.name!r}: sha256 of {path.name} is {actual[:16]}..., expected "
                                      f"{self.sha256[:16]}... (corrupted or replaced file)")
        return path

    # ------------------------------------------------------------------------------------------ loading
    def load_network(self, device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
        """Build the network, load verified weights onto ``device``, set eval mode."""
        path = self.verify()
        if self.kind == "torchscript":
            try:
                net = torch.jit.load(str(path), map_location=device)
            except RuntimeError as exc:
                raise CheckpointError(f"{path}: not a TorchScript file ({str(exc).splitlines()[0]})") from None
            return net.eval()
        net = _bundle_network(self) if self.kind == "bundle" else build_network(self.network)
        state = _load_state_dict(path)
        load_state(net, state, str(path))
        return net.to(device).eval()


def _load_state_dict(path: Path) -> dict:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, unsupported globals
        raise CheckpointError(f"{path}: cannot load as a weights-only checkpoint ({str(exc).splitlines()[0]})") \
            from None
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]  # training checkpoint (model + optimizer)
    elif isinstance(data, dict) and "state_dict" in data:
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return data


# ----------------------------------------------------------------------------------------- MONAI bundles
def _bundle_config(folder: Path) -> Path:
    for name in ("inference.json", "inference.yaml", "train.json", "train.yaml"):
        candidate = folder / "configs" / name
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{folder}: MONAI bundle has no configs/inference.json (or .yaml)")


def _bundle_network(entry: ModelEntry) -> torch.nn.Module:
    from monai.bundle import ConfigParser

    folder = Path(entry.folder)
    parser = ConfigParser()
    parser.read_config(str(_bundle_config(folder)))
    parser["bundle_root"] = str(folder)
    try:
        return parser.get_parsed_content("network_def")
    except Exception as exc:  # the bundle's own config code may raise anything
        raise CheckpointError(f"{folder}: cannot build the bundle's network_def ({exc})") from None


def entry_from_bundle(folder: Path) -> ModelEntry:
    """A :class:`ModelEntry` for a MONAI bundle folder, from its ``model.json`` or its ``metadata.json``."""
    if (folder / "model.json").is_file():
        entry = ModelEntry.from_json(folder / "model.json")
        entry.kind = "bundle"
        return entry
    meta_path = folder / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    fmt = meta.get("network_data_format", {})
    image = fmt.get("inputs", {}).get("image", {})
    n_in = int(image.get("num_channels", 1))
    inputs = [str(image.get("channel_def", {}).get(str(c), f"input{c}")).lower() for c in range(n_in)]
    pred = fmt.get("outputs", {}).get("pred", {})
    channel_def = pred.get("channel_def", {})
    labels = [{"value": int(k), "name": str(v), "color": [1.0, 0.0, 0.0]}
              for k, v in channel_def.items() if int(k) != 0]
    spatial = image.get("spatial_shape", [128, 128, 128])
    dims = "2d" if len(spatial) == 2 else "3d"
    entry = ModelEntry(name=meta.get("name", folder.name), kind="bundle", inputs=inputs, labels=labels,
                       title=meta.get("name", folder.name), dims=dims, licence=meta.get("license", ""),
                       description=meta.get("description", ""), weights="models/model.pt",
                       roi_size=[int(s) if isinstance(s, int) else 96 for s in spatial][:3] or [96, 96, 96],
                       folder=folder)
    entry.validate()
    return entry


# ------------------------------------------------------------------------------------------- registry
def _entries_in(root: Path) -> list[ModelEntry]:
    if not root.is_dir():
        return []
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if (sub / "model.json").is_file():
            out.append(ModelEntry.from_json(sub / "model.json"))
        elif (sub / "configs").is_dir():
            out.append(entry_from_bundle(sub))
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


def get_model(name_or_path: Union[str, Path, ModelEntry]) -> ModelEntry:
    """A model by registry name, or by path: a folder with ``model.json``, a MONAI bundle folder, or a weights
    file (``.pt`` checkpoint / ``.ts`` TorchScript) with a ``<stem>.json`` or ``model.json`` beside it."""
    if isinstance(name_or_path, ModelEntry):
        return name_or_path
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "configs").is_dir():
            return entry_from_bundle(path)
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
        if path.name != entry.weights:
            entry.weights, entry.sha256 = path.name, ""  # another file than the one described: no digest
        if path.suffix == ".ts":
            entry.kind = "torchscript"
        return entry
    names = {e.name: e for e in list_models()}
    if str(name_or_path) in names:
        return names[str(name_or_path)]
    raise InputError(f"unknown model {str(name_or_path)!r}: not a file or folder, and not one of the installed "
                     f"models ({', '.join(sorted(names)) or 'none'})")
