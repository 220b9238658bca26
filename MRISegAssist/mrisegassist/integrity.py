"""Integrity of volume files before they are read: header, voxel-count limit, and every byte of voxel data.

ITK reads a truncated ``.nii``/``.nii.gz`` silently (missing slices become zeros) and writes one without an
exception when the disk is full, so files are checked here, before reading and after writing:

* **header**: NIfTI-1/2 through nibabel (on-disk type, shape and data offset, before any scaling); NRRD,
  MetaImage (``.mha``/``.mhd``) and GIPL through SimpleITK's header reader, plus the few layout fields it does
  not expose (encoding, detached data file, line/byte skip, ``ElementDataFile``, ``CompressedDataSize``).
* **voxel-count limit** on the header's (decompressed) size, before any voxel is decompressed
  (:func:`max_voxels_limit`: ``MRISEGASSIST_MAX_VOXELS`` or :data:`DEFAULT_MAX_VOXELS`).
* **voxel data**: raw data must hold ``prod(sizes) x bytes per voxel`` bytes after its offset; gzip (NIfTI
  ``.nii.gz``, NRRD ``gzip``, GIPL ``.gz``), zlib (MetaImage ``CompressedData``) and bzip2 (NRRD) streams are
  decompressed in bounded chunks (never held in memory) and must end properly, pass their CRC/length
  checks and hold the expected byte count.

Not checked: DICOM series, NRRD ``ascii``/``hex`` encodings, and multi-file data (NRRD ``data file: LIST``
or ``%d`` patterns, MetaImage ``LIST``); :attr:`VolumeFileInfo.data_checked` says so.
Messages name the file and what is wrong, e.g. ``"flair.nii: truncated: expected 28,901,376 bytes of voxel
data, found 14,450,688"`` or ``"flair.nii.gz: gzip stream ends early ..."``.
"""
from __future__ import annotations

import bz2
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from .errors import DamagedFileError, VolumeTooLargeError

PathLike = Union[str, os.PathLike]

#: Default limit on the number of voxel values (all components and time points) a header may declare:
#: 2**28 = 268,435,456 (a 512^3 volume has 134,217,728; 1 GiB as float32). ``MRISEGASSIST_MAX_VOXELS``
#: overrides it; so does the ``max_voxels`` argument of the readers.
DEFAULT_MAX_VOXELS = 2 ** 28
MAX_VOXELS_ENV = "MRISEGASSIST_MAX_VOXELS"
#: Suffixes this module checks (DICOM and unknown formats are left to the reader).
CHECKED_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl", ".gipl.gz")
_CHUNK = 1 << 20          # compressed bytes read at a time
_MAX_OUT = 1 << 24        # decompressed bytes produced at a time (bounds memory on highly compressed data)
_MAX_HEADER = 1 << 20     # NRRD / MetaImage text headers are small; more means it is not one


def max_voxels_limit(override: Optional[int] = None) -> int:
    """The voxel-count limit: ``override``, else ``$MRISEGASSIST_MAX_VOXELS``, else :data:`DEFAULT_MAX_VOXELS`."""
    if override is not None:
        return int(override)
    text = os.environ.get(MAX_VOXELS_ENV, "").strip().replace("_", "")
    if text:
        try:
            value = int(float(text))
        except ValueError:
            raise VolumeTooLargeError(f"{MAX_VOXELS_ENV}={text!r} is not a number of voxels") from None
        if value > 0:
            return value
    return DEFAULT_MAX_VOXELS


@dataclass(frozen=True)
class VolumeFileInfo:
    """What a volume file's header declares and where its voxel data lie.

    ``sizes`` are in file order (``(i, j, k[, t])``); ``components`` values per voxel (vector images);
    ``component_bytes`` bytes per value. ``data_file`` holds the voxel data (``path`` itself unless the
    header is detached: ``.nhdr``/``.mhd``) from byte ``data_offset`` (compressed: where the stream starts);
    ``encoding`` is ``raw``, ``gzip``, ``zlib``, ``bzip2``, ``ascii``/``hex``/``text`` or ``multi-file``.
    ``decompressed_skip`` bytes precede the voxels inside a compressed stream (NIfTI header, NRRD byte skip).
    """

    path: Path
    format: str
    sizes: tuple[int, ...]
    components: int
    component_bytes: int
    data_file: Optional[Path]
    encoding: str
    data_offset: int = 0
    decompressed_skip: int = 0
    data_at_end: bool = False
    compressed_size: Optional[int] = None

    @property
    def n_voxels(self) -> int:
        """Number of voxels (product of the sizes, all time points)."""
        n = 1
        for s in self.sizes:
            n *= int(s)
        return n

    @property
    def n_values(self) -> int:
        return self.n_voxels * self.components

    @property
    def expected_bytes(self) -> int:
        """Bytes of voxel data the header declares (decompressed)."""
        return self.n_values * self.component_bytes

    @property
    def data_checked(self) -> bool:
        """Whether :func:`check_voxel_data` can verify this layout."""
        return self.data_file is not None and self.encoding in ("raw", "gzip", "zlib", "bzip2")

    @property
    def files(self) -> tuple[Path, ...]:
        """The header file and (when separate) the data file."""
        if self.data_file is None or self.data_file == self.path:
            return (self.path,)
        return (self.path, self.data_file)

    def describe(self) -> str:
        """``"512x512x512 x 4 bytes"`` for messages."""
        dims = "x".join(str(s) for s in self.sizes)
        comp = f" x {self.components} components" if self.components > 1 else ""
        return f"{dims}{comp} x {self.component_bytes} byte{'s' if self.component_bytes != 1 else ''}"


