"""Reference sets: N reference images with label maps, and the structures to find in them.

A reference set comes from

* ``builtin:NAME`` -- a built-in brain atlas (``builtin/NAME.json``; see :mod:`.builtin`),
* a folder -- ``atlas.json`` inside it (an atlas definition listing its references), or else pairs of files
  ``<id>_image.<ext>`` + ``<id>_labels.<ext>`` (or sub-folders ``<id>/image.<ext>`` + ``<id>/labels.<ext>``),
* a CSV manifest -- columns ``image,labels[,name]`` (paths relative to the CSV),
* a JSON manifest -- an atlas definition (``{"name", "structures": [...], "references": [...]}``).

Without structure definitions every label value found in the references becomes one structure.
Label maps are integer ``[k, j, i]`` arrays; each :class:`Structure` merges one or more label values.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from ..errors import InputError
from ..labels import default_color
from ..progress import CancelToken, ProgressFn, track
from ..volume import READABLE_SUFFIXES, Volume, read_volume

BUILTIN_DIR = Path(__file__).with_name("builtin")
PathLike = Union[str, os.PathLike]


def cache_dir() -> Path:
    """On-disk cache of built atlases, deformed references and registrations (``$MRISEGASSIST_CACHE`` or
    ``~/.cache/mrisegassist``), created on first use."""
    root = Path(os.environ.get("MRISEGASSIST_CACHE", Path.home() / ".cache" / "mrisegassist")).expanduser()
    path = root / "atlas"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Structure:
    """One structure to box: ``labels`` = the reference label values merged into it.

    ``threshold``: score-map level (fraction of references agreeing) above which a voxel belongs to the
    structure; ``cascade``: ``False`` excludes it from the second (cascade) pass (thin or small structures);
    ``source``: where its reference labels come from (e.g. ``"AAL atlas labels"``).
    """

    name: str
    labels: tuple[int, ...]
    threshold: float = 0.5
    color: tuple[float, float, float] = (1.0, 0.0, 0.0)
    cascade: bool = True
    source: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise InputError("a structure needs a name")
        if not self.labels or any(int(v) < 1 for v in self.labels):
            raise InputError(f"structure {self.name!r}: needs label values >= 1, got {list(self.labels)}")
        if not 0.0 < self.threshold <= 1.0:
            raise InputError(f"structure {self.name!r}: threshold must be in (0, 1], got {self.threshold}")

    @classmethod
    def from_json(cls, data: dict) -> "Structure":
        try:
            labels = data["labels"] if "labels" in data else [data["label"]]
            labels = [labels] if isinstance(labels, int) else labels
            color = data.get("color") or default_color(int(labels[0]))
            return cls(str(data["name"]), tuple(int(v) for v in labels), float(data.get("threshold", 0.5)),
                       tuple(float(c) for c in color), bool(data.get("cascade", True)), str(data.get("source", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"bad structure definition {data!r}: {exc}") from None

    def to_json(self) -> dict:
        d = asdict(self)
        d["labels"], d["color"] = list(self.labels), list(self.color)
        return d


@dataclass
class Reference:
    """One reference image with its label map. ``image``/``labels`` load lazily from files when given as
    paths; ``key`` is a content hash (file bytes or array bytes); ``source`` names the subject the image shows
    (default: its own key; deformed copies keep their original's), so leave-one-out learning never holds out
    a reference while keeping a copy of it."""

    name: str
    _image: Union[Volume, Path, Callable[[], Volume]]
    _labels: Union[Volume, Path, Callable[[], Volume]]
    key: str = ""
    origin: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            self.key = _content_key(self._image) + _content_key(self._labels)
        if not self.source:
            self.source = self.key

    @property
    def image(self) -> Volume:
        if not isinstance(self._image, Volume):
            self._image = _load(self._image, "image", f"{self.name} image")
        return self._image

    @property
    def labels(self) -> Volume:
        if not isinstance(self._labels, Volume):
            self._labels = _load(self._labels, "label", f"{self.name} labels")
            if not np.issubdtype(self._labels.array.dtype, np.integer):
                raise InputError(f"{self.name}: label map is not integer")
        return self._labels


def _load(source, kind: str, name: str) -> Volume:
    if callable(source) and not isinstance(source, Path):
        return source()
    return read_volume(source, kind=kind, name=name)


def _content_key(source) -> str:
    h = hashlib.sha256()
    if isinstance(source, Volume):
        from .registration import volume_hash

        return volume_hash(source)[:16]
    if isinstance(source, Path):
        if not source.exists():
            raise InputError(f"{source}: no such file")
        with open(source, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()[:16]
    raise InputError("a reference built from a function needs an explicit content key")


@dataclass
class ReferenceSet:
    """References plus the structures to find; ``label_kind`` says what the labels are (for reports)."""

    name: str
    references: list[Reference]
    structures: list[Structure]
    label_kind: str = ""
    description: str = ""
    excluded: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.references:
            raise InputError(f"reference set {self.name!r} has no reference")
        names = [s.name for s in self.structures]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise InputError(f"reference set {self.name!r}: structure names repeat: {', '.join(dup)}")

    @property
    def key(self) -> str:
        return hashlib.sha256("".join(r.key for r in self.references).encode()).hexdigest()[:16]

    def structure(self, name: str) -> Structure:
        for s in self.structures:
            if s.name == name:
                return s
        raise InputError(f"unknown structure {name!r} in {self.name}; known: {', '.join(self.structure_names)}")

    @property
    def structure_names(self) -> list[str]:
        return [s.name for s in self.structures]

    def select(self, names: Optional[Sequence[str]]) -> "ReferenceSet":
        """The same references restricted to the named structures (all when ``names`` is empty)."""
        if not names:
            return self
        return ReferenceSet(self.name, self.references, [self.structure(n) for n in names], self.label_kind,
                            self.description)

    def with_structures(self, structures: Sequence[Structure]) -> "ReferenceSet":
        return ReferenceSet(self.name, self.references, list(structures), self.label_kind, self.description)

    def check_labels(self, progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> None:
        """Raise :class:`InputError` when a reference lacks every label value of a structure (its votes
        would silently count as "absent" and bias the score map)."""
        problems = []
        for ref in track(self.references, len(self.references), "checking reference labels", progress, cancel):
            present = set(np.unique(ref.labels.array).tolist())
            for s in self.structures:
                if not present.intersection(s.labels):
                    problems.append(f"{ref.name} has none of the labels {list(s.labels)} of {s.name!r}")
        if problems:
            raise InputError("missing labels in the reference set: " + "; ".join(problems)
                             + " (restrict --structures or fix the label maps)")


# --------------------------------------------------------------------------------------------- definitions
def read_definition(path: PathLike) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such atlas definition") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: an atlas definition must be a JSON object")
    return data


def structures_from(data: dict, where: str) -> list[Structure]:
    items = data.get("structures")
    if items is None:
        return []
    if not isinstance(items, list):
        raise InputError(f"{where}: 'structures' must be a list")
    return [Structure.from_json(s) for s in items]


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.json"))


def builtin_definition(name: str) -> dict:
    path = BUILTIN_DIR / f"{name}.json"
    if not path.is_file():
        raise InputError(f"unknown built-in atlas {name!r}; available: {', '.join(builtin_names())}")
    data = read_definition(path)
    if "structures_from" in data and "structures" not in data:
        data["structures"] = builtin_definition(data["structures_from"])["structures"]
    return data


def _default_structures(references: Sequence[Reference]) -> list[Structure]:
    values: set[int] = set()
    for ref in references:
        values.update(int(v) for v in np.unique(ref.labels.array) if v > 0)
    if not values:
        raise InputError("the reference label maps are all empty")
    return [Structure(f"label-{v}", (v,), color=default_color(v)) for v in sorted(values)]


def _image_files(folder: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(folder.iterdir()):
        name = p.name.lower()
        for suf in sorted(READABLE_SUFFIXES, key=len, reverse=True):
            if name.endswith(suf):
                out[p.name[: -len(suf)]] = p
                break
    return out


def _folder_references(folder: Path) -> list[Reference]:
    refs = []
    files = _image_files(folder)
    for stem, path in files.items():
        if stem.endswith("_image"):
            base = stem[: -len("_image")]
            lab = files.get(base + "_labels")
            if lab is None:
                raise InputError(f"{path}: no matching {base}_labels.<ext> beside it")
            refs.append(Reference(base, path, lab, origin=str(folder)))
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        sfiles = _image_files(sub)
        if "image" in sfiles and "labels" in sfiles:
            refs.append(Reference(sub.name, sfiles["image"], sfiles["labels"], origin=str(sub)))
    if not refs:
        raise InputError(f"{folder}: no references found (expected atlas.json, <id>_image + <id>_labels files, "
                         f"or sub-folders with image.* + labels.*)")
    return refs


def _manifest_references(entries, base: Path, where: str) -> list[Reference]:
    refs = []
    for n, e in enumerate(entries, 1):
        if not isinstance(e, dict) or "image" not in e or "labels" not in e:
            raise InputError(f"{where}: reference {n} needs 'image' and 'labels'")
        if "builtin" in e:
            raise InputError(f"{where}: use 'builtin' entries only in built-in definitions")
        image, labels = (base / e["image"]).expanduser(), (base / e["labels"]).expanduser()
        for p in (image, labels):
            if not p.exists():
                raise InputError(f"{where}: reference {n}: {p} does not exist")
        refs.append(Reference(str(e.get("name") or Path(e["image"]).name.split(".")[0]), image, labels,
                              origin=where))
    return refs


def load_reference_set(spec: Union[str, PathLike], structures: Optional[Sequence[str]] = None, *,
                       progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> ReferenceSet:
    """Open a reference set (see the module docstring for ``spec``); ``structures`` restricts it by name.

    Built-in atlases are built from the system's template files on first use and cached (see :mod:`.builtin`).
    Raises :class:`InputError` for a missing or malformed set, unknown structure names, or references
    lacking a structure's labels.
    """
    spec_s = str(spec)
    if spec_s.startswith("builtin:"):
        from .builtin import builtin_reference_set

        refset = builtin_reference_set(spec_s.split(":", 1)[1], progress=progress, cancel=cancel)
    else:
        path = Path(spec_s).expanduser()
        if not path.exists():
            raise InputError(f"{path}: no such reference folder or manifest (or use builtin:NAME; "
                             f"available: {', '.join(builtin_names())})")
        data: dict = {}
        if path.is_dir():
            where = path / "atlas.json"
            if where.is_file():
                data = read_definition(where)
                refs = _manifest_references(data.get("references") or [], path, str(where))
                if not refs:
                    refs = _folder_references(path)
            else:
                refs = _folder_references(path)
        elif path.suffix.lower() == ".csv":
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
            refs = _manifest_references(rows, path.parent, str(path))
            side = path.with_suffix(".json")
            data = read_definition(side) if side.is_file() else {}
        elif path.suffix.lower() == ".json":
            data = read_definition(path)
            refs = _manifest_references(data.get("references") or [], path.parent, str(path))
        else:
            raise InputError(f"{path}: a reference set is a folder, a .csv or a .json manifest")
        if not refs:
            raise InputError(f"{path}: the manifest lists no reference")
        defined = structures_from(data, str(path))
        refset = ReferenceSet(str(data.get("name") or path.stem), refs, defined or _default_structures(refs),
                              str(data.get("label_kind", "user-supplied labels")), str(data.get("description", "")))
    refset = refset.select(structures)
    refset.check_labels(cancel=cancel)
    return refset
