"""The segmentation service over HTTP against real ``mrisegassist server`` processes on 127.0.0.1, on a real case
(BraTS 2013 pat0001, 240x240x155, expert labels): the same label maps as in-process (classical engine and the
shipped U-Net, voxel for voxel), two clients at once without cross-talk, cancel, a killed worker, version
mismatch, size limit, tokens when bound off loopback, the loopback Host guard."""
from __future__ import annotations

import dataclasses
import http.client
import json
import time

import numpy as np
import pytest

from service_env import brats_case, server_process, wait_for

from mrisegassist.errors import Cancelled, InputError
from mrisegassist.prompt.base import Box2D, ObjectPrompt
from mrisegassist.service import (AutoSegmentRequest, HttpClient, LocalWorker, PromptRequest, Service,
                                  ServiceUnavailable, VersionMismatch)

TOKEN = "test-token-0123456789"


@pytest.fixture(scope="module")
def case():
    return brats_case()


@pytest.fixture(scope="module")
def server():
    srv = server_process("--host", "127.0.0.1", "--token", TOKEN, "--max-request-mb", "80")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def service():
    return Service("cpu")


def test_same_label_maps_as_in_process(server, service, case):
    flair, t1c, labels, prompt = case
    client = HttpClient(server.url, TOKEN)
    try:
        info = client.info()
        assert info.version == service.info().version and "glioma-2d" in [m.name for m in info.models]
        request = PromptRequest(flair, [prompt], "classical")
        remote, local = client.call(request), service.prompt(request)
        assert remote.array.dtype == local.array.dtype == np.uint16
        assert np.array_equal(remote.array, local.array) and remote.labels.geometry == local.labels.geometry
        assert remote.objects == local.objects and remote.labels.labels == local.labels.labels
        tumour = remote.array == 1
        dice = 2 * (tumour & (labels > 0)).sum() / (tumour.sum() + (labels > 0).sum())
        assert dice > 0.6, dice  # one box on the whole tumour, expert labels
        unet = AutoSegmentRequest({"flair": flair, "t1c": t1c}, "glioma-2d")
        remote, local = client.call(unet), service.auto_segment(unet)
        assert np.array_equal(remote.array, local.array) and remote.labels.labels == local.labels.labels
        assert [o.voxels for o in remote.objects] == [o.voxels for o in local.objects]
        assert (remote.array > 0).sum() > 10000  # the glioma model finds the tumour
    finally:
        client.close()


def test_two_clients_at_once_have_separate_sessions(server, service, case):
    flair, t1c, _, prompt = case
    a, b = HttpClient(server.url, TOKEN), HttpClient(server.url, TOKEN)
    try:
        other = ObjectPrompt(1, [Box2D(70, 150, 80, 175, 110)], name="other")
        ra, rb = PromptRequest(flair, [prompt]), PromptRequest(t1c, [other])
        ja, jb = a.submit(ra), b.submit(rb)  # both queued before either finished
        wait_for(lambda: ja.poll().final and jb.poll().final)
        assert np.array_equal(ja.result().array, service.prompt(ra).array)
        assert np.array_equal(jb.result().array, service.prompt(rb).array)
        # a job is only reachable within its own session
        foreign = ja.path.replace(a._session, b._session)
        with pytest.raises(InputError, match="unknown job"):
            b.get_json(foreign)
    finally:
        a.close()
        b.close()


def test_cancel_mid_job(server, case):
    flair, _, _, prompt = case
    client = HttpClient(server.url, TOKEN)
    try:
        job = client.submit(PromptRequest(flair, [prompt], cascade="D"))
        wait_for(lambda: job.poll().state == "running" and job.poll().progress > 0.35)
        t0 = time.perf_counter()
        job.cancel()
        status = wait_for(lambda: job.poll() if job.poll().final else None, timeout=30)
        latency = time.perf_counter() - t0
        print(f"cancel honoured after {latency:.2f} s")
        assert status.state == "cancelled" and latency < 3.0
        with pytest.raises(Cancelled):
            job.result()
        assert client.call(PromptRequest(flair, [prompt])).objects[0].voxels > 0  # the server goes on
    finally:
        client.close()


def test_version_mismatch_names_both_versions(server, monkeypatch):
    import mrisegassist.service.client as client_module

    monkeypatch.setattr(client_module, "client_version", lambda: "9.9.9")
    with pytest.raises(VersionMismatch) as err:
        HttpClient(server.url, TOKEN).info()
    assert "9.9.9" in str(err.value) and "0.1.0" in str(err.value)


def test_oversized_request_is_refused(server, case):
    flair, t1c, _, prompt = case
    client = HttpClient(server.url, TOKEN)
    try:
        big = PromptRequest(flair, [prompt], extra={"t1c": t1c, "t1c-copy": t1c})  # 3 x 36 MB > 80 MB
        with pytest.raises(InputError, match="exceeds this server's limit of 80 MB"):
            client.submit(big)
        assert client.call(PromptRequest(flair, [prompt])).objects[0].voxels > 0
    finally:
        client.close()


