"""Checkpoint catalog, resolution and resumable verified downloads against a local HTTP server (127.0.0.1)."""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import threading
import zipfile

import pytest
import torch

from mrisegassist.errors import Cancelled, CheckpointError
from mrisegassist.progress import CancelToken
from mrisegassist.prompt import weights
from mrisegassist.prompt.weights import CATALOG, WeightsSpec, load_into, load_state_dict, resolve_checkpoint


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.payload`` at any path, honouring ``Range: bytes=N-`` unless ``server.ignore_range``.
    ``server.truncate_next`` (a list of byte counts) cuts the next responses short after that many bytes."""

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        data: bytes = self.server.payload
        header = self.headers.get("Range")
        start = 0
        if header and not self.server.ignore_range:
            start = int(header.split("=")[1].split("-")[0])
        self.server.requests.append(start if header else None)
        if start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.server.truncate_next.pop(0) if self.server.truncate_next else None
        self.wfile.write(body if cut is None else body[:cut])
        self.wfile.flush()
        if cut is not None:
            self.close_connection = True


@pytest.fixture
def server():
    """A local HTTP server with Range support serving a small real PyTorch checkpoint."""
    buffer = io.BytesIO()
    generator = torch.Generator().manual_seed(0)
    torch.save({"model": {"weight": torch.randn(700_000, generator=generator), "bias": torch.zeros(3)}}, buffer)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.payload = buffer.getvalue()
    httpd.requests, httpd.truncate_next, httpd.ignore_range = [], [], False
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _catalog(httpd, *, sha256: str | None = "auto", size: int | None = -1, prefix: str | None = None) -> dict:
    data = httpd.payload
    spec = WeightsSpec("test-model", "test_model.pt", f"http://127.0.0.1:{httpd.server_port}/test_model.pt",
                       len(data) if size == -1 else size,
                       hashlib.sha256(data).hexdigest() if sha256 == "auto" else sha256, "test-only",
                       sha256_prefix=prefix)
    return {spec.name: spec}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(weights.WEIGHTS_ENV, raising=False)


def test_full_download_verifies_and_loads(server, tmp_path):
    seen = []
    path = resolve_checkpoint("test-model", cache_dir=tmp_path, download=True, catalog=_catalog(server),
                              progress=lambda f, m: seen.append(f))
    assert path == tmp_path / "test_model.pt"
    assert path.read_bytes() == server.payload
    assert not (tmp_path / "test_model.pt.part").exists()
    assert server.requests == [None]
    assert seen[-1] == 1.0 and seen == sorted(seen) and len(seen) > 2
    state = load_state_dict(path)  # the {"model": ...} layout is unwrapped
    assert set(state) == {"weight", "bias"} and state["weight"].shape == (700_000,)
    # the second resolution finds the verified file without downloading (no new request)
    assert resolve_checkpoint("test-model", cache_dir=tmp_path, catalog=_catalog(server)) == path
    assert server.requests == [None]


def test_resume_after_truncated_transfer(server, tmp_path):
    server.truncate_next = [1_000_000]  # the first response breaks off after 1 MB
    path = resolve_checkpoint("test-model", cache_dir=tmp_path, download=True, catalog=_catalog(server))
    assert path.read_bytes() == server.payload
    assert server.requests == [None, 1_000_000]  # the retry asked only for the rest


def test_resume_from_part_left_by_an_earlier_run(server, tmp_path):
    (tmp_path / "test_model.pt.part").write_bytes(server.payload[:1_234_567])
    path = resolve_checkpoint("test-model", cache_dir=tmp_path, download=True, catalog=_catalog(server))
    assert path.read_bytes() == server.payload
    assert server.requests == [1_234_567]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.ignore_range = True
    (tmp_path / "test_model.pt.part").write_bytes(b"x" * 1000)
    path = resolve_checkpoint("test-model", cache_dir=tmp_path, download=True, catalog=_catalog(server))
    assert path.read_bytes() == server.payload


def test_corrupted_download_rejected_and_not_kept(server, tmp_path):
    catalog = _catalog(server, sha256="0" * 64)
    with pytest.raises(CheckpointError, match="failed verification and was deleted.*sha256"):
        resolve_checkpoint("test-model", cache_dir=tmp_path, download=True, catalog=catalog)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match="was not found"):
        resolve_checkpoint("test-model", cache_dir=tmp_path, catalog=catalog)


def test_corrupted_file_in_cache_moved_aside_then_redownloaded(server, tmp_path):
    bad = bytearray(server.payload)
    bad[5000] ^= 0xFF
    (tmp_path / "test_model.pt").write_bytes(bytes(bad))
    catalog = _catalog(server)
    with pytest.raises(CheckpointError, match="corrupted: sha256"):
        resolve_checkpoint("test-model", cache_dir=tmp_path, catalog=catalog)
    assert not (tmp_path / "test_model.pt").exists() and (tmp_path / "test_model.pt.corrupt").exists()
    path = resolve_checkpoint("test-model", cache_dir=tmp_path, download=True, catalog=catalog)
    assert path.read_bytes() == server.payload


def test_truncated_file_rejected_then_resumed(server, tmp_path):
    (tmp_path / "test_model.pt").write_bytes(server.payload[:2_000_000])
    catalog = _catalog(server)
    with pytest.raises(CheckpointError, match=f"truncated: 2000000 of {len(server.payload)} bytes"):
        resolve_checkpoint("test-model", cache_dir=tmp_path, catalog=catalog)
    assert not (tmp_path / "test_model.pt").exists()  # not left in the cache as a valid file
    path = resolve_checkpoint("test-model", cache_dir=tmp_path, download=True, catalog=catalog)
    assert path.read_bytes() == server.payload and server.requests == [2_000_000]


def test_truncated_checkpoint_file_is_a_clear_load_error(server, tmp_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(server.payload[: len(server.payload) // 2])
    with pytest.raises(CheckpointError, match="cannot be read as PyTorch weights"):
        load_state_dict(cut)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_state_dict(junk)


def test_cancel_keeps_part_and_next_call_resumes(server, tmp_path):
    token = CancelToken()
    catalog = _catalog(server)

    def progress(fraction: float, message: str) -> None:
        if fraction > 0:
            token.cancel()

    with pytest.raises(Cancelled):
        resolve_checkpoint("test-model", cache_dir=tmp_path, download=True, catalog=catalog, progress=progress,
                           cancel=token)
    part = tmp_path / "test_model.pt.part"
    assert not (tmp_path / "test_model.pt").exists()
    assert 0 < part.stat().st_size < len(server.payload)
    kept = part.stat().st_size
    path = resolve_checkpoint("test-model", cache_dir=tmp_path, download=True, catalog=catalog)
    assert path.read_bytes() == server.payload and server.requests[-1] == kept


def test_missing_checkpoint_names_url_and_places(server, tmp_path):
    catalog = _catalog(server)
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint("test-model", cache_dir=tmp_path, catalog=catalog)
    message = str(info.value)
    assert catalog["test-model"].url in message and str(tmp_path / "test_model.pt") in message
    assert server.requests == []  # no download without download=True


def test_env_folder_and_explicit_path(server, tmp_path, monkeypatch):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "test_model.pt").write_bytes(server.payload)
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(folder))
    catalog = _catalog(server)
    assert resolve_checkpoint("test-model", cache_dir=tmp_path / "cache", catalog=catalog) == folder / "test_model.pt"
    own = tmp_path / "finetuned.pt"
    own.write_bytes(b"user weights")  # explicit paths are the user's own files: returned, checked on load
    assert resolve_checkpoint("test-model", path=own, catalog=catalog) == own
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint("test-model", path=tmp_path / "nope.pt", catalog=catalog)


def test_prefix_and_unverified_entries(server, tmp_path):
    digest = hashlib.sha256(server.payload).hexdigest()
    path = resolve_checkpoint("test-model", cache_dir=tmp_path, download=True,
                              catalog=_catalog(server, sha256=None, prefix=digest[:8]))
    assert weights.verify_file(path, _catalog(server, sha256=None, prefix=digest[:8])["test-model"]) in (
        "sha256-prefix",)
    with pytest.raises(CheckpointError, match="sha256 prefix"):
        weights.verify_file(path, _catalog(server, sha256=None, prefix="ffffffff")["test-model"])
    unpublished = _catalog(server, sha256=None, size=None)["test-model"]  # nothing published: trust on first use
    assert weights.verify_file(path, unpublished) == "pinned-now"
    pin = tmp_path / "test_model.pt.sha256-pin"
    assert pin.read_text().strip() == digest
    assert weights.verify_file(path, unpublished) == "pinned"
    changed = bytearray(path.read_bytes())
    changed[100] ^= 0xFF
    path.write_bytes(bytes(changed))
    with pytest.raises(CheckpointError, match="differs from .* recorded when it was first used"):
        weights.verify_file(path, unpublished)


def test_md5_published_entry(server, tmp_path):
    """MONAI Model Zoo publishes an md5 only: it is checked, and the sha256 is pinned for later runs."""
    md5 = hashlib.md5(server.payload).hexdigest()
    catalog = _catalog(server, sha256=None, size=None)
    catalog = {"test-model": dataclasses.replace(catalog["test-model"], md5=md5)}
    path = resolve_checkpoint("test-model", cache_dir=tmp_path, download=True, catalog=catalog)
    assert path.read_bytes() == server.payload
    assert (tmp_path / "test_model.pt.sha256-pin").read_text().strip() == hashlib.sha256(server.payload).hexdigest()
    assert weights.verify_file(path, catalog["test-model"]) == "md5"
    wrong = {"test-model": dataclasses.replace(catalog["test-model"], md5="0" * 32)}
    with pytest.raises(CheckpointError, match="md5 .* does not match the published md5"):
        weights.verify_file(path, wrong["test-model"])
    for p in tmp_path.iterdir():
        p.unlink()
    with pytest.raises(CheckpointError, match="failed verification and was deleted"):
        resolve_checkpoint("test-model", cache_dir=tmp_path, download=True, catalog=wrong)
    assert not (tmp_path / "test_model.pt").exists()


def _zip(members: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def test_zip_member_is_extracted_by_name_only(server, tmp_path):
    """A zip download (Swin UNETR fold weights): only the member named model.pt is read, by its file name, into
    <zip stem>-model.pt beside the archive; the archive's own paths are never used (no path traversal)."""
    inner = server.payload
    server.payload = _zip({"../../escape/model.pt": inner, "fold1/readme.txt": b"x"})
    spec = WeightsSpec("zipped", "fold1.zip", f"http://127.0.0.1:{server.server_port}/fold1.zip",
                       len(server.payload), hashlib.sha256(server.payload).hexdigest(), "test-only", member="model.pt")
    path = resolve_checkpoint("zipped", cache_dir=tmp_path / "cache", download=True, catalog={"zipped": spec})
    assert path == tmp_path / "cache" / "fold1-model.pt" and path.read_bytes() == inner
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()
    assert set(load_state_dict(path)) == {"weight", "bias"}
    # the second resolution reuses the extracted file without a request
    assert resolve_checkpoint("zipped", cache_dir=tmp_path / "cache", catalog={"zipped": spec}) == path
    assert server.requests == [None]
    server.payload = _zip({"a/model.pt": inner, "b/model.pt": inner})
    two = dataclasses.replace(spec, filename="two.zip", url=spec.url.replace("fold1", "two"),
                              size=len(server.payload), sha256=hashlib.sha256(server.payload).hexdigest())
    with pytest.raises(CheckpointError, match="expected exactly one 'model.pt'.*found 2"):
        resolve_checkpoint("two", cache_dir=tmp_path / "cache", download=True, catalog={"two": two})


