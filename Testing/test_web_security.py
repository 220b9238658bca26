"""Security of the browser front end without a browser: token policy, the aiohttp guard on a real HTTP server
(pages and websocket), paths confined to the data folder, upload limits, and study-folder scanning on the real
data folder."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from conftest import data_path
from mrisegassist.errors import InputError

security = pytest.importorskip("MRISegAssistWeb.security")
from MRISegAssistWeb.study import UploadArea, list_studies, role_of, scan_study  # noqa: E402

TOKEN = "s3cret-token-for-tests"


# ------------------------------------------------------------------------------------------- binding
@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.1.2.3:8080", True), ("localhost", True),
                                           ("[::1]:80", True), ("::1", True), ("0.0.0.0", False),
                                           ("192.168.1.20", False), ("example.org:8080", False), ("", False)])
def test_loopback_detection(host, loopback):
    assert security.is_loopback(host) is loopback


def test_token_required_off_loopback_and_honoured_on_it():
    assert security.access_token_for("127.0.0.1", None) == (None, False)
    assert security.access_token_for("127.0.0.1", TOKEN) == (TOKEN, False)
    token, generated = security.access_token_for("0.0.0.0", None)
    assert generated and len(token) >= 24
    assert security.access_token_for("0.0.0.0", None)[0] != token  # random each time
    assert security.access_token_for("0.0.0.0", TOKEN) == (TOKEN, False)
    with pytest.raises(InputError, match="at least 8"):
        security.access_token_for("0.0.0.0", "short")


def test_check_request_rules():
    host = {"Host": "127.0.0.1:8080"}
    ok = lambda **kw: security.check_request(kw.pop("token", TOKEN), kw.pop("loopback", True),  # noqa: E731
                                             kw.pop("query", {}), {**host, **kw.pop("headers", {})},
                                             kw.pop("cookies", {}))
    assert ok()[0] is False and "access token required" in ok()[1]
    assert ok(query={"token": "wrong-token-value"})[0] is False
    assert ok(query={"token": TOKEN}) == (True, "", "query")
    assert ok(headers={"Authorization": f"Bearer {TOKEN}"}) == (True, "", "header")
    assert ok(cookies={security.TOKEN_COOKIE: TOKEN}) == (True, "", "cookie")
    assert ok(token=None) == (True, "", "")  # loopback without a token: open to this machine
    # DNS rebinding: a loopback server refuses a foreign Host header even with the token
    assert ok(query={"token": TOKEN}, headers={"Host": "evil.example:8080"})[0] is False
    # a page of another site may not use the server (cross-site websocket / request)
    refused = ok(query={"token": TOKEN}, headers={"Origin": "http://evil.example"})
    assert refused[0] is False and "cross-site" in refused[1]
    assert ok(query={"token": TOKEN}, headers={"Origin": "http://127.0.0.1:8080"})[0] is True


def test_guard_on_a_real_http_server():
    """The middleware on an aiohttp server: pages and the websocket upgrade need the token; the cookie set
    after ``?token=`` lets the page's scripts and websocket through."""
    from aiohttp import ClientSession, CookieJar, WSServerHandshakeError, web

    async def page(_request):
        return web.Response(text="<html>page</html>", content_type="text/html")

    async def ws_handler(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("hello")
        await ws.close()
        return ws

    async def scenario():
        app = web.Application(middlewares=[security.aiohttp_middleware(TOKEN, loopback_only=True)])
        app.add_routes([web.get("/index.html", page), web.get("/ws", ws_handler)])
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        base = f"http://127.0.0.1:{port}"
        try:
            async with ClientSession() as anonymous:
                async with anonymous.get(f"{base}/index.html") as r:
                    assert r.status == 403 and "access token required" in await r.text()
                async with anonymous.get(f"{base}/index.html?token=wrong-token-value") as r:
                    assert r.status == 403
                with pytest.raises(WSServerHandshakeError) as refused:
                    await anonymous.ws_connect(f"{base}/ws")
                assert refused.value.status == 403
            async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as user:  # keeps cookies of IP hosts
                async with user.get(f"{base}/index.html?token={TOKEN}") as r:
                    assert r.status == 200 and "page" in await r.text()
                    cookie = r.cookies[security.TOKEN_COOKIE]
                    assert cookie.value == TOKEN and cookie["httponly"] and cookie["samesite"] == "Strict"
                async with user.ws_connect(f"{base}/ws") as ws:  # carries the cookie
                    assert (await ws.receive_str()) == "hello"
                async with user.get(f"{base}/index.html", headers={"Origin": "http://evil.example"}) as r:
                    assert r.status == 403
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------- paths
@pytest.fixture
def data_tree(tmp_path):
    root = tmp_path / "data"
    (root / "study1").mkdir(parents=True)
    (root / "study1" / "flair.nii.gz").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.nii.gz").write_bytes(b"y")
    os.symlink(outside, root / "escape")  # a symlink pointing out of the data folder
    os.symlink(root / "study1", root / "alias")  # a symlink staying inside
    return root, outside


def test_paths_are_confined_to_the_data_folder(data_tree):
    root, outside = data_tree
    assert security.confine_path(root, "study1", kind="dir") == (root / "study1").resolve()
    assert security.confine_path(root, "study1/flair.nii.gz", kind="file").name == "flair.nii.gz"
    assert security.confine_path(root, str(root / "study1")) == (root / "study1").resolve()  # absolute inside
    assert security.confine_path(root, "alias") == (root / "study1").resolve()
    for bad, message in [("../outside", r"'\.\.' is not allowed"), ("study1/../../outside", r"'\.\.'"),
                         (str(outside), "outside the data folder"), ("/etc", "outside the data folder"),
                         ("escape", "outside the data folder"), ("escape/secret.nii.gz", "outside"),
                         ("missing", "no such file"), ("", "no path"), ("study1\x00", "NUL")]:
        with pytest.raises(InputError, match=message):
            security.confine_path(root, bad)
    with pytest.raises(InputError, match="not a folder"):
        security.confine_path(root, "study1/flair.nii.gz", kind="dir")
    # outputs: the parent must exist inside
    assert security.confine_path(root, "study1/new.seg.nrrd", must_exist=False).parent == (root / "study1").resolve()
    with pytest.raises(InputError, match="outside"):
        security.confine_path(root, "escape/new.nii.gz", must_exist=False)


def test_file_names_are_sanitised():
    assert security.safe_file_name("../../etc/passwd") == "passwd"
    assert security.safe_file_name("C:\\Users\\x\\flair.nii.gz") == "flair.nii.gz"
    assert security.safe_file_name("my scan (1).nii.gz") == "my_scan_1_.nii.gz"
    assert security.safe_file_name("..") == "file"


# -------------------------------------------------------------------------------------------- uploads
def test_upload_area_limits_total_size_and_discards():
    area = UploadArea(limit_bytes=1000)
    try:
        folder = area.begin()
        written = area.add([{"name": "../a.nii.gz", "size": 400, "content": b"a" * 400}])
        assert written == [folder / "a.nii.gz"] and written[0].read_bytes() == b"a" * 400
        area.add([{"name": "b.nii.gz", "size": 300, "content": [b"b" * 100, b"b" * 200]}])
        with pytest.raises(InputError, match="exceeds the server's limit"):
            area.add([{"name": "c.nii.gz", "size": 400, "content": b"c" * 400}])
        assert area.folder is None and not folder.exists()  # refused uploads leave nothing behind
        area.begin()
        with pytest.raises(InputError, match="exceeds"):  # a lying size field is still caught
            area.add([{"name": "d.nii.gz", "size": 10, "content": b"d" * 2000}])
    finally:
        area.close()


# -------------------------------------------------------------------------------------------- studies
def test_study_roles_on_real_folders():
    lesjak = scan_study(data_path("ms-lesjak", "patient07"))
    assert [p.name for p in lesjak.images] == ["flair.nii.gz", "t1.nii.gz", "t1post.nii.gz", "t2.nii.gz"]
    assert lesjak.default_reference.name == "lesions.nii.gz"
    brats = scan_study(data_path("brats2013-deepmedic", "pat0001"))
    assert [p.name for p in brats.images] == ["flair.nii.gz", "t1c.nii.gz"]
    assert [p.name for p in brats.ignored] == ["brainmask.nii.gz"]
    assert brats.default_reference.name == "labels.nii.gz"
    radiomics = scan_study(data_path("radiomics-brain"))
    assert [p.name for p in radiomics.images] == ["brain1_image.nrrd", "brain2_image.nrrd"]
    assert [p.name for p in radiomics.references] == ["brain1_label.nrrd", "brain2_label.nrrd"]
    assert role_of(Path("BraTS-GLI-00001-000-seg.nii.gz")) == "reference"
    assert role_of(Path("BraTS-GLI-00001-000-t2f.nii.gz")) == "image"
    assert role_of(Path("model_output_labels.nii.gz")) == "reference"
    with pytest.raises(InputError, match="holds no image"):
        scan_study(data_path("ms-lesjak"))


def test_list_studies_of_the_data_folder():
    root = data_path()
    studies = list_studies(root)
    for expected in ("ms-lesjak/patient07", "ms-lesjak/patient26", "brats2013-deepmedic/pat0001",
                     "radiomics-brain", "itksnap-mricrop"):
        assert expected in studies
    assert "ms-lesjak" not in studies  # only folders that hold images