def _get(port: int, path: str, headers: dict) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def test_token_required_off_loopback():
    srv = server_process("--host", "0.0.0.0")
    try:
        line = next(x for x in srv.lines if x.startswith("access token"))
        token = line.split(":", 1)[1].split()[0]
        assert len(token) >= 24
        for headers in ({}, {"Authorization": "Bearer wrong-token-123"}, {"Authorization": token}):
            status, body = _get(srv.port, "/v1/info", headers)
            assert status == 401 and body["error"]["kind"] == "auth", headers
        status, body = _get(srv.port, "/v1/info", {"Authorization": f"Bearer {token}"})
        assert status == 200 and body["version"] == "0.1.0"
        with pytest.raises(InputError, match="refused"):
            HttpClient(srv.url).info()
        assert HttpClient(srv.url, token).info().version == "0.1.0"
    finally:
        srv.stop()


def test_loopback_server_refuses_other_host_names(server):
    status, body = _get(server.port, "/v1/info", {"Host": "attacker.example:80",
                                                  "Authorization": f"Bearer {TOKEN}"})
    assert status == 403 and "loopback" in body["error"]["message"]


def test_confined_server_refuses_paths(server, case, tmp_path):
    flair, _, _, prompt = case
    client = HttpClient(server.url, TOKEN)
    try:
        with pytest.raises(InputError, match="no file paths"):
            client.call(AutoSegmentRequest({"flair": flair, "t1c": flair}, str(tmp_path / "model")))
        with pytest.raises(InputError, match="no file paths"):
            client.call(PromptRequest(flair, [prompt], "sam-vit-b", checkpoint="/etc/passwd"))
        with pytest.raises(InputError, match="downloads no weights"):
            client.call(PromptRequest(flair, [prompt], "sam-vit-b", download=True))
    finally:
        client.close()


def test_killed_worker_gives_a_clear_error_and_restarts(case):
    flair, _, _, prompt = case
    worker = LocalWorker(device="cpu")
    try:
        request = PromptRequest(flair, [prompt], cascade="D")
        job = worker.submit(request)
        wait_for(lambda: job.poll().state == "running" and job.poll().progress > 0.1, timeout=300)
        worker.process.kill()
        status = wait_for(lambda: job.poll() if job.poll().final else None, timeout=30)
        assert status.state == "failed"
        with pytest.raises(ServiceUnavailable, match=r"worker process stopped \(exit code -9\)"):
            job.result()
        assert "stopped" in worker.status()
        result = worker.call(dataclasses.replace(request, cascade=None))  # a new worker starts
        assert worker.starts == 2 and worker.alive and result.objects[0].voxels > 0
    finally:
        worker.stop()
    assert not worker.alive


def test_taken_port_is_bad_input_and_ctrl_c_stops_the_server(server):
    """A second server on the first one's port ends with the bad-input status and a message naming the port; the
    server (a fresh one here) stops cleanly on Ctrl-C, its HTTP thread and its main (job) thread both."""
    import os
    import signal
    import subprocess
    import sys

    from mrisegassist.bench.processes import PACKAGE_ROOT

    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
    taken = subprocess.run([sys.executable, "-m", "mrisegassist", "server", "--port", str(server.port),
                            f"--token={TOKEN}"], capture_output=True, text=True, env=env, timeout=120)
    assert taken.returncode == 2, taken.stderr
    assert f"cannot listen on 127.0.0.1 port {server.port}" in taken.stderr and "Traceback" not in taken.stderr
    fresh = server_process("--host", "127.0.0.1", f"--token={TOKEN}")
    fresh.proc.send_signal(signal.SIGINT)
    assert fresh.proc.wait(20) == 0
    assert "Traceback" not in fresh.log


def test_main_thread_executor_runs_jobs_in_order_on_the_calling_thread():
    """`serve` computes on its main thread (as a script does) through this executor: jobs in order, errors and
    cancellations kept per job, nothing accepted after shutdown."""
    import threading

    from mrisegassist.service.server import MainThreadExecutor

    executor, order = MainThreadExecutor(), []
    first = executor.submit(lambda: order.append(1) or threading.current_thread() is threading.main_thread())
    failing = executor.submit(lambda: 1 / 0)
    dropped = executor.submit(order.append, 3)
    assert dropped.cancel()
    last = executor.submit(order.append, 4)
    executor.shutdown(wait=False)
    executor.run(threading.Event())  # returns once the queue reaches the shutdown mark
    assert first.result() is True and order == [1, 4] and last.done()
    assert isinstance(failing.exception(), ZeroDivisionError) and dropped.cancelled()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(order.append, 5)


def test_bench_service_reports_every_mode(capsys):
    """`mrisegassist bench service` on BraTS 2013 pat0001 (box prompt, one round): in-process, local worker and
    server rows with their wall, service and first-request seconds (figures only; the goal is the bench's)."""
    from conftest import DATA

    from mrisegassist.cli import main

    assert main(["bench", "service", "--data", str(DATA), "--workflows", "box prompt", "--repeats", "1",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    row = summary["rows"]["box prompt"]
    assert list(row) == ["in-process", "local worker", "server"]
    for mode, r in row.items():
        assert len(r["runs"]) == 1 and r["seconds"] >= r["service_seconds"] > 0 and r["first_seconds"] > 0
        assert r["goal_met"] in (True, False) and (mode != "in-process" or r["overhead_s"] == 0)
