"""The output policy: outputs never touch inputs, and an existing output is only replaced by a complete,
verified new one.

Rules (one place; every command, the Slicer logic and the web app call these):

1. **Before computing** — :func:`guard_outputs`: an output path is refused when it resolves (through symbolic
   links and ``..``; hard links and bind mounts by inode) to an input file or a file beside it that the writer
   would also write (the ``.labels.json`` sidecar of a label map), when it lies inside (or is) a case folder
   being read, when it was read as an input earlier in this process, or when two outputs are the same file.
   It then runs :func:`check_output_path` on each (format the writer supports, not a folder, parent folder
   exists and is writable).
2. **Backstop** — every volume the readers read is recorded (:func:`record_input`); :func:`atomic_write`
   refuses to replace a recorded file even when a caller forgot rule 1. Files this process wrote itself (and
   that are unchanged since) are its own outputs, not recorded: reading a result back and re-running over it
   stays possible (rule 1 still refuses it as an explicit input).
3. **Writing** — :func:`atomic_write` / :func:`atomic_write_group`: write to a temporary file in the same
   folder, flush + ``fsync``, verify (size, header read back, small files in full), then ``os.replace`` (and
   ``fsync`` the folder). On any failure — including a full disk that ITK only reports on stderr — the
   temporary files are removed, the previous output is left byte-identical, and :class:`WriteError` is raised
   naming the path. Bad paths raise :class:`InputError` (CLI exit 2), write failures :class:`WriteError`
   (an ``MRISegAssistError``, CLI exit 1).
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from .errors import DamagedFileError, InputError, WriteError

PathLike = Union[str, os.PathLike]
Verifier = Callable[[Path], None]

#: Image formats the volume writer produces (single files: they can be renamed into place atomically).
WRITABLE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".gipl", ".gipl.gz")
#: Two-file formats (header + ``.raw``): readable, never written (two renames cannot replace both atomically).
TWO_FILE_SUFFIXES = (".mhd", ".nhdr")
#: Suffixes accepted per output kind by :func:`check_output_path` (``None``: any).
OUTPUT_KINDS: dict[str, Optional[tuple[str, ...]]] = {
    "volume": WRITABLE_SUFFIXES, "labelmap": WRITABLE_SUFFIXES, "json": (".json",), "png": (".png",),
    "csv": (".csv",), "any": None, "folder": None,
}


# ------------------------------------------------------------------------------------- read registry
@dataclass(frozen=True)
class _Identity:
    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int


_READ: dict[tuple[int, int], _Identity] = {}
_WRITTEN: set[tuple[int, int, int, int]] = set()  # (dev, ino, size, mtime_ns) of files this process wrote
_LOCK = threading.Lock()


def _identity(path: PathLike) -> Optional[_Identity]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _Identity(os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def record_input(path: PathLike) -> None:
    """Remember that this process read ``path`` as an input (called by the readers; folders: every file)."""
    if os.path.isdir(path):
        for entry in os.scandir(path):
            if entry.is_file():
                record_input(entry.path)
        return
    ident = _identity(path)
    if ident is not None:
        with _LOCK:
            if (ident.dev, ident.ino, ident.size, ident.mtime_ns) not in _WRITTEN:
                _READ[(ident.dev, ident.ino)] = ident


def was_read(path: PathLike) -> Optional[str]:
    """The recorded input that ``path`` is (same inode, unchanged size and time), or ``None``."""
    ident = _identity(path)
    if ident is None:
        return None
    with _LOCK:
        seen = _READ.get((ident.dev, ident.ino))
    if seen is None or (seen.size, seen.mtime_ns) != (ident.size, ident.mtime_ns):
        return None  # an inode number reused by a later file, or a file changed since it was read
    return seen.path


def _record_output(path: PathLike) -> None:
    ident = _identity(path)
    if ident is not None:
        with _LOCK:
            _WRITTEN.add((ident.dev, ident.ino, ident.size, ident.mtime_ns))
            _READ.pop((ident.dev, ident.ino), None)


def forget_inputs() -> None:
    """Forget every recorded input (a long-running server between studies; tests)."""
    with _LOCK:
        _READ.clear()


# ------------------------------------------------------------------------------------- path checks
def _label(path: Path, option: str) -> str:
    return f"{option} {path}" if option else str(path)


def refuse_two_file_format(path: PathLike, option: str = "") -> None:
    """:class:`InputError` for ``.mhd``/``.nhdr`` outputs (the early check and the writer agree on this)."""
    path = Path(path)
    if path.name.lower().endswith(TWO_FILE_SUFFIXES):
        raise InputError(f"{_label(path, option)}: two-file formats (.mhd + .raw, .nhdr + .raw) are not written "
                         f"(they cannot replace an existing output atomically); use .mha or .nrrd")


def check_output_path(path: PathLike, kind: str = "any", option: str = "") -> Path:
    """Early checks of one output path; returns the file that will be written (symbolic links followed).

    ``kind``: a key of :data:`OUTPUT_KINDS` (``"volume"``, ``"labelmap"``, ``"json"``, ``"png"``, ``"csv"``,
    ``"any"``, ``"folder"``) choosing the accepted suffixes; ``option`` (e.g. ``"-o"``) prefixes messages. Raises
    :class:`InputError` for an unsupported suffix (``.mhd``/``.nhdr`` included), an existing folder (a file
    for ``"folder"``), a missing or non-folder parent, a parent folder that is not writable, or an existing
    read-only file (or folder).
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    path = Path(os.path.expanduser(str(path)))
    label = _label(path, option)
    if not str(path).strip() or path.name in ("", ".", ".."):
        raise InputError(f"{label}: not a file name")
    target = Path(os.path.realpath(path)) if path.is_symlink() else Path(os.path.abspath(path))
    if kind == "folder":
        if target.exists() and not target.is_dir():
            raise InputError(f"{label}: is a file; give a folder (it is created when missing)")
        if target.is_dir():
            if not os.access(target, os.W_OK | os.X_OK):
                raise InputError(f"{label}: folder is not writable")
            return target
    elif target.is_dir():
        raise InputError(f"{label}: is a folder; give a file name")
    suffixes = OUTPUT_KINDS[kind]
    if suffixes is not None:
        refuse_two_file_format(path, option)
        if not path.name.lower().endswith(suffixes):
            raise InputError(f"{label}: unsupported output format; use one of {', '.join(suffixes)}")
    parent = target.parent
    if not parent.exists():
        raise InputError(f"{label}: output folder {parent} does not exist")
    if not parent.is_dir():
        raise InputError(f"{label}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{label}: output folder {parent} is not writable")
    if target.exists() and not os.access(target, os.W_OK):
        raise InputError(f"{label}: exists and is read-only; it is not replaced")
    return target


