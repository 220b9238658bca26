"""Run a batch: every study through the service on a Ray cluster (or a plain serial loop), resumable and
fault-isolated, with a results table kept consistent at every moment.

* **Ray** (default): a local cluster on this machine (``ray.init``; its node address is a loopback address,
  so nothing is meant to be reached from the network), or an existing one with ``address`` (``"auto"``,
  ``"HOST:6379"``, ``"ray://HOST:10001"``; the package must be installed on its nodes and the studies and
  results folder visible to them at the same paths). Workers are Ray *actors*, each holding one
  :class:`~mrisegassist.batch.workflow.StudyProcessor` (a :class:`~mrisegassist.service.Service`), so models
  load once per worker. A CPU worker takes ``cpus_per_worker`` cores (torch threads = that number) and by
  default there are as many workers as the cluster's cores allow; with ``device="cuda"`` each worker requests
  ``gpus_per_worker`` GPUs (default 1) and there is one worker per GPU.
* **Serial** (``serial=True``): the same processor in this process, one study after another.
* **Resume**: a study whose ``study.json`` carries the same key (inputs unchanged, same options, same version)
  and is done - or failed with an input error, which would recur - is skipped.
* **Faults**: a study's own failure (damaged file, engine error) is a ``failed`` record; a worker process that
  dies (killed, out of memory, crashed) has its study retried on another worker (a replacement worker is
  started), up to ``max_attempts`` times. Outputs are written atomically and never deleted.
* **Cancel**: Ctrl-C (or ``cancel``) stops dispatching, cancels the running studies (nothing of theirs is
  written), and writes the results table of the finished ones.
"""
from __future__ import annotations

import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from ..errors import Cancelled, InputError, MRISegAssistError
from ..progress import CancelToken
from .energy import EnergyMeter, EnergyReading, total
from .results import (FAILED, STUDY_FILE, StudyRecord, append_run, read_record, study_dir, write_table)
from .studies import Study, discover_studies
from .workflow import StudyProcessor, WorkflowOptions, study_key

#: Ray maps 127.0.0.1 / localhost to the machine's network address; another loopback address keeps a local
#: cluster's traffic on the loopback interface.
LOCAL_NODE_IP = "127.0.0.2"
#: Object store of a local cluster: studies travel as paths and records, never as arrays.
LOCAL_OBJECT_STORE_BYTES = 256 * 2 ** 20


@dataclass
class BatchConfig:
    """A batch run (the ``mrisegassist batch`` options). ``source``: folder of case folders or CSV manifest."""

    source: Path
    out: Path
    options: WorkflowOptions = field(default_factory=WorkflowOptions)
    serial: bool = False
    workers: Optional[int] = None
    address: Optional[str] = None
    device: Optional[str] = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: Optional[float] = None
    max_attempts: int = 3
    retry_failed: bool = False
    country: Optional[str] = None
    energy: bool = True
    progress: bool = True
    table_every_s: float = 10.0


@dataclass
class BatchEvent:
    """What the runner reports to ``on_event``: ``kind`` is ``"started"`` (a worker is up), ``"dispatched"``,
    ``"finished"`` or ``"worker-died"`` (its study is retried elsewhere or recorded as failed)."""

    kind: str
    case: str = ""
    worker_pid: int = 0
    attempt: int = 0
    status: str = ""


@dataclass
class BatchSummary:
    """One run: counts, time, throughput and energy (``energy_studies``: the sum of the studies' process
    measurements; ``energy_run``: the whole machine over the run's wall time, other load included)."""

    out: str
    mode: str
    studies: int
    done: int
    failed: int
    skipped: int
    pending: int
    cancelled: bool
    workers: int
    device: str
    address: str
    started_at: str
    wall_s: float
    startup_s: float
    studies_per_hour: Optional[float]
    retried: list[str]
    worker_deaths: int
    energy_studies: EnergyReading
    energy_run: EnergyReading
    records: list[StudyRecord] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        import dataclasses

        doc = dataclasses.asdict(self)
        doc.pop("records")
        return doc


