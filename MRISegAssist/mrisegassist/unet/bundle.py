"""MONAI bundle folders read as data: no code from a model folder is ever run unless the user trusts it.

A MONAI bundle's ``configs/inference.json`` (or ``.yaml``) may hold Python: ``"$..."`` expressions, ``_target_``
of any importable callable, ``%file#key`` macros. MONAI's ``ConfigParser`` evaluates them when it builds the
network, so a bundle folder passed as ``--model`` could run anything. This module instead reads the config as
plain JSON/YAML (``yaml.safe_load``) and takes from it only:

* ``network_def``: its ``_target_`` must be one of the allow-listed MONAI network classes
  (:data:`mrisegassist.unet.networks.ALLOWED_NETWORKS`) and every argument a literal (number, string, boolean,
  null, or lists/dicts of them). ``"@key"`` references to other literal entries of the same file are followed;
  a ``"$..."`` expression, a ``%`` macro, a nested ``_target_`` or any other construct is refused with an
  :class:`UntrustedCodeError` naming the file and the construct (CLI exit status 2). Entries outside
  ``network_def`` are never evaluated (the official bundles keep ``$`` expressions there, for devices, paths and
  loaders, which this reader ignores).
* input conventions, read literally when present: ``Orientationd`` axcodes, ``Spacingd`` pixdim,
  ``NormalizeIntensityd(nonzero=True)``, ``Activationsd(sigmoid=True)``, ``SlidingWindowInferer`` ROI/overlap;
  and from ``configs/metadata.json`` the input channels and output channel names.

``trust_code=True`` (the CLI's ``--trust-model-code``) hands the config to MONAI's ``ConfigParser`` as before:
only for bundles whose authors the user trusts. Weights are always loaded with ``torch.load(weights_only=True)``
(and checked against a sha256 when ``model.json`` gives one).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

from ..errors import CheckpointError, InputError
from .networks import ALLOWED_NETWORKS, is_literal, network_class_name

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml", "train.json", "train.yaml", "train.yml")
TRUST_HINT = ("MRISegAssist does not run code from model folders; if you trust the bundle's authors, pass "
              "--trust-model-code (CLI) / trust_code=True (API) to let MONAI's ConfigParser evaluate it")
#: BraTS channel names of sigmoid multi-label bundles (tumour core, whole tumour, enhancing tumour)
_BRATS_CHANNELS = {"tc": "tc", "tumor core": "tc", "tumour core": "tc", "wt": "wt", "whole tumor": "wt",
                   "whole tumour": "wt", "et": "et", "enhancing tumor": "et", "enhancing tumour": "et"}
_MAX_REF_DEPTH = 16


class UntrustedCodeError(InputError, CheckpointError):
    """A model folder asks for code to be run (a ``$`` expression, a non-allow-listed ``_target_``, ...)."""


def config_path(folder: Path) -> Path:
    """The bundle's inference config (``configs/inference.json``/``.yaml``, else ``train.*``)."""
    for name in CONFIG_NAMES:
        candidate = Path(folder) / "configs" / name
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{folder}: MONAI bundle has no configs/inference.json (or .yaml)")


def read_config(path: Path) -> dict:
    """A JSON or YAML config as plain data (``yaml.safe_load``: no tags, no objects); CheckpointError if bad."""
    path = Path(path)
    try:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (OSError, ValueError) as exc:  # json.JSONDecodeError and yaml.YAMLError are ValueError / Exception
        raise CheckpointError(f"{path}: cannot read the bundle config ({exc})") from None
    except Exception as exc:  # yaml.YAMLError
        raise CheckpointError(f"{path}: cannot read the bundle config ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the bundle config is not a mapping")
    return data


def _lookup(config: Mapping, ref: str, path: Path, where: str) -> Any:
    node: Any = config
    for part in ref.split("#"):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise UntrustedCodeError(f"{path}: {where} refers to '@{ref}', which the file does not define")
    return node


def literal(value: Any, config: Mapping, path: Path, where: str, depth: int = 0) -> Any:
    """``value`` with ``@key`` references replaced by their literal values; :class:`UntrustedCodeError` for a
    ``$`` expression, a ``%`` macro, a nested ``_target_`` or anything that is not a plain literal."""
    if depth > _MAX_REF_DEPTH:
        raise UntrustedCodeError(f"{path}: {where}: references nested more than {_MAX_REF_DEPTH} deep")
    if isinstance(value, str):
        if value.startswith("$"):
            raise UntrustedCodeError(f"{path}: {where} is a Python expression {value[:80]!r}. {TRUST_HINT}")
        if value.startswith("%"):
            raise UntrustedCodeError(f"{path}: {where} is a macro {value[:80]!r} (content from another file). "
                                     f"{TRUST_HINT}")
        if value.startswith("@"):
            target = _lookup(config, value[1:], path, where)
            return literal(target, config, path, f"{where} -> {value}", depth + 1)
        return value
    if isinstance(value, list):
        return [literal(v, config, path, f"{where}[{n}]", depth) for n, v in enumerate(value)]
    if isinstance(value, dict):
        special = sorted(k for k in value if str(k).startswith("_") and k != "_desc_")
        if special:
            raise UntrustedCodeError(f"{path}: {where} holds {special[0]!r} "
                                     f"({str(value.get(special[0]))[:80]!r}): only literal arguments are read. "
                                     f"{TRUST_HINT}")
        return {k: literal(v, config, path, f"{where}.{k}", depth) for k, v in value.items() if k != "_desc_"}
    if is_literal(value):
        return value
    raise UntrustedCodeError(f"{path}: {where} holds a {type(value).__name__}, not a literal. {TRUST_HINT}")


