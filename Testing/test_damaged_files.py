"""Damaged and oversized input files are refused with a message naming the file and the problem, before
anything reads them; copies of the shared data in a temporary folder, inputs' sha256 unchanged.

Formats: NIfTI (.nii, .nii.gz), NRRD (.nrrd raw/gzip, .nhdr + .raw), MetaImage (.mha raw/zlib, .mhd + .raw /
.zraw), GIPL (.gipl.gz). Also: the voxel-count limit on the header's size, float64 values beyond float32,
implausible spacing warnings, and no false alarm on any file of the shared data."""
from __future__ import annotations

import gzip
import os
import tracemalloc
import warnings

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DATA, data_path
from faults import copy, digests, flip_byte, gunzip_copy, truncate, zero_nifti_gz
from mrisegassist.errors import DamagedFileError, InputError, InputWarning, VolumeTooLargeError
from mrisegassist.integrity import (CHECKED_SUFFIXES, DEFAULT_MAX_VOXELS, MAX_VOXELS_ENV, inspect_volume_file,
                                    verify_volume_file)
from mrisegassist.labels import read_labelmap
from mrisegassist.volume import Volume, load_case, read_volume, write_volume

FLAIR = ("ms-lesjak", "patient07", "flair.nii.gz")          # float32 182x218x182: 28,884,128 bytes of voxels
LESIONS = ("ms-lesjak", "patient07", "lesions.nii.gz")      # uint8: 7,221,032 bytes
T1_GIPL = ("itksnap-mricrop", "t1.gipl.gz")                 # int16 78x110x64: 1,098,240 bytes
BRAIN_NRRD = ("radiomics-brain", "brain1_image.nrrd")       # int16 256x256x25 gzip: 3,276,800 bytes


def refused(path, message, error=DamagedFileError, **kwargs):
    """``read_volume(path)`` raises ``error`` matching ``message``; the file's sha256 is unchanged."""
    before = digests([path])
    with pytest.raises(error, match=message) as info:
        read_volume(path, **kwargs)
    assert digests([path]) == before
    return str(info.value)


def _compressed_size(header) -> int:
    """The ``CompressedDataSize`` a MetaImage header declares."""
    line = next(x for x in header.read_bytes().split(b"\n") if x.startswith(b"CompressedDataSize"))
    return int(line.split(b"=")[1])


# ------------------------------------------------------------------------------------------------ NIfTI
def test_nifti_gz_cut_in_half(tmp_path):
    path = copy(data_path(*FLAIR), tmp_path, "flair_half.nii.gz")
    truncate(path, 0.5)
    msg = refused(path, r"flair_half\.nii\.gz: gzip stream ends early after [\d,]+ of 28,884,480 decompressed "
                        r"bytes \(the file is truncated\)")
    assert str(tmp_path) in msg  # the CLI names the whole path
    with pytest.raises(DamagedFileError, match=r"flair \(flair_half.nii.gz\): gzip stream ends early"):
        load_case({"t1": data_path("ms-lesjak", "patient07", "t1.nii.gz"), "flair": path})
    labels = copy(data_path(*LESIONS), tmp_path, "lesions_cut.nii.gz")
    truncate(labels, 0.3)
    with pytest.raises(DamagedFileError, match=r"lesions_cut\.nii\.gz: gzip stream ends early"):
        read_labelmap(labels)


def test_nii_cut_in_half_names_both_byte_counts(tmp_path):
    path = gunzip_copy(data_path(*LESIONS), tmp_path / "lesions.nii")
    size = truncate(path, 0.5)
    refused(path, rf"lesions\.nii: truncated: expected 7,221,032 bytes of voxel data, found {size - 352:,}$",
            kind="label")
    assert read_volume(gunzip_copy(data_path(*LESIONS), tmp_path / "whole.nii"), kind="label").array.any()


