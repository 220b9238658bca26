"""``mrisegassist server``: the segmentation service over HTTP (aiohttp), holding models between calls.

The protocol is described in :mod:`.protocol`. With ``jobs=1`` (the default: one job at a time on the device,
others queue) :func:`serve` computes on the process's main thread and runs the HTTP event loop in a second
thread, so a job allocates its volume-sized arrays as the same job in a script does (glibc's main heap: a job
thread's own arena made them ~4-8 % slower on 2 cores, `bench service`); ``jobs > 1``: a pool of threads. Each
client session has its own jobs and prepared-volume cache. Requests
carry volumes, never paths: a server started without ``allow_local_files`` reaches nothing on its disk but its
installed models, weights and atlas cache. Bound off loopback it requires a token; with ``loopback_only`` (the
default on loopback) requests whose ``Host`` is not a loopback name are refused (DNS-rebinding guard).
"""
from __future__ import annotations

import asyncio
import json
import os
import queue
import secrets
import sys
import threading
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from aiohttp import web

from .. import __version__
from ..errors import InputError
from ..progress import CancelToken
from . import api, auth, wire
from .core import PreparedCache, Service
from .protocol import (PREFIX, READY_PREFIX, VERSION_HEADER, JobStatus, error_kind,
                       error_message, version_message)

DEFAULT_MAX_REQUEST_MB = 1024
SESSION_IDLE_S = 3600.0
KEEP_FINISHED_JOBS = 4
REQUEST_TYPES = (api.AutoSegmentRequest, api.PromptRequest, api.AtlasBoxesRequest, api.AutoRequest,
                 api.DownloadWeightsRequest)


@dataclass
class _Job:
    id: str
    request: object
    cancel: CancelToken = field(default_factory=CancelToken)
    status: JobStatus = field(default_factory=lambda: JobStatus("queued", 0.0, "queued"))
    result: object = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    loop: Optional[asyncio.AbstractEventLoop] = None
    changed: Optional[asyncio.Event] = None
    notified: float = 0.0

    def set(self, status: JobStatus) -> None:
        """Record a new status (from the job thread); wake the event streams on a final state at once, on
        progress at most every 0.25 s (few wake-ups: the event loop competes with the job for the GIL)."""
        with self.lock:
            if self.status.final:
                return
            self.status = status
            now = time.monotonic()
            if not (status.final or now - self.notified >= 0.25) or self.loop is None:
                return
            self.notified = now
        try:
            self.loop.call_soon_threadsafe(self.changed.set)
        except RuntimeError:  # the loop has closed (shutdown)
            pass

    def get(self) -> JobStatus:
        with self.lock:
            return self.status


@dataclass
class _Session:
    id: str
    cache: PreparedCache
    volumes: wire.VolumeStore = field(default_factory=wire.VolumeStore)
    jobs: dict = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)


