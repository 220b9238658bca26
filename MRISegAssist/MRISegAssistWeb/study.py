"""Studies on the server: folders of the data folder holding volumes, which files are images and which a
reference mask, and uploads written to a private temporary folder.

A *study* is one folder with one file per sequence (``flair.nii.gz``, ``t1.nii.gz``, ...), optionally with a
reference mask (``lesions.nii.gz``, ``labels.nii.gz``, ``*-seg.nii.gz``, ...) for metrics. Files are
classified by name only; the page lets the user correct the choice.

Safety: every volume file of a study (and a detached ``.raw`` it names) must resolve inside the data folder
(symbolic links are followed and confined like folders), and is checked for truncation, compressed-stream
damage and the voxel-count limit before anything reads it (:func:`mrisegassist.integrity.verify_volume_file`).
Messages name files relative to the study, never the server's folders.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mrisegassist.errors import InputError
from mrisegassist.integrity import inspect_volume_file, verify_volume_file

from .security import UploadBudget, safe_file_name

#: Volume files the study loader reads (Slicer's readers; DICOM series are not listed here).
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl", ".gipl.gz")
#: Names of reference masks (expert labels or another model's output) offered for metrics.
REFERENCE_PATTERN = re.compile(r"label|lesion|(^|[^a-z])seg([^a-z]|$)|segmentation|(^|[^a-z])gt([^a-z]|$)|"
                               r"truth|annotation|manual|mask")
#: Masks that are neither an image nor a reference (brain masks from skull stripping).
IGNORED_PATTERN = re.compile(r"brain_?mask|skull|(^|[^a-z])bet([^a-z]|$)")
MAX_STUDIES = 500


def is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return not name.startswith(".") and path.is_file() and name.endswith(VOLUME_SUFFIXES)


def stem(path: Path) -> str:
    """File name without its volume suffix (``flair.nii.gz`` -> ``flair``), by the engine's suffix rule."""
    from mrisegassist.volume import _suffix

    suffix = _suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


def role_of(path: Path) -> str:
    """``"ignored"`` (brain mask), ``"reference"`` (label-like name) or ``"image"``."""
    name = stem(path).lower()
    if IGNORED_PATTERN.search(name):
        return "ignored"
    if REFERENCE_PATTERN.search(name):
        return "reference"
    return "image"


@dataclass
class StudyFiles:
    """The volume files of one study folder, by role (sorted by name)."""

    folder: Path
    images: list[Path] = field(default_factory=list)
    references: list[Path] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)

    @property
    def default_reference(self) -> Optional[Path]:
        """The first reference-like file (``None`` when there is none)."""
        return self.references[0] if self.references else None


def _confine_file(path: Path, base: Path, where: str) -> None:
    real = path.resolve()
    if real != base and base not in real.parents:
        link = "is a link to a file" if path.is_symlink() else "lies"
        raise InputError(f"{path.name}: {link} outside {where}; refused")


def scan_study(folder: Path, root: Optional[Path] = None, max_voxels: Optional[int] = None) -> StudyFiles:
    """Classify and check the volume files directly inside ``folder``; :class:`InputError` when it has no image.

    Every volume file (and a detached data file its header names) must resolve inside ``root`` (the data
    folder; default: ``folder`` itself), and passes the engine's integrity checks (truncation, gzip CRC, the
    voxel-count limit ``max_voxels``) before anything reads it. Messages name the file, not its folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder.name}: is not a folder")
    base = Path(root if root is not None else folder).resolve()
    where = "the data folder" if root is not None else "the study folder"
    study = StudyFiles(folder)
    for path in sorted(folder.iterdir()):
        if not is_volume_file(path):
            continue
        _confine_file(path, base, where)
        info = verify_volume_file(path, name=path.name, max_voxels=max_voxels)
        for extra in (info.files[1:] if info is not None else ()):
            _confine_file(extra, base, where)
        {"image": study.images, "reference": study.references, "ignored": study.ignored}[role_of(path)].append(path)
    if not study.images:
        raise InputError(f"{folder.name}: holds no image volume ({', '.join(VOLUME_SUFFIXES)})")
    return study


def list_studies(root: Path, max_depth: int = 4) -> list[str]:
    """Folders under ``root`` (relative POSIX paths, sorted) that hold at least one image volume.

    Hidden folders are skipped and symlinked folders are not followed.
    """
    root = Path(root).resolve()
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if depth < max_depth else []
        if any(role_of(here / f) == "image" and is_volume_file(here / f) for f in filenames):
            found.append(here.relative_to(root).as_posix() or ".")
            if len(found) >= MAX_STUDIES:
                break
    return sorted(found)


class UploadArea:
    """A private temporary folder receiving one upload at a time, limited to ``limit_bytes`` in total (bytes
    received and decompressed voxel data) and ``max_voxels`` per volume (default: the engine's limit).

    Files from the browser arrive as trame file dicts (``name``, ``size``, ``content`` bytes or chunks);
    names are sanitised (folders dropped), so nothing is written outside the folder. Messages name the
    uploaded file, never the temporary folder (:meth:`redact` hides it in other messages).
    """

    def __init__(self, limit_bytes: int, max_voxels: Optional[int] = None) -> None:
        self.budget = UploadBudget(limit_bytes, max_voxels)
        self._root = Path(tempfile.mkdtemp(prefix="mrisegassist-upload-"))
        self.folder: Optional[Path] = None

    def begin(self) -> Path:
        """Start a new upload (the previous one is deleted)."""
        self.discard()
        self.budget.reset()
        self.folder = Path(tempfile.mkdtemp(prefix="study-", dir=self._root))
        return self.folder

    def add(self, files: list[dict]) -> list[Path]:
        """Write one chunk of files; raises :class:`InputError` (and discards the upload) past a limit or for a
        volume whose header cannot be read."""
        if self.folder is None:
            self.begin()
        written = []
        try:
            names = [safe_file_name(f.get("name") or "", "upload") for f in files]
            self.budget.check_declared([(n, int(f.get("size") or 0)) for n, f in zip(names, files)])
            for name, item in zip(names, files):
                content = item.get("content") or b""
                if isinstance(content, list):
                    content = b"".join(content)
                self.budget.add(len(content), name)
                path = self.folder / name
                path.write_bytes(content)
                written.append(path)
                info = inspect_volume_file(path, name) if is_volume_file(path) else None
                if info is not None:
                    self.budget.add_volume(info, name)
        except InputError as exc:
            self.discard()
            raise type(exc)(self.redact(str(exc))) from None  # same class (DamagedFileError, ...)
        return written

    def redact(self, text: str) -> str:
        """``text`` with this area's temporary folder replaced by ``<upload>`` (for messages shown in the page)."""
        for form in {str(self._root), str(self._root.resolve())}:
            text = text.replace(form, "<upload>")
        return text

    def discard(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def close(self) -> None:
        self.discard()
        shutil.rmtree(self._root, ignore_errors=True)