@dataclass(frozen=True)
class Output:
    """One output of a command: its path, what is written there (a key of :data:`OUTPUT_KINDS`) and the
    option that named it (for messages)."""

    path: Path
    kind: str = "any"
    option: str = ""

    def files(self) -> list[Path]:
        """Every file the writer creates: the path, plus the ``.labels.json`` sidecar of a label map."""
        path = Path(self.path)
        if self.kind == "labelmap" and not path.name.lower().endswith(".seg.nrrd"):
            from .labels import sidecar_path

            return [path, sidecar_path(path)]
        return [path]


@dataclass(frozen=True)
class _Input:
    shown: str
    real: str
    ident: Optional[_Identity]


def _input_files(path: Path) -> list[Path]:
    """An input file and the files read with it: a detached data file, a label map's sidecar."""
    from .integrity import inspect_volume_file
    from .labels import sidecar_path

    files = [path]
    try:
        info = inspect_volume_file(path)
    except InputError:
        info = None  # the reader reports a damaged header; here only the companions matter
    if info is not None:
        files += [f for f in info.files if f != path]
    side = sidecar_path(path)
    if side != path and side.exists():
        files.append(side)
    return files


def _inside(child: str, folder: str) -> bool:
    try:
        return os.path.commonpath([child, folder]) == folder
    except ValueError:  # different drives
        return False


