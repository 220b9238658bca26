"""Volumes with geometry: reading (integrity-checked), validation, resampling onto a reference grid, verified
atomic writing.

Conventions
-----------
* ``Volume.array`` is indexed ``[k, j, i]`` (z, y, x), as ``SimpleITK.GetArrayFromImage`` returns it.
* ``Geometry.size`` and ``Geometry.spacing`` are in ``(i, j, k)`` order (ITK order).
* ``Geometry.origin`` is the LPS position (mm) of the centre of voxel ``(0, 0, 0)``; ``Geometry.direction``
  is the 3x3 ITK direction matrix, row-major; its columns are the i, j, k axes in LPS.
* ``ijk_to_lps`` / ``ijk_to_ras`` are 4x4 homogeneous matrices mapping voxel indices to millimetres.

Safety: every file is checked by :mod:`mrisegassist.integrity` before it is read (truncation, compressed
stream CRC, voxel-count limit) and recorded as an input (:func:`mrisegassist.outputs.record_input`);
:func:`write_volume` writes through :func:`mrisegassist.outputs.atomic_write` and verifies the file it wrote.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .errors import InputError, InputWarning, VolumeTooLargeError, WriteError
from .integrity import hide_folder, max_voxels_limit, verify_volume_file
from .outputs import WRITABLE_SUFFIXES, atomic_write, record_input, refuse_two_file_format

PathLike = Union[str, os.PathLike]
READABLE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl", ".gipl.gz", ".dcm")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Voxel spacings (mm) outside this open range give an :class:`InputWarning` (likely a wrong header unit).
PLAUSIBLE_SPACING_MM = (0.05, 20.0)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a 3D volume (ITK conventions, see module docstring)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(int(s) for s in image.GetSize()), tuple(float(s) for s in image.GetSpacing()),
                   tuple(float(o) for o in image.GetOrigin()), tuple(float(d) for d in image.GetDirection()))

    @classmethod
    def from_ijk_to_ras(cls, matrix: np.ndarray, size: Sequence[int]) -> "Geometry":
        """Geometry from a 4x4 IJK->RAS matrix (Slicer's convention) and an ``(i, j, k)`` size."""
        lps = LPS_TO_RAS @ np.asarray(matrix, dtype=float)
        axes = lps[:3, :3]
        spacing = np.linalg.norm(axes, axis=0)
        if np.any(spacing <= 0):
            raise InputError("IJK-to-RAS matrix has a zero-length axis")
        return cls(tuple(int(s) for s in size), tuple(float(s) for s in spacing),
                   tuple(float(o) for o in lps[:3, 3]), tuple(float(d) for d in (axes / spacing).ravel()))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(k, j, i)``."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def ijk_to_lps(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix * np.asarray(self.spacing)[None, :]
        m[:3, 3] = self.origin
        return m

    @property
    def ijk_to_ras(self) -> np.ndarray:
        return LPS_TO_RAS @ self.ijk_to_lps

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set this geometry on ``image`` (whose size must match) and return it."""
        if tuple(image.GetSize()) != self.size:
            raise InputError(f"array size {image.GetSize()} does not match geometry size {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def corners_lps(self) -> np.ndarray:
        """``(8, 3)`` LPS positions of the outer corners of the grid (voxel edges, not centres)."""
        lo, hi = -0.5, np.asarray(self.size, dtype=float) - 0.5
        idx = np.array([[x, y, z] for x in (lo, hi[0]) for y in (lo, hi[1]) for z in (lo, hi[2])])
        return (self.ijk_to_lps @ np.c_[idx, np.ones(8)].T).T[:, :3]

    def lps_to_continuous_ijk(self, points: np.ndarray) -> np.ndarray:
        """``(N, 3)`` LPS points -> ``(N, 3)`` continuous ``(i, j, k)`` indices."""
        inv = np.linalg.inv(self.ijk_to_lps)
        pts = np.atleast_2d(np.asarray(points, dtype=float))
        return (inv @ np.c_[pts, np.ones(len(pts))].T).T[:, :3]

    def overlaps(self, other: "Geometry") -> bool:
        """True when the physical boxes of the two grids intersect (checked in this grid's index space)."""
        idx = self.lps_to_continuous_ijk(other.corners_lps())
        lo, hi = idx.min(axis=0), idx.max(axis=0)
        return bool(np.all(hi > -0.5) and np.all(lo < np.asarray(self.size) - 0.5))

    def subgrid(self, lo_ijk: Sequence[int], size_ijk: Sequence[int]) -> "Geometry":
        """The grid of the box starting at voxel ``lo_ijk`` with ``size_ijk`` voxels (``(i, j, k)`` order);
        the matching array is ``array[k0:k0+nk, j0:j0+nj, i0:i0+ni]``."""
        lo = np.asarray(lo_ijk, dtype=float)
        origin = (self.ijk_to_lps @ np.array([*lo, 1.0]))[:3]
        return Geometry(tuple(int(s) for s in size_ijk), self.spacing, tuple(float(o) for o in origin),
                        self.direction)

    def to_dict(self) -> dict:
        """JSON-friendly form (lists); inverse of :meth:`from_dict`."""
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Geometry":
        try:
            return cls(tuple(int(v) for v in data["size"]), tuple(float(v) for v in data["spacing"]),
                       tuple(float(v) for v in data["origin"]),
                       tuple(float(v) for v in data.get("direction", cls.direction)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"bad geometry description {dict(data)!r}: {exc}") from None

    def same_as(self, other: "Geometry", atol: float = 1e-4) -> bool:
        return (self.size == other.size and np.allclose(self.spacing, other.spacing, atol=atol)
                and np.allclose(self.origin, other.origin, atol=atol)
                and np.allclose(self.direction, other.direction, atol=atol))


@dataclass
class Volume:
    """A 3D scalar volume: ``array[k, j, i]`` with its :class:`Geometry`. ``name`` is for messages."""

    array: np.ndarray
    geometry: Geometry
    name: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise InputError(f"{self.label}: expected a 3D array, got shape {self.array.shape}")
        if tuple(self.array.shape) != self.geometry.shape:
            raise InputError(f"{self.label}: array shape {self.array.shape} does not match geometry "
                             f"(k, j, i) = {self.geometry.shape}")

    @property
    def label(self) -> str:
        return self.name or "volume"

    @classmethod
    def from_sitk(cls, image: sitk.Image, name: str = "") -> "Volume":
        return cls(sitk.GetArrayFromImage(image), Geometry.from_sitk(image), name)

    def to_sitk(self) -> sitk.Image:
        return self.geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(self.array)))

    def with_array(self, array: np.ndarray, name: Optional[str] = None) -> "Volume":
        """A new volume on the same grid (``array`` must have the same shape)."""
        return Volume(array, self.geometry, self.name if name is None else name)


def fingerprint(*arrays: np.ndarray) -> str:
    """sha256 of the arrays' shapes, dtypes and voxels."""
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.shape}{a.dtype.str}".encode())
        digest.update(memoryview(a).cast("B") if a.size else b"")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- reading
