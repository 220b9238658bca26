"""Catalog of the official foundation-model checkpoints, resolution, verified resumable downloads, loading.

Where a checkpoint is looked for, in order (:func:`resolve_checkpoint`):

1. ``path`` given by the caller (a file: used as is, not hash-verified, since it may be the user's own
   fine-tuned weights; the architecture is checked when loaded);
2. every folder in ``$MRISEGASSIST_WEIGHTS`` (``os.pathsep``-separated), by the catalog file name;
3. the cache folder (``cache_dir``, default ``$XDG_CACHE_HOME/mrisegassist/weights`` =
   ``~/.cache/mrisegassist/weights``), by the catalog file name;
4. with ``download=True``: downloaded from the official URL into the cache folder.

Files found in 2-4 are verified against the catalog (size, and sha256 where known) before use; a verified
file gets a ``<file>.verified`` note (size, mtime, sha256) so the next run does not hash gigabytes again.
Downloads go to ``<file>.part`` with HTTP ``Range`` requests, so an interrupted or cancelled download resumes
where it stopped; the file is renamed into place only after verification. A download that fails verification
is deleted, never left in the cache as a valid file.

Facts in the catalog (looked up in public records, 2025):

* SAM ViT-B/L/H (Meta, Apache-2.0), ``https://dl.fbaipublicfiles.com/segment_anything/``. Meta publishes no
  checksum; the 6 hex digits in the file names are *not* a sha256 prefix (they do not match the sha256). The full
  sha256 and byte sizes are the values recorded identically by several independent public projects.
* SAM 2.1 Hiera T/S/B+/L (Meta, Apache-2.0), ``https://dl.fbaipublicfiles.com/segment_anything_2/092824/``.
  The sha256 equals the Git-LFS sha256 that Meta's Hugging Face repositories (``facebook/sam2.1-hiera-*``)
  publish for the same files; sizes from the same records.
* MedSAM2 (``MedSAM2_latest.pt``, Hugging Face ``wanglab/MedSAM2``; about 156 MB). The model repository is
  licensed **CC-BY-SA-4.0** (code on GitHub ``bowang-lab/MedSAM2`` is Apache-2.0). No sha256 or exact size was
  found in the public records available here: the file is accepted unverified (reported as such) and only the
  architecture check on loading guards it.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

from ..errors import Cancelled, CheckpointError, InputError
from ..progress import CancelToken, ProgressFn, check, report

WEIGHTS_ENV = "MRISEGASSIST_WEIGHTS"
CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightsSpec:
    """One catalog entry. ``sha256`` is the full digest, or ``None`` with ``sha256_prefix`` when only a
    prefix is published, or both ``None`` when nothing is published (file accepted unverified)."""

    name: str
    filename: str
    url: str
    size: Optional[int]
    sha256: Optional[str]
    licence: str
    sha256_prefix: Optional[str] = None
    source: str = ""
    approx_mb: Optional[int] = None

    @property
    def verifiable(self) -> bool:
        return bool(self.sha256 or self.sha256_prefix)

    def as_dict(self) -> dict:
        return {"name": self.name, "filename": self.filename, "url": self.url, "size": self.size,
                "sha256": self.sha256, "sha256_prefix": self.sha256_prefix, "licence": self.licence,
                "source": self.source, "approx_mb": self.approx_mb or (self.size and self.size >> 20)}


_SAM = "https://dl.fbaipublicfiles.com/segment_anything/"
_SAM2 = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
_SAM_SRC = "Meta publishes no checksum; sha256/size as recorded identically by several independent projects"
_SAM2_SRC = "sha256 = Git-LFS sha256 of the same file in Meta's Hugging Face repo facebook/{}"

CATALOG: dict[str, WeightsSpec] = {s.name: s for s in [
    WeightsSpec("sam-vit-b", "sam_vit_b_01ec64.pth", _SAM + "sam_vit_b_01ec64.pth", 375_042_383,
                "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", "Apache-2.0", source=_SAM_SRC),
    WeightsSpec("sam-vit-l", "sam_vit_l_0b3195.pth", _SAM + "sam_vit_l_0b3195.pth", 1_249_524_607,
                "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", "Apache-2.0", source=_SAM_SRC),
    WeightsSpec("sam-vit-h", "sam_vit_h_4b8939.pth", _SAM + "sam_vit_h_4b8939.pth", 2_564_550_879,
                "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", "Apache-2.0", source=_SAM_SRC),
    WeightsSpec("sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt", _SAM2 + "sam2.1_hiera_tiny.pt", 156_008_466,
                "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69", "Apache-2.0",
                source=_SAM2_SRC.format("sam2.1-hiera-tiny")),
    WeightsSpec("sam2.1-hiera-small", "sam2.1_hiera_small.pt", _SAM2 + "sam2.1_hiera_small.pt", 184_416_285,
                "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38", "Apache-2.0",
                source=_SAM2_SRC.format("sam2.1-hiera-small")),
    WeightsSpec("sam2.1-hiera-base-plus", "sam2.1_hiera_base_plus.pt", _SAM2 + "sam2.1_hiera_base_plus.pt",
                323_606_802, "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5", "Apache-2.0",
                source=_SAM2_SRC.format("sam2.1-hiera-base-plus")),
    WeightsSpec("sam2.1-hiera-large", "sam2.1_hiera_large.pt", _SAM2 + "sam2.1_hiera_large.pt", 898_083_611,
                "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318", "Apache-2.0",
                source=_SAM2_SRC.format("sam2.1-hiera-large")),
    WeightsSpec("medsam2", "MedSAM2_latest.pt",
                "https://huggingface.co/wanglab/MedSAM2/resolve/main/MedSAM2_latest.pt", None, None,
                "CC-BY-SA-4.0 (Hugging Face wanglab/MedSAM2 model licence)",
                source="no sha256 or exact size found in public records: accepted unverified", approx_mb=156),
]}


def catalog_entry(name: str, catalog: Optional[Mapping[str, WeightsSpec]] = None) -> WeightsSpec:
    """The catalog entry ``name``; :class:`InputError` listing the known names otherwise."""
    catalog = CATALOG if catalog is None else catalog
    spec = catalog.get(name)
    if spec is None:
        raise InputError(f"no checkpoint named {name!r} in the catalog; known: {', '.join(catalog)}")
    return spec


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mrisegassist/weights`` (default ``~/.cache/mrisegassist/weights``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mrisegassist" / "weights"


# ------------------------------------------------------------------------------------------ verification
def sha256_file(path: Path, progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> str:
    """Hex sha256 of a file, reading it in 1 MiB chunks (reports progress, checks ``cancel``)."""
    digest = hashlib.sha256()
    total = max(path.stat().st_size, 1)
    done = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
            done += len(block)
            if (done // CHUNK) % 64 == 0:
                check(cancel)
                report(progress, done / total, f"verifying {path.name}")
    return digest.hexdigest()


def _note_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _read_note(path: Path) -> Optional[dict]:
    try:
        note = json.loads(_note_path(path).read_text())
        stat = path.stat()
        if note.get("size") == stat.st_size and note.get("mtime_ns") == stat.st_mtime_ns:
            return note
    except (OSError, ValueError):
        pass
    return None


def _write_note(path: Path, digest: str) -> None:
    stat = path.stat()
    try:
        _note_path(path).write_text(json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                                "sha256": digest}))
    except OSError:
        pass  # a read-only weights folder: verify again next time


def verify_file(path: Path, spec: WeightsSpec, progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None) -> str:
    """Check ``path`` against ``spec``; returns ``"sha256"``, ``"sha256-prefix"`` or ``"unverified"``.

    Raises :class:`CheckpointError` for an empty, truncated, over-long or corrupted (hash mismatch) file.
    """
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); delete it and download it again "
                              f"from {spec.url}")
    if spec.size is not None and size < spec.size:
        raise CheckpointError(f"checkpoint {path} is truncated: {size} of {spec.size} bytes; delete it and "
                              f"download it again from {spec.url} (or resolve with download=True to resume)")
    if spec.size is not None and size > spec.size:
        raise CheckpointError(f"checkpoint {path} is corrupted: {size} bytes, expected {spec.size}; delete it "
                              f"and download it again from {spec.url}")
    if not spec.verifiable:
        return "unverified"
    note = _read_note(path)
    digest = note["sha256"] if note else sha256_file(path, progress, cancel)
    expected = spec.sha256 or spec.sha256_prefix
    ok = digest == spec.sha256 if spec.sha256 else digest.startswith(spec.sha256_prefix)
    if not ok:
        raise CheckpointError(f"checkpoint {path} is corrupted: sha256 {digest} does not match the published "
                              f"{'sha256' if spec.sha256 else 'sha256 prefix'} {expected}; delete it and "
                              f"download it again from {spec.url}")
    if note is None:
        _write_note(path, digest)
    return "sha256" if spec.sha256 else "sha256-prefix"


# ------------------------------------------------------------------------------------------- download
def _open_range(url: str, start: int, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": "mrisegassist"})
    if start > 0:
        request.add_header("Range", f"bytes={start}-")
    return urllib.request.urlopen(request, timeout=timeout)


def _fetch_once(spec: WeightsSpec, part: Path, progress: Optional[ProgressFn], cancel: Optional[CancelToken],
                timeout: float) -> None:
    """Append to ``part`` from its current size to the end of the file (restart if the server ignores Range)."""
    start = part.stat().st_size if part.exists() else 0
    if spec.size is not None and start >= spec.size:
        if start > spec.size:
            part.unlink()
            start = 0
        else:
            return
    try:
        response = _open_range(spec.url, start, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start > 0:  # the part already holds the whole file (size unknown)
            return
        raise
    with response:
        status = getattr(response, "status", 200)
        if start > 0 and status != 206:
            start = 0  # server ignored the Range header: restart from scratch
        elif start > 0:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {start}-"):
                raise CheckpointError(f"download of {spec.url}: server answered range {content_range!r} "
                                      f"to a request from byte {start}")
        length = response.headers.get("Content-Length")
        total = spec.size or (start + int(length) if length is not None else None)
        done = start
        with open(part, "ab" if start > 0 else "wb") as out:
            while True:
                check(cancel)
                block = response.read(CHUNK)
                if not block:
                    break
                out.write(block)
                done += len(block)
                if total:
                    report(progress, min(done / total, 1.0), f"downloading {spec.filename}: "
                                                             f"{done >> 20} / {total >> 20} MiB")
    if total is not None and done < total:
        raise ConnectionError(f"transfer ended after {done} of {total} bytes")


def download_checkpoint(spec: WeightsSpec, cache_dir: Optional[Union[str, Path]] = None,
             progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
             retries: int = 3, timeout: float = 60.0) -> Path:
    """Download ``spec`` into ``cache_dir`` (resuming ``<file>.part``), verify, rename into place.

    Transient network failures are retried ``retries`` times, each resuming where the last stopped.
    Raises :class:`Cancelled` (the ``.part`` file is kept so the next call resumes) or
    :class:`CheckpointError` (network failure after the retries; verification failure, the file deleted).
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    final, part = folder / spec.filename, folder / (spec.filename + ".part")
    last: Optional[BaseException] = None
    for _attempt in range(retries + 1):
        try:
            _fetch_once(spec, part, progress, cancel, timeout)
            last = None
            break
        except Cancelled:
            raise
        except urllib.error.HTTPError as exc:
            raise CheckpointError(f"download of {spec.name} from {spec.url} failed: HTTP {exc.code} {exc.reason}"
                                  ) from None
        except (ConnectionError, http.client.HTTPException, urllib.error.URLError, socket.timeout,
                TimeoutError) as exc:
            last = exc
    if last is not None:
        have = part.stat().st_size if part.exists() else 0
        raise CheckpointError(f"download of {spec.name} from {spec.url} failed after {retries + 1} attempts "
                              f"({type(last).__name__}: {last}); {have} bytes kept in {part}, run again to "
                              f"resume") from None
    try:
        verify_file(part, spec, progress, cancel)
    except CheckpointError as exc:
        part.unlink(missing_ok=True)
        _note_path(part).unlink(missing_ok=True)
        raise CheckpointError(f"downloaded {spec.filename} failed verification and was deleted: {exc}") from None
    os.replace(part, final)  # keeps the mtime, so the verification note stays valid
    if _note_path(part).exists():
        os.replace(_note_path(part), _note_path(final))
    report(progress, 1.0, f"{spec.filename} ready")
    return final