def guard_outputs(outputs: Iterable[Union[Output, PathLike]], inputs: Iterable[Optional[PathLike]] = (),
                  case_folders: Iterable[Optional[PathLike]] = ()) -> list[Path]:
    """The output policy, run before computing; returns the resolved output paths in order.

    ``outputs``: :class:`Output` objects (or plain paths: kind ``"any"``). ``inputs``: every file or folder the
    command reads (``None`` entries are skipped; a folder counts as a case folder). ``case_folders``: folders
    being read as a case (``--case D``). Raises :class:`InputError` naming the output and the input it would
    replace (see the module docstring, rule 1).
    """
    outs = [o if isinstance(o, Output) else Output(Path(o)) for o in outputs]
    folders = [Path(f) for f in case_folders if f is not None]
    files: list[_Input] = []
    for item in inputs:
        if item is None:
            continue
        p = Path(item)
        if p.is_dir():
            folders.append(p)
            continue
        for f in _input_files(p):
            files.append(_Input(str(f), os.path.realpath(f), _identity(f)))
    real_folders = [(str(f), os.path.realpath(f)) for f in folders]
    claimed: dict[str, str] = {}
    result = []
    for out in outs:
        for f in out.files():
            label = _label(Path(f), out.option) if f == Path(out.path) else \
                f"{_label(Path(out.path), out.option)} (its {Path(f).name})"
            real = os.path.realpath(f)
            ident = _identity(f)
            for inp in files:
                if real == inp.real:
                    how = " through a symbolic link" if os.path.abspath(f) != real else ""
                    raise InputError(f"{label}: is the input {inp.shown}{how}; outputs never replace inputs, "
                                     f"choose another output path")
                if ident is not None and inp.ident is not None and (ident.dev, ident.ino) == (inp.ident.dev,
                                                                                            inp.ident.ino):
                    raise InputError(f"{label}: is a hard link to the input {inp.shown} (same file); outputs "
                                     f"never replace inputs, choose another output path")
            for shown, folder in real_folders:
                if real == folder:
                    raise InputError(f"{label}: is the case folder {shown} being read; write outputs "
                                     f"outside it")
                if _inside(real, folder):
                    raise InputError(f"{label}: lies inside the case folder {shown} being read; write outputs "
                                     f"outside the case folder")
            seen = was_read(f)
            if seen is not None:
                raise InputError(f"{label}: was read as an input ({seen}) in this session; outputs never "
                                 f"replace inputs")
            if real in claimed:
                raise InputError(f"{label}: is also the output {claimed[real]}; give each output its own file")
            claimed[real] = label
        result.append(check_output_path(out.path, out.kind, out.option))
    return result


def guard_output_folder(folder: PathLike, files: Iterable[Output] = (), inputs: Iterable[Optional[PathLike]] = (),
                        case_folders: Iterable[Optional[PathLike]] = (), option: str = "-o") -> list[Path]:
    """:func:`guard_outputs` for a command writing into a folder (``demo -o``, ``train --out``, ``synth -o``).

    The folder is checked first as an output itself (not an input, not a case folder being read nor inside one,
    not a file, parent writable), then created when missing, then ``files`` (:class:`Output` objects inside it)
    are checked; on a refusal a folder created here is removed again. Returns the folder, then the files.
    """
    inputs, case_folders = list(inputs), list(case_folders)
    [target] = guard_outputs([Output(Path(folder), "folder", option)], inputs, case_folders)
    created = not target.exists()
    target.mkdir(exist_ok=True)
    try:
        return [target] + guard_outputs(files, inputs, case_folders)
    except BaseException:
        if created:
            target.rmdir()
        raise


# ------------------------------------------------------------------------------------------ writing
def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _suffix(path: Path) -> str:
    from .volume import _suffix as volume_suffix

    return volume_suffix(path)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def _disk_note(folder: Path) -> str:
    try:
        st = os.statvfs(folder)
    except OSError:
        return ""
    free = st.f_bavail * st.f_frsize
    return f"; the disk is nearly full: {free:,} bytes free" if free < (1 << 20) else ""


