"""Per-study records and the results table of a batch.

Layout of a results folder ``OUT``::

    OUT/studies/<case>/labels.nii.gz (+ labels.labels.json)   the label map with its names (verified, atomic)
    OUT/studies/<case>/study.json                             the study's record (written last)
    OUT/results.parquet, OUT/results.csv                      one row per finished study (rebuilt atomically)
    OUT/runs.json                                             one summary per run (time, energy, counts)

A study is *finished* when its ``study.json`` exists: ``status`` ``done`` (label map written) or ``failed``
(``error_kind``, ``error``). Table columns (one rule: :func:`StudyRecord.row`): the fixed fields of
:data:`BASE_COLUMNS`, then ``group:<column>`` (grouping columns of the manifest), ``volume_ml:<label>``,
``dice:<label>`` and ``hd95_mm:<label>`` (per label, per region in brackets such as ``[whole tumour]``, and
``foreground``: any label against any reference label). Volumes in ml, times in s, energy in kWh.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import InputError, WriteError
from ..outputs import atomic_write, write_json, write_text
from .energy import EnergyReading

SCHEMA = "mrisegassist-batch-study"
SCHEMA_VERSION = 1
STUDY_FILE, LABELS_FILE = "study.json", "labels.nii.gz"
DONE, FAILED = "done", "failed"
#: Failures that recur with the same inputs and options: not retried by a re-run (unless --retry-failed)
DETERMINISTIC_ERRORS = ("InputError", "DamagedFileError", "VolumeTooLargeError", "CheckpointError")
GROUP, VOLUME, DICE, HD95 = "group:", "volume_ml:", "dice:", "hd95_mm:"
FOREGROUND = "foreground"


@dataclass
class StudyTimings:
    """Seconds spent on a study in its worker: ``total`` = read + compute (the service) + write + metrics."""

    total: float = 0.0
    read: float = 0.0
    compute: float = 0.0
    write: float = 0.0
    metrics: float = 0.0


@dataclass
class StudyRecord:
    """The outcome of one study (what ``study.json`` holds and one row of the results table)."""

    case: str
    status: str
    key: str = ""
    workflow: str = ""
    model: str = ""
    engine: str = ""
    groups: dict[str, str] = field(default_factory=dict)
    image: str = ""  # the sequence the label map's grid comes from
    reference: str = ""
    labels: str = ""  # label map, relative to the results folder
    objects: int = 0
    volumes_ml: dict[str, float] = field(default_factory=dict)
    total_ml: Optional[float] = None
    dice: dict[str, Optional[float]] = field(default_factory=dict)
    hd95_mm: dict[str, Optional[float]] = field(default_factory=dict)
    not_found: list[str] = field(default_factory=list)
    timings: StudyTimings = field(default_factory=StudyTimings)
    energy: EnergyReading = field(default_factory=EnergyReading)
    device: str = ""
    worker: str = ""  # host:pid
    worker_pid: int = 0
    attempts: int = 1
    finished_at: str = ""
    error_kind: str = ""
    error: str = ""
    traceback: str = ""

    @property
    def done(self) -> bool:
        return self.status == DONE

    def reusable(self, key: str, retry_failed: bool = False) -> bool:
        """Whether a re-run with this study key skips the study: done, or failed for a reason that recurs."""
        if self.key != key:
            return False
        return self.done or (self.status == FAILED and not retry_failed and
                             self.error_kind in DETERMINISTIC_ERRORS)

    # ------------------------------------------------------------------------------------------ JSON
    def to_json(self) -> dict:
        return {"format": SCHEMA, "version": SCHEMA_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, doc: dict, source: str = "") -> "StudyRecord":
        if doc.get("format") != SCHEMA:
            raise InputError(f"{source}: not a batch study record")
        data = {k: v for k, v in doc.items() if k in {f.name for f in dataclasses.fields(cls)}}
        data["timings"] = StudyTimings(**data.get("timings", {}))
        data["energy"] = EnergyReading(**data.get("energy", {}))
        return cls(**data)

    def write(self, path: Path) -> Path:
        return write_json(path, self.to_json())

    # ------------------------------------------------------------------------------------------ table
    def row(self) -> dict:
        """The flat table row (see the module docstring)."""
        e, t = self.energy, self.timings
        out = {"case": self.case, "status": self.status, "error_kind": self.error_kind, "error": self.error,
               "workflow": self.workflow, "model": self.model, "engine": self.engine, "device": self.device,
               "worker": self.worker, "worker_pid": self.worker_pid, "attempts": self.attempts,
               "finished_at": self.finished_at, "seconds": t.total, "read_s": t.read, "compute_s": t.compute,
               "write_s": t.write, "metrics_s": t.metrics, "energy_kwh": e.energy_kwh,
               "emissions_kg": e.emissions_kg, "cpu_energy_kwh": e.cpu_kwh, "ram_energy_kwh": e.ram_kwh,
               "gpu_energy_kwh": e.gpu_kwh, "energy_method": e.method, "country": e.country,
               "objects": self.objects, "total_ml": self.total_ml, "not_found": ";".join(self.not_found),
               "image": self.image, "reference": self.reference, "labels": self.labels}
        out.update({GROUP + k: v for k, v in self.groups.items()})
        out.update({VOLUME + k: v for k, v in self.volumes_ml.items()})
        out.update({DICE + k: v for k, v in self.dice.items()})
        out.update({HD95 + k: v for k, v in self.hd95_mm.items()})
        return out


BASE_COLUMNS = tuple(StudyRecord("", "").row())


def study_dir(out: Path, case: str) -> Path:
    return Path(out) / "studies" / case


def read_record(out: Path, case: str) -> Optional[StudyRecord]:
    """The finished record of ``case`` in results folder ``out`` (``None`` if absent or unreadable)."""
    path = study_dir(out, case) / STUDY_FILE
    try:
        return StudyRecord.from_json(json.loads(path.read_text()), str(path))
    except (OSError, ValueError, TypeError, InputError):
        return None


# ------------------------------------------------------------------------------------------------ table
def table(records: list[StudyRecord]):
    """A pandas DataFrame of the records' rows (columns: fixed ones first, then the prefixed groups)."""
    import pandas as pd

    rows = [r.row() for r in records]
    extra = list(dict.fromkeys(k for row in rows for k in row if k not in BASE_COLUMNS))
    prefixes = (GROUP, VOLUME, DICE, HD95)  # then in order of first appearance
    extra.sort(key=lambda c: next(n for n, p in enumerate(prefixes) if c.startswith(p)))
    return pd.DataFrame(rows, columns=list(BASE_COLUMNS) + extra)