def _is_dicom_dir(path: Path) -> bool:
    return path.is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def read_image(path: Path, series_id: Optional[str] = None, name: Optional[str] = None,
               max_voxels: Optional[int] = None) -> sitk.Image:
    """A SimpleITK image from a file or DICOM series folder, read after the integrity checks
    (:func:`mrisegassist.integrity.verify_volume_file`); every file read is recorded as an input.

    Messages name ``name`` when given (the path stays private: the web server's upload folder), else the path.
    """
    path = Path(path)
    shown = name or str(path)
    if not path.exists():
        raise InputError(f"{shown}: no such file or folder")
    try:
        if path.is_dir():
            ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
            if not ids:
                raise InputError(f"{shown}: folder holds no DICOM series")
            if series_id is None and len(ids) > 1:
                raise InputError(f"{shown}: folder holds {len(ids)} DICOM series ({', '.join(ids)}); "
                                 f"pass one series folder or a series id")
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series_id or ids[0])
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            image = reader.Execute()
            read = list(files)
        else:
            info = verify_volume_file(path, name=shown, max_voxels=max_voxels)
            image = sitk.ReadImage(str(path))
            read = list(info.files) if info is not None else [path]
    except InputError:
        raise
    except RuntimeError as exc:  # SimpleITK reports every I/O failure as RuntimeError
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{shown}: cannot read as an image ({first if name is None else hide_folder(first, path)})") \
            from None
    for f in read:
        record_input(f)
    return image