# ------------------------------------------------------------------------------------------- headers
def _format_of(path: Path) -> Optional[str]:
    name = path.name.lower()
    for fmt, suffixes in (("nifti", (".nii", ".nii.gz")), ("nrrd", (".nrrd", ".nhdr")),
                          ("metaimage", (".mha", ".mhd")), ("gipl", (".gipl", ".gipl.gz"))):
        if name.endswith(suffixes):
            return fmt
    return None


def _clean(text: object) -> str:
    """The last line of a library message (the caller's prefix names the file)."""
    text = str(text).strip()
    return text.splitlines()[-1] if text else "unreadable"


def hide_folder(text: str, path: Path) -> str:
    """``text`` with the file's folder removed (the web server's temporary folders stay private)."""
    for form in {str(path), os.path.realpath(path)}:
        text = text.replace(form, path.name)
    return text


def _sitk_header(path: Path, name: str, fmt: str) -> tuple[tuple[int, ...], int, int]:
    """``(sizes, components, component bytes)`` from SimpleITK's header reader (no voxel is read)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DamagedFileError(f"{name}: cannot read as an image ({fmt} header: "
                               f"{hide_folder(_clean(exc), path)})") from None
    components = int(reader.GetNumberOfComponents())
    pixel = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), components) if components > 1 \
        else sitk.Image([1] * reader.GetDimension(), reader.GetPixelID())
    return tuple(int(s) for s in reader.GetSize()), components, int(pixel.GetSizeOfPixelComponent())


def _nifti_info(path: Path, name: str) -> VolumeFileInfo:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        header = img.header
        sizes = tuple(int(s) for s in header.get_data_shape())
        dtype = header.get_data_dtype()
        offset = int(img.dataobj.offset)
    except Exception as exc:  # nibabel raises many types (HeaderDataError, EOFError, zlib/gzip errors)
        raise DamagedFileError(f"{name}: cannot read as an image (NIfTI header: "
                               f"{hide_folder(_clean(exc), path)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DamagedFileError(f"{name}: is not a single-file NIfTI image ({type(img).__name__})")
    if any(s < 0 for s in sizes):
        raise DamagedFileError(f"{name}: NIfTI header has negative dimensions {sizes}")
    gz = path.name.lower().endswith(".gz")
    return VolumeFileInfo(path, "nifti", sizes, 1, int(dtype.itemsize), path, "gzip" if gz else "raw",
                          0 if gz else offset, offset if gz else 0)


def _text_header(path: Path, name: str, what: str, stop: Callable[[str], bool]) -> tuple[list[str], int]:
    """Lines of a text header up to (including) the line where ``stop(line)`` is true, and the byte offset after
    it; for a detached header without a stop line, the whole file."""
    lines, offset = [], 0
    with open(path, "rb") as fh:
        while offset < _MAX_HEADER:
            raw = fh.readline(_MAX_HEADER)
            if not raw:
                return lines, offset
            offset += len(raw)
            line = raw.decode("latin-1").rstrip("\r\n")
            lines.append(line)
            if stop(line):
                return lines, offset
    raise DamagedFileError(f"{name}: no end of the {what} header in the first {_MAX_HEADER:,} bytes")


def _int_field(fields: dict, key: str, name: str, default: Optional[int] = 0) -> Optional[int]:
    text = fields.get(key)
    if not text:
        return default
    try:
        return int(float(text))
    except ValueError:
        raise DamagedFileError(f"{name}: header field {key!r} is not a number: {text!r}") from None


def _skip_lines(path: Path, offset: int, count: int, name: str) -> int:
    with open(path, "rb") as fh:
        fh.seek(offset)
        for _ in range(count):
            raw = fh.readline()
            if not raw:
                raise DamagedFileError(f"{name}: truncated: the data file ends within its {count} skipped lines")
            offset += len(raw)
    return offset


def _nrrd_info(path: Path, name: str) -> VolumeFileInfo:
    sizes, components, comp_bytes = _sitk_header(path, name, "NRRD")
    lines, end = _text_header(path, name, "NRRD", lambda line: line.strip() == "")
    fields = {}
    for line in lines[1:]:
        if line.startswith("#") or ":=" in line or ": " not in line:
            continue  # comments, key:=value pairs (ITK metadata), the blank end line
        key, value = line.split(": ", 1)
        fields[key.strip().lower().replace(" ", "")] = value.strip()
    encoding = {"gz": "gzip", "bz2": "bzip2", "txt": "text"}.get(fields.get("encoding", "raw").lower(),
                                                                   fields.get("encoding", "raw").lower())
    line_skip = _int_field(fields, "lineskip", name)
    byte_skip = _int_field(fields, "byteskip", name)
    data_file: Optional[Path] = path
    offset = end
    spec = fields.get("datafile")
    if spec is not None:
        if spec.upper().startswith("LIST") or "%" in spec:
            data_file, encoding = None, "multi-file"
        else:
            data_file, offset = path.parent / spec, 0
    if data_file is not None and data_file.is_file() and line_skip:
        offset = _skip_lines(data_file, offset, line_skip, name)
    raw = encoding == "raw"
    return VolumeFileInfo(path, "nrrd", sizes, components, comp_bytes, data_file, encoding,
                          offset + (byte_skip if raw and byte_skip > 0 else 0),
                          byte_skip if not raw and byte_skip > 0 else 0, data_at_end=raw and byte_skip == -1)


def _metaimage_info(path: Path, name: str) -> VolumeFileInfo:
    sizes, components, comp_bytes = _sitk_header(path, name, "MetaImage")
    lines, end = _text_header(path, name, "MetaImage",
                              lambda line: line.split("=", 1)[0].strip().lower() == "elementdatafile")
    fields = {line.split("=", 1)[0].strip().lower(): line.split("=", 1)[1].strip() for line in lines if "=" in line}
    spec = fields.get("elementdatafile")
    if spec is None:
        raise DamagedFileError(f"{name}: MetaImage header has no ElementDataFile")
    compressed = fields.get("compresseddata", "false").lower() in ("true", "1")
    header_size = _int_field(fields, "headersize", name)
    comp_size = _int_field(fields, "compresseddatasize", name, None)
    if spec.upper() == "LOCAL":
        data_file, offset = path, end
    elif spec.upper().startswith("LIST") or "%" in spec or " " in spec:
        return VolumeFileInfo(path, "metaimage", sizes, components, comp_bytes, None, "multi-file")
    else:
        data_file, offset = path.parent / spec, 0
    if header_size > 0:
        offset += header_size
    return VolumeFileInfo(path, "metaimage", sizes, components, comp_bytes, data_file,
                          "zlib" if compressed else "raw", offset, data_at_end=header_size == -1 and not compressed,
                          compressed_size=comp_size if compressed else None)


def _gipl_info(path: Path, name: str) -> VolumeFileInfo:
    sizes, components, comp_bytes = _sitk_header(path, name, "GIPL")
    gz = path.name.lower().endswith(".gz")
    return VolumeFileInfo(path, "gipl", sizes, components, comp_bytes, path, "gzip" if gz else "raw",
                          0 if gz else 256, 256 if gz else 0)  # a 256-byte header, then the voxels


def inspect_volume_file(path: PathLike, name: Optional[str] = None) -> Optional[VolumeFileInfo]:
    """Parse the header of a NIfTI, NRRD, MetaImage or GIPL file; ``None`` for other formats (DICOM...).

    Reads no voxel data (a detached data file need not exist yet: :func:`check_voxel_data` reports it).
    Raises :class:`DamagedFileError` (an ``InputError``) naming ``name`` (default: the file name) when the
    header cannot be read.
    """
    path = Path(path)
    name = name or path.name
    fmt = _format_of(path)
    if fmt is None or not path.is_file():
        return None
    return {"nifti": _nifti_info, "nrrd": _nrrd_info, "metaimage": _metaimage_info, "gipl": _gipl_info}[fmt](path,
                                                                                                         name)


def check_voxel_limit(info: VolumeFileInfo, max_voxels: Optional[int] = None, name: Optional[str] = None) -> None:
    """Raise :class:`VolumeTooLargeError` when the header declares more values than the limit."""
    limit = max_voxels_limit(max_voxels)
    if info.n_values > limit:
        name = name or info.path.name
        size = os.path.getsize(info.path) + (os.path.getsize(info.data_file) if info.data_file not in (None, info.path)
                                             and info.data_file.is_file() else 0)
        raise VolumeTooLargeError(
            f"{name}: header declares {info.n_values:,} voxels ({info.describe()} = "
            f"{info.expected_bytes / 2 ** 20:,.0f} MB of voxel data in a {size / 2 ** 20:,.1f} MB file), over the "
            f"limit of {limit:,} voxels (set {MAX_VOXELS_ENV} to change it)")


# ---------------------------------------------------------------------------------------- voxel data
def _stream_length(fh, encoding: str, name: str, need: int) -> int:
    """Decompress the stream at ``fh``'s position in bounded chunks; return its decompressed length.

    Gzip and bzip2 may hold several concatenated members; bytes after the last one are ignored (as gzip does).
    Decompression stops once the stream holds ``need`` bytes plus a 64 MB margin (a stream far longer than its
    header says is not decompressed to its end: the readers ignore the excess too). Raises
    :class:`DamagedFileError` when a stream ends early, fails its CRC/length check or is corrupted.
    """
    def new():
        if encoding == "bzip2":
            return bz2.BZ2Decompressor()
        return zlib.decompressobj(31 if encoding == "gzip" else 47)  # 47: zlib or gzip, as MetaIO accepts

    what, enough = encoding, need + (1 << 26)
    dec, total, pending = new(), 0, b""
    while True:
        if not pending:
            pending = fh.read(_CHUNK)
            if not pending:
                break
        try:
            if encoding == "bzip2":
                out, pending = dec.decompress(pending, _MAX_OUT), b""
                while not dec.eof and not dec.needs_input:  # output was capped: drain the buffered input
                    total += len(out)
                    out = dec.decompress(b"", _MAX_OUT)
            else:
                out = dec.decompress(pending, _MAX_OUT)
                pending = dec.unconsumed_tail
        except (zlib.error, OSError, EOFError) as exc:
            text = str(exc)
            if "incorrect data check" in text:
                raise DamagedFileError(f"{name}: {what} CRC mismatch: the compressed voxel data are corrupted "
                                       f"(found after {total:,} decompressed bytes)") from None
            if "incorrect length check" in text:
                raise DamagedFileError(f"{name}: {what} length check failed: the compressed data are corrupted")
            raise DamagedFileError(f"{name}: {what} stream is corrupted after {total:,} decompressed bytes "
                                   f"({text.split(':')[-1].strip()})") from None
        total += len(out)
        if total >= enough:
            return total
        if dec.eof:
            rest = dec.unused_data + pending
            pending = b""
            if encoding == "zlib":
                return total
            rest = rest or fh.read(_CHUNK)
            magic = b"\x1f\x8b" if encoding == "gzip" else b"BZh"
            if not rest.startswith(magic):
                return total  # trailing bytes after the last member: ignored, as gzip/bzip2 do
            dec, pending = new(), rest
    raise DamagedFileError(f"{name}: {what} stream ends early after {total:,} of {need:,} decompressed bytes "
                           f"(the file is truncated)")


def check_voxel_data(info: VolumeFileInfo, name: Optional[str] = None) -> None:
    """Verify that the file holds every byte of voxel data its header declares (see the module docstring)."""
    if not info.data_checked:
        return
    name = name or info.path.name
    data = info.data_file
    assert data is not None
    expected = info.expected_bytes
    where = "" if data == info.path else f" (in {data.name})"
    if not data.is_file():
        raise DamagedFileError(f"{name}: its data file {data.name} is missing")
    size = os.path.getsize(data)
    if info.encoding == "raw":
        found = size if info.data_at_end else max(0, size - info.data_offset)
        if found < expected:
            raise DamagedFileError(f"{name}: truncated: expected {expected:,} bytes of voxel data{where}, "
                                   f"found {found:,}")
        return
    available = size - info.data_offset
    if info.compressed_size is not None and available < info.compressed_size:
        raise DamagedFileError(f"{name}: truncated: expected {info.compressed_size:,} bytes of compressed voxel "
                               f"data{where}, found {max(0, available):,}")
    need = info.decompressed_skip + expected
    with open(data, "rb") as fh:
        fh.seek(info.data_offset)
        total = _stream_length(fh, info.encoding, name, need)
    found = total - info.decompressed_skip
    if found < expected:
        raise DamagedFileError(f"{name}: truncated: expected {expected:,} bytes of voxel data{where}, found "
                               f"{max(0, found):,} (the {info.encoding} stream is complete but too short)")


def verify_volume_file(path: PathLike, name: Optional[str] = None,
                       max_voxels: Optional[int] = None) -> Optional[VolumeFileInfo]:
    """Header, voxel-count limit, then voxel data: the checks every reader runs before reading a file.

    Returns the header information (``None`` for formats not inspected). Raises :class:`VolumeTooLargeError`
    or :class:`DamagedFileError` (both ``InputError``) with a message naming ``name`` (default: file name).
    """
    info = inspect_volume_file(path, name)
    if info is None:
        return None
    check_voxel_limit(info, max_voxels, name)
    check_voxel_data(info, name)
    return info