def write_table(records: list[StudyRecord], out: Path) -> tuple[Path, Path]:
    """``out/results.parquet`` and ``out/results.csv``, each written atomically and verified."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = table(records)
    parquet, csv = Path(out) / "results.parquet", Path(out) / "results.csv"
    arrow = pa.Table.from_pandas(frame, preserve_index=False)

    def verify_parquet(tmp: Path) -> None:
        rows = pq.read_metadata(tmp).num_rows
        if rows != len(frame):
            raise WriteError(f"{parquet.name}: read back {rows} rows, wrote {len(frame)}")

    atomic_write(parquet, lambda tmp: pq.write_table(arrow, tmp), verify_parquet)
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    write_text(csv, buffer.getvalue())
    return parquet, csv


class ResultsTable:
    """A results table read back (Parquet or CSV, or a results folder), with typed access to its columns."""

    def __init__(self, frame, source: Path) -> None:
        self.frame = frame
        self.source = Path(source)
        self.folder = self.source if self.source.is_dir() else self.source.parent

    @classmethod
    def read(cls, path: Path) -> "ResultsTable":
        import pandas as pd

        path = Path(path)
        target = path / "results.parquet" if path.is_dir() else path
        if path.is_dir() and not target.exists():
            target = path / "results.csv"
        if not target.exists():
            raise InputError(f"{path}: no results table (results.parquet or results.csv)")
        try:
            frame = pd.read_parquet(target) if target.suffix == ".parquet" else pd.read_csv(target)
        except Exception as exc:  # noqa: BLE001 - pyarrow/pandas raise many kinds for a damaged file
            raise InputError(f"{target}: cannot read the results table ({exc})") from None
        missing = [c for c in ("case", "status", "seconds") if c not in frame.columns]
        if missing:
            raise InputError(f"{target}: not a batch results table (no {', '.join(missing)} column)")
        return cls(frame, path if path.is_dir() else target)

    def columns(self, prefix: str) -> list[str]:
        """Names after ``prefix`` (``GROUP``, ``VOLUME``, ``DICE``, ``HD95``), in table order."""
        return [c[len(prefix):] for c in self.frame.columns if c.startswith(prefix)]

    @property
    def done(self):
        return self.frame[self.frame["status"] == DONE]

    @property
    def failed(self):
        return self.frame[self.frame["status"] == FAILED]

    def path(self, value) -> Optional[Path]:
        """A path cell of the table resolved against the results folder (``None`` when empty)."""
        if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value):
            return None
        p = Path(str(value))
        return p if p.is_absolute() else self.folder / p


def append_run(out: Path, summary: dict) -> Path:
    """Add one run's summary to ``out/runs.json`` (atomically; earlier runs are kept)."""
    path = Path(out) / "runs.json"
    runs = []
    if path.exists():
        try:
            runs = list(json.loads(path.read_text()).get("runs", []))
        except (OSError, ValueError, AttributeError):
            runs = []
    runs.append(summary)
    return write_text(path, json.dumps({"runs": runs}, indent=2, default=str))
