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
  found in the public records available here: its sha256 is pinned on first use (below) and the architecture
  check on loading guards it.
* MONAI Model Zoo ``brats_mri_segmentation`` (SegResNet, BraTS 2018; Apache-2.0): the bundle's
  ``large_files.yml`` (``Project-MONAI/model-zoo``, ``models/brats_mri_segmentation``) gives the official URL of
  ``models/model.pt`` and its **md5** ``870e677b...``; MONAI publishes no sha256 or byte size for it. The
  SegResNet of the bundle's config has 4,702,227 parameters, i.e. 18.8 MB of float32, the size Hugging Face lists
  for ``MONAI/brats_mri_segmentation`` ``models/model.pt`` (version 0.5.3).
* Swin UNETR BraTS 2021, fold 1 (``Project-MONAI/research-contributions``, ``SwinUNETR/BRATS21``, Apache-2.0):
  a zip on the ``MONAI-extra-test-data`` 0.8.1 release holding ``model.pt`` (``{"epoch", "best_acc",
  "state_dict", ...}``); no checksum or size is published: pinned on first use. Only ``model.pt`` is read from
  the zip (by name, never by the archive's paths), into ``<zip stem>-model.pt`` beside it.

Hash pinning when nothing is published: the first verified copy's sha256 is written to ``<file>.sha256-pin``
(trust on first use); from then on the file must match it (a changed file is refused like a corrupted one;
delete the pin after checking a legitimately re-published file).
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import urllib.error
import urllib.request
import zipfile
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
    md5: Optional[str] = None  # when the publisher gives only an md5 (MONAI Model Zoo large_files.yml)
    member: Optional[str] = None  # the download is a zip: use its single member with this file name

    @property
    def verifiable(self) -> bool:
        return bool(self.sha256 or self.sha256_prefix or self.md5)

    def as_dict(self) -> dict:
        return {"name": self.name, "filename": self.filename, "url": self.url, "size": self.size,
                "sha256": self.sha256, "sha256_prefix": self.sha256_prefix, "md5": self.md5, "member": self.member,
                "licence": self.licence, "source": self.source,
                "approx_mb": self.approx_mb or (self.size and self.size >> 20)}


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
                source="no sha256 or exact size found in public records: sha256 pinned on first use", approx_mb=156),
    WeightsSpec("monai-brats-mri-segmentation", "model_brats_mri_segmentation.pt",
                "https://developer.download.nvidia.com/assets/Clara/monai/tutorials/model_zoo/"
                "model_brats_mri_segmentation.pt", None, None,
                "Apache-2.0 (MONAI Model Zoo bundle brats_mri_segmentation; trained on BraTS 2018: cite Menze et al. "
                "2015 and Bakas et al. 2017; the bundle calls it an example, not for diagnostic use)",
                md5="870e677b782a5184cbc48db1456b78e8", approx_mb=19,
                source="URL and md5 from the bundle's large_files.yml (Project-MONAI/model-zoo, "
                       "models/brats_mri_segmentation); no sha256 published: sha256 pinned on first use"),
    WeightsSpec("swinunetr-brats21-fold1", "fold1_f48_ep300_4gpu_dice0_9059.zip",
                "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                "fold1_f48_ep300_4gpu_dice0_9059.zip", None, None,
                "Apache-2.0 (Project-MONAI/research-contributions, SwinUNETR/BRATS21; trained on BraTS 2021: cite "
                "Baid et al. 2021, Menze et al. 2015, Bakas et al. 2017)", member="model.pt",
                source="URL from the SwinUNETR/BRATS21 README (fold 1, mean Dice 0.9059 on that fold's validation "
                       "split); no checksum or size published: sha256 pinned on first use"),
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


def _write_note(path: Path, digest: str, md5: str = "") -> None:
    stat = path.stat()
    try:
        _note_path(path).write_text(json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                                "sha256": digest, "md5": md5}))
    except OSError:
        pass  # a read-only weights folder: verify again next time


def _pin_path(path: Path, spec: WeightsSpec) -> Path:
    return path.parent / (spec.filename + ".sha256-pin")