def test_gzip_crc_field_and_flipped_data_byte(tmp_path):
    crc = copy(data_path(*LESIONS), tmp_path, "crc.nii.gz")
    flip_byte(crc, -8)  # the gzip trailer: CRC32 (4 bytes) then the length (4 bytes)
    refused(crc, r"crc\.nii\.gz: gzip CRC mismatch: the compressed voxel data are corrupted", kind="label")
    length = copy(data_path(*LESIONS), tmp_path, "length.nii.gz")
    flip_byte(length, -1)
    refused(length, r"length\.nii\.gz: gzip length check failed", kind="label")
    body = copy(data_path(*FLAIR), tmp_path, "body.nii.gz")
    flip_byte(body, os.path.getsize(body) // 2)  # inside the deflate data: a bad code or a CRC mismatch
    refused(body, r"body\.nii\.gz: gzip (CRC mismatch|stream is corrupted after [\d,]+ decompressed bytes)")


def test_garbage_and_header_only_nifti(tmp_path):
    head = tmp_path / "header_only.nii.gz"
    with gzip.open(data_path(*LESIONS)) as fh:
        head.write_bytes(gzip.compress(fh.read(352)))  # a complete gzip stream holding only the header
    refused(head, r"header_only\.nii\.gz: truncated: expected 7,221,032 bytes of voxel data, found 0 \(the gzip "
                  r"stream is complete but too short\)", kind="label")
    tiny = tmp_path / "tiny.nii"
    tiny.write_bytes(b"\x5c\x01\x00\x00" + b"\0" * 20)
    refused(tiny, r"tiny\.nii: cannot read as an image \(NIfTI header")


# ------------------------------------------------------------------------------------------------- NRRD
def test_nrrd_gzip_and_raw_truncated(tmp_path):
    gz = copy(data_path(*BRAIN_NRRD), tmp_path, "brain_cut.nrrd")
    truncate(gz, 0.6)
    refused(gz, r"brain_cut\.nrrd: gzip stream ends early after [\d,]+ of 3,276,800 decompressed bytes")
    image = read_volume(data_path(*BRAIN_NRRD))
    raw = write_volume(image, tmp_path / "raw.nrrd", compress=False)
    header = raw.read_bytes().index(b"\n\n") + 2
    truncate(raw, 0.5)
    found = os.path.getsize(raw) - header
    refused(raw, rf"raw\.nrrd: truncated: expected 6,553,600 bytes of voxel data, found {found:,}$")


def test_detached_nrrd_and_metaimage_data_files(tmp_path):
    image = sitk.ReadImage(str(data_path(*T1_GIPL)))
    sitk.WriteImage(image, str(tmp_path / "t1.nhdr"), False)     # t1.nhdr + t1.raw
    sitk.WriteImage(image, str(tmp_path / "t1gz.nhdr"), True)    # t1gz.nhdr + t1gz.raw.gz
    sitk.WriteImage(image, str(tmp_path / "t1.mhd"), False)      # t1.mhd + t1.raw (shared name with the NRRD)
    sitk.WriteImage(image, str(tmp_path / "t1z.mhd"), True)      # t1z.mhd + t1z.zraw
    for name in ("t1.nhdr", "t1gz.nhdr", "t1.mhd", "t1z.mhd"):  # complete files read as before
        assert read_volume(tmp_path / name).array.shape == (64, 110, 78)
    size = truncate(tmp_path / "t1.raw", 0.25)
    for header in ("t1.nhdr", "t1.mhd"):
        refused(tmp_path / header, rf"{header.replace('.', '[.]')}: truncated: expected 1,098,240 bytes of voxel "
                                   rf"data \(in t1\.raw\), found {size:,}")
    truncate(tmp_path / "t1gz.raw.gz", 0.5)
    refused(tmp_path / "t1gz.nhdr", r"t1gz\.nhdr: gzip stream ends early")
    size = truncate(tmp_path / "t1z.zraw", 0.5)
    refused(tmp_path / "t1z.mhd", rf"t1z\.mhd: truncated: expected {_compressed_size(tmp_path / 't1z.mhd'):,} bytes "
                                  rf"of compressed voxel data \(in t1z\.zraw\), found {size:,}")
    (tmp_path / "t1.raw").unlink()
    refused(tmp_path / "t1.nhdr", r"t1\.nhdr: (its data file t1\.raw is missing|cannot read as an image)")


# -------------------------------------------------------------------------------------------- MetaImage
def test_mha_compressed_and_raw_truncated(tmp_path):
    image = sitk.ReadImage(str(data_path(*T1_GIPL)))
    sitk.WriteImage(image, str(tmp_path / "z.mha"), True)
    sitk.WriteImage(image, str(tmp_path / "r.mha"), False)
    declared = _compressed_size(tmp_path / "z.mha")
    truncate(tmp_path / "z.mha", 0.5)
    refused(tmp_path / "z.mha", rf"z\.mha: truncated: expected {declared:,} bytes of compressed voxel data, found")
    truncate(tmp_path / "r.mha", 0.5)
    refused(tmp_path / "r.mha", r"r\.mha: truncated: expected 1,098,240 bytes of voxel data, found")


def test_gipl_gz_truncated(tmp_path):
    path = copy(data_path(*T1_GIPL), tmp_path, "t1_cut.gipl.gz")
    truncate(path, 0.5)
    refused(path, r"t1_cut\.gipl\.gz: gzip stream ends early after [\d,]+ of 1,098,496 decompressed bytes")


# ----------------------------------------------------------------------------------------- voxel limit
def test_512_cube_zero_volume_is_measured_by_its_header(tmp_path, monkeypatch):
    """A ~130 KB .nii.gz holding 512^3 voxels: refused under a lower limit before any voxel is decompressed;
    under the default limit its check decompresses in bounded chunks."""
    path = zero_nifti_gz(tmp_path / "zeros512.nii.gz")
    assert os.path.getsize(path) < 1_000_000
    before = digests([path])

    def no_read(*_args, **_kwargs):
        raise AssertionError("the volume was read despite the limit")

    monkeypatch.setattr(sitk, "ReadImage", no_read)
    message = (r"zeros512\.nii\.gz: header declares 134,217,728 voxels \(512x512x512 x 1 byte = 128 MB of voxel "
               r"data in a 0\.\d MB file\), over the limit of 16,777,216 voxels \(set MRISEGASSIST_MAX_VOXELS")
    with pytest.raises(VolumeTooLargeError, match=message):
        read_volume(path, max_voxels=256 ** 3)
    monkeypatch.setenv(MAX_VOXELS_ENV, str(256 ** 3))
    with pytest.raises(VolumeTooLargeError, match=message):
        read_volume(path)
    monkeypatch.delenv(MAX_VOXELS_ENV)
    assert DEFAULT_MAX_VOXELS >= 512 ** 3
    tracemalloc.start()
    try:
        info = verify_volume_file(path)  # default limit: accepted; the whole stream is checked
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.n_voxels == 512 ** 3 and info.expected_bytes == 512 ** 3
    assert peak < 64 * 2 ** 20, f"checking a 512^3 file held {peak / 2 ** 20:.0f} MB"
    assert digests([path]) == before


def test_absurd_header_refused_by_default(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((2048, 2048, 2048))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    path = tmp_path / "absurd.nii.gz"
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 1000))
    refused(path, r"absurd\.nii\.gz: header declares 8,589,934,592 voxels \(2048x2048x2048 x 4 bytes = 32,768 MB",
            error=VolumeTooLargeError)