# ------------------------------------------------------------------------------------------ resolution
def _search_folders(cache_dir: Optional[Union[str, Path]]) -> list[Path]:
    folders = [Path(p).expanduser() for p in os.environ.get(WEIGHTS_ENV, "").split(os.pathsep) if p]
    folders.append(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    return folders


def resolve_checkpoint(name: str, path: Optional[Union[str, Path]] = None,
                       cache_dir: Optional[Union[str, Path]] = None, download: bool = False,
                       progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None, *,
                       catalog: Optional[Mapping[str, WeightsSpec]] = None) -> Path:
    """Path of a verified checkpoint file for catalog entry ``name`` (see the module docstring for the order).

    Raises :class:`CheckpointError` when it is missing (naming the URL and where to put the file), corrupted
    or truncated (a truncated file in the cache is resumed when ``download=True``).
    """
    spec = catalog_entry(name, catalog)
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} for {name!r} does not exist")
        if path.stat().st_size == 0:
            raise CheckpointError(f"checkpoint {path} for {name!r} is empty (0 bytes)")
        return path
    folders = _search_folders(cache_dir)
    cache = folders[-1]
    for folder in folders:
        candidate = folder / spec.filename
        if not candidate.is_file():
            continue
        if folder == cache and spec.size is not None and 0 < candidate.stat().st_size < spec.size:
            part = cache / (spec.filename + ".part")
            os.replace(candidate, part)  # truncated: keep it as a partial download, never as valid
            if download:
                break
            raise CheckpointError(f"checkpoint {candidate} is truncated: {part.stat().st_size} of {spec.size} "
                                  f"bytes; kept as {part.name} so that a download (download=True) resumes it")
        try:
            verify_file(candidate, spec, progress, cancel)
        except CheckpointError as exc:
            if folder != cache:
                raise
            bad = candidate.with_name(candidate.name + ".corrupt")
            os.replace(candidate, bad)  # never left in the cache as a valid file
            _note_path(candidate).unlink(missing_ok=True)
            if not download:
                raise CheckpointError(f"{exc} (moved aside to {bad})") from None
            break
        return candidate
    if download:
        return download_checkpoint(spec, cache, progress, cancel)
    where = "\n".join(f"  {f / spec.filename}" for f in folders)
    raise CheckpointError(f"checkpoint {spec.filename} for {name!r} was not found. Download it from {spec.url} "
                          f"(licence: {spec.licence}) and put it at one of:\n{where}\n(or set ${WEIGHTS_ENV} to "
                          f"its folder, pass its path, or allow the download, e.g. --download)")


# --------------------------------------------------------------------------------------------- loading
def load_state_dict(path: Union[str, Path]) -> dict:
    """``torch.load(path, weights_only=True)``, unwrapping SAM 2's ``{"model": state_dict}`` layout.

    Raises :class:`CheckpointError` for unreadable / non-PyTorch files and files holding no state dict.
    """
    import torch

    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        raise CheckpointError(f"checkpoint {path} cannot be read as PyTorch weights "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                              f"it may be truncated or corrupted") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict of tensors (got {type(obj).__name__})")
    return dict(obj)


def _examples(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_into(model, state_dict: Mapping, what: str, source: Union[str, Path] = "checkpoint") -> None:
    """Load ``state_dict`` into ``model`` strictly; :class:`CheckpointError` naming every kind of mismatch
    (missing keys, unexpected keys, shape mismatches) when the checkpoint is for another architecture."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_examples(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_examples(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches ({_examples(shapes)})")
    if problems:
        raise CheckpointError(f"{source} does not fit the {what} architecture: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)