class MainThreadExecutor(Executor):
    """Runs submitted calls one at a time on the thread that calls :meth:`run` (the server's main thread)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn, /, *args, **kwargs) -> Future:
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new jobs after shutdown")
            future: Future = Future()
            self._queue.put((future, fn, args, kwargs))
            return future

    def run(self, stop: threading.Event) -> None:
        """Run calls as they come until ``stop`` is set or :meth:`shutdown` is called (a running call finishes
        first). ``KeyboardInterrupt`` inside a call ends the loop after failing that call."""
        while not stop.is_set():
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is None:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
        while cancel_futures:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        self._queue.put(None)


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": {"kind": kind, "message": message}}, status=status)


class SegmentationServer:
    """The aiohttp application around a :class:`~.core.Service` (see module docstring)."""

    def __init__(self, service: Service, token: Optional[str] = None, loopback_only: bool = True,
                 max_request_mb: float = DEFAULT_MAX_REQUEST_MB, jobs: int = 1,
                 executor: Optional[Executor] = None) -> None:
        if max_request_mb <= 0:
            raise InputError("--max-request-mb must be positive")
        self.service = service
        self.token = token
        self.loopback_only = loopback_only
        self.max_request_bytes = int(max_request_mb * 2 ** 20)
        self.executor = executor or ThreadPoolExecutor(max_workers=max(int(jobs), 1),
                                                       thread_name_prefix="mrisegassist-job")
        self.sessions: dict[str, _Session] = {}
        self.app = web.Application(middlewares=[self._guard], client_max_size=self.max_request_bytes)
        p = PREFIX
        self.app.add_routes([
            web.get(f"{p}/info", self.info), web.get(f"{p}/weights/{{engine}}", self.weights),
            web.post(f"{p}/sessions", self.new_session), web.delete(f"{p}/sessions/{{sid}}", self.end_session),
            web.post(f"{p}/sessions/{{sid}}/jobs", self.submit),
            web.get(f"{p}/sessions/{{sid}}/jobs/{{jid}}", self.status),
            web.get(f"{p}/sessions/{{sid}}/jobs/{{jid}}/events", self.events),
            web.get(f"{p}/sessions/{{sid}}/jobs/{{jid}}/result", self.result),
            web.delete(f"{p}/sessions/{{sid}}/jobs/{{jid}}", self.cancel),
            web.post(f"{p}/release", self.release)])
        self.app.on_shutdown.append(self._shutdown)

    # ---------------------------------------------------------------------------------------- guard
    @web.middleware
    async def _guard(self, request: web.Request, handler):
        host = request.headers.get("Host", "")
        if self.loopback_only and not auth.is_loopback(host):
            return _error(403, "auth", f"host {host!r} is not this machine's loopback address")
        header = request.headers.get("Authorization", "")
        candidate = header[7:].strip() if header.lower().startswith("bearer ") else None
        if not auth.token_matches(self.token, candidate):
            return _error(401, "auth", "a valid access token is required (the one `mrisegassist server` printed "
                                       "or was given with --token)" if candidate is None else
                          "the access token is wrong")
        version = request.headers.get(VERSION_HEADER)
        if version is not None and version != __version__:
            return _error(409, "version", version_message(version, __version__))
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status == 413:
                return _error(413, "too-large", f"the request exceeds this server's limit of "
                                                f"{self.max_request_bytes / 2 ** 20:.0f} MB (--max-request-mb)")
            if exc.status == 404:
                return _error(404, "not-found", f"no such endpoint: {request.method} {request.path}")
            raise
        except InputError as exc:
            return _error(400, "input", str(exc))

    async def _blocking(self, fn, *args):
        """Run ``fn`` off the event loop (decoding, encoding) without taking a job thread."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # ----------------------------------------------------------------------------------- discovery
    async def info(self, request: web.Request) -> web.Response:
        info = await self._blocking(self.service.info)
        info.where = "server"
        return web.json_response(wire.to_document(info))

    async def weights(self, request: web.Request) -> web.Response:
        status = await self._blocking(self.service.weights_status, request.match_info["engine"])
        return web.json_response(wire.to_document(status))

    async def release(self, request: web.Request) -> web.Response:
        for session in self.sessions.values():
            session.cache.clear()
            session.volumes.clear()
        await asyncio.get_running_loop().run_in_executor(self.executor, self.service.release)
        return web.json_response({"released": True})

    # ------------------------------------------------------------------------------------ sessions
    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s.id for s in self.sessions.values() if now - s.last_seen > SESSION_IDLE_S]:
            self._drop(sid)

    def _drop(self, sid: str) -> None:
        session = self.sessions.pop(sid, None)
        if session is not None:
            for job in session.jobs.values():
                job.cancel.cancel()
            session.cache.clear()
            session.volumes.clear()

    def _session(self, request: web.Request) -> _Session:
        session = self.sessions.get(request.match_info["sid"])
        if session is None:
            raise InputError("unknown session (expired, or the server restarted): open a new one")
        session.last_seen = time.monotonic()
        return session

    def _job(self, request: web.Request) -> _Job:
        job = self._session(request).jobs.get(request.match_info["jid"])
        if job is None:
            raise InputError("unknown job in this session")
        return job

    async def new_session(self, request: web.Request) -> web.Response:
        self._expire()
        sid = secrets.token_hex(16)
        self.sessions[sid] = _Session(sid, PreparedCache(self.service.cache.size))
        return web.json_response({"session": sid})

    async def end_session(self, request: web.Request) -> web.Response:
        self._drop(request.match_info["sid"])
        return web.json_response({"ended": True})

    # ---------------------------------------------------------------------------------------- jobs
    async def submit(self, request: web.Request) -> web.Response:
        session = self._session(request)
        length = request.content_length
        if length is not None and length > self.max_request_bytes:
            return _error(413, "too-large", f"the request ({length / 2 ** 20:.1f} MB) exceeds this server's limit of "
                                            f"{self.max_request_bytes / 2 ** 20:.0f} MB (--max-request-mb)")
        body = await request.read()
        try:
            message = await self._blocking(wire.loads, body, self.max_request_bytes, session.volumes)
        except wire.MissingVolume as exc:
            return _error(409, "missing-volume", str(exc))
        if not isinstance(message, REQUEST_TYPES):
            raise InputError(f"not a segmentation request: {type(message).__name__}")
        job = _Job(secrets.token_hex(8), message, loop=asyncio.get_running_loop(), changed=asyncio.Event())
        finished = [j for j, x in session.jobs.items() if x.get().final]
        for jid in finished[:max(len(finished) - KEEP_FINISHED_JOBS + 1, 0)]:
            del session.jobs[jid]
        session.jobs[job.id] = job
        asyncio.get_running_loop().run_in_executor(self.executor, self._run, job, session)
        return web.json_response({"job": job.id}, status=201)

    def _run(self, job: _Job, session: _Session) -> None:
        """One job, in a job thread; the result is kept until fetched (encoded then, as the client asks)."""
        if job.cancel.cancelled:
            job.set(JobStatus("cancelled", 0.0, "", "cancelled", "cancelled by the user"))
            return
        job.set(JobStatus("running", 0.0, "starting"))

        def progress(fraction: float, message: str) -> None:
            job.set(JobStatus("running", fraction, message))

        try:
            job.result = self.service.run(job.request, progress, job.cancel, cache=session.cache)
            job.set(JobStatus("done", 1.0, "done"))
        except BaseException as exc:  # reported to the client
            kind = error_kind(exc)
            if kind == "internal":
                import traceback

                traceback.print_exc()
            job.set(JobStatus("cancelled" if kind == "cancelled" else "failed", 0.0, "", kind, error_message(exc)))
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):  # the server is being stopped
                raise
        finally:
            job.request = None  # the volumes are not needed any more

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self._job(request).get().to_json())

    async def events(self, request: web.Request) -> web.StreamResponse:
        job = self._job(request)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"})
        await response.prepare(request)
        last = None
        while True:
            job.changed.clear()
            status = job.get()
            if status != last:
                await response.write((json.dumps(status.to_json()) + "\n").encode())
                last = status
            if status.final:
                break
            try:
                await asyncio.wait_for(job.changed.wait(), 0.5)
            except asyncio.TimeoutError:  # heartbeat: the client checks its cancel flag on every line
                await response.write((json.dumps(status.to_json()) + "\n").encode())
        await response.write_eof()
        return response

    async def result(self, request: web.Request) -> web.Response:
        job = self._job(request)
        status = job.get()
        if status.state in ("failed", "cancelled"):
            return _error(409 if status.state == "cancelled" else 422, status.error_kind, status.error)
        if status.state != "done":
            return _error(409, "input", f"the job is still {status.state}")
        body = await self._blocking(wire.dumps, job.result, request.query.get("deflate") == "1")
        return web.Response(body=body, content_type=wire.MEDIA_TYPE)

    async def cancel(self, request: web.Request) -> web.Response:
        job = self._job(request)
        job.cancel.cancel()
        if job.get().state == "queued":
            job.set(JobStatus("cancelled", 0.0, "", "cancelled", "cancelled by the user"))
        return web.json_response(job.get().to_json())

    async def _shutdown(self, app) -> None:
        for sid in list(self.sessions):
            self._drop(sid)
        self.executor.shutdown(wait=False, cancel_futures=True)