# ------------------------------------------------------------------------------------ values, spacing
def test_float64_values_near_1e300_are_named(tmp_path):
    src = nib.load(str(data_path(*FLAIR)))
    data = np.asarray(src.dataobj, dtype=np.float64)
    data[90, 100, 80:84] = 1e300
    path = tmp_path / "flair_1e300.nii.gz"
    nib.save(nib.Nifti1Image(data, src.affine), str(path))
    msg = refused(path, r"flair_1e300\.nii\.gz: 4 voxels have values beyond the float32 range \(largest magnitude "
                        r"1e\+300", error=InputError)
    assert "NaN" not in msg
    with pytest.raises(InputError, match="beyond the float32 range"):
        load_case({"flair": path})


@pytest.mark.parametrize("spacing", [100.0, 0.01])
def test_implausible_spacing_warns_naming_the_file(tmp_path, spacing):
    vol = read_volume(data_path(*T1_GIPL))
    geometry = vol.geometry.__class__(vol.geometry.size, (1.0, 1.0, spacing), vol.geometry.origin)
    path = write_volume(Volume(vol.array, geometry), tmp_path / "odd_spacing.nrrd")
    with pytest.warns(InputWarning, match=rf"odd_spacing\.nrrd: implausible voxel spacing 1 x 1 x {spacing:g} mm"):
        read_volume(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_volume(data_path(*T1_GIPL))  # 1 mm: no warning


# ------------------------------------------------------------------------------------- no false alarm
def test_every_shared_volume_passes_and_matches_itk():
    """No false alarm: every volume file of the shared data passes, and its header's voxel count is ITK's."""
    files = sorted(p for p in DATA.rglob("*") if p.is_file() and p.name.lower().endswith(CHECKED_SUFFIXES))
    if not files:
        pytest.skip(f"real MRI not available: no volume files under {DATA}")
    for path in files:
        info = verify_volume_file(path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        assert info.n_voxels == int(np.prod(reader.GetSize())), path
        assert inspect_volume_file(path).files == (path,)
