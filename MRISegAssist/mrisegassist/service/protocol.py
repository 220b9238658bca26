"""The HTTP protocol between segmentation clients and ``mrisegassist server`` (version 1).

Every request carries ``X-MRISegAssist-Version: <client version>`` and, when the server has a token,
``Authorization: Bearer <token>``. Bodies of requests and results are archives (:mod:`.wire`, media type
``application/vnd.mrisegassist+zip``); small documents are JSON. Errors are JSON
``{"error": {"kind": "input" | "checkpoint" | "cancelled" | "version" | "auth" | "too-large" | "not-found" |
"missing-volume" | "internal", "message": "..."}}`` with a 4xx/5xx status.

Volumes in a request carry their sha256 (``{"__volume__": {"array", "sha256", "geometry"}}``); the server keeps
the last few of each session, and a later request may send ``{"__volume__": {"ref": sha256, "geometry"}}``
instead (re-prompting the same case uploads nothing). A reference the server no longer holds gets
``409 missing-volume``, and the client sends the volume again.

=======================================================  ============================================================
``GET /v1/info``                                         :class:`~.api.ServiceInfo` (JSON)
``GET /v1/weights/{engine}``                             :class:`~.api.WeightsStatus` (JSON)
``POST /v1/sessions``                                    ``{"session": id}``: jobs and prepared volumes of one client
``DELETE /v1/sessions/{sid}``                            end the session (cancels its jobs, drops its volumes)
``POST /v1/sessions/{sid}/jobs``  (archive: a request)   ``{"job": id}`` (413 above the server's size limit)
``GET /v1/sessions/{sid}/jobs/{jid}``                    :class:`JobStatus` (JSON)
``GET /v1/sessions/{sid}/jobs/{jid}/events``             the status as newline-delimited JSON, streamed on every
                                                         change and at least every 0.5 s, until a final state
``GET /v1/sessions/{sid}/jobs/{jid}/result[?deflate=1]`` archive: the result (409 while running, the job's error
                                                         if it failed); ``deflate=1``: compressed (slow networks)
``DELETE /v1/sessions/{sid}/jobs/{jid}``                 cancel: the job stops at its next check (within a second)
``POST /v1/release``                                     free the server's models, engines and prepared volumes
=======================================================  ============================================================

A session is only reachable with its id (random, 128 bits): clients sharing a server never see each other's
jobs, volumes or results. When the server is started, it prints ``MRISegAssist serving at <url>`` and (with
``--ready-file``) writes ``{"url", "pid", "version"}`` to that file.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from .. import __version__
from ..errors import Cancelled, CheckpointError, InputError, MRISegAssistError

PROTOCOL = 1
PREFIX = "/v1"
VERSION_HEADER = "X-MRISegAssist-Version"
READY_PREFIX = "MRISegAssist serving at "
JSON_TYPE = "application/json"
STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL_STATES = ("done", "failed", "cancelled")


class ServiceUnavailable(MRISegAssistError):
    """The server or worker cannot be reached, or stopped during a job."""


class ServiceError(MRISegAssistError):
    """The job failed on the server with an unexpected error (its type and message are given)."""


class VersionMismatch(MRISegAssistError):
    """Client and server run different versions of MRISegAssist."""


def version_message(client: str, server: str) -> str:
    return (f"version mismatch: this client runs MRISegAssist {client}, the server at the other end runs "
            f"MRISegAssist {server}; install the same version on both sides")


@dataclass
class JobStatus:
    """State of a job: one of :data:`STATES` (plus ``"starting"`` while a local worker starts), progress 0..1,
    the last progress message, and for failed jobs the error's kind and message."""

    state: str
    progress: float = 0.0
    message: str = ""
    error_kind: str = ""
    error: str = ""

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "JobStatus":
        return cls(str(data.get("state", "failed")), float(data.get("progress", 0.0)), str(data.get("message", "")),
                   str(data.get("error_kind", "")), str(data.get("error", "")))

    def raise_error(self) -> None:
        """Raise the job's error (for ``failed`` / ``cancelled``)."""
        if self.state == "cancelled":
            raise Cancelled(self.error or "cancelled by the user")
        if self.state == "failed":
            raise error_from(self.error_kind, self.error)


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, Cancelled):
        return "cancelled"
    if isinstance(exc, InputError):
        return "input"
    if isinstance(exc, CheckpointError):
        return "checkpoint"
    if isinstance(exc, VersionMismatch):
        return "version"
    if isinstance(exc, MRISegAssistError):
        return "error"
    return "internal"


def error_message(exc: BaseException) -> str:
    if isinstance(exc, MRISegAssistError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def error_from(kind: str, message: str) -> MRISegAssistError:
    """The exception a client raises for an error the server reported."""
    if kind == "cancelled":
        return Cancelled(message)
    if kind in ("input", "too-large", "auth", "not-found", "missing-volume"):
        return InputError(message)
    if kind == "checkpoint":
        return CheckpointError(message)
    if kind == "version":
        return VersionMismatch(message)
    if kind == "error":
        return ServiceError(message)
    return ServiceError(f"the segmentation server failed: {message}")


def client_version() -> str:
    return __version__


def bearer(token: Optional[str]) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}