# -------------------------------------------------------------------------------------------- running
def page_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def _write_ready(path: Path, url: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid(), "version": __version__}))
    os.replace(tmp, path)


def serve(host: str = auth.DEFAULT_HOST, port: int = 8765, token: Optional[str] = None, device: Optional[str] = None,
          max_request_mb: float = DEFAULT_MAX_REQUEST_MB, allow_local_files: bool = False, jobs: int = 1,
          ready_file: Optional[str] = None, exit_with_stdin: bool = False) -> int:
    """Serve until interrupted (``port=0``: a free port). Prints ``MRISegAssist serving at URL`` when listening;
    ``exit_with_stdin``: stop when standard input closes (the parent that started this worker has gone)."""
    if not 0 <= int(port) <= 65535:
        raise InputError(f"port {port} is outside 0..65535")
    token, generated = auth.access_token_for(host, token)
    if device is not None:
        from ..devices import check_device

        check_device(device)
    service = Service(device, confined=not allow_local_files)
    executor = MainThreadExecutor() if jobs <= 1 else None
    server = SegmentationServer(service, token, auth.is_loopback(host), max_request_mb, jobs, executor)
    control: dict = {}  # the event loop and its stop event, once running
    ended = threading.Event()  # the event loop has ended
    failure: list = []

    async def main() -> None:
        runner = web.AppRunner(server.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, int(port))
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise InputError(f"cannot listen on {host} port {port}: {exc.strerror or exc} (another server there? "
                             f"choose another --port, or 0 for a free one)") from None
        bound = site._server.sockets[0].getsockname()[1]
        url = page_url(host, bound)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        control.update(loop=loop, stop=stop)
        if exit_with_stdin:
            threading.Thread(target=lambda: (sys.stdin.buffer.read(), loop.call_soon_threadsafe(stop.set)),
                             daemon=True, name="stdin-watch").start()
        if generated:
            print(f"access token (bound to {host}, not loopback): {token}\n"
                  f"give it only to your users; clients pass it with --token", flush=True)
        print(f"MRISegAssist {__version__} segmentation server, device {service.device}", flush=True)
        print(f"{READY_PREFIX}{url}", flush=True)
        if ready_file:
            _write_ready(Path(ready_file), url)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    def http_thread() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # e.g. the port is taken: raised again on the main thread
            failure.append(exc)
        finally:
            ended.set()

    thread = threading.Thread(target=http_thread, name="mrisegassist-http", daemon=True)
    thread.start()
    try:
        if executor is not None:
            executor.run(ended)  # jobs on this (main) thread until the event loop ends
        else:
            ended.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if "loop" in control and not ended.is_set():
            try:
                control["loop"].call_soon_threadsafe(control["stop"].set)
            except RuntimeError:  # the loop has just closed
                pass
        ended.wait(30)
    if failure and not isinstance(failure[0], KeyboardInterrupt):
        raise failure[0]
    return 0