def warn_implausible_spacing(geometry: "Geometry", name: str) -> Optional[str]:
    """Issue an :class:`InputWarning` (and return its text) when a spacing lies outside
    :data:`PLAUSIBLE_SPACING_MM`; volumes in ml would then be wrong by orders of magnitude."""
    lo, hi = PLAUSIBLE_SPACING_MM
    if all(lo < s < hi for s in geometry.spacing):
        return None
    text = (f"{name}: implausible voxel spacing {' x '.join(f'{s:g}' for s in geometry.spacing)} mm (expected "
            f"{lo:g}-{hi:g} mm); check the header's units: volumes in ml and distances in mm use it")
    warnings.warn(text, InputWarning, stacklevel=3)
    return text


def validate_array(array: np.ndarray, name: str, kind: str = "image") -> None:
    """Raise :class:`InputError` for 4D/2D data, NaN/inf, or (``kind='image'``) an empty/constant image."""
    if array.ndim != 3:
        raise InputError(f"{name}: expected a 3D volume, got {array.ndim}D data of shape {array.shape}"
                         + (" (4D / multi-component input: pass one 3D volume per sequence)"
                            if array.ndim > 3 else ""))
    if array.size == 0 or min(array.shape) < 1:
        raise InputError(f"{name}: volume is empty (shape {array.shape})")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise InputError(f"{name}: {bad} voxels are NaN or infinite")
    if kind == "image" and np.issubdtype(array.dtype, np.floating) and array.dtype.itemsize > 4:
        big = np.abs(array) > _FLOAT32_MAX
        if big.any():
            raise InputError(f"{name}: {int(np.count_nonzero(big))} voxels have values beyond the float32 range "
                             f"(largest magnitude {float(np.abs(array).max()):.3g}; float32 holds up to "
                             f"{_FLOAT32_MAX:.3g}, the engine computes in float32): rescale the image")
    if kind == "image":
        if np.all(array == array.flat[0]):
            raise InputError(f"{name}: volume is empty (every voxel is {array.flat[0]})")
    elif kind == "label":
        if not (np.issubdtype(array.dtype, np.integer) or np.all(array == np.round(array))):
            raise InputError(f"{name}: label map has non-integer values")
        if array.min() < 0:
            raise InputError(f"{name}: label map has negative values")
        if array.max() > np.iinfo(np.int32).max:
            raise InputError(f"{name}: label values up to {float(array.max()):.3g} are too large for a label map")


def _nifti_nonfinite(path: Path) -> int:
    """Number of NaN/inf voxels in a floating-point NIfTI file (ITK's NIfTI reader turns them into 0)."""
    try:
        import nibabel as nib

        img = nib.load(str(path))
        if img.get_data_dtype().kind != "f":
            return 0
        return int(np.count_nonzero(~np.isfinite(np.asanyarray(img.dataobj))))
    except Exception:  # nibabel missing or cannot parse: SimpleITK read the file, keep its result
        return 0


