"""Clients of the segmentation service: the same calls in-process, to a local worker or to a remote server.

Every client offers ``submit(request) -> Submission`` (non-blocking: a front end polls ``submission.poll()``
from its main-thread timer, ``cancel()``s it, and reads ``result()`` once the state is final) and the blocking
``call(request, progress, cancel)`` (scripts, the CLI), plus ``info()``, ``weights_status(engine)`` and
``release()``.

* :class:`InProcessClient`: the :class:`~.core.Service` in this process (``submit`` computes in a thread);
* :class:`HttpClient`: a server (``mrisegassist server``) at a URL with an optional token. Standard library
  only (``http.client``), so it runs in Slicer's Python without extra packages;
* :class:`~.worker.LocalWorker`: a server process this client starts and owns.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
from abc import ABC, abstractmethod
from typing import Any, Optional
from urllib.parse import urlsplit

from ..errors import InputError
from ..progress import CancelToken, ProgressFn, report
from . import wire
from .wire import MissingVolume
from .auth import is_loopback
from .api import ServiceInfo, WeightsStatus
from .protocol import (PREFIX, VERSION_HEADER, JobStatus, ServiceUnavailable, VersionMismatch, bearer,
                       client_version, error_from, error_kind, error_message, version_message)

#: Largest result a client accepts (a label map of 1024^3 uint16 voxels is 2 GB).
MAX_RESULT_BYTES = 4 * 2 ** 30


class Submission(ABC):
    """A submitted job: poll it (non-blocking), cancel it, read its result once final."""

    @abstractmethod
    def poll(self) -> JobStatus:
        """The job's current state (never blocks on the computation)."""

    @abstractmethod
    def cancel(self) -> None:
        """Ask the job to stop; its state becomes ``cancelled`` at its next check."""

    @abstractmethod
    def result(self) -> Any:
        """The result of a ``done`` job; raises the job's error otherwise."""


class SegmentationClient(ABC):
    """Where segmentation runs (see module docstring). ``where`` describes it for messages."""

    where = ""

    @abstractmethod
    def submit(self, request) -> Submission:
        """Start ``request`` and return at once."""

    def call(self, request, progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
             interval: float = 0.05):
        """Run ``request`` to its end (progress forwarded, ``cancel`` honoured); returns its result."""
        submission = self.submit(request)
        cancelled = False
        while True:
            status = submission.poll()
            if status.progress or status.message:
                report(progress, status.progress, status.message)
            if status.final:
                return submission.result()
            if cancel is not None and cancel.cancelled and not cancelled:
                submission.cancel()
                cancelled = True
            time.sleep(interval)

    @abstractmethod
    def info(self) -> ServiceInfo:
        """What the service offers (version, devices, models, engines, atlas reference sets)."""

    @abstractmethod
    def weights_status(self, engine: str) -> WeightsStatus:
        """Whether ``engine``'s weights are installed where the service runs."""

    @abstractmethod
    def release(self) -> None:
        """Free the service's models, engines and prepared volumes."""

    def forget_volumes(self) -> None:
        """Drop the prepared volumes kept for this client (the scene was closed)."""

    def close(self) -> None:
        """Let go of the service (a local worker stops)."""


# ----------------------------------------------------------------------------------------- in-process
class ThreadSubmission(Submission):
    """A request computed by a :class:`~.core.Service` in a daemon thread of this process."""

    def __init__(self, service, request) -> None:
        self._cancel = CancelToken()
        self._lock = threading.Lock()
        self._status = JobStatus("running", 0.0, "starting")
        self._outcome: Optional[tuple[bool, Any]] = None
        self._thread = threading.Thread(target=self._work, args=(service, request), daemon=True,
                                        name=f"mrisegassist: {type(request).__name__}")
        self._thread.start()

    def _progress(self, fraction: float, message: str) -> None:
        with self._lock:
            if not self._status.final:
                self._status = JobStatus("running", fraction, message)

    def _work(self, service, request) -> None:
        try:
            outcome = (True, service.run(request, self._progress, self._cancel))
            status = JobStatus("done", 1.0, "done")
        except BaseException as exc:  # handed to the polling thread
            outcome = (False, exc)
            status = JobStatus("cancelled" if error_kind(exc) == "cancelled" else "failed", 0.0, "",
                               error_kind(exc), error_message(exc))
        with self._lock:
            self._outcome, self._status = outcome, status

    def poll(self) -> JobStatus:
        with self._lock:
            return self._status

    def cancel(self) -> None:
        self._cancel.cancel()

    def result(self) -> Any:
        self._thread.join()
        ok, value = self._outcome
        if not ok:
            raise value
        return value


