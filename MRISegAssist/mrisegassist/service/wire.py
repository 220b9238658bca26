"""Wire format of service requests and results: one ZIP archive holding ``message.json`` and ``.npy`` arrays.

``message.json`` is the request/result as JSON, with the registered dataclasses tagged by type
(``{"__type__": "PromptRequest", ...}``), tuples as ``{"__tuple__": [...]}``, and every array replaced by
``{"__array__": "arrays/N.npy"}``, a member holding it in NumPy's ``.npy`` format (dtype and shape in its
header; read with ``allow_pickle=False``). A :class:`~mrisegassist.volume.Volume` is its array plus its geometry
(``Geometry.to_dict``: ITK size, spacing, LPS origin and direction); atlas boxes use their JSON form
(``AtlasBoxes.to_json``). An integer volume (a label map) travels as the box around its non-zero voxels plus
the whole volume's shape. Only the registered types are ever built from a message. Readers refuse archives
whose members, or cropped volumes once restored, add up to more than their size limit before anything is
decompressed or restored.
"""
from __future__ import annotations

import dataclasses
import io
import json
import struct
import threading
import zipfile
import zlib
from collections import OrderedDict
from typing import Any, Optional

import numpy as np

from ..errors import InputError
from ..labels import LabelInfo, LabelMap
from ..prompt.base import Box2D, ObjectPrompt, Point2D
from ..prompt.fusion import union_bbox
from ..volume import Geometry, Volume, fingerprint
from . import api

MESSAGE = "message.json"
MEDIA_TYPE = "application/vnd.mrisegassist+zip"
_DATACLASSES = {cls.__name__: cls for cls in (
    api.AutoSegmentRequest, api.PromptRequest, api.AtlasBoxesRequest, api.AutoRequest, api.DownloadWeightsRequest,
    api.ObjectSummary, api.NotFound, api.SegmentationResult, api.AtlasBoxesResult, api.WeightsStatus,
    api.ModelInfo, api.EngineInfo, api.ServiceInfo, ObjectPrompt, Box2D, Point2D, LabelInfo, LabelMap)}


def _atlas_boxes_class():
    from ..atlas.boxes import AtlasBoxes

    return AtlasBoxes