def read_volume(path: PathLike, kind: str = "image", name: Optional[str] = None,
                series_id: Optional[str] = None, check_nan: bool = True,
                max_voxels: Optional[int] = None) -> Volume:
    """Read a 3D volume (NIfTI, NRRD, MHA/MHD, GIPL, or a DICOM series folder), keeping its geometry.

    ``kind`` is ``"image"`` (float32 array; constant volumes rejected) or ``"label"`` (integer array).
    Before reading, the file's header and every byte of voxel data are checked
    (:func:`mrisegassist.integrity.verify_volume_file`: truncation, gzip CRC, and the voxel-count limit
    ``max_voxels``, default ``$MRISEGASSIST_MAX_VOXELS`` or 2**28). Raises :class:`InputError` (or its
    subclasses ``DamagedFileError`` / ``VolumeTooLargeError``) with a specific message for missing, damaged
    or unreadable files, 4D or 2D data, multi-component pixels, NaN/inf, values beyond float32 and empty
    volumes; warns (:class:`InputWarning`) on implausible spacing. ITK silently reads NaN voxels of NIfTI
    files as 0, so floating-point NIfTI files are also checked with nibabel (``check_nan=False`` skips that
    second read, ~0.5 s for a 240x240x155 float32 file). Every file read is recorded as an input.
    """
    path = Path(path)
    label = name or path.name
    image = read_image(path, series_id, label if name else None, max_voxels)
    if path.is_dir():
        check_voxel_limit_of(image, label, max_voxels)
    if check_nan and path.name.lower().endswith((".nii", ".nii.gz")) and \
            image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        bad = _nifti_nonfinite(path)
        if bad:
            raise InputError(f"{label}: {bad} voxels are NaN or infinite")
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise InputError(f"{label}: has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                         f"(4D or vector image); pass one 3D scalar volume per sequence")
    if image.GetDimension() == 4:
        if image.GetSize()[3] != 1:
            raise InputError(f"{label}: is 4D with {image.GetSize()[3]} time points; pass one 3D volume")
        image = sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])
    if image.GetDimension() != 3:
        raise InputError(f"{label}: expected a 3D volume, got a {image.GetDimension()}D image")
    array = sitk.GetArrayFromImage(image)
    validate_array(array, label, kind)
    if kind == "label":
        array = array.astype(np.int32 if array.max() > 255 else np.uint8, copy=False)
    else:
        array = array.astype(np.float32, copy=False)
    volume = Volume(array, Geometry.from_sitk(image), label)
    warn_implausible_spacing(volume.geometry, label)
    volume.metadata = {k: image.GetMetaData(k) for k in image.GetMetaDataKeys()}
    volume.metadata["source_pixel_type"] = image.GetPixelIDTypeAsString()
    volume.metadata["source_path"] = str(path)
    return volume


def check_voxel_limit_of(image: sitk.Image, name: str, max_voxels: Optional[int] = None) -> None:
    """The voxel-count limit for an image read without a file header check (a DICOM series)."""
    n = int(np.prod(image.GetSize())) * image.GetNumberOfComponentsPerPixel()
    limit = max_voxels_limit(max_voxels)
    if n > limit:
        raise VolumeTooLargeError(f"{name}: {n:,} voxels, over the limit of {limit:,} voxels")


# ------------------------------------------------------------------------------------------ resampling
_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor,
                  "bspline": sitk.sitkBSpline, "label": sitk.sitkLabelGaussian}


def as_transform(transform: Union[None, PathLike, sitk.Transform], name: str = "") -> Optional[sitk.Transform]:
    """A SimpleITK transform from a transform object or an ITK transform file (``.txt``, ``.tfm``, ``.h5``)."""
    if transform is None or isinstance(transform, sitk.Transform):
        return transform
    path = Path(transform)
    if not path.is_file():
        raise InputError(f"{name + ': ' if name else ''}transform file {path} does not exist")
    try:
        return sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise InputError(f"{name + ': ' if name else ''}cannot read {path} as an ITK transform ({last})") from None


def _overlaps_through(moving: Geometry, reference: Geometry, transform: sitk.Transform) -> bool:
    """True when the reference grid, mapped through ``transform`` (reference -> moving points), meets ``moving``."""
    corners = reference.corners_lps()
    centre = corners.mean(axis=0, keepdims=True)
    points = np.array([transform.TransformPoint(p.tolist()) for p in np.vstack([corners, centre])])
    idx = moving.lps_to_continuous_ijk(points)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    return bool(np.all(hi > -0.5) and np.all(lo < np.asarray(moving.size) - 0.5))