class InProcessClient(SegmentationClient):
    """The service in this process (tests, scripts): ``call`` computes in the calling thread, ``submit`` in a
    thread of this process."""

    where = "in this process"

    def __init__(self, service=None, device: Optional[str] = None) -> None:
        if service is None:
            from .core import Service

            service = Service(device)
        self.service = service

    def submit(self, request) -> Submission:
        return ThreadSubmission(self.service, request)

    def call(self, request, progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
             interval: float = 0.05):
        return self.service.run(request, progress, cancel)

    def info(self) -> ServiceInfo:
        return self.service.info()

    def weights_status(self, engine: str) -> WeightsStatus:
        return self.service.weights_status(engine)

    def release(self) -> None:
        self.service.release()

    def forget_volumes(self) -> None:
        self.service.cache.clear()


# ---------------------------------------------------------------------------------------------- HTTP
class HttpSubmission(Submission):
    """A job on a server: each :meth:`poll` is one short HTTP request."""

    def __init__(self, client: "HttpClient", path: str) -> None:
        self.client, self.path = client, path
        self._last = JobStatus("queued")

    def poll(self) -> JobStatus:
        if self._last.final:
            return self._last
        self._last = JobStatus.from_json(self.client.get_json(self.path))
        return self._last

    def cancel(self) -> None:
        if not self._last.final:
            self.client.request("DELETE", self.path)

    def events(self):
        """The job's status changes as the server streams them, until a final state."""
        yield from self.client.stream_json(self.path + "/events")

    def result(self) -> Any:
        status = self.poll()
        if status.state != "done":
            status.raise_error()
            raise InputError(f"the job is still {status.state}")
        deflate = "?deflate=1" if self.client.compress else ""  # label maps shrink ~100x
        _, body = self.client.request("GET", self.path + "/result" + deflate)
        return wire.loads(body, MAX_RESULT_BYTES)