def test_wrong_architecture_names_mismatches():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    state = {"0.weight": torch.zeros(5, 4), "0.bias": torch.zeros(3), "extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError) as info:
        load_into(model, state, "toy", "toy.pt")
    message = str(info.value)
    assert "2 missing keys (1.bias, 1.weight)" in message
    assert "1 unexpected keys (extra.weight)" in message
    assert "0.weight: checkpoint (5, 4) vs model (3, 4)" in message
    before = model[0].weight.detach().clone()
    assert torch.equal(model[0].weight, before)  # nothing was loaded


def test_catalog_entries_are_consistent():
    for name, spec in CATALOG.items():
        assert spec.name == name and spec.url.startswith("https://") and spec.url.endswith("/" + spec.filename)
        assert spec.sha256 is None or (len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0)
        assert spec.md5 is None or (len(spec.md5) == 32 and int(spec.md5, 16) >= 0)
        assert spec.licence and spec.source
    # pretrained brain-MRI segmentation models (MONAI Model Zoo bundle; Swin UNETR BraTS 2021 fold weights)
    brats = CATALOG["monai-brats-mri-segmentation"]
    assert brats.md5 == "870e677b782a5184cbc48db1456b78e8" and "Apache-2.0" in brats.licence
    assert brats.url.startswith("https://developer.download.nvidia.com/")
    swin = CATALOG["swinunetr-brats21-fold1"]
    assert swin.member == "model.pt" and swin.url.startswith("https://github.com/Project-MONAI/")
    assert {"sam-vit-b", "sam-vit-l", "sam-vit-h", "sam2.1-hiera-tiny", "sam2.1-hiera-small",
            "sam2.1-hiera-base-plus", "sam2.1-hiera-large", "medsam2"} <= set(CATALOG)
    # SAM file names carry 6 hex digits that are not the sha256 prefix (documented in the catalog)
    assert not CATALOG["sam-vit-b"].sha256.startswith("01ec64")
