"""The studies of a batch: a folder of case folders or a CSV manifest.

* **Folder**: each sub-folder is a study (case id = folder name); its sequences and reference mask are found by
  file name as for training (:func:`mrisegassist.unet.data.find_case_files`: ``flair``/``t2f``, ``t1``/``t1n``,
  ``t1c``/``t1ce``/``t1post``, ``t2``/``t2w``; ``labels``/``seg``/``lesions``/``gt`` = reference mask).
* **CSV manifest**: a header row with a ``case`` column (or ``id`` / ``study``), one column per sequence (the
  names above), optionally ``reference`` (also ``label``/``labels``/``seg``/``gt``: reference mask), ``model``
  (U-Net model of that study, overriding ``--model``), ``mask`` (the mask whose components become prompts) and
  ``boxes`` (an ``mrisegassist atlas`` boxes JSON). Every other column is a **grouping column** (site, scanner,
  field strength, protocol, ...): it is carried into the results table and the report groups Dice by it.
  Relative paths are relative to the CSV's folder; empty cells mean "not given".
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import InputError

CASE_COLUMNS = ("case", "id", "study")
REFERENCE_COLUMNS = ("reference", "label", "labels", "seg", "gt")
MODEL_COLUMN, MASK_COLUMN, BOXES_COLUMN = "model", "mask", "boxes"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass
class Study:
    """One study: its sequences (``{name: path}``), optional reference mask, per-study model / prompt mask /
    boxes file, and grouping values (``{column: value}``, e.g. ``{"site": "A"}``)."""

    case: str
    sequences: dict[str, Path]
    reference: Optional[Path] = None
    groups: dict[str, str] = field(default_factory=dict)
    model: Optional[str] = None
    mask: Optional[Path] = None
    boxes: Optional[Path] = None
    folder: Optional[Path] = None  # the case folder (folder input), never written into

    def input_files(self) -> list[Path]:
        """Every file the study reads."""
        files = list(self.sequences.values())
        return files + [p for p in (self.reference, self.mask, self.boxes) if p is not None]

    def fingerprint(self) -> str:
        """sha256 of the study's inputs as they are now (path, size, modification time) and its per-study
        settings: a finished result is reused only while this (and the workflow options) are unchanged."""
        def ident(path: Path) -> list:
            try:
                st = os.stat(path)
                return [os.path.realpath(path), st.st_size, st.st_mtime_ns]
            except OSError:
                return [str(path), None, None]

        doc = {"case": self.case, "sequences": {k: ident(v) for k, v in sorted(self.sequences.items())},
               "reference": ident(self.reference) if self.reference else None, "model": self.model,
               "mask": ident(self.mask) if self.mask else None, "boxes": ident(self.boxes) if self.boxes else None}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _check_case_id(case: str, where: str) -> str:
    case = case.strip()
    if not _SAFE_ID.match(case) or ".." in case:
        raise InputError(f"{where}: case id {case!r} cannot name a results folder (use letters, digits, '.', "
                         f"'_', '+', '-'; no '/' or '..')")
    return case


def from_folder(root: Path) -> list[Study]:
    """One study per sub-folder of ``root`` holding recognised sequence files (sorted by name)."""
    from ..unet.data import find_case_files

    root = Path(root)
    studies = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        files = find_case_files(sub)
        if files is None:
            continue
        studies.append(Study(_check_case_id(sub.name, str(sub)), dict(files.images), files.labels, folder=sub))
    if not studies:
        raise InputError(f"{root}: no studies found (expected sub-folders with flair/t1/t1c/t2 files, or a CSV "
                         f"manifest)")
    return studies


def from_manifest(path: Path) -> list[Study]:
    """Studies from a CSV manifest (see the module docstring)."""
    from ..unet.data import SEQUENCE_ALIASES

    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read the manifest ({exc})") from None
    if not rows:
        raise InputError(f"{path}: the manifest has no study rows")
    header = [h.strip() for h in rows[0].keys() if h is not None]
    lower = {h.lower(): h for h in header}
    case_col = next((lower[c] for c in CASE_COLUMNS if c in lower), None)
    if case_col is None:
        raise InputError(f"{path}: the manifest needs a case column ({', '.join(CASE_COLUMNS)}); found "
                         f"{', '.join(header)}")
    ref_col = next((lower[c] for c in REFERENCE_COLUMNS if c in lower), None)
    special = {case_col, ref_col, lower.get(MODEL_COLUMN), lower.get(MASK_COLUMN), lower.get(BOXES_COLUMN)}
    seq_cols = {h: SEQUENCE_ALIASES[h.lower()] for h in header if h.lower() in SEQUENCE_ALIASES}
    group_cols = [h for h in header if h not in special and h not in seq_cols]
    if not seq_cols:
        raise InputError(f"{path}: the manifest names no sequence column (e.g. flair, t1, t1c, t2)")

    def file(value: Optional[str], line: int, column: str) -> Optional[Path]:
        value = (value or "").strip()
        if not value:
            return None
        p = Path(value).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if not p.exists():
            raise InputError(f"{path}, line {line}, column {column}: {p} does not exist")
        return p

    studies, seen = [], set()
    for line, row in enumerate(rows, start=2):
        row = {(k or "").strip(): v for k, v in row.items()}
        case = _check_case_id(row.get(case_col) or "", f"{path}, line {line}")
        if case in seen:
            raise InputError(f"{path}, line {line}: case {case!r} appears twice")
        seen.add(case)
        sequences = {}
        for col, name in seq_cols.items():
            f = file(row.get(col), line, col)
            if f is not None:
                sequences.setdefault(name, f)
        if not sequences:
            raise InputError(f"{path}, line {line}: case {case!r} has no sequence file")
        studies.append(Study(
            case, sequences, file(row.get(ref_col), line, ref_col) if ref_col else None,
            {g: (row.get(g) or "").strip() for g in group_cols},
            (row.get(lower[MODEL_COLUMN]) or "").strip() or None if MODEL_COLUMN in lower else None,
            file(row.get(lower[MASK_COLUMN]), line, MASK_COLUMN) if MASK_COLUMN in lower else None,
            file(row.get(lower[BOXES_COLUMN]), line, BOXES_COLUMN) if BOXES_COLUMN in lower else None))
    return studies


def discover_studies(source: Path) -> list[Study]:
    """Studies of a folder of case folders or of a ``.csv`` manifest."""
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source}: no such folder or manifest")
    if source.is_dir():
        return from_folder(source)
    if source.suffix.lower() != ".csv":
        raise InputError(f"{source}: give a folder of case folders or a .csv manifest")
    return from_manifest(source)


def group_columns(studies: list[Study]) -> list[str]:
    """The grouping columns, in manifest order."""
    return list(dict.fromkeys(g for s in studies for g in s.groups))