def resample_to(volume: Volume, geometry: Geometry, interpolation: str = "linear", default: float = 0.0,
                transform: Union[None, PathLike, sitk.Transform] = None) -> Volume:
    """Resample ``volume`` onto ``geometry``. Returns a new volume; the input is never modified.

    ``transform`` (a SimpleITK transform or an ITK transform file) maps physical points of the reference
    grid to points of ``volume`` (ITK's resampling convention: what a registration with the reference as
    fixed image and ``volume`` as moving image returns); default: identity. ``interpolation`` is ``linear``,
    ``nearest`` (label maps), ``bspline`` or ``label`` (label Gaussian). Raises :class:`InputError` when the
    two grids do not overlap in physical space.
    """
    if interpolation not in _INTERPOLATORS:
        raise InputError(f"unknown interpolation {interpolation!r}; use one of {', '.join(_INTERPOLATORS)}")
    tx = as_transform(transform, volume.label)
    if tx is None and volume.geometry.same_as(geometry, atol=1e-6):
        return Volume(volume.array.copy(), geometry, volume.name)
    overlaps = _overlaps_through(volume.geometry, geometry, tx) if tx is not None else geometry.overlaps(volume.geometry)
    if not overlaps:
        raise InputError(f"{volume.label}: does not overlap the reference grid in physical space "
                         f"(check that the sequences belong to the same study and are co-registered)")
    reference = geometry.apply_to(sitk.Image(list(geometry.size), sitk.sitkUInt8))
    moving = volume.to_sitk()
    out = sitk.Resample(moving, reference, tx if tx is not None else sitk.Transform(), _INTERPOLATORS[interpolation],
                        float(default), moving.GetPixelID())
    return Volume(sitk.GetArrayFromImage(out), geometry, volume.name)


# ----------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """Several sequences of one patient on one grid: ``images[name]`` is ``[k, j, i]`` float32."""

    images: dict[str, np.ndarray]
    geometry: Geometry
    reference: str
    sources: dict[str, str] = field(default_factory=dict)
    #: sequences that were resampled (different grid or a co-registration transform)
    resampled: list[str] = field(default_factory=list)

    def stack(self, names: Sequence[str]) -> np.ndarray:
        """``(C, k, j, i)`` float32 array of the named sequences, in order."""
        missing = [n for n in names if n not in self.images]
        if missing:
            raise InputError(f"missing sequence(s) {', '.join(missing)}; have {', '.join(self.images)}")
        return np.stack([self.images[n] for n in names]).astype(np.float32, copy=False)

    def volume(self, name: str) -> Volume:
        return Volume(self.images[name], self.geometry, name)


def load_case(inputs: Mapping[str, Union[PathLike, Volume]], reference: Optional[str] = None,
              transforms: Optional[Mapping[str, Union[PathLike, sitk.Transform]]] = None,
              interpolation: str = "linear") -> Case:
    """Read sequences (name -> path or :class:`Volume`) and resample all onto the ``reference`` one.

    ``reference`` defaults to the first sequence. ``transforms`` optionally co-registers sequences:
    name -> SimpleITK transform or ITK transform file mapping reference-grid points to that sequence's
    points (e.g. ``ms-longitudinal``'s ``study1_T1W_intrastudy_to_FLAIR.txt`` with FLAIR as reference);
    sequences without one are resampled with the identity (same scanner space). Every input is read and
    checked before anything is resampled; inputs are never modified.
    """
    if not inputs:
        raise InputError("no input sequences given")
    names = list(inputs)
    reference = reference or names[0]
    if reference not in inputs:
        raise InputError(f"reference sequence {reference!r} is not among the inputs ({', '.join(names)})")
    transforms = dict(transforms or {})
    unknown = [n for n in transforms if n not in inputs]
    if unknown:
        raise InputError(f"transform(s) given for unknown sequence(s) {', '.join(unknown)}; inputs are "
                         f"{', '.join(names)}")
    if transforms.get(reference) is not None:
        raise InputError(f"the reference sequence {reference!r} defines the grid; it takes no transform")
    txs = {n: as_transform(t, n) for n, t in transforms.items()}
    volumes = {n: (v if isinstance(v, Volume) else read_volume(v, name=f"{n} ({Path(v).name})"))
               for n, v in inputs.items()}
    for n, v in volumes.items():
        validate_array(v.array, n, "image")
    geometry = volumes[reference].geometry
    images, resampled = {}, []
    for n, v in volumes.items():
        out = resample_to(v, geometry, interpolation, transform=txs.get(n))
        if n != reference and (txs.get(n) is not None or not v.geometry.same_as(geometry, atol=1e-6)):
            resampled.append(n)
        images[n] = out.array.astype(np.float32, copy=False)
    sources = {n: str(p) for n, p in inputs.items() if not isinstance(p, Volume)}
    return Case(images, geometry, reference, sources, resampled)


