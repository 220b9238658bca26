"""The output policy and verified writes, on copies of the shared data in a temporary folder.

* :func:`guard_outputs` refuses, before computing, an output that is an input (same path, ``..``, symbolic
  link, hard link), the sidecar of an input, a case folder or a file inside one, a file read earlier in this
  process, or another output; the backstop in the writers refuses to replace a file that was read.
* :func:`check_output_path` (the early check) and the writers agree: ``.mhd``/``.nhdr`` are refused by both.
* Writes are verified before they replace anything: a file ITK wrote incompletely without an exception, a
  failing sidecar, a full disk (a 1 MB tmpfs when this machine allows mounting) all leave the previous output
  byte-identical and no temporary file, and raise ``WriteError`` (CLI exit 1) naming the path.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import data_path
from faults import copy, digests, fill, remount_read_only, small_filesystem, truncate
from mrisegassist.errors import InputError, MRISegAssistError, WriteError
from mrisegassist.labels import LabelMap, MRICROP_LABELS, read_labelmap, sidecar_path, write_labelmap
from mrisegassist.outputs import (Output, atomic_write, check_output_path, forget_inputs, guard_outputs,
                                  was_read, write_json, write_text)
from mrisegassist.volume import read_volume, write_volume

LABELS_GIPL = ("itksnap-mricrop", "labels.gipl.gz")   # 78x110x64 uint8, 8 structures
FLAIR = ("ms-lesjak", "patient07", "flair.nii.gz")


@pytest.fixture(autouse=True)
def fresh_registry():
    forget_inputs()
    yield
    forget_inputs()


@pytest.fixture
def case(tmp_path):
    """A case folder with copies of real files, a label map with its sidecar, and an output folder."""
    folder = tmp_path / "case"
    folder.mkdir()
    flair = copy(data_path(*FLAIR), folder)
    out = tmp_path / "out"
    out.mkdir()
    made = write_labelmap(read_labelmap(data_path(*LABELS_GIPL), MRICROP_LABELS), out / "labels.nii.gz")
    labels = copy(made, folder)  # copies: files from elsewhere, not outputs of this process
    copy(sidecar_path(made), folder)
    made.unlink()
    sidecar_path(made).unlink()
    return {"folder": folder, "flair": flair, "labels": labels, "sidecar": sidecar_path(labels), "out": out}


def refused(outputs, inputs, message, case_folders=(), files=()):
    before = digests(files or [p for p in inputs if p is not None])
    with pytest.raises(InputError, match=message):
        guard_outputs(outputs, inputs, case_folders)
    assert digests(files or [p for p in inputs if p is not None]) == before


# ------------------------------------------------------------------------------------------- the policy
def test_output_equal_to_an_input_in_every_spelling(case, tmp_path):
    flair, folder = case["flair"], case["folder"]
    inputs = [flair, case["labels"]]
    refused([Output(flair, "labelmap", "-o")], inputs, rf"-o {flair}: is the input {flair}; outputs never")
    dotted = folder / ".." / "case" / "flair.nii.gz"
    refused([Output(dotted, "labelmap", "-o")], inputs, r"is the input .*flair\.nii\.gz; outputs never")
    link = case["out"] / "link.nii.gz"
    os.symlink(flair, link)
    refused([Output(link, "labelmap", "-o")], inputs, r"is the input .*flair\.nii\.gz through a symbolic link")
    hard = case["out"] / "hard.nii.gz"
    os.link(flair, hard)
    refused([Output(hard, "labelmap", "-o")], inputs, r"is a hard link to the input .*flair\.nii\.gz")
    # the label map's sidecar would replace an input's (a --labels JSON given as input)
    names = write_json(case["out"] / "seg.labels.json", {"labels": []})
    refused([Output(case["out"] / "seg.nii.gz", "labelmap", "-o")], [flair, names],
            r"-o .*seg\.nii\.gz \(its seg\.labels\.json\): is the input .*seg\.labels\.json")


def test_case_folders_and_duplicate_outputs(case):
    folder, out = case["folder"], case["out"]
    refused([Output(folder, "labelmap", "-o")], [], rf"-o {folder}: is the case folder {folder} being read",
            case_folders=[folder], files=[folder])
    refused([Output(folder / "new.nii.gz", "labelmap", "-o")], [case["flair"]],
            r"new\.nii\.gz: lies inside the case folder .* being read", case_folders=[folder], files=[folder])
    dicom_like = folder  # a folder given as an input counts as a case folder
    refused([Output(folder / "x.json", "json", "--boxes-out")], [dicom_like], r"--boxes-out .*x\.json: lies inside")
    refused([Output(out / "a.nii.gz", "labelmap", "-o"), Output(out / "a.nii.gz", "volume", "--probabilities")],
            [case["flair"]], r"--probabilities .*a\.nii\.gz: is also the output -o .*a\.nii\.gz")
    ok = guard_outputs([Output(out / "seg.nii.gz", "labelmap", "-o"), out / "report.json"],
                       [case["flair"], None], [folder])
    assert ok == [out / "seg.nii.gz", out / "report.json"]


def test_backstop_refuses_to_replace_a_file_read_in_this_process(case):
    flair = case["flair"]
    vol = read_volume(flair)
    assert was_read(flair) == str(flair)
    before = digests([flair])
    refused([Output(flair, "volume", "-o")], [], r"was read as an input .* in this session", files=[flair])
    with pytest.raises(InputError, match=r"refusing to overwrite .*flair\.nii\.gz: it was read as an input"):
        write_volume(vol.with_array(vol.array * 0), flair)
    labels = read_labelmap(case["labels"])
    with pytest.raises(InputError, match=r"labels\.nii\.gz: refusing to overwrite"):
        write_labelmap(labels, case["labels"])
    with pytest.raises(InputError, match=r"labels\.labels\.json: refusing to overwrite"):
        write_text(case["sidecar"], "{}")
    assert digests([flair]) == before
    forget_inputs()  # a server between studies: the same path may be written again
    assert was_read(flair) is None


def test_own_outputs_read_back_are_not_inputs(case):
    """A result this process wrote and then read back (to check it) may be replaced by a re-run; rule 1 still
    refuses it when it is given as an input of that re-run."""
    vol = read_volume(data_path(*LABELS_GIPL), kind="label")
    out = write_volume(vol, case["out"] / "seg.nrrd")
    read_volume(out, kind="label")
    assert was_read(out) is None
    write_volume(vol.with_array(vol.array * 0), out)
    with pytest.raises(InputError, match=r"is the input"):
        guard_outputs([Output(out, "volume", "-o")], [out])


# ----------------------------------------------------------------------------------- early path checks
def test_early_check_and_writer_agree_on_two_file_formats(case):
    vol = read_volume(data_path(*LABELS_GIPL), kind="label")
    for name in ("labels.mhd", "labels.nhdr"):
        with pytest.raises(InputError, match=r"two-file formats .* use \.mha or \.nrrd") as early:
            check_output_path(case["out"] / name, "labelmap", "-o")
        with pytest.raises(InputError, match=r"two-file formats") as late:
            write_volume(vol, case["out"] / name)
        assert str(late.value) in str(early.value).replace("-o ", "")
        with pytest.raises(InputError, match=r"two-file formats"):
            write_labelmap(LabelMap(vol), case["out"] / name)
    assert list(case["out"].iterdir()) == []
    with pytest.raises(InputError, match=r"unsupported output format; use one of \.nii, \.nii\.gz"):
        check_output_path(case["out"] / "x.png", "labelmap", "-o")


def test_early_check_of_folders_and_parents(case, tmp_path):
    out = case["out"]
    with pytest.raises(InputError, match=rf"-o {out}: is a folder; give a file name"):
        check_output_path(out, "any", "-o")
    with pytest.raises(InputError, match=r"output folder .*missing does not exist"):
        check_output_path(out / "missing" / "x.nii.gz", "volume")
    with pytest.raises(InputError, match=r"flair\.nii\.gz is not a folder"):
        check_output_path(case["flair"] / "x.nii.gz", "volume")
    assert check_output_path(out / "x.nii.gz", "volume") == out / "x.nii.gz"


def test_not_writable_folder(case):
    if os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not stop root (the read-only file system test covers it)")
    locked = case["out"] / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(InputError, match=r"output folder .*locked is not writable"):
            check_output_path(locked / "x.nii.gz", "volume")
    finally:
        locked.chmod(0o755)


def test_read_only_file_system(tmp_path):
    vol = read_volume(data_path(*LABELS_GIPL), kind="label")
    try:
        with small_filesystem(tmp_path / "ro", "1m") as mount:
            old = write_volume(vol, mount / "old.nrrd")
            before = digests([old])
            remount_read_only(mount)
            with pytest.raises(InputError, match=r"output folder .*ro is not writable"):
                check_output_path(mount / "x.nii.gz", "volume")
            with pytest.raises(InputError, match=r"is not writable"):
                write_volume(vol, old)
            assert digests([old]) == before
    except PermissionError as exc:
        pytest.skip(f"cannot mount a read-only file system here: {exc}")


# ---------------------------------------------------------------------------------- verified writes
def _silently_incomplete(fraction):
    """``sitk.WriteImage`` that writes, then loses the end of the file without an exception (what ITK does on a
    full disk for NIfTI and NRRD: it prints "wrote only N of M bytes" and returns)."""
    real = sitk.WriteImage

    def write(image, path, *args, **kwargs):
        real(image, path, *args, **kwargs)
        truncate(Path(path), fraction)

    return write


@pytest.mark.parametrize("name", ["labels.nii.gz", "labels.nii", "labels.nrrd", "labels.mha", "labels.seg.nrrd"])
def test_incomplete_write_keeps_the_previous_output(tmp_path, monkeypatch, name):
    labels = read_labelmap(data_path(*LABELS_GIPL), MRICROP_LABELS)
    old = write_labelmap(labels, tmp_path / name)
    before = digests([tmp_path])
    monkeypatch.setattr(sitk, "WriteImage", _silently_incomplete(0.5))
    changed = LabelMap(labels.volume.with_array((labels.volume.array > 0).astype(np.uint8)), labels.labels[:1])
    with pytest.raises(WriteError, match=rf"{old}: cannot write \(the written file is incomplete: .*(truncated|"
                                         rf"ends early).*\); the previous file is kept unchanged"):
        write_labelmap(changed, old)
    assert digests([tmp_path]) == before  # image and sidecar byte-identical, no temporary file left
    assert isinstance(WriteError("x"), MRISegAssistError) and not isinstance(WriteError("x"), InputError)


def test_verify_compares_small_files_in_full(tmp_path, monkeypatch):
    """A complete, well-formed file whose voxels differ from the data (a writer bug) is not accepted."""
    vol = read_volume(data_path(*LABELS_GIPL), kind="label")
    old = write_volume(vol, tmp_path / "labels.nrrd")
    before = digests([tmp_path])
    real = sitk.WriteImage

    def wrong(image, path, *args, **kwargs):
        real(sitk.Image(image.GetSize(), image.GetPixelID()) + 1, path, *args, **kwargs)

    monkeypatch.setattr(sitk, "WriteImage", wrong)
    with pytest.raises(WriteError, match=r"voxel values read back differ from those written"):
        write_volume(vol, old)
    assert digests([tmp_path]) == before


def test_sidecar_failure_keeps_both_files(case, monkeypatch):
    labels = read_labelmap(data_path(*LABELS_GIPL), MRICROP_LABELS)
    old = write_labelmap(labels, case["out"] / "seg.nii.gz")
    before = digests([case["out"]])
    real = Path.write_bytes

    def full_disk_for_json(self, data):
        if ".labels.json." in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk_for_json)
    renamed = LabelMap(labels.volume, [lab.__class__(lab.value, lab.name.upper()) for lab in labels.labels])
    with pytest.raises(WriteError, match=r"seg\.labels\.json: cannot write \(no space left on device"):
        write_labelmap(renamed, old)
    assert digests([case["out"]]) == before


def test_text_writer_verifies_and_keeps_other_exceptions(tmp_path):
    path = write_text(tmp_path / "notes.txt", "é" * 10)
    assert path.read_text(encoding="utf-8") == "é" * 10
    assert json.loads(write_json(tmp_path / "doc.json", {"a": [1, 2]}).read_text()) == {"a": [1, 2]}
    with pytest.raises(ZeroDivisionError):  # a caller's own exception passes through, nothing left behind
        atomic_write(tmp_path / "x.txt", lambda tmp: 1 / 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.json", "notes.txt"]


# ----------------------------------------------------------------------------------------- disk full
def test_disk_full_keeps_previous_outputs_byte_identical(tmp_path):
    """On a 1 MB tmpfs: ITK's silent NIfTI/NRRD failures, MetaImage's exception, the sidecar and plain text."""
    small = read_labelmap(data_path(*LABELS_GIPL), MRICROP_LABELS)
    big = read_volume(data_path(*FLAIR))  # 28 MB of float32 noise-like data: never fits
    try:
        with small_filesystem(tmp_path / "full", "1m") as mount:
            olds = [write_labelmap(small, mount / name) for name in ("a.nii.gz", "b.nrrd", "c.mha")]
            text = write_text(mount / "notes.txt", "previous")
            before = digests([mount])
            for old in olds:
                with pytest.raises(WriteError, match=rf"{old}: cannot write \(.*(no space left on device|"
                                                     rf"the disk is nearly full).*\); the previous file is kept"):
                    write_volume(big, old)
                assert digests([mount]) == before
            filler = fill(mount, leave=0)
            with pytest.raises(WriteError, match=r"notes\.txt: cannot write \(no space left on device"):
                write_text(text, "new text " * 100)
            with pytest.raises(WriteError, match=r"a\.(nii\.gz|labels\.json): cannot write"):
                write_labelmap(LabelMap(small.volume, small.labels[:2]), olds[0])
            filler.unlink()
            assert digests([mount]) == before
            assert sorted(p.name for p in mount.iterdir()) == sorted(Path(p).name for p in before)
    except PermissionError as exc:
        pytest.skip(f"cannot create a size-limited file system here: {exc}")
