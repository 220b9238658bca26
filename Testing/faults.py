"""Fault-injection helpers for the data-safety tests: damaged copies of real files, digests, a small
size-limited file system. Files are always copies in a temporary folder; the shared data is never touched."""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def digests(paths: Iterable[Path]) -> dict[str, str]:
    """``{path: sha256}`` of every existing file (folders: every file inside, recursively)."""
    out = {}
    for p in map(Path, paths):
        for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else []):
            out[str(f)] = sha256(f)
    return out


def copy(src: Path, folder: Path, name: str = "") -> Path:
    dst = Path(folder) / (name or Path(src).name)
    shutil.copyfile(src, dst)
    return dst


def truncate(path: Path, fraction: float = 0.5) -> int:
    """Cut ``path`` to ``fraction`` of its size; returns the new size."""
    size = int(os.path.getsize(path) * fraction)
    with open(path, "r+b") as fh:
        fh.truncate(size)
    return size


def flip_byte(path: Path, offset: int) -> None:
    """Invert the bits of one byte (negative offsets count from the end)."""
    with open(path, "r+b") as fh:
        fh.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
        pos = fh.tell()
        byte = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([byte[0] ^ 0xFF]))


def gunzip_copy(src: Path, dst: Path) -> Path:
    with gzip.open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    return dst


def zero_nifti_gz(path: Path, n: int = 512, dtype=np.uint8) -> Path:
    """An ``n^3`` all-zero NIfTI-1 ``.nii.gz`` written in streamed chunks (never ``n^3`` bytes in memory)."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((n, n, n))
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    header.set_sform(np.eye(4), code=1)
    slab = np.zeros((n, n), dtype=dtype).tobytes()
    with gzip.open(path, "wb", compresslevel=6) as fh:
        fh.write(header.binaryblock + b"\0\0\0\0")
        for _ in range(n):
            fh.write(slab)
    return path


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str = "1m", read_only: bool = False) -> Iterator[Path]:
    """Mount a size-limited tmpfs at ``folder`` (needs the right to mount: root or CAP_SYS_ADMIN).

    Raises :class:`PermissionError` with the exact reason when the mount is refused; unmounts on exit.
    """
    folder.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise PermissionError(f"cannot run mount: {exc}") from None
    if done.returncode != 0:
        raise PermissionError(f"mount -t tmpfs -o {opts} refused: {(done.stderr or done.stdout).strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True, timeout=30)


def remount_read_only(folder: Path) -> None:
    done = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise PermissionError(f"remount read-only refused: {done.stderr.strip()}")


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system holding ``folder`` until at most ``leave`` bytes are free (a filler file)."""
    filler = Path(folder) / ".filler"
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    block = st.f_frsize
    want = max(0, (free - leave) // block * block)
    with open(filler, "ab") as fh:
        try:
            fh.write(b"\0" * want)
            fh.flush()
        except OSError:
            pass
    return filler


def limit_inodes(folder: Path, free: int = 1) -> None:
    """Remount the tmpfs at ``folder`` so that only ``free`` more files can be created (then creating one fails
    with ENOSPC, "No space left on device", as on a full disk): a full disk at an exact point of a write."""
    st = os.statvfs(folder)
    used = st.f_files - st.f_ffree
    done = subprocess.run(["mount", "-o", f"remount,nr_inodes={used + free}", str(folder)], capture_output=True,
                          text=True, timeout=30)
    if done.returncode != 0:
        raise PermissionError(f"remount nr_inodes refused: {done.stderr.strip()}")
