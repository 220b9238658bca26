"""Security of the browser front end without a browser: token policy, the aiohttp guard on a real HTTP server
(pages and websocket), paths and symlinked files confined to the data folder, upload limits (bytes, decompressed
voxel data, voxel count) with messages naming the file's own size and never the server's temporary folder, and
study-folder scanning (with integrity checks) on the real data folder."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from conftest import data_path
from faults import copy, digests, gunzip_copy, truncate, zero_nifti_gz
from mrisegassist.errors import DamagedFileError, InputError, VolumeTooLargeError

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


def test_symlinked_files_are_confined_like_folders(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    study, other = root / "study1", root / "study2"
    for folder in (study, other, outside):
        folder.mkdir(parents=True)
    src = data_path("itksnap-mricrop")
    copy(src / "t1.gipl.gz", study)
    copy(src / "labels.gipl.gz", outside, "secret_labels.gipl.gz")
    copy(src / "t1.gipl.gz", other, "t2.gipl.gz")
    import SimpleITK as sitk

    sitk.WriteImage(sitk.ReadImage(str(src / "t1.gipl.gz")), str(outside / "x.mhd"))
    before = digests([outside])
    os.symlink(outside / "secret_labels.gipl.gz", study / "labels.gipl.gz")
    with pytest.raises(InputError, match=r"^labels\.gipl\.gz: is a link to a file outside the data folder; refused"):
        scan_study(study, root=root)
    with pytest.raises(InputError, match=r"^labels\.gipl\.gz: is a link to a file outside the study folder"):
        scan_study(study)  # without the data folder, files are confined to the study folder itself
    (study / "labels.gipl.gz").unlink()
    os.symlink(other / "t2.gipl.gz", study / "t2.gipl.gz")  # a link that stays inside the data folder
    assert [p.name for p in scan_study(study, root=root).images] == ["t1.gipl.gz", "t2.gipl.gz"]
    (study / "t2.gipl.gz").unlink()
    # a MetaImage header naming a data file outside the data folder
    header = (outside / "x.mhd").read_text().replace("ElementDataFile = x.raw", "ElementDataFile = ../../outside/x.raw")
    (study / "t2.mhd").write_text(header)
    with pytest.raises(InputError, match=r"^x\.raw: lies outside the data folder; refused"):
        scan_study(study, root=root)
    assert digests([outside]) == before


def test_file_names_are_sanitised():
    assert security.safe_file_name("../../etc/passwd") == "passwd"
    assert security.safe_file_name("C:\\Users\\x\\flair.nii.gz") == "flair.nii.gz"
    assert security.safe_file_name("my scan (1).nii.gz") == "my_scan_1_.nii.gz"
    assert security.safe_file_name("..") == "file"


# -------------------------------------------------------------------------------------------- uploads
def _upload(path: Path, name: str = "", size=None) -> dict:
    data = Path(path).read_bytes()
    return {"name": name or Path(path).name, "size": len(data) if size is None else size, "content": data}


def test_upload_area_limits_total_size_and_names_the_file(tmp_path):
    src = data_path("itksnap-mricrop")
    t1 = gunzip_copy(src / "t1.gipl.gz", tmp_path / "t1.gipl")  # uncompressed: bytes are counted first
    labels = gunzip_copy(src / "labels.gipl.gz", tmp_path / "labels.gipl")
    t1_size, labels_size = t1.stat().st_size, labels.stat().st_size
    area = UploadArea(limit_bytes=t1_size + labels_size - 1)
    try:
        folder = area.begin()
        written = area.add([_upload(t1, "../t1.gipl")])
        assert written == [folder / "t1.gipl"] and written[0].read_bytes() == t1.read_bytes()
        with pytest.raises(InputError) as over:
            area.add([_upload(labels)])
        # the refused file's own size, then what the upload already holds: not a running total alone
        assert str(over.value) == (f"labels.gipl ({labels_size / 2 ** 20:.1f} MB) exceeds the server's limit of "
                                   f"{(t1_size + labels_size - 1) / 2 ** 20:.1f} MB for one upload, with "
                                   f"{t1_size / 2 ** 20:.1f} MB already in this upload")
        assert area.folder is None and not folder.exists()  # refused uploads leave nothing behind
        area.begin()
        with pytest.raises(InputError, match=r"^l2\.gipl \(0\.5 MB\) exceeds"):  # lying size fields
            area.add([_upload(t1, size=10), _upload(labels, "l2.gipl", size=10)])
    finally:
        area.close()


def test_upload_counts_decompressed_voxels(tmp_path):
    """A ~130 KB .nii.gz holding 512^3 voxels: refused by the voxel limit, and by decompressed size."""
    zeros = zero_nifti_gz(tmp_path / "zeros512.nii.gz")
    area = UploadArea(limit_bytes=2 ** 30, max_voxels=256 ** 3)
    try:
        with pytest.raises(VolumeTooLargeError, match=r"^zeros512\.nii\.gz: header declares 134,217,728 voxels "
                                                      r"\(512x512x512 x 1 byte = 128 MB of voxel data in a 0\.\d MB file"):
            area.add([_upload(zeros)])
        assert area.folder is None
    finally:
        area.close()
    area = UploadArea(limit_bytes=100 * 2 ** 20)  # 100 MB: the compressed file fits, its 128 MB of voxels do not
    try:
        with pytest.raises(InputError, match=r"^zeros512\.nii\.gz holds 128\.0 MB of voxel data when decompressed "
                                             r"\(512x512x512 x 1 byte\), which exceeds the server's limit of 100\.0 MB"):
            area.add([_upload(zeros)])
    finally:
        area.close()


def test_upload_errors_never_show_the_server_folder(tmp_path):
    area = UploadArea(limit_bytes=2 ** 30)
    try:
        with pytest.raises(DamagedFileError) as garbage:
            area.add([{"name": "t2.nii.gz", "size": 5000, "content": b"not a volume" * 400}])
        assert str(garbage.value).startswith("t2.nii.gz: cannot read as an image")
        cut = copy(data_path("ms-lesjak", "patient07", "flair.nii.gz"), tmp_path)
        truncate(cut, 0.5)
        area.begin()
        area.add([_upload(cut), _upload(data_path("ms-lesjak", "patient07", "t1.nii.gz"))])  # headers are fine
        with pytest.raises(DamagedFileError) as damaged:
            scan_study(area.folder)  # what the page runs before reading an upload
        assert str(damaged.value).startswith("flair.nii.gz: gzip stream ends early")
        for exc in (garbage.value, damaged.value):
            assert str(area._root) not in str(exc) and "mrisegassist-upload" not in str(exc)
        assert area.redact(f"{area.folder / 'x.nii.gz'}: failed") .startswith("<upload>/")
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