# ---------------------------------------------------------------------------------------------- writing
def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in (".seg.nrrd", ".nii.gz", ".gipl.gz") + READABLE_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix


def verify_written_volume(image: sitk.Image, name: str) -> Callable[[Path], None]:
    """A verifier for :func:`~mrisegassist.outputs.atomic_write`: the written file's voxel data are complete
    (integrity check: byte count, compressed stream and CRC), its header (size, components, spacing) matches
    ``image``, and files up to :data:`FULL_READBACK_MAX_BYTES` of voxel data are read back in full and compared."""
    size = tuple(int(s) for s in image.GetSize())

    def verify(tmp: Path) -> None:
        info = verify_volume_file(tmp, name=name, max_voxels=2 ** 62)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(tmp))
        reader.ReadImageInformation()
        if tuple(reader.GetSize()) != size or reader.GetNumberOfComponents() != image.GetNumberOfComponentsPerPixel():
            raise WriteError(f"{name}: header read back declares size {reader.GetSize()}, wrote {size}")
        if not np.allclose(reader.GetSpacing(), image.GetSpacing(), rtol=1e-5):
            raise WriteError(f"{name}: header read back has spacing {reader.GetSpacing()}, wrote {image.GetSpacing()}")
        if info is not None and info.expected_bytes <= FULL_READBACK_MAX_BYTES:
            back = reader.Execute()  # keep the image alive while its array view is compared
            if not np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image)):
                raise WriteError(f"{name}: voxel values read back differ from those written")

    return verify


#: Written files with at most this many bytes of voxel data are read back in full and compared.
FULL_READBACK_MAX_BYTES = 64 * 2 ** 20


def write_volume(volume: Volume, path: PathLike, metadata: Optional[Mapping[str, str]] = None,
                 compress: bool = True) -> Path:
    """Write ``volume`` with its geometry, atomically and verified. ``metadata`` becomes NRRD/MHA header keys.

    Formats: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.seg.nrrd``), MetaImage (``.mha``), GIPL.
    Two-file formats (``.nhdr``, ``.mhd``) are refused (:class:`InputError`): they cannot be renamed into place
    atomically. The temporary file is checked (:func:`verify_written_volume`) before it replaces ``path``; on
    any failure (a full disk included) nothing is left behind, an existing file at ``path`` is untouched, and
    :class:`~mrisegassist.errors.WriteError` is raised. Refuses to replace a file read as an input.
    """
    path = Path(path)
    refuse_two_file_format(path)
    if not path.name.lower().endswith(WRITABLE_SUFFIXES):
        raise InputError(f"{path.name}: cannot write this format; use one of {', '.join(WRITABLE_SUFFIXES)}")
    return atomic_write(path, *volume_writer(volume, path, metadata, compress))


def volume_writer(volume: Volume, path: Path, metadata: Optional[Mapping[str, str]] = None,
                  compress: bool = True) -> tuple[Callable[[str], None], Callable[[Path], None]]:
    """``(writer, verify)`` for :func:`~mrisegassist.outputs.atomic_write` / ``atomic_write_group``."""
    image = volume.to_sitk()
    for key, value in (metadata or {}).items():
        image.SetMetaData(key, str(value))

    def write(tmp: str) -> None:
        sitk.WriteImage(image, tmp, compress)  # RuntimeError -> WriteError naming the path (outputs._stage)

    return write, verify_written_volume(image, path.name)