def network_spec(config: Mapping, path: Path) -> dict:
    """``network_def`` as a network spec ``{"name": <allow-listed class>, **literal args}`` (nothing evaluated)."""
    if "network_def" not in config:
        raise CheckpointError(f"{path}: the bundle config has no 'network_def'")
    node = config["network_def"]
    if isinstance(node, str) and node.startswith("@"):
        node = _lookup(config, node[1:], path, "network_def")
    if isinstance(node, str) and node.startswith("$"):
        raise UntrustedCodeError(f"{path}: network_def is a Python expression {node[:80]!r}. {TRUST_HINT}")
    if not isinstance(node, dict) or "_target_" not in node:
        raise UntrustedCodeError(f"{path}: network_def is not a '_target_' component with literal arguments. "
                                 f"{TRUST_HINT}")
    target = node["_target_"]
    name = network_class_name(target) if isinstance(target, str) else None
    if name is None:
        raise UntrustedCodeError(f"{path}: network_def '_target_' {str(target)[:80]!r} is not an allowed MONAI "
                                 f"network ({', '.join(ALLOWED_NETWORKS)}). {TRUST_HINT}")
    args = {k: v for k, v in node.items() if k not in ("_target_", "_desc_")}
    return {"name": name, **literal(args, config, path, "network_def")}


# -------------------------------------------------------------------------- conventions, read literally
def _components(node: Any):
    """Every dict with a literal ``_target_`` inside ``node`` (lists and dicts walked, strings ignored)."""
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield node
        for v in node.values():
            yield from _components(v)
    elif isinstance(node, list):
        for v in node:
            yield from _components(v)


def _short(target: str) -> str:
    return target.rpartition(".")[2]


def conventions(config: Mapping) -> dict:
    """Input/output conventions the config states literally (values that are expressions are skipped):
    ``array_order``, ``spacing``, ``normalization`` (``"nonzero"``), ``sigmoid``, ``roi_size`` (the config's
    order) and ``overlap``."""
    out: dict = {}
    for comp in _components({k: v for k, v in config.items() if k != "network_def"}):
        kind = _short(comp["_target_"])
        if kind == "Orientationd" and isinstance(comp.get("axcodes"), str):
            out["array_order"] = "ras" if comp["axcodes"].upper() == "RAS" else "unsupported:" + comp["axcodes"]
        elif kind == "Spacingd" and is_literal(comp.get("pixdim")) and isinstance(comp.get("pixdim"), list):
            out["spacing"] = [float(v) for v in comp["pixdim"]]
        elif kind == "NormalizeIntensityd" and comp.get("nonzero") is True:
            out["normalization"] = "nonzero"
        elif kind == "Activationsd" and comp.get("sigmoid") is True:
            out["sigmoid"] = True
        elif kind in ("SlidingWindowInferer", "SlidingWindowInfererAdapt"):
            roi = comp.get("roi_size")
            if isinstance(roi, list) and all(isinstance(v, int) for v in roi):
                out["roi_size"] = [int(v) for v in roi]
            if isinstance(comp.get("overlap"), (int, float)):
                out["overlap"] = float(comp["overlap"])
    return out


def brats_channels(names: Mapping[str, Any]) -> Optional[list[str]]:
    """``["tc", "wt", "et"]`` order of a BraTS multi-label output's channel names, or None."""
    keys = [_BRATS_CHANNELS.get(str(names[k]).strip().lower()) for k in sorted(names, key=lambda k: int(k))]
    return keys if sorted(k for k in keys if k) == ["et", "tc", "wt"] and len(keys) == 3 else None


def trusted_network(folder: Path):
    """The bundle's ``network_def`` built by MONAI's ``ConfigParser`` (RUNS the config's code: trusted only)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config_path(folder)))
    parser["bundle_root"] = str(folder)
    try:
        return parser.get_parsed_content("network_def")
    except Exception as exc:  # the bundle's own config code may raise anything
        raise CheckpointError(f"{folder}: cannot build the bundle's network_def ({exc})") from None
