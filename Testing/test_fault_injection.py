"""Fault injection as a new user meets it (issue 14): the command line run as a subprocess
(``python -m mrisegassist ...``), the service API in-process, a real ``mrisegassist server`` and the browser
front end's application, on copies of the shared data in a temporary folder.

For every case: the exit status (0 ok, 1 failure, 2 bad input; ``mrisegassist --help``), the message (one line
naming the file and the problem, no traceback), every input byte-identical (sha256), and on failure every
pre-existing output byte-identical with nothing new left behind (no partial output, no temporary file, no
created folder). Full-disk cases run on a small tmpfs (root or CAP_SYS_ADMIN) and skip with the mount's own
reason elsewhere.

Data: ITK-SNAP's T1 crop with 8 expert structures (78x110x64, GIPL; also as NIfTI/NRRD/MHA copies) for the
weights-free classical engine, and a 160x160x16 crop of BraTS 2013 pat0001 (FLAIR, T1c, expert labels) for the
shipped glioma U-Net.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

from conftest import DATA, data_path
from faults import copy, fill, flip_byte, gunzip_copy, limit_inodes, remount_read_only, sha256, small_filesystem, \
    truncate

import mrisegassist
from mrisegassist.errors import InputError, InputWarning, WriteError
from mrisegassist.labels import MRICROP_LABELS, read_labelmap, write_labelmap
from mrisegassist.outputs import Output, guard_output_folder
from mrisegassist.prompt.base import Box2D, ObjectPrompt
from mrisegassist.volume import Geometry, Volume, read_volume, write_volume

PACKAGE_ROOT = Path(mrisegassist.__file__).resolve().parents[1]
BOX = "30,20,30,50,70"                      # k=30, i 20..50, j 30..70 on the 78x110x64 T1 (the ventricles)
GLIOMA = ("--model", "glioma-2d", "-i", "flair=flair.nii.gz", "-i", "t1c=t1c.nii.gz")


# ------------------------------------------------------------------------------------------------ helpers
@dataclass
class Run:
    rc: int
    out: str
    err: str


def cli(*argv, cwd: Path, env: Optional[dict] = None, timeout: float = 600) -> Run:
    """``python -m mrisegassist ARGV`` in ``cwd``, importing this checkout, as a user would run it."""
    environ = {**os.environ, "MRISEGASSIST_DATA": str(DATA), **(env or {})}
    environ["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    environ.pop("MRISEGASSIST_TRACEBACK", None)
    done = subprocess.run([sys.executable, "-m", "mrisegassist", *map(str, argv)], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=timeout)
    return Run(done.returncode, done.stdout, done.stderr)


def snapshot(*folders: Path) -> dict[str, str]:
    """Every path under ``folders``: sha256 of files (through links), ``<dir>`` for folders."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            out[str(p)] = "<dir>" if p.is_dir() else sha256(p) if p.exists() else f"<link {os.readlink(p)}>"
    return out


def assert_message(run: Run, rc: int, message: str) -> None:
    """Exit status ``rc``; ``message`` (a regex) on stderr; no traceback, no internal error."""
    assert run.rc == rc, f"exit {run.rc}, expected {rc}\n{run.err[-3000:]}"
    assert re.search(message, run.err), f"{message!r} not in:\n{run.err[-3000:]}"
    assert "Traceback" not in run.err and "internal error" not in run.err, run.err[-3000:]