# --------------------------------------------------------------------------------------------- the worker
class StudyWorker:
    """The Ray actor's body: a processor plus a cancel token per running study (see :func:`_actor_class`)."""

    def __init__(self, options: WorkflowOptions, out: str, device: Optional[str], threads: Optional[int],
                 country: Optional[str], energy: bool) -> None:
        self.processor = StudyProcessor(options, Path(out), device, threads, country, energy)
        self.token: Optional[CancelToken] = None

    def pid(self) -> int:
        return os.getpid()

    def process(self, study: Study, attempt: int) -> Optional[StudyRecord]:
        """The study's record, or ``None`` when it was cancelled."""
        self.token = CancelToken()
        try:
            return self.processor.process(study, attempt, self.token)
        except Cancelled:
            return None

    def cancel(self) -> None:
        if self.token is not None:
            self.token.cancel()


def _actor_class(cpus: float, gpus: float):
    import ray

    # max_concurrency 2: cancel() and pid() answer while a study runs (the driver sends one study at a time)
    return ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_concurrency=2)(StudyWorker)


# ---------------------------------------------------------------------------------------------- helpers
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def connect_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> bool:
    """Join ``address`` or start a local cluster unless Ray is already initialised; True when this call
    started or joined it (the caller then shuts it down)."""
    try:
        import ray
    except ImportError as exc:
        raise InputError(f"batch runs on Ray, which is not installed ({exc}); pip install 'ray==2.60.0', or "
                         f"use --serial") from None
    if ray.is_initialized():
        return False
    common = dict(log_to_driver=False, logging_level="WARNING", include_dashboard=False)
    if address:
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise InputError(f"--address {address}: cannot join the Ray cluster ({exc})") from None
    else:
        from ..atlas.space import cpu_count

        ray.init(num_cpus=num_cpus or cpu_count(), _node_ip_address=LOCAL_NODE_IP,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, **common)
    return True


def plan(studies: list[Study], config: BatchConfig) -> tuple[list[Study], dict[str, StudyRecord]]:
    """``(studies to run, {case: reusable finished record})``."""
    todo, reused = [], {}
    for study in studies:
        old = read_record(config.out, study.case)
        if old is not None and old.reusable(study_key(study, config.options), config.retry_failed):
            reused[study.case] = old
        else:
            todo.append(study)
    return todo, reused


def _guard(studies: list[Study], config: BatchConfig) -> None:
    from ..outputs import Output, guard_outputs

    out = Path(config.out)
    source = Path(config.source)
    inputs, folders = [source] if source.is_file() else [], [s.folder for s in studies]
    if not out.is_dir():  # the folder itself passes the rules before it is created (its parent must exist)
        guard_outputs([Output(out, option="-o")], inputs, folders)
        out.mkdir()
    guard_outputs([Output(out / "results.parquet"), Output(out / "results.csv", "csv"),
                   Output(out / "runs.json", "json")], inputs, folders)