def _digests(path: Path, progress: Optional[ProgressFn], cancel: Optional[CancelToken]) -> tuple[str, str]:
    """(sha256, md5) of a file in one pass (md5 only compared with a publisher's md5, never trusted alone)."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    total = max(path.stat().st_size, 1)
    done = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            sha.update(block)
            md5.update(block)
            done += len(block)
            if (done // CHUNK) % 64 == 0:
                check(cancel)
                report(progress, done / total, f"verifying {path.name}")
    return sha.hexdigest(), md5.hexdigest()


def verify_file(path: Path, spec: WeightsSpec, progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None) -> str:
    """Check ``path`` against ``spec``; returns ``"sha256"``, ``"sha256-prefix"``, ``"md5"``, ``"pinned"``
    (matches the sha256 recorded at first use), ``"pinned-now"`` (first use: sha256 recorded) or
    ``"unverified"`` (nothing published and the pin cannot be written).

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
    note = _read_note(path)
    if note and (not spec.md5 or note.get("md5")):
        digest, md5 = note["sha256"], note.get("md5", "")
    else:
        digest, md5 = _digests(path, progress, cancel)
    pin = _pin_path(path, spec)
    if spec.sha256 or spec.sha256_prefix:
        expected = spec.sha256 or spec.sha256_prefix
        ok = digest == spec.sha256 if spec.sha256 else digest.startswith(spec.sha256_prefix)
        if not ok:
            raise CheckpointError(f"checkpoint {path} is corrupted: sha256 {digest} does not match the published "
                                  f"{'sha256' if spec.sha256 else 'sha256 prefix'} {expected}; delete it and "
                                  f"download it again from {spec.url}")
        result = "sha256" if spec.sha256 else "sha256-prefix"
    elif spec.md5:
        if md5 != spec.md5:
            raise CheckpointError(f"checkpoint {path} is corrupted: md5 {md5} does not match the published md5 "
                                  f"{spec.md5}; delete it and download it again from {spec.url}")
        result = "md5"
    elif pin.is_file():
        pinned = pin.read_text().strip()
        if digest != pinned:
            raise CheckpointError(f"checkpoint {path} changed: sha256 {digest} differs from {pinned} recorded when "
                                  f"it was first used ({pin}); delete it and download it again from {spec.url} "
                                  f"(delete the pin only if the publisher re-released the file)")
        result = "pinned"
    else:
        result = "pinned-now"
    if spec.md5 or not (spec.sha256 or spec.sha256_prefix):  # nothing (or only md5) published: pin the sha256
        try:
            if not pin.is_file():
                pin.write_text(digest + "\n")
        except OSError:
            result = "unverified" if result == "pinned-now" else result  # read-only folder: nothing to pin
    if note is None or (spec.md5 and not note.get("md5")):
        _write_note(path, digest, md5)
    return result


# ------------------------------------------------------------------------------------------ zip members
def extracted_path(archive: Path, spec: WeightsSpec) -> Path:
    """Where the member of a zip download is kept: ``<zip stem>-<member>`` beside the archive."""
    return archive.with_name(f"{Path(spec.filename).stem}-{spec.member}")


MAX_MEMBER_BYTES = 8 << 30  # refuse absurd (zip-bomb) members


def extract_member(archive: Path, spec: WeightsSpec) -> Path:
    """The single member of ``archive`` named ``spec.member`` (by file name; the archive's paths are never used
    as output paths), written atomically to :func:`extracted_path`; reused while it is newer than the archive."""
    target = extracted_path(archive, spec)
    if target.is_file() and target.stat().st_mtime_ns >= archive.stat().st_mtime_ns and target.stat().st_size:
        return target
    try:
        with zipfile.ZipFile(archive) as zf:
            matches = [i for i in zf.infolist() if not i.is_dir() and Path(i.filename).name == spec.member]
            if len(matches) != 1:
                names = ", ".join(i.filename for i in zf.infolist()[:8])
                raise CheckpointError(f"{archive}: expected exactly one {spec.member!r} in the archive, found "
                                      f"{len(matches)} (contents: {names})")
            info = matches[0]
            if info.file_size > MAX_MEMBER_BYTES:
                raise CheckpointError(f"{archive}: member {info.filename} declares {info.file_size} bytes")
            tmp = target.with_name(target.name + ".tmp")
            with zf.open(info) as src, open(tmp, "wb") as dst:
                for block in iter(lambda: src.read(CHUNK), b""):
                    dst.write(block)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{archive}: cannot read the zip archive ({exc})") from None
    os.replace(tmp, target)
    return target


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
    found = _resolve(spec, name, path, cache_dir, download, progress, cancel)
    return extract_member(found, spec) if spec.member and path is None else found


def _resolve(spec: WeightsSpec, name: str, path, cache_dir, download: bool, progress, cancel) -> Path:
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