def one_line(run: Run, prefix: str, pattern: str) -> str:
    """The single stderr line ``prefix: ...`` matching ``pattern`` (progress bars use carriage returns)."""
    lines = [x for x in re.split(r"[\r\n]", run.err) if x.startswith(prefix) and re.search(pattern, x)]
    assert len(lines) == 1, run.err[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Copies of real data (never the shared files themselves) and a previous output ``prev.nii.gz``."""
    import SimpleITK as sitk

    folder = tmp_path_factory.mktemp("source")
    mricrop = data_path("itksnap-mricrop")
    copy(mricrop / "t1.gipl.gz", folder)
    copy(mricrop / "labels.gipl.gz", folder)
    write_volume(read_volume(folder / "t1.gipl.gz"), folder / "t1.nii.gz")
    brats = data_path("brats2013-deepmedic", "pat0001")
    (folder / "case").mkdir()
    for name in ("flair", "t1c", "labels"):  # 160x160x16 through the tumour (slices 56..71)
        image = sitk.ReadImage(str(brats / f"{name}.nii.gz"))[40:200, 50:210, 56:72]
        sitk.WriteImage(image, str(folder / f"{name}.nii.gz"), True)
        shutil.copyfile(folder / f"{name}.nii.gz", folder / "case" / f"{name}.nii.gz")
    previous = read_labelmap(folder / "labels.gipl.gz", MRICROP_LABELS)
    write_labelmap(previous, folder / "prev.nii.gz")  # + prev.labels.json: a result of an earlier run
    return folder


@pytest.fixture
def work(source, tmp_path) -> Path:
    folder = tmp_path / "work"
    shutil.copytree(source, folder, symlinks=True)
    return folder


def _cut(src: str, dst: str, fraction: float = 0.5) -> Callable[[Path], None]:
    def make(w: Path) -> None:
        truncate(copy(w / src, w, dst), fraction)
    return make


def _gunzip_cut(w: Path) -> None:
    truncate(gunzip_copy(w / "flair.nii.gz", w / "flair.nii"), 0.5)


def _crc(w: Path) -> None:
    flip_byte(copy(w / "t1.nii.gz", w, "crc.nii.gz"), -8)  # the gzip trailer's CRC32


def _cut_nrrd(w: Path) -> None:
    truncate(write_volume(read_volume(w / "t1.gipl.gz"), w / "cut.nrrd", compress=False), 0.5)


def _cut_mha(w: Path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.ReadImage(str(w / "labels.gipl.gz")), str(w / "mask.mha"), True)
    truncate(w / "mask.mha", 0.5)


def _garbage(w: Path) -> None:
    (w / "bad.nii.gz").write_bytes(np.random.default_rng(14).bytes(6000))


def _symlink(w: Path) -> None:
    os.symlink("t1.nii.gz", w / "link.nii.gz")


def _float64_1e300(w: Path) -> None:
    import nibabel as nib

    src = nib.load(str(w / "t1.nii.gz"))
    data = np.asarray(src.dataobj, dtype=np.float64)
    data[30, 50, 20:23] = 1e300
    nib.save(nib.Nifti1Image(data, src.affine), str(w / "huge.nii.gz"))


def _configs(w: Path) -> None:
    (w / "bad.json").write_text('{"epochs": 2,, }')
    (w / "list.json").write_text('[{"epochs": 2}]')


@dataclass(frozen=True)
class Case:
    """One command that must be refused: ``argv`` run in a copy of the data, exit ``rc``, ``message`` on stderr."""

    id: str
    argv: tuple
    message: str
    rc: int = 2
    setup: Optional[Callable[[Path], None]] = None
    env: dict = field(default_factory=dict)


REFUSED = [
    # ---- outputs never touch inputs (issue item 1)
    Case("prompt-o-is-input", ("prompt", "-q", "-i", "t1.gipl.gz", "-o", "t1.gipl.gz", "--box", BOX),
         r"error: -o t1\.gipl\.gz: is the input t1\.gipl\.gz; outputs never replace inputs"),
    Case("prompt-o-is-boxes-from-mask", ("prompt", "-q", "-i", "t1.gipl.gz", "--boxes-from-mask", "labels.gipl.gz",
                                         "-o", "labels.gipl.gz"),
         r"error: -o labels\.gipl\.gz: is the input labels\.gipl\.gz"),
    Case("prompt-o-symlink-to-input", ("prompt", "-q", "-i", "t1.nii.gz", "-o", "link.nii.gz", "--box", BOX),
         r"error: -o link\.nii\.gz: is the input t1\.nii\.gz through a symbolic link", setup=_symlink),
    Case("segment-o-is-input", ("segment", *GLIOMA, "-o", "flair.nii.gz"),
         r"error: -o flair\.nii\.gz: is the input flair\.nii\.gz"),
    Case("segment-o-is-ref-mask", ("segment", *GLIOMA, "-o", "labels.nii.gz", "--ref-mask", "labels.nii.gz"),
         r"error: -o labels\.nii\.gz: is the input labels\.nii\.gz"),
    Case("auto-o-is-target", ("auto", "--target", "t1.gipl.gz", "--from-mask", "labels.gipl.gz", "-o", "t1.gipl.gz"),
         r"error: -o t1\.gipl\.gz: is the input t1\.gipl\.gz"),
    Case("demo-case-D-o-D", ("demo", "--case", "case", "-o", "case"),
         r"error: -o case: is the case folder case being read; write outputs outside it"),
    Case("demo-o-inside-case", ("demo", "--case", "case", "-o", "case/demo"),
         r"error: -o case/demo: lies inside the case folder case being read"),
    Case("train-out-inside-cases", ("train", "--cases", "case", "--inputs", "flair", "--labels", "brats2013",
                                    "--out", "case/model"),
         r"error: --out case/model: lies inside the case folder case being read"),
    Case("evaluate-overlay-is-input", ("evaluate", "prev.nii.gz", "labels.gipl.gz", "--image", "t1.gipl.gz",
                                       "--overlay", "t1.gipl.gz"),
         r"error: --overlay t1\.gipl\.gz: is the input t1\.gipl\.gz"),
    Case("atlas-o-is-target", ("atlas", "--target", "t1.gipl.gz", "--references", "builtin:colin27", "-o",
                               "t1.gipl.gz"), r"error: -o t1\.gipl\.gz: is the input t1\.gipl\.gz"),
    Case("bench-out-inside-data", ("bench", "prompt-accuracy", "--data", ".", "--out", "case"),
         r"error: --out case: lies inside the case folder \. being read"),
    Case("bench-png-inside-data", ("bench", "atlas-eval", "--data", ".", "--png", "eval.png"),
         r"error: --png eval\.png: lies inside the case folder \. being read"),
    # ---- output paths checked before any work (item 6)
    Case("prompt-o-folder", ("prompt", "-q", "-i", "t1.gipl.gz", "-o", "case", "--box", BOX),
         r"error: -o case: is a folder; give a file name"),
    Case("segment-o-folder", ("segment", *GLIOMA, "-o", "case"), r"error: -o case: is a folder; give a file name"),
    Case("prompt-o-mhd-before-work", ("prompt", "-q", "-i", "t1.gipl.gz", "-o", "out.mhd", "--box", "500,0,0,5,5"),
         r"error: -o out\.mhd: two-file formats \(\.mhd \+ \.raw, \.nhdr \+ \.raw\) are not written .* use \.mha or "
         r"\.nrrd"),  # the box on slice 500 would fail later: the output is checked first
    Case("auto-o-nhdr", ("auto", "--target", "t1.gipl.gz", "--from-mask", "labels.gipl.gz", "-o", "out.nhdr"),
         r"error: -o out\.nhdr: two-file formats"),
    Case("prompt-o-missing-folder", ("prompt", "-q", "-i", "t1.gipl.gz", "-o", "nowhere/x.nii.gz", "--box", BOX),
         r"error: -o nowhere/x\.nii\.gz: output folder .*nowhere does not exist"),
    Case("demo-o-is-a-file", ("demo", "--case", "case", "-o", "prev.nii.gz"),
         r"error: -o prev\.nii\.gz: is a file; give a folder"),
    Case("synth-o-is-a-file", ("synth", "-o", "prev.nii.gz"), r"error: -o prev\.nii\.gz: is a file; give a folder"),
    # ---- damaged, oversized and implausible inputs (items 2, 5, 6); prev.nii.gz stays as it was
    Case("prompt-nii-gz-cut-in-half", ("prompt", "-q", "-i", "cut.nii.gz", "-o", "prev.nii.gz", "--box", BOX),
         r"error: cut\.nii\.gz: gzip stream ends early after [\d,]+ of [\d,]+ decompressed bytes \(the file is "
         r"truncated\)", setup=_cut("t1.nii.gz", "cut.nii.gz")),
    Case("segment-nii-cut-in-half", ("segment", "--model", "glioma-2d", "-i", "flair=flair.nii", "-i",
                                     "t1c=t1c.nii.gz", "-o", "prev.nii.gz"),
         r"error: flair \(flair\.nii\): truncated: expected 1,638,400 bytes of voxel data, found [\d,]+",
         setup=_gunzip_cut),
    Case("prompt-gzip-crc", ("prompt", "-q", "-i", "crc.nii.gz", "-o", "prev.nii.gz", "--box", BOX),
         r"error: crc\.nii\.gz: gzip CRC mismatch: the compressed voxel data are corrupted", setup=_crc),
    Case("prompt-nrrd-cut", ("prompt", "-q", "-i", "cut.nrrd", "-o", "prev.nii.gz", "--box", BOX),
         r"error: cut\.nrrd: truncated: expected 2,196,480 bytes of voxel data, found", setup=_cut_nrrd),
    Case("auto-from-mask-mha-cut", ("auto", "--target", "t1.gipl.gz", "--from-mask", "mask.mha", "-o", "prev.nii.gz"),
         r"error: .*mask\.mha: truncated: expected [\d,]+ bytes of compressed voxel data", setup=_cut_mha),
    Case("segment-ref-mask-bad", ("segment", *GLIOMA, "-o", "prev.nii.gz", "--ref-mask", "bad.nii.gz"),
         r"error: reference bad\.nii\.gz: cannot read as an image", setup=_garbage),
    Case("prompt-ref-mask-bad", ("prompt", "-q", "-i", "t1.gipl.gz", "-o", "prev.nii.gz", "--box", BOX,
                                 "--ref-mask", "bad.nii.gz"),
         r"error: --ref-mask bad\.nii\.gz: cannot read as an image", setup=_garbage),
    Case("auto-ref-mask-bad", ("auto", "--target", "t1.gipl.gz", "--from-mask", "labels.gipl.gz", "-o",
                               "prev.nii.gz", "--ref-mask", "bad.nii.gz"),
         r"error: --ref-mask bad\.nii\.gz: cannot read as an image", setup=_garbage),
    Case("prompt-voxel-limit", ("prompt", "-q", "-i", "t1.gipl.gz", "-o", "prev.nii.gz", "--box", BOX),
         r"error: t1\.gipl\.gz: header declares 549,120 voxels \(78x110x64 x 2 bytes", env={
             "MRISEGASSIST_MAX_VOXELS": "100000"}),
    Case("prompt-float64-near-1e300", ("prompt", "-q", "-i", "huge.nii.gz", "-o", "prev.nii.gz", "--box", BOX),
         r"error: huge\.nii\.gz: 3 voxels have values beyond the float32 range \(largest magnitude 1e\+300",
         setup=_float64_1e300),
    Case("segment-input-missing", ("segment", "--model", "glioma-2d", "-i", "flair=missing.nii.gz", "-o", "x.nii.gz"),
         r"error: --input flair: missing\.nii\.gz does not exist"),
    Case("prompt-box-outside", ("prompt", "-q", "-i", "t1.gipl.gz", "-o", "prev.nii.gz", "--box", "30,100,0,120,20"),
         r"error: box \(30, 100, 0, 120, 20\) lies outside the slice \(i 0\.\.77, j 0\.\.109\)"),
    # ---- devices and options (item 6)
    Case("segment-device-nonsense", ("segment", *GLIOMA, "-o", "x.nii.gz", "--device", "nonsense"),
         r"error: --device 'nonsense': unknown device; use cpu, cuda, cuda:N or mps"),
    Case("train-device-nonsense", ("train", "--cases", "case", "--out", "model", "--device", "nonsense"),
         r"error: --device 'nonsense': unknown device"),
    Case("prompt-classical-device-nonsense", ("prompt", "-q", "-i", "t1.gipl.gz", "-o", "x.nii.gz", "--box", BOX,
                                              "--device", "nonsense"),
         r"error: --device 'nonsense': unknown device"),
    Case("auto-device-nonsense", ("auto", "--target", "t1.gipl.gz", "--from-mask", "labels.gipl.gz", "-o", "x.nii.gz",
                                  "--device", "nonsense"), r"error: --device 'nonsense': unknown device"),
    Case("demo-device-nonsense", ("demo", "--case", "case", "-o", "demo", "--device", "nonsense"),
         r"error: --device 'nonsense': unknown device"),
    Case("train-config-missing", ("train", "--config", "missing.json"), r"error: --config missing\.json: no such file"),
    Case("train-config-invalid-json", ("train", "--config", "bad.json"),
         r"error: --config bad\.json: not valid JSON \(Expecting property name enclosed in double quotes at line 1 "
         r"column 14\)", setup=_configs),
    Case("train-config-a-list", ("train", "--config", "list.json"),
         r"error: --config list\.json: expected a JSON object of training options .*, got a list", setup=_configs),
    Case("prompt-unknown-engine", ("prompt", "-q", "-i", "t1.gipl.gz", "-o", "x.nii.gz", "--box", BOX, "--engine",
                                   "nope"), r"error: unknown engine 'nope'; known engines: classical"),
    Case("segment-unknown-model", ("segment", "--model", "nope", "-i", "flair=flair.nii.gz", "-o", "x.nii.gz"),
         r"error: unknown model 'nope'"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c.id for c in REFUSED])
def test_cli_refuses_before_any_work(work, case):
    if case.setup:
        case.setup(work)
    before = snapshot(work)
    run = cli(*case.argv, cwd=work, env=case.env)
    assert_message(run, case.rc, case.message)
    one_line(run, "error:", ".")  # one line, not a dump
    assert snapshot(work) == before  # inputs and prev.nii.gz byte-identical; nothing created, nothing left


# ------------------------------------------------------------------------- accepted, with a warning
WARNED = [
    ("prompt-classical-device-cuda", ("prompt", "-q", "-i", "t1.gipl.gz", "-o", "out.nii.gz", "--box", BOX, "--device",
                                      "cuda"), None,
     r"^warning: engine 'classical' runs on the CPU; device 'cuda' is ignored$"),
    ("prompt-box-partly-outside", ("prompt", "-q", "-i", "t1.gipl.gz", "-o", "out.nii.gz", "--box", "30,-10,30,90,70"),
     None, r"^warning: object 1: box \(30, -10, 30, 90, 70\) \(k, i0, j0, i1, j1\) reaches outside slice 30 "
           r"\(i 0\.\.77, j 0\.\.109\); clipped to \(30, 0, 30, 77, 70\)$"),
    ("prompt-100mm-spacing", ("prompt", "-q", "-i", "thick.nrrd", "-o", "out.nii.gz", "--box", BOX), "thick",
     r"^warning: thick\.nrrd: implausible voxel spacing 1 x 1 x 100 mm \(expected .* mm\); check the header's units"),
    ("segment-unknown-sequence", ("segment", *GLIOMA, "-i", "dwi=t1c.nii.gz", "-o", "out.nii.gz"), None,
     r"^warning: sequence\(s\) dwi: not used by model 'glioma-2d' \(it reads flair, t1c\); ignored$"),
]


@pytest.mark.filterwarnings("ignore::mrisegassist.errors.InputWarning")  # this process reads them too
@pytest.mark.parametrize("argv,setup,warning", [w[1:] for w in WARNED], ids=[w[0] for w in WARNED])
def test_cli_warns_in_one_line_and_runs(work, argv, setup, warning):
    if setup == "thick":
        t1 = read_volume(work / "t1.gipl.gz")
        g = t1.geometry
        write_volume(Volume(t1.array, Geometry(g.size, (1.0, 1.0, 100.0), g.origin, g.direction)),
                     work / "thick.nrrd")
    before = snapshot(work)
    run = cli(*argv, cwd=work)
    assert_message(run, 0, r"warning: ")
    one_line(run, "warning:", warning)
    assert "InputWarning" not in run.err and "warnings.warn" not in run.err  # Python's long form is not shown
    after = snapshot(work)
    assert {k: after[k] for k in before} == before  # inputs unchanged
    assert read_volume(work / "out.nii.gz", kind="label").array.any()


def test_cli_extra_sequence_for_a_multi_sequence_engine_runs_without_warning(work):
    """The weights-free engine reads every extra sequence (``accepts_channels``): nothing to warn about. (Engines
    that read one sequence warn: ``test_api_warns_for_ignored_or_changed_options[extra-sequence]``.)"""
    before = snapshot(work)
    run = cli("prompt", "-q", "-i", "t1.gipl.gz", "-o", "out.nii.gz", "--box", BOX, "--extra", "dwi=t1.nii.gz",
              cwd=work)
    assert run.rc == 0 and "warning" not in run.err.lower(), run.err[-3000:]
    after = snapshot(work)
    assert {k: after[k] for k in before} == before  # inputs unchanged
    assert read_volume(work / "out.nii.gz", kind="label").array.any()


# ----------------------------------------------------------------------------- failures while writing
@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    """A small tmpfs at ``folder``; the test skips with the mount's own reason where mounting is not allowed."""
    try:
        with small_filesystem(folder, size) as mount:
            yield mount
    except PermissionError as exc:
        pytest.skip(f"cannot mount a size-limited file system here: {exc}")


def refused_on(mount: Path, work: Path, argv: tuple, rc: int, message: str) -> None:
    """Run ``argv`` in ``work``; exit ``rc`` with ``message``; inputs and the mount's files byte-identical."""
    before = snapshot(work, mount)
    run = cli(*argv, cwd=work)
    assert_message(run, rc, message)
    assert snapshot(work, mount) == before


def test_disk_full_keeps_the_previous_output(work, tmp_path):
    """prompt -o x.nii (1.1 MB uncompressed) on a full tmpfs with one 4 KB page left: ITK writes part of the file
    and returns without an error (it only prints "wrote only 4096 of ... bytes")."""
    with tmpfs(tmp_path / "full", "2m") as mount:
        write_volume(read_volume(work / "prev.nii.gz", kind="label"), mount / "prev.nii")
        fill(mount, leave=4096)
        refused_on(mount, work, ("prompt", "-q", "-i", "t1.gipl.gz", "-o", mount / "prev.nii", "--box", BOX), 1,
                   rf"error: {mount}/prev\.nii: cannot write \(.*(no space left on device|the disk is nearly full).*\); "
                   rf"the previous file is kept unchanged")


def test_disk_full_while_writing_the_sidecar(work, tmp_path):
    """auto -o on a tmpfs that can create one more file: the label map is staged, its .labels.json sidecar is not;
    neither previous file is replaced."""
    with tmpfs(tmp_path / "full", "4m") as mount:
        copy(work / "prev.nii.gz", mount)
        copy(work / "prev.labels.json", mount)
        limit_inodes(mount, 1)
        refused_on(mount, work, ("auto", "--target", "t1.gipl.gz", "--from-mask", "labels.gipl.gz", "-o",
                                 mount / "prev.nii.gz"), 1,
                   rf"error: {mount}/prev\.labels\.json: cannot write \(no space left on device.*\); the previous "
                   rf"file is kept unchanged")


def test_disk_full_while_writing_a_png(work, tmp_path):
    """evaluate --overlay on a full tmpfs: the PNG writer fails, the previous PNG stays."""
    from PIL import Image

    with tmpfs(tmp_path / "full", "1m") as mount:
        Image.new("RGB", (8, 8), (200, 10, 10)).save(mount / "overlay.png")
        fill(mount, leave=0)
        refused_on(mount, work, ("evaluate", "prev.nii.gz", "labels.gipl.gz", "--image", "t1.gipl.gz", "--overlay",
                                 mount / "overlay.png", "--no-distances"), 1,
                   rf"error: {mount}/overlay\.png: cannot write \(.*\); the previous file is kept")


@pytest.mark.parametrize("argv", [("prompt", "-q", "-i", "t1.gipl.gz", "--box", BOX), ("segment", *GLIOMA)],
                         ids=["prompt", "segment"])
def test_output_folder_not_writable(work, tmp_path, argv):
    with tmpfs(tmp_path / "ro", "1m") as mount:
        remount_read_only(mount)
        refused_on(mount, work, (*argv, "-o", mount / "out.nii.gz"), 2,
                   rf"error: -o {mount}/out\.nii\.gz: output folder {mount} is not writable")


class _Payload:
    """A pickle that runs a command when unpickled without ``weights_only`` (what a hostile checkpoint holds)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_train_resume_refuses_a_pickle_payload(work):
    (work / "model").mkdir()
    marker = work.parent / "payload-ran"
    with open(work / "model" / "last.pt", "wb") as fh:
        pickle.dump({"model": _Payload(marker)}, fh)
    before = snapshot(work)
    run = cli("train", "--cases", "case", "--inputs", "flair,t1c", "--labels", "brats2013", "--out", "model",
              "--resume", cwd=work)
    assert_message(run, 1, r"error: model/last\.pt: refused as a --resume checkpoint: it holds pickled Python "
                           r"objects, not only weights \(loading them could run code\); not loaded")
    assert not marker.exists()
    assert snapshot(work) == before


def test_bundle_with_code_is_refused(work):
    """A MONAI bundle whose config holds a ``$`` expression: refused without --trust-model-code; nothing runs."""
    import json

    import torch

    bundle = work / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    marker = work.parent / "bundle-code-ran"
    (bundle / "configs" / "inference.json").write_text(json.dumps(
        {"network_def": f"$open({str(marker)!r}, 'w').write('ran') and None"}))
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"name": "hostile", "network_data_format": {
        "inputs": {"image": {"num_channels": 1, "spatial_shape": [96, 96, 96], "channel_def": {"0": "flair"}}},
        "outputs": {"pred": {"channel_def": {"0": "background", "1": "lesion"}}}}}))
    torch.save({"w": torch.zeros(1)}, bundle / "models" / "model.pt")
    before = snapshot(work)
    run = cli("segment", "--model", "bundle", "-i", "flair=flair.nii.gz", "-o", "out.nii.gz", cwd=work)
    assert not marker.exists(), "the bundle's code ran"
    assert_message(run, 2, r"bundle.*(expression|--trust-model-code)")
    assert snapshot(work) == before


# ------------------------------------------------------------------------------------------------- API
@pytest.fixture(scope="module")
def t1(source):
    return read_volume(source / "t1.gipl.gz", name="t1")


def _prompt(t1, **kwargs):
    from mrisegassist.service import PromptRequest

    return PromptRequest(t1, [ObjectPrompt(1, [Box2D(30, 20, 30, 50, 70)])], **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"device": "nonsense"}, r"device 'nonsense': unknown device; use cpu, cuda, cuda:N or mps"),
    ({"device": "cuda:x"}, r"device 'cuda:x': unknown device"),
    ({"engine": "sam-vit-b", "device": "tpu"}, r"device 'tpu': unknown device"),
], ids=["nonsense", "cuda-colon-x", "weights-engine-tpu"])
def test_api_refuses_a_bad_device_before_work(t1, kwargs, message):
    from mrisegassist.service import Service

    with pytest.raises(InputError, match=message):
        Service("cpu").run(_prompt(t1, **kwargs))


def test_api_confined_service_refuses_file_paths(t1):
    from mrisegassist.service import Service

    with pytest.raises(InputError, match=r"checkpoint '/etc/passwd': this server accepts no file paths"):
        Service("cpu", confined=True).run(_prompt(t1, engine="sam-vit-b", checkpoint="/etc/passwd"))


@pytest.mark.parametrize("change,warning", [
    ({"device": "cuda"}, r"engine 'classical' runs on the CPU; device 'cuda' is ignored"),
    ("extra", r"sequence\(s\) dwi: not used by engine 'classical'"),
    ("box", r"object 1: box \(30, 70, 30, 95, 70\) .* clipped to \(30, 70, 30, 77, 70\)"),
], ids=["device", "extra-sequence", "clipped-box"])
def test_api_warns_for_ignored_or_changed_options(t1, change, warning, monkeypatch):
    from mrisegassist.prompt.classical import ClassicalEngine
    from mrisegassist.service import PromptRequest, Service

    if change == "extra":  # an engine that reads one sequence (the weights-free one reads them all)
        monkeypatch.setattr(ClassicalEngine, "accepts_channels", False)
        request = _prompt(t1, extra={"dwi": t1})
    elif change == "box":
        request = PromptRequest(t1, [ObjectPrompt(1, [Box2D(30, 70, 30, 95, 70)])])
    else:
        request = _prompt(t1, **change)
    with pytest.warns(InputWarning, match=warning):
        result = Service("cpu").run(request)
    assert result.array.any()


def test_api_extra_sequence_read_by_the_engine_is_not_warned(t1):
    from mrisegassist.prompt.classical import ClassicalEngine
    from mrisegassist.service import Service

    assert ClassicalEngine.accepts_channels
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        result = Service("cpu").run(_prompt(t1, extra={"dwi": t1}))
    assert result.array.any()


def test_api_png_is_verified_before_it_replaces_the_previous_one(t1, tmp_path, monkeypatch):
    """A PNG writer that stops half-way without an error: the previous overlay stays, WriteError names it."""
    from matplotlib.figure import Figure

    from mrisegassist.viz import overlay_png

    old = overlay_png(t1, None, tmp_path / "overlay.png")
    before = snapshot(tmp_path)
    real = Figure.savefig

    def half(self, fname, *args, **kwargs):
        real(self, fname, *args, **kwargs)
        truncate(Path(fname), 0.5)

    monkeypatch.setattr(Figure, "savefig", half)
    with pytest.raises(WriteError, match=rf"{old}: cannot write \(.*the written PNG does not read back"):
        overlay_png(t1, None, old)
    assert snapshot(tmp_path) == before


def test_api_output_folder_created_only_when_every_output_is_accepted(tmp_path):
    folder = tmp_path / "new"
    with pytest.raises(InputError, match=r"is also the output"):
        guard_output_folder(folder, [Output(folder / "a.json", "json"), Output(folder / "a.json", "json")])
    assert not folder.exists()
    with pytest.raises(InputError, match=r"-o .*new: is the case folder .*new being read"):
        guard_output_folder(folder, case_folders=[folder])
    assert guard_output_folder(folder, [Output(folder / "a.json", "json")]) == [folder, folder / "a.json"]
    assert folder.is_dir()


# ---------------------------------------------------------------------------------- the HTTP server
@pytest.fixture(scope="module")
def server():
    from service_env import server_process

    srv = server_process("--host", "127.0.0.1", "--token", "fault-token-0123456789")
    yield srv
    srv.stop()


@pytest.mark.parametrize("kwargs,message", [
    ({"engine": "sam-vit-b", "checkpoint": "/etc/passwd"}, r"checkpoint '/etc/passwd': this server accepts no file "
                                                           r"paths"),
    ({"device": "nonsense"}, r"device 'nonsense': unknown device"),
], ids=["path-in-request", "device-nonsense"])
def test_server_refuses_with_a_clear_message(server, t1, kwargs, message):
    from mrisegassist.service import HttpClient

    client = HttpClient(server.url, "fault-token-0123456789")
    try:
        with pytest.raises(InputError, match=message):
            client.call(_prompt(t1, **kwargs))
    finally:
        client.close()


# -------------------------------------------------------------------------------- the browser front end
@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """The browser application on a data folder of copies: a study, a study with a link leading outside it."""
    pytest.importorskip("trame_slicer", reason="trame-slicer is needed for the browser front end")
    from trame.app import get_server

    from MRISegAssistWeb.app import MRISegAssistWebApp

    root = tmp_path_factory.mktemp("web")
    data, outside = root / "data", root / "outside"
    for folder in (data / "study", data / "linked", outside):
        folder.mkdir(parents=True)
    src = data_path("itksnap-mricrop")
    copy(src / "t1.gipl.gz", data / "study")
    copy(src / "labels.gipl.gz", data / "study")
    copy(src / "t1.gipl.gz", data / "linked")
    copy(src / "labels.gipl.gz", outside, "secret.gipl.gz")
    os.symlink(outside / "secret.gipl.gz", data / "linked" / "labels.gipl.gz")
    app = MRISegAssistWebApp(get_server("fault_injection", client_type="vue3"), data_dir=data,
                             output_dir=root / "saved")
    yield app, data, outside
    app.close()


def test_web_study_with_a_link_outside_the_data_folder_is_refused(web):
    app, data, outside = web
    before = snapshot(data, outside)
    app.load_study("linked")
    assert app.state.error.startswith("labels.gipl.gz: is a link to a file outside the data folder; refused")
    assert not app.state.study_loaded
    assert snapshot(data, outside) == before


def test_web_save_never_writes_into_the_study_folder(web):
    app, data, _ = web
    app.load_study("study")
    assert app.state.error == ""
    app.add_box_from_extent((20, 50, 30, 70, 30, 30))
    app.propagate()
    assert app.jobs.wait(300) and app.state.error == "" and app.state.segments
    before = snapshot(data)
    saved = app.output_dir
    app.output_dir = data / "study"
    try:
        app.state.update({"save_name": "labels", "save_format": "nii.gz"})
        assert app.save() is None
        assert re.match(r"^Save .*study/labels\.nii\.gz: lies inside the case folder .*study being read",
                        app.state.error), app.state.error
    finally:
        app.output_dir = saved
    assert snapshot(data) == before
    assert Path(app.save()).parent == saved and app.state.error == ""  # the configured folder still works


def test_web_upload_of_a_truncated_file_names_it_not_the_server_folder(web, tmp_path):
    app, _, _ = web
    cut = copy(data_path("itksnap-mricrop", "t1.gipl.gz"), tmp_path, "t1.gipl.gz")
    write_volume(read_volume(cut), tmp_path / "t1.nii.gz")
    truncate(tmp_path / "t1.nii.gz", 0.5)
    data = (tmp_path / "t1.nii.gz").read_bytes()
    app.upload_chunk([{"name": "t1.nii.gz", "size": len(data), "content": data}])
    app.upload_chunk([])
    assert app.state.error.startswith("t1.nii.gz: gzip stream ends early"), app.state.error
    assert "mrisegassist-upload" not in app.state.error and str(tmp_path) not in app.state.error


@pytest.mark.parametrize("limit,message", [
    (100_000, r"^t1\.gipl\.gz \(0\.4 MB\) exceeds the server's limit of 0\.1 MB for one upload$"),
    (500_000, r"^t1\.gipl\.gz holds 1\.0 MB of voxel data when decompressed \(78x110x64 .*\), which exceeds the "
              r"server's limit of 0\.5 MB for one upload$"),
], ids=["bytes", "decompressed-voxels"])
def test_web_upload_over_the_limit_names_the_file_and_its_size(web, limit, message):
    app, _, _ = web
    t1 = data_path("itksnap-mricrop", "t1.gipl.gz")
    saved = app.uploads.budget.limit_bytes
    app.uploads.budget.limit_bytes = limit
    try:
        app.upload_chunk([{"name": "t1.gipl.gz", "size": t1.stat().st_size, "content": t1.read_bytes()}])
    finally:
        app.uploads.budget.limit_bytes = saved
    assert re.match(message, app.state.error), app.state.error
    assert app.uploads.folder is None  # a refused upload leaves nothing behind


def test_web_upload_after_a_refused_one_holds_only_its_own_files(web, tmp_path):
    app, _, _ = web
    write_volume(read_volume(data_path("itksnap-mricrop", "t1.gipl.gz")), tmp_path / "t2.nii.gz")
    truncate(tmp_path / "t2.nii.gz", 0.5)
    uploads = [[tmp_path / "t2.nii.gz"], [data_path("itksnap-mricrop", n) for n in ("t1.gipl.gz", "labels.gipl.gz")]]
    for files in uploads:
        app.upload_chunk([{"name": p.name, "size": p.stat().st_size, "content": p.read_bytes()} for p in files])
        app.upload_chunk([])
        if files == uploads[0]:
            assert app.state.error.startswith("t2.nii.gz: gzip stream ends early"), app.state.error
    assert app.state.error == "" and app.state.study_label == "uploaded files"
    assert app.state.study_files == ["t1.gipl.gz"] and app.state.reference_file == "labels.gipl.gz"