def _write_failure(target: Path, exc: BaseException) -> WriteError:
    """The :class:`WriteError` for a failed or unverifiable write of ``target`` (names the disk when full)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on device"
    elif isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
    else:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        for prefix in (f"{target}: ", f"{target.name}: "):
            reason = reason[len(prefix):] if reason.startswith(prefix) else reason
        if isinstance(exc, DamagedFileError):
            reason = f"the written file is incomplete: {reason}"
    kept = "; the previous file is kept unchanged" if target.exists() else ""
    return WriteError(f"{target}: cannot write ({reason}{_disk_note(target.parent)}){kept}")


def _stage(target: Path, writer: Callable[[str], Any], verify: Optional[Verifier]) -> str:
    """Write and verify a temporary file beside ``target``; return its path (removed on failure)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{_suffix(target)}", dir=target.parent)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise InputError(f"{target}: output folder {target.parent} is not writable ({exc.strerror})") from None
        raise _write_failure(target, exc) from None
    os.close(fd)
    try:
        writer(tmp)
        _fsync_file(tmp)
        if verify is not None:
            verify(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, (OSError, RuntimeError, WriteError, DamagedFileError)):
            raise _write_failure(target, exc) from None
        raise  # InputError about the data, Cancelled, a caller's own exception: unchanged
    return tmp


def atomic_write_group(items: Sequence[tuple[PathLike, Callable[[str], Any], Optional[Verifier]]]) -> list[Path]:
    """Write several files that belong together (a label map and its sidecar) all-or-nothing.

    Each item is ``(path, writer, verify)``: ``writer(tmp_path)`` writes the temporary file (its name keeps the
    extension, so format-by-extension writers work); ``verify(tmp_path)`` raises when the file is incomplete.
    Every file is staged and verified before the first one is renamed into place; on failure nothing is
    replaced and no temporary file is left. Refuses (:class:`InputError`) bad paths and files read as inputs.
    """
    targets = []
    for path, _writer, _verify in items:
        target = check_output_path(path)
        seen = was_read(target)
        if seen is not None:
            raise InputError(f"{target}: refusing to overwrite {seen}: it was read as an input in this session "
                             f"(outputs never replace inputs)")
        targets.append(target)
    staged: list[str] = []
    try:
        for target, (_path, writer, verify) in zip(targets, items):
            staged.append(_stage(target, writer, verify))
        for tmp, target in zip(staged, targets):
            os.replace(tmp, target)
    except BaseException:
        for tmp in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    for folder in {t.parent for t in targets}:
        _fsync_dir(folder)
    for target in targets:
        _record_output(target)
    return targets


def atomic_write(path: PathLike, writer: Callable[[str], Any], verify: Optional[Verifier] = None) -> Path:
    """Call ``writer(tmp_path)`` on a temporary file beside ``path``, verify it, and rename it into place.

    See :func:`atomic_write_group`. Without ``verify`` the file is only flushed to disk (callers writing
    formats they can check should pass one: :func:`write_text` does).
    """
    return atomic_write_group([(path, writer, verify)])[0]


def write_text(path: PathLike, text: str) -> Path:
    """Write UTF-8 text atomically; the file is read back and compared before it replaces ``path``."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), text_verifier(data, Path(path).name))


def text_verifier(data: bytes, name: str) -> Verifier:
    """A verifier comparing a written file with the bytes meant for it."""
    def verify(tmp: Path) -> None:
        back = tmp.read_bytes()
        if back != data:
            raise WriteError(f"{name}: read back {len(back):,} bytes that differ from the {len(data):,} written")

    return verify


def verify_png(tmp: Path) -> None:
    """A verifier for PNG files: signature, every chunk's CRC and the image data stream read back in full."""
    from PIL import Image

    try:
        with Image.open(tmp) as image:
            image.verify()  # chunk CRCs up to the end
        with Image.open(tmp) as image:
            image.load()  # the compressed pixel stream decodes to the declared size
    except Exception as exc:  # noqa: BLE001 - PIL raises SyntaxError, OSError, ValueError for damaged files
        raise WriteError(f"{Path(tmp).name}: the written PNG does not read back ({exc})") from None


def write_json(path: PathLike, document: Any) -> Path:
    """Write a JSON document atomically (2-space indent), verified by reading it back."""
    return write_text(path, json.dumps(document, indent=2))
