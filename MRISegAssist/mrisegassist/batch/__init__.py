"""Cohorts: batch segmentation through the service on Ray (or serially), per-study records, a results table
(Parquet + CSV), energy per study and per run (CodeCarbon, offline), and the HTML study report.

* :mod:`.studies`: a folder of case folders or a CSV manifest -> :class:`Study` list (grouping columns);
* :mod:`.workflow`: :class:`WorkflowOptions` and the :class:`StudyProcessor` (one study: service request,
  atomic writes, metrics);
* :mod:`.runner`: :func:`run_batch` (Ray actors or a serial loop; resume, retries, cancel);
* :mod:`.results`: :class:`StudyRecord`, the results table and :class:`ResultsTable`;
* :mod:`.energy`: :class:`EnergyMeter` (CodeCarbon's offline tracker);
* :mod:`.report`: :func:`write_report` (one HTML page with embedded plots).

Importing this package imports neither Ray nor torch.
"""
from __future__ import annotations

from .energy import EnergyMeter, EnergyReading  # noqa: F401
from .results import ResultsTable, StudyRecord, StudyTimings  # noqa: F401
from .runner import BatchConfig, BatchEvent, BatchSummary, run_batch  # noqa: F401
from .studies import Study, discover_studies  # noqa: F401
from .workflow import WORKFLOWS, StudyProcessor, WorkflowOptions  # noqa: F401