class VolumeStore:
    """Volumes a server keeps for one client session, by fingerprint (the ``size`` most recent), so a client
    re-prompting the same volume sends only its fingerprint."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: str, array: np.ndarray) -> None:
        with self._lock:
            self._items[key] = array
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def get(self, key: str) -> np.ndarray:
        with self._lock:
            if key not in self._items:
                raise MissingVolume(f"the server no longer holds volume {key[:12]}...: send it again")
            self._items.move_to_end(key)
            return self._items[key]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class MissingVolume(InputError):
    """A message refers to a volume the server does not hold (any more)."""


class _Writer:
    def __init__(self, archive: zipfile.ZipFile, compress: bool, known: Optional[set] = None) -> None:
        self.archive, self.compress, self.count = archive, compress, 0
        self.known = known  # fingerprints the receiver holds; None: always send volumes
        self.sent: list[str] = []

    def array(self, a: np.ndarray) -> dict:
        a = np.ascontiguousarray(a)
        if a.dtype.hasobject:
            raise InputError("object arrays cannot be sent")
        name = f"arrays/{self.count}.npy"
        self.count += 1
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, np.lib.format.header_data_from_array_1_0(a))
        with self.archive.open(name, "w", force_zip64=True) as fh:
            fh.write(header.getvalue())
            fh.write(memoryview(a).cast("B") if a.size else b"")
        return {"__array__": name}

    def voxels(self, a: np.ndarray) -> dict:
        """A volume's voxels: integer volumes (label maps, often int16 MRI) as the box holding their non-zero
        voxels (``crop``: its [k, j, i] start; ``shape``: the whole volume's), so a label map of a few objects
        costs what its objects' boxes do; other volumes whole."""
        if a.dtype.kind not in "biu" or a.ndim != 3 or not a.size:
            return {"array": self.array(a)}
        box = union_bbox([a]) or (slice(0, 0),) * 3
        crop = a[box]
        if crop.size * 2 > a.size:  # mostly filled: whole
            return {"array": self.array(a)}
        return {"array": self.array(crop), "crop": [s.start for s in box], "shape": [int(v) for v in a.shape]}

    def encode(self, obj: Any) -> Any:
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, (int, float)):
            return obj
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return self.array(obj)
        if isinstance(obj, Volume):
            volume = {"geometry": obj.geometry.to_dict(), "name": obj.name}
            if self.known is None:
                return {"__volume__": {**self.voxels(obj.array), **volume}}
            key = fingerprint(obj.array)
            if key in self.known:
                return {"__volume__": {"ref": key, **volume}}
            self.sent.append(key)
            return {"__volume__": {**self.voxels(obj.array), "sha256": key, **volume}}
        if isinstance(obj, Geometry):
            return {"__geometry__": obj.to_dict()}
        if isinstance(obj, tuple):
            return {"__tuple__": [self.encode(v) for v in obj]}
        if isinstance(obj, list):
            return [self.encode(v) for v in obj]
        if isinstance(obj, dict):
            if not all(isinstance(k, str) for k in obj):
                raise InputError(f"cannot send a mapping with non-text keys: {list(obj)[:3]}")
            return {k: self.encode(v) for k, v in obj.items()}
        name = type(obj).__name__
        if name == "AtlasBoxes":
            return {"__atlas_boxes__": obj.to_json()}
        if dataclasses.is_dataclass(obj) and _DATACLASSES.get(name) is type(obj):
            return {"__type__": name, **{f.name: self.encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
        raise InputError(f"cannot send a {name} to the segmentation service")


def dumps(obj: Any, compress: bool = False, known: Optional[set] = None) -> memoryview:
    """One archive holding ``obj`` (members deflated at level 1 when ``compress``: label maps shrink ~100x, for
    slow networks; stored otherwise, which is fastest on loopback). With ``known`` (fingerprints of the volumes
    the receiver holds), those volumes are sent as references and the others with their fingerprint, which
    are added to ``known``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED, allowZip64=True,
                         compresslevel=1 if compress else None) as archive:
        writer = _Writer(archive, compress, known)
        text = json.dumps(writer.encode(obj))
        archive.writestr(MESSAGE, text)
    if known is not None:
        known.update(writer.sent)
    return buffer.getbuffer()


class _Reader:
    def __init__(self, archive: Optional[zipfile.ZipFile], data: bytes = b"",
                 store: Optional[VolumeStore] = None, max_bytes: int = 0, unpacked: int = 0) -> None:
        self.archive, self.data, self.store, self.max_bytes = archive, data, store, max(max_bytes, 1 << 20)
        self.unpacked = unpacked  # bytes the message holds once unpacked, so far

    def _member(self, info: zipfile.ZipInfo) -> memoryview:
        """A member's bytes: a view into the message for stored members (CRC checked), else decompressed."""
        if info.compress_type != zipfile.ZIP_STORED:
            return memoryview(self.archive.read(info))
        start = info.header_offset
        local = self.data[start:start + 30]
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise InputError(f"{info.filename}: damaged archive member")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        begin = start + 30 + name_len + extra_len
        raw = memoryview(self.data)[begin:begin + info.file_size]
        if len(raw) != info.file_size or zlib.crc32(raw) != info.CRC:
            raise InputError(f"{info.filename}: damaged archive member (size or checksum)")
        return raw

    def array(self, ref: dict) -> np.ndarray:
        name = ref.get("__array__") if isinstance(ref, dict) else None
        if self.archive is None or not isinstance(name, str) or name not in self.archive.namelist():
            raise InputError(f"message names a missing array {name!r}")
        raw = bytearray(self._member(self.archive.getinfo(name)))  # aligned, writable: one copy
        head = io.BytesIO(raw[:min(len(raw), 1 << 16)])
        try:
            major, _ = np.lib.format.read_magic(head)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(head)
            if dtype.hasobject:
                raise ValueError("object arrays are refused")
            count = int(np.prod(shape, dtype=np.int64))
            flat = np.frombuffer(raw, dtype=dtype, count=count, offset=head.tell())
        except ValueError as exc:
            raise InputError(f"array {name}: not a valid .npy member ({exc})") from None
        return flat.reshape(shape, order="F" if fortran else "C")

    def uncrop(self, crop: np.ndarray, start: Any, shape: Any) -> np.ndarray:
        """The whole volume of a cropped integer volume (zeros outside ``crop``), within the size limit."""
        ok = (isinstance(start, list) and isinstance(shape, list) and len(start) == len(shape) == crop.ndim == 3
              and all(type(v) is int and v >= 0 for v in start + shape)
              and all(b + n <= s for b, n, s in zip(start, crop.shape, shape)))
        if not ok:
            raise InputError(f"a cropped volume has a bad box: start {start!r}, shape {shape!r}, "
                             f"crop {crop.shape}")
        self.unpacked += (int(np.prod(shape, dtype=np.int64)) - crop.size) * crop.dtype.itemsize
        if self.unpacked > self.max_bytes:
            raise InputError(f"the message holds {self.unpacked / 2 ** 20:.1f} MB once unpacked, over the limit of "
                             f"{self.max_bytes / 2 ** 20:.1f} MB")
        whole = np.zeros(shape, dtype=crop.dtype)
        whole[tuple(slice(b, b + n) for b, n in zip(start, crop.shape))] = crop
        return whole

    def decode(self, obj: Any) -> Any:
        if isinstance(obj, list):
            return [self.decode(v) for v in obj]
        if not isinstance(obj, dict):
            return obj
        if "__array__" in obj:
            return self.array(obj)
        if "__tuple__" in obj:
            return tuple(self.decode(v) for v in obj["__tuple__"])
        if "__volume__" in obj:
            v = obj["__volume__"]
            if "ref" in v:
                if self.store is None:
                    raise InputError("this message refers to a stored volume, but nothing is stored here")
                array = self.store.get(str(v["ref"]))
            else:
                array = self.array(v["array"])
                if "crop" in v:
                    array = self.uncrop(array, v.get("crop"), v.get("shape"))
                if self.store is not None and isinstance(v.get("sha256"), str):
                    self.store.put(v["sha256"], array)
            return Volume(array, Geometry.from_dict(v["geometry"]), str(v.get("name", "")))
        if "__geometry__" in obj:
            return Geometry.from_dict(obj["__geometry__"])
        if "__atlas_boxes__" in obj:
            return _atlas_boxes_class().from_json(obj["__atlas_boxes__"])
        if "__type__" in obj:
            cls = _DATACLASSES.get(obj["__type__"])
            if cls is None:
                raise InputError(f"unknown message type {obj['__type__']!r}")
            names = {f.name for f in dataclasses.fields(cls)}
            values = {k: self.decode(v) for k, v in obj.items() if k != "__type__"}
            unknown = sorted(set(values) - names)
            if unknown:
                raise InputError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
            try:
                return cls(**values)
            except TypeError as exc:
                raise InputError(f"{cls.__name__}: {exc}") from None
        return {k: self.decode(v) for k, v in obj.items()}


def loads(data: bytes, max_bytes: int, store: Optional[VolumeStore] = None) -> Any:
    """The object in an archive made by :func:`dumps`; :class:`InputError` for anything else or anything larger
    than ``max_bytes`` once decompressed. ``store`` resolves volume references and keeps the volumes sent with
    their fingerprint (:class:`MissingVolume` for a reference it does not hold)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise InputError("the message is not a MRISegAssist archive (ZIP with message.json)") from None
    with archive:
        total = sum(info.file_size for info in archive.infolist())
        if total > max(max_bytes, 1 << 20):
            raise InputError(f"the message holds {total / 2 ** 20:.1f} MB once unpacked, over the limit of "
                             f"{max_bytes / 2 ** 20:.1f} MB")
        try:
            message = json.loads(archive.read(MESSAGE))
        except KeyError:
            raise InputError("the archive has no message.json") from None
        except (ValueError, zipfile.BadZipFile) as exc:
            raise InputError(f"message.json is damaged ({exc})") from None
        try:
            return _Reader(archive, data, store, max_bytes, total).decode(message)
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise InputError(f"the archive is damaged ({exc})") from None


class _NoArrays(_Writer):
    def __init__(self) -> None:
        super().__init__(None, False)

    def array(self, a: np.ndarray) -> dict:
        raise InputError("this document cannot carry arrays")


def to_document(obj: Any) -> Any:
    """JSON-ready form of an array-free object (e.g. :class:`~.api.ServiceInfo`)."""
    return _NoArrays().encode(obj)


def from_document(data: Any) -> Any:
    """Inverse of :func:`to_document`."""
    return _Reader(None).decode(data)