class HttpClient(SegmentationClient):
    """A segmentation server at ``url`` (``http://host:port``), with its access ``token`` if it has one.

    The first call checks that the server runs this client's version (:class:`VersionMismatch` naming both
    otherwise) and opens a session. ``timeout``: seconds for one HTTP exchange (uploads of large cases may need
    more on slow networks). ``compress``: ask for deflated results (default: unless the server is on loopback).
    """

    def __init__(self, url: str, token: Optional[str] = None, timeout: float = 300.0,
                 compress: Optional[bool] = None) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"server URL {url!r}: expected http://HOST:PORT (or https://)")
        self.url = f"{parts.scheme}://{parts.netloc}"
        self.where = f"the server at {self.url}"
        self._scheme, self._host = parts.scheme, parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self.token = token or None
        self.timeout = timeout
        self.compress = (not is_loopback(self._host)) if compress is None else bool(compress)
        self._session: Optional[str] = None
        self._known: set = set()  # fingerprints of the volumes the server holds for this session
        self._info: Optional[ServiceInfo] = None
        self._lock = threading.Lock()

    # --------------------------------------------------------------------------------- transport
    def _connection(self, timeout: Optional[float] = None):
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=timeout or self.timeout)

    def _headers(self, content_type: Optional[str] = None) -> dict:
        headers = {VERSION_HEADER: client_version(), **bearer(self.token)}
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _fail(self, status: int, body: bytes):
        try:
            error = json.loads(body)["error"]
            kind, message = str(error["kind"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            kind, message = "internal", f"HTTP {status}: {body[:300].decode('utf-8', 'replace')}"
        if kind == "auth":
            message = f"{self.where} refused the request: {message}"
        if kind == "missing-volume":
            return MissingVolume(message)
        return error_from(kind, message)

    def _unreachable(self, exc: BaseException) -> ServiceUnavailable:
        return ServiceUnavailable(f"cannot reach the MRISegAssist server at {self.url}: {exc}")

    def request(self, method: str, path: str, body: Optional[bytes] = None, content_type: Optional[str] = None,
                timeout: Optional[float] = None) -> tuple[int, bytes]:
        """One HTTP exchange; raises the server's error (or :class:`ServiceUnavailable`) on failure."""
        connection = self._connection(timeout)
        try:
            connection.request(method, path, body=body, headers=self._headers(content_type))
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        finally:
            connection.close()
        if response.status >= 400:
            raise self._fail(response.status, data)
        return response.status, data

    def get_json(self, path: str) -> Any:
        return json.loads(self.request("GET", path)[1])

    def stream_json(self, path: str):
        """Newline-delimited JSON documents streamed by the server."""
        connection = self._connection()
        try:
            connection.request("GET", path, headers=self._headers())
            response = connection.getresponse()
            if response.status >= 400:
                raise self._fail(response.status, response.read())
            while True:
                line = response.readline()
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        finally:
            connection.close()

    # ---------------------------------------------------------------------------------- session
    def connect(self) -> ServiceInfo:
        """Check the server's version (once) and return its :class:`ServiceInfo`."""
        if self._info is None:
            info = wire.from_document(self.get_json(f"{PREFIX}/info"))
            if info.version != client_version():
                raise VersionMismatch(version_message(client_version(), info.version))
            info.where = self.where
            self._info = info
        return self._info

    def _session_path(self, renew: bool = False) -> str:
        with self._lock:
            if self._session is None or renew:
                self.connect()
                self._session = json.loads(self.request("POST", f"{PREFIX}/sessions")[1])["session"]
                self._known = set()
            return f"{PREFIX}/sessions/{self._session}"

    def submit(self, request) -> HttpSubmission:
        """Upload ``request`` (volumes the session's server already holds go as their fingerprint only)."""
        path = self._session_path()
        for attempt in range(3):
            try:
                _, data = self.request("POST", path + "/jobs", wire.dumps(request, known=self._known), wire.MEDIA_TYPE)
                return HttpSubmission(self, f"{path}/jobs/{json.loads(data)['job']}")
            except MissingVolume:
                self._known.clear()  # the server dropped it: send every volume again
            except InputError as exc:
                if "unknown session" not in str(exc) or attempt:
                    raise
                path = self._session_path(renew=True)  # the server restarted: a new session
        raise ServiceUnavailable(f"{self.where} keeps refusing this request's volumes")

    def call(self, request, progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
             interval: float = 0.05):
        """Submit, follow the streamed progress (cancel forwarded within the server's 0.5 s heartbeat), fetch."""
        submission = self.submit(request)
        sent_cancel = False
        for event in submission.events():
            status = JobStatus.from_json(event)
            report(progress, status.progress, status.message)
            if status.final:
                submission._last = status
                break
            if cancel is not None and cancel.cancelled and not sent_cancel:
                submission.cancel()
                sent_cancel = True
        return submission.result()

    def info(self) -> ServiceInfo:
        return self.connect()

    def weights_status(self, engine: str) -> WeightsStatus:
        self.connect()
        return wire.from_document(self.get_json(f"{PREFIX}/weights/{engine}"))

    def release(self) -> None:
        self.connect()
        self.request("POST", f"{PREFIX}/release")

    def forget_volumes(self) -> None:
        self.close()  # the server drops the session's volumes; the next call opens a new session

    def close(self) -> None:
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            try:
                self.request("DELETE", f"{PREFIX}/sessions/{session}", timeout=5)
            except (ServiceUnavailable, InputError):
                pass

