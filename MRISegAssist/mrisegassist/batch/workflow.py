"""One study through the segmentation service: read -> typed request -> :class:`~mrisegassist.service.Service`
-> label map + record written atomically -> metrics against the reference.

Workflows (:data:`WORKFLOWS`), each one service request:

* ``unet``: :class:`AutoSegmentRequest` with the study's sequences (``model``: the study's ``model`` column or
  ``--model``); label map on the reference sequence's grid;
* ``mask``: :class:`AutoRequest` with ``mask`` = the study's ``mask`` file (or its reference mask with
  ``mask_from="reference"``): one prompt per connected component -> promptable engine (-> cascade);
* ``boxes``: :class:`AutoRequest` with the boxes of the study's ``boxes`` file (``mrisegassist atlas`` JSON);
* ``atlas``: :class:`AutoRequest` with an :class:`AtlasBoxesRequest` (registration atlas ``references``)
  -> engine (``engine="atlas"``: the atlas label fusion itself).

Prompt workflows segment the ``target`` sequence (default: FLAIR when present, else the first sequence).
Metrics (:mod:`mrisegassist.metrics`): per named label (U-Net labels; BraTS regions for BraTS models) and
``foreground`` (any label against any reference label), on the label map's grid (the reference is resampled
onto it with nearest neighbour when its grid differs).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np

from .. import __version__
from ..errors import Cancelled, InputError, MRISegAssistError
from ..progress import CancelToken, check
from .energy import EnergyMeter
from .results import DONE, FAILED, FOREGROUND, LABELS_FILE, STUDY_FILE, StudyRecord, StudyTimings, study_dir
from .studies import Study

WORKFLOWS = ("unet", "mask", "boxes", "atlas")
TARGET_ORDER = ("flair", "t1c", "t1", "t2")


@dataclass
class WorkflowOptions:
    """What is done to every study (the CLI's workflow options). See the module docstring."""

    workflow: str = "unet"
    model: Optional[str] = None
    reference_sequence: Optional[str] = None
    min_component_mm3: Optional[float] = None
    target: Optional[str] = None
    engine: str = "classical"
    cascade: Optional[str] = None
    strategy: str = "A"
    min_voxels: int = 3
    mask_from: str = "mask"
    references: Optional[str] = None
    structures: Optional[list[str]] = None
    extra: bool = False
    distances: bool = True

    def check(self) -> "WorkflowOptions":
        """InputError for options that cannot work for any study (before a cluster is started)."""
        if self.workflow not in WORKFLOWS:
            raise InputError(f"unknown workflow {self.workflow!r}; use one of {', '.join(WORKFLOWS)}")
        if self.mask_from not in ("mask", "reference"):
            raise InputError(f"--mask-from must be 'mask' or 'reference', got {self.mask_from!r}")
        if self.strategy not in ("A", "B"):
            raise InputError(f"--strategy must be A or B, got {self.strategy!r}")
        if self.cascade not in (None, "C", "D"):
            raise InputError(f"--cascade must be C or D, got {self.cascade!r}")
        if self.workflow != "atlas" and self.engine == "atlas":
            raise InputError("engine 'atlas' (the atlas label fusion) needs --workflow atlas")
        if self.workflow != "unet" and self.engine != "atlas":
            from ..prompt import engine_spec

            engine_spec(self.engine)
        return self

    def key(self) -> str:
        """sha256 of the options (a finished study is reused only with the same options)."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()


def study_key(study: Study, options: WorkflowOptions) -> str:
    """The key a finished record must carry to be reused: inputs as they are now + options + version."""
    return hashlib.sha256(f"{study.fingerprint()}|{options.key()}|{__version__}".encode()).hexdigest()


def target_sequence(study: Study, options: WorkflowOptions) -> str:
    if options.target:
        if options.target not in study.sequences:
            raise InputError(f"{study.case}: no {options.target} sequence (has {', '.join(study.sequences)})")
        return options.target
    return next((s for s in TARGET_ORDER if s in study.sequences), next(iter(study.sequences)))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- processor
class StudyProcessor:
    """Runs studies one at a time in this process (a Ray worker holds one; the serial loop too). Holds the
    :class:`~mrisegassist.service.Service` (models and engines load once, on first use) and the energy meter.

    ``threads``: torch CPU threads of this process (default: torch's). ``country``: see :mod:`.energy`."""

    def __init__(self, options: WorkflowOptions, out: Path, device: Optional[str] = None,
                 threads: Optional[int] = None, country: Optional[str] = None, energy: bool = True) -> None:
        from ..service import Service

        if threads:
            import torch

            torch.set_num_threads(int(threads))
        self.options = options.check()
        self.out = Path(out)
        self.service = Service(device, prepared_cache_size=0)  # studies differ: keep no prepared volume
        self.meter = EnergyMeter(country, "process", energy)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    @property
    def pid(self) -> int:
        return os.getpid()

    def process(self, study: Study, attempt: int = 1, cancel: Optional[CancelToken] = None) -> StudyRecord:
        """Segment one study and write its label map and ``study.json``; failures of the study (bad or damaged
        input, an engine error) become a ``failed`` record, written too. Raises only :class:`Cancelled` (nothing
        of the study is written then) and errors writing the record itself."""
        record = StudyRecord(study.case, FAILED, study_key(study, self.options), self.options.workflow,
                             model=(study.model or self.options.model or "") if self.options.workflow == "unet"
                             else "", engine="" if self.options.workflow == "unet" else self.options.engine,
                             groups=dict(study.groups), reference=str(study.reference or ""),
                             device=self.service.device, worker=self.worker, worker_pid=os.getpid(),
                             attempts=attempt)
        folder = study_dir(self.out, study.case)
        t0 = self.meter.start(study.case)
        try:
            self._run(study, record, folder, cancel)
            record.status = DONE
        except Cancelled:
            self.meter.stop()
            raise
        except MRISegAssistError as exc:
            record.error_kind, record.error = type(exc).__name__, str(exc)
        except Exception as exc:  # noqa: BLE001 - one study's failure must not end the batch
            record.error_kind, record.error = type(exc).__name__, f"{type(exc).__name__}: {exc}"
            record.traceback = traceback.format_exc(limit=20)
        record.energy = self.meter.stop()
        record.timings.total = time.perf_counter() - t0
        record.finished_at = _now()
        folder.mkdir(parents=True, exist_ok=True)
        record.write(folder / STUDY_FILE)
        return record

    # ------------------------------------------------------------------------------------------ steps
    def _run(self, study: Study, record: StudyRecord, folder: Path, cancel: Optional[CancelToken]) -> None:
        from ..labels import write_labelmap
        from ..outputs import Output, guard_outputs

        opts, timings = self.options, record.timings
        t = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".*.tmp*"):  # staged files of a worker that died while writing this study
            stale.unlink(missing_ok=True)
        labels_path = folder / LABELS_FILE
        guard_outputs([Output(labels_path, "labelmap"), Output(folder / STUDY_FILE, "json")],
                      inputs=study.input_files(), case_folders=[study.folder])
        request, image_name = self._request(study)
        record.image = str(study.sequences.get(image_name, ""))
        timings.read = time.perf_counter() - t
        check(cancel)
        t = time.perf_counter()
        result = self.service.run(request, cancel=cancel)
        timings.compute = time.perf_counter() - t
        check(cancel)
        record.model, record.engine = result.model or record.model, result.engine or record.engine
        record.objects = len(result.objects)
        if opts.workflow != "mask":  # mask components are numbered per study: no per-label volume columns
            record.volumes_ml = {o.name: float(o.volume_ml) for o in result.objects}
        record.total_ml = float(sum(o.volume_ml for o in result.objects))
        record.not_found = [n.name for n in result.not_found]
        t = time.perf_counter()
        write_labelmap(result.labels, labels_path)
        record.labels = str(labels_path.relative_to(self.out))
        timings.write = time.perf_counter() - t
        if study.reference is not None:
            t = time.perf_counter()
            self._metrics(study, result, record)
            timings.metrics = time.perf_counter() - t

    def _request(self, study: Study):
        """The service request of ``study`` and the sequence whose grid the label map is on."""
        from ..service import AtlasBoxesRequest, AutoRequest, AutoSegmentRequest
        from ..volume import read_volume

        opts = self.options

        def read(name: str):
            return read_volume(study.sequences[name])

        if opts.workflow == "unet":
            from ..unet.entries import get_model

            model = study.model or opts.model
            if not model:
                raise InputError(f"{study.case}: no U-Net model (give --model, or a 'model' column)")
            entry = get_model(model)  # the service checks the sequences and the reference sequence
            inputs = {s: read(s) for s in entry.inputs if s in study.sequences}
            reference = opts.reference_sequence or entry.inputs[0]
            return AutoSegmentRequest(inputs, model, reference, opts.min_component_mm3), reference
        target = target_sequence(study, opts)
        volume = read(target)
        extra = {s: read(s) for s in study.sequences if s != target} if opts.extra else {}
        request = AutoRequest(volume, opts.engine, opts.cascade, opts.strategy, min_voxels=opts.min_voxels,
                              extra=extra)
        if opts.workflow == "mask":
            source = study.reference if opts.mask_from == "reference" else study.mask
            if source is None:
                column = "reference" if opts.mask_from == "reference" else "mask"
                raise InputError(f"{study.case}: no {column} file to take prompts from")
            request.mask = read_volume(source, kind="label")
        elif opts.workflow == "boxes":
            from ..atlas.boxes import AtlasBoxes

            if study.boxes is None:
                raise InputError(f"{study.case}: no boxes file (a 'boxes' column of the manifest)")
            request.boxes = AtlasBoxes.read(study.boxes)
        else:
            request.atlas = AtlasBoxesRequest(volume, opts.references, opts.structures, opts.strategy,
                                              workers=max(1, _threads()))
        return request, target

    def _metrics(self, study: Study, result, record: StudyRecord) -> None:
        from ..metrics import BRATS_REGIONS, evaluate_labels, overlap_metrics
        from ..volume import read_volume, resample_to

        labelmap = result.labels
        grid = labelmap.volume.geometry
        ref = read_volume(study.reference, kind="label")
        if not ref.geometry.same_as(grid):
            ref = resample_to(ref, grid, "nearest")
        pred, spacing = labelmap.volume.array, grid.spacing
        named, regions = [], None
        if self.options.workflow == "unet":
            from ..unet.entries import get_model

            named = labelmap.labels
            regions = BRATS_REGIONS if get_model(study.model or self.options.model).regions == "brats" else None
        if named or regions:
            ev = evaluate_labels(pred, ref.array, spacing, labels=named, regions=regions,
                                 distances=self.options.distances)
            for name, m in ev["labels"].items():
                record.dice[name], record.hd95_mm[name] = m["dice"], m["hd95_mm"]
            for name, m in ev["regions"].items():
                record.dice[f"[{name}]"], record.hd95_mm[f"[{name}]"] = m["dice"], m["hd95_mm"]
        fg = overlap_metrics(pred > 0, np.asarray(ref.array) > 0, spacing, distances=self.options.distances)
        record.dice[FOREGROUND], record.hd95_mm[FOREGROUND] = fg["dice"], fg["hd95_mm"]


def _threads() -> int:
    try:
        import torch

        return int(torch.get_num_threads())
    except ImportError:
        return 1