class _Progress:
    """tqdm bar over the studies: done / failed / remaining, rate and time left."""

    def __init__(self, total_: int, skipped: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.done = self.failed = 0
        self.total = total_
        self.skipped = skipped
        self.bar = tqdm(total=total_, initial=skipped, desc="studies", unit="study", disable=not enabled,
                        dynamic_ncols=True, smoothing=0.1)
        self._show()

    def _show(self, refresh: bool = True) -> None:
        remaining = self.total - self.skipped - self.done - self.failed
        self.bar.set_postfix_str(f"done {self.done + self.skipped}, failed {self.failed}, remaining {remaining}",
                                 refresh=refresh)

    def finished(self, record: StudyRecord) -> None:
        if record.done:
            self.done += 1
        else:
            self.failed += 1
        self._show(refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------------------------------------ run
def run_batch(config: BatchConfig, cancel: Optional[CancelToken] = None,
              on_event: Optional[Callable[[BatchEvent], None]] = None) -> BatchSummary:
    """Run every study of ``config.source`` not finished yet; returns the run's summary (also appended to
    ``out/runs.json``). Ctrl-C or ``cancel`` ends the run early with ``cancelled=True``."""
    from .energy import check_country

    config.options.check()
    config.country = check_country(config.country)
    if config.max_attempts < 1:
        raise InputError("--max-attempts must be >= 1")
    studies = discover_studies(config.source)
    _guard(studies, config)
    todo, reused = plan(studies, config)
    cancel = cancel or CancelToken()
    emit = on_event or (lambda event: None)
    records: dict[str, StudyRecord] = dict(reused)
    order = [s.case for s in studies]

    def table() -> None:
        write_table([records[c] for c in order if c in records], config.out)

    table()  # consistent from the start: the reused records
    started_at, t0 = _now(), time.perf_counter()
    run_meter = EnergyMeter(config.country, "machine", config.energy)
    run_meter.start("run")
    bar = _Progress(len(studies), len(reused), config.progress)
    state = _RunState()
    mode = "serial" if config.serial else "ray"
    try:
        if todo and config.serial:
            _run_serial(todo, config, records, bar, cancel, emit, state)
        elif todo:
            _run_ray(todo, config, records, bar, cancel, emit, state, table)
    except KeyboardInterrupt:
        cancel.cancel()
    finally:
        bar.close()
        energy_run = run_meter.stop()
        table()
    wall = time.perf_counter() - t0
    new = [records[s.case] for s in todo if s.case in records]
    run_time = max(wall - state.startup_s, 1e-9)
    summary = BatchSummary(
        str(config.out), mode, len(studies), sum(r.done for r in new), sum(not r.done for r in new), len(reused),
        len(todo) - len(new), cancel.cancelled, state.workers, state.device, state.address, started_at, wall,
        state.startup_s, 3600.0 * len(new) / run_time if new else None, sorted(state.retried),
        state.deaths, total([r.energy for r in new]), energy_run, [records[c] for c in order if c in records])
    append_run(config.out, summary.to_json())
    return summary


@dataclass
class _RunState:
    workers: int = 0
    device: str = ""
    address: str = ""
    startup_s: float = 0.0
    deaths: int = 0
    retried: set = field(default_factory=set)


def _run_serial(todo, config, records, bar, cancel, emit, state) -> None:
    t = time.perf_counter()
    processor = StudyProcessor(config.options, config.out, config.device, None, config.country, config.energy)
    state.workers, state.device, state.address = 1, processor.service.device, "in-process"
    state.startup_s = time.perf_counter() - t
    emit(BatchEvent("started", worker_pid=os.getpid()))
    for study in todo:
        if cancel.cancelled:
            return
        emit(BatchEvent("dispatched", study.case, os.getpid(), 1))
        try:
            record = processor.process(study, 1, cancel)
        except Cancelled:
            return
        records[study.case] = record
        bar.finished(record)
        emit(BatchEvent("finished", study.case, os.getpid(), 1, record.status))


def _size(config: BatchConfig, n_todo: int) -> tuple[int, str, float, int]:
    """``(workers, device, gpus per worker, torch threads per worker)`` from the cluster's resources."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 1)), float(resources.get("GPU", 0))
    device = config.device or ("cuda" if gpus > 0 else "cpu")
    per_gpu = config.gpus_per_worker if config.gpus_per_worker is not None else (1.0 if device == "cuda" else 0.0)
    if device == "cuda" and gpus <= 0:
        raise InputError("--device cuda: the Ray cluster has no GPU")
    if config.cpus_per_worker <= 0:
        raise InputError("--cpus-per-worker must be > 0")
    if config.workers:
        workers = int(config.workers)
    elif per_gpu > 0:
        workers = max(1, int(gpus // per_gpu))
    else:
        workers = max(1, int(cpus // config.cpus_per_worker))
    workers = max(1, min(workers, n_todo))
    if workers * config.cpus_per_worker > cpus + 1e-9 or workers * per_gpu > gpus + 1e-9:
        raise InputError(f"{workers} workers x ({config.cpus_per_worker:g} CPU, {per_gpu:g} GPU) do not fit the "
                         f"cluster's {cpus:g} CPUs and {gpus:g} GPUs (Ray would wait for them forever); lower "
                         f"--workers, --cpus-per-worker or --gpus-per-worker")
    return workers, device, per_gpu, max(1, int(config.cpus_per_worker))


def _run_ray(todo, config, records, bar, cancel, emit, state, table) -> None:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    t = time.perf_counter()
    started = connect_ray(config.address)
    try:
        n, device, per_gpu, threads = _size(config, len(todo))
        state.workers, state.device = n, device
        state.address = config.address or ray.get_runtime_context().gcs_address
        actor_cls = _actor_class(config.cpus_per_worker, per_gpu)
        args = (config.options, str(config.out), device, threads, config.country, config.energy)

        def new_worker():
            actor = actor_cls.remote(*args)
            return actor, actor.pid.remote()

        starting = [new_worker() for _ in range(n)]
        pids: dict = {}
        idle = []
        for actor, pid_ref in starting:
            try:
                pids[actor] = ray.get(pid_ref)
            except RayActorError as exc:
                raise MRISegAssistError(f"a batch worker could not start: {_first_line(exc)}") from None
            idle.append(actor)
            emit(BatchEvent("started", worker_pid=pids[actor]))
        state.startup_s = time.perf_counter() - t
        pending = deque((s, 1) for s in todo)
        inflight: dict = {}
        last_table = time.perf_counter()
        max_deaths = n * config.max_attempts + len(todo)
        try:
            while pending or inflight:
                if cancel.cancelled:
                    raise KeyboardInterrupt
                while idle and pending:
                    actor = idle.pop()
                    study, attempt = pending.popleft()
                    inflight[actor.process.remote(study, attempt)] = (actor, study, attempt)
                    emit(BatchEvent("dispatched", study.case, pids.get(actor, 0), attempt))
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
                for ref in ready:
                    actor, study, attempt = inflight.pop(ref)
                    try:
                        record = ray.get(ref)
                    except RayActorError as exc:
                        state.deaths += 1
                        emit(BatchEvent("worker-died", study.case, pids.pop(actor, 0), attempt))
                        if state.deaths > max_deaths:
                            raise MRISegAssistError(f"batch workers keep dying ({state.deaths} so far; last: "
                                                    f"{_first_line(exc)})") from None
                        if attempt < config.max_attempts:
                            state.retried.add(study.case)
                            pending.appendleft((study, attempt + 1))
                        else:
                            record = _died(study, config, attempt, exc)
                            _finish(record, records, bar, emit, pids.get(actor, 0))
                        replacement, pid_ref = new_worker()  # keep the pool's size
                        try:
                            pids[replacement] = ray.get(pid_ref)
                        except RayActorError:
                            if not idle and not inflight:
                                raise MRISegAssistError(f"no batch worker is left: a replacement could not "
                                                        f"start ({_first_line(exc)})") from None
                            continue
                        emit(BatchEvent("started", worker_pid=pids[replacement]))
                        idle.append(replacement)
                        continue
                    except RayTaskError as exc:  # writing the study's own record failed
                        record = _task_failed(study, config, attempt, exc)
                    idle.append(actor)
                    if record is None:  # cancelled
                        continue
                    _finish(record, records, bar, emit, pids.get(actor, 0))
                if time.perf_counter() - last_table > config.table_every_s:
                    table()
                    last_table = time.perf_counter()
        except KeyboardInterrupt:
            cancel.cancel()
            for actor, _study, _attempt in inflight.values():
                actor.cancel.remote()
            deadline = time.perf_counter() + 30
            for ref, (actor, study, _attempt) in list(inflight.items()):
                try:
                    record = ray.get(ref, timeout=max(deadline - time.perf_counter(), 0.1))
                except (RayActorError, RayTaskError, GetTimeoutError, KeyboardInterrupt):
                    continue
                if record is not None:  # it finished before the cancel reached it
                    _finish(record, records, bar, emit, pids.get(actor, 0))
        finally:
            for actor in list(pids) + idle:
                try:
                    ray.kill(actor)
                except Exception:  # noqa: BLE001 - already gone
                    pass
    finally:
        if started:
            ray.shutdown()


def _finish(record: StudyRecord, records: dict, bar: _Progress, emit, pid: int) -> None:
    records[record.case] = record
    bar.finished(record)
    emit(BatchEvent("finished", record.case, record.worker_pid or pid, record.attempts, record.status))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _failed_record(study: Study, config: BatchConfig, attempt: int, kind: str, message: str) -> StudyRecord:
    """A failed record written by the driver (the worker could not write one)."""
    record = StudyRecord(study.case, FAILED, study_key(study, config.options), config.options.workflow,
                         groups=dict(study.groups), reference=str(study.reference or ""), attempts=attempt,
                         finished_at=_now(), error_kind=kind, error=message, worker=f"{socket.gethostname()}")
    folder = study_dir(config.out, study.case)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        record.write(folder / STUDY_FILE)
    except (OSError, MRISegAssistError) as exc:
        record.error += f" (its record could not be written: {exc})"
    return record


def _died(study: Study, config: BatchConfig, attempt: int, exc: BaseException) -> StudyRecord:
    return _failed_record(study, config, attempt, "WorkerDied",
                          f"the worker process died {attempt} time(s) on this study (last: {_first_line(exc)})")


def _task_failed(study: Study, config: BatchConfig, attempt: int, exc: BaseException) -> StudyRecord:
    cause = getattr(exc, "cause", None) or exc
    return _failed_record(study, config, attempt, type(cause).__name__, str(cause).strip() or repr(cause))
