"""Security of the browser front end on a shared server: access token, loopback binding, confined paths,
size-limited uploads.

* The server binds ``127.0.0.1`` by default. Bound to any other address it requires an access token
  (:func:`access_token_for` makes one when none is given); a token given on loopback is honoured too.
* Every HTTP request (page, scripts, the websocket upgrade) must carry the token: ``?token=T`` in the URL
  (the page is then given an HttpOnly, SameSite=Strict cookie so its scripts and websocket carry it),
  ``Authorization: Bearer T``, or that cookie. Requests without it get ``403``.
* Requests from another web site are refused (``Origin`` must match ``Host``), and on loopback the ``Host``
  header must name the loopback (DNS-rebinding guard).
* Paths typed in the page are confined to the data folder: no ``..``, symlinks resolved, absolute paths only
  when they resolve inside it (:func:`confine_path`).
* Uploads are limited in total size, counted both as bytes received and as decompressed voxel data from each
  file's header, and each volume by the engine's voxel-count limit (:class:`UploadBudget`); they are saved
  under sanitised names.
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Optional, Union
from urllib.parse import urlsplit

from mrisegassist.errors import InputError
from mrisegassist.service.auth import DEFAULT_HOST, access_token_for, is_loopback, token_matches  # noqa: F401

TOKEN_COOKIE = "mrisegassist_token"
TOKEN_QUERY = "token"
DEFAULT_MAX_UPLOAD_MB = 2048
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]+")


# ----------------------------------------------------------------------------------------------- binding
# is_loopback, access_token_for, token_matches: the rules of mrisegassist.service.auth (shared with the
# segmentation server).


def request_token(query: dict, headers: dict, cookies: dict) -> tuple[Optional[str], str]:
    """The token a request carries and where: ``(token, "query" | "header" | "cookie" | "")``."""
    if query.get(TOKEN_QUERY):
        return query[TOKEN_QUERY], "query"
    auth = headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip(), "header"
    if cookies.get(TOKEN_COOKIE):
        return cookies[TOKEN_COOKIE], "cookie"
    return None, ""


def origin_allowed(origin: Optional[str], host: Optional[str]) -> bool:
    """A request without ``Origin`` (not from a page) or whose ``Origin`` is this server (same host:port)."""
    if not origin:
        return True
    if origin == "null" or not host:
        return False
    parts = urlsplit(origin)
    netloc = parts.netloc.lower()
    default_port = {"http": "80", "https": "443"}.get(parts.scheme, "")
    return netloc == host.lower() or (default_port and netloc + ":" + default_port == host.lower())


def check_request(expected_token: Optional[str], loopback_only: bool, query: dict, headers: dict,
                  cookies: dict) -> tuple[bool, str, str]:
    """Decide on one HTTP request: ``(allowed, reason if refused, where the token came from)``."""
    host = headers.get("Host", "")
    if loopback_only and not is_loopback(host):
        return False, f"host {host!r} is not this machine's loopback address", ""
    if not origin_allowed(headers.get("Origin"), host):
        return False, "cross-site request refused", ""
    candidate, source = request_token(query, headers, cookies)
    if not token_matches(expected_token, candidate):
        return False, ("access token required: open the address printed by `mrisegassist serve` "
                       "(it ends with ?token=...)"), ""
    return True, "", source


def aiohttp_middleware(expected_token: Optional[str], loopback_only: bool):
    """An aiohttp middleware applying :func:`check_request` to every request (pages, files, websocket)."""
    from aiohttp import web

    @web.middleware
    async def guard(request, handler):
        allowed, reason, source = check_request(expected_token, loopback_only, dict(request.query),
                                                dict(request.headers), dict(request.cookies))
        if not allowed:
            return web.Response(status=403, text=f"403 Forbidden: {reason}\n")
        response = await handler(request)
        if source == "query" and expected_token is not None and not getattr(response, "prepared", False):
            response.set_cookie(TOKEN_COOKIE, expected_token, httponly=True, samesite="Strict", path="/")
        return response

    return guard


# ------------------------------------------------------------------------------------------------ paths
def confine_path(root: Union[str, Path], user_path: Union[str, Path], *, must_exist: bool = True,
                 kind: Optional[str] = None) -> Path:
    """Resolve a path typed in the page inside the data folder ``root``; raise :class:`InputError` otherwise.

    ``user_path`` is relative to ``root`` (or absolute, accepted only when it resolves inside ``root``).
    ``..`` components are refused outright; symlinks are resolved and must stay inside ``root``.
    ``kind`` = ``"file"`` or ``"dir"`` checks the type of an existing path. With ``must_exist=False`` (an
    output file) the parent folder must exist inside ``root``.
    """
    root = Path(root).resolve(strict=True)
    text = str(user_path).strip()
    if not text:
        raise InputError("no path given")
    if "\x00" in text:
        raise InputError("path contains a NUL character")
    pure = PurePosixPath(text.replace("\\", "/"))
    if ".." in pure.parts:
        raise InputError(f"{text}: '..' is not allowed in paths (paths stay inside the data folder)")
    candidate = Path(pure) if pure.is_absolute() else root / pure
    try:
        if must_exist:
            resolved = candidate.resolve(strict=True)
        else:
            resolved = candidate.parent.resolve(strict=True) / candidate.name
            if resolved.is_symlink():
                resolved = resolved.resolve()
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"{text}: no such file or folder in the data folder") from None
    except (OSError, RuntimeError) as exc:  # symlink loops, permissions
        raise InputError(f"{text}: cannot be resolved ({exc})") from None
    if resolved != root and root not in resolved.parents:
        raise InputError(f"{text}: is outside the data folder")
    if kind == "file" and not resolved.is_file():
        raise InputError(f"{text}: is not a file")
    if kind == "dir" and not resolved.is_dir():
        raise InputError(f"{text}: is not a folder")
    return resolved


def relative_to_root(root: Union[str, Path], path: Union[str, Path]) -> str:
    """``path`` (inside ``root``) as the POSIX relative path the page shows; ``"."`` for the root."""
    rel = Path(path).resolve().relative_to(Path(root).resolve())
    return rel.as_posix() or "."


def safe_file_name(name: str, default: str = "file") -> str:
    """A file name without folders or unusual characters (for uploads and outputs)."""
    base = PurePosixPath(str(name).replace("\\", "/")).name
    base = _SAFE_NAME.sub("_", base).strip("._") or default
    return base[:200]


# ---------------------------------------------------------------------------------------------- uploads
class UploadBudget:
    """Limits of one upload: bytes received and decompressed voxel data (each at most ``limit_bytes`` in
    total), and the voxel count of each volume (``max_voxels``; ``None``: the engine's limit,
    :func:`mrisegassist.integrity.max_voxels_limit`). Refusals raise :class:`InputError` naming the file and
    its own size."""

    def __init__(self, limit_bytes: int, max_voxels: Optional[int] = None) -> None:
        if limit_bytes <= 0:
            raise InputError("upload limit must be positive")
        self.limit_bytes = int(limit_bytes)
        self.max_voxels = max_voxels
        self.used = 0
        self.voxel_bytes = 0

    def check_declared(self, files: list[tuple[str, int]]) -> None:
        """Refuse an upload whose declared ``(name, size)`` files already exceed the limit (before any byte is
        kept); the message names the first file that does not fit and its size."""
        total = self.used
        for name, size in files:
            total += int(size)
            if total > self.limit_bytes:
                raise InputError(self._over(f"{name} ({_mb(int(size))})", total - int(size)))

    def add(self, n_bytes: int, name: str = "a file") -> None:
        """Count ``n_bytes`` received for file ``name``."""
        if self.used + n_bytes > self.limit_bytes:
            raise InputError(self._over(f"{name} ({_mb(n_bytes)})", self.used))
        self.used += n_bytes

    def add_volume(self, info, name: str) -> None:
        """Count a received volume by its header (:class:`mrisegassist.integrity.VolumeFileInfo`): its voxel
        count against ``max_voxels`` and its decompressed voxel data against the limit."""
        from mrisegassist.integrity import check_voxel_limit

        check_voxel_limit(info, self.max_voxels, name)
        if self.voxel_bytes + info.expected_bytes > self.limit_bytes:
            raise InputError(self._over(f"{name} holds {_mb(info.expected_bytes)} of voxel data when decompressed "
                                        f"({info.describe()}), which", self.voxel_bytes, "of voxel data "))
        self.voxel_bytes += info.expected_bytes

    def _over(self, what: str, before: int, kind: str = "") -> str:
        already = f", with {_mb(before)} {kind}already in this upload" if before else ""
        return f"{what} exceeds the server's limit of {_mb(self.limit_bytes)} for one upload{already}"

    def reset(self) -> None:
        self.used = 0
        self.voxel_bytes = 0


def _mb(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MB"
