"""The segmentation service in-process on real MRI: the multi-sequence contract (other co-registered sequences
resampled onto the prompted grid, channels for engines that accept them), the wire format (round trip, volume
references, refusals) and the service's own checks."""
from __future__ import annotations

import dataclasses
import io
import zipfile

import numpy as np
import pytest

from conftest import data_path

from mrisegassist.errors import InputError
from mrisegassist.labels import LabelInfo
from mrisegassist.prompt import get_engine
from mrisegassist.prompt.base import Box2D, ObjectPrompt
from mrisegassist.prompt.classical import ClassicalEngine
from mrisegassist.prompt.fusion import fuse, label_counts, union_bbox
from mrisegassist.service import PromptRequest, Service, wire
from mrisegassist.volume import Volume, read_volume, resample_to


@pytest.fixture(scope="module")
def study():
    """ms-longitudinal patient01: FLAIR (oblique, 4 mm slices) and T1W on another grid of the same study."""
    folder = data_path("ms-longitudinal", "patient01")
    flair = read_volume(folder / "study1_FLAIR.nii.gz", name="flair")
    t1 = read_volume(folder / "study1_T1W.nii.gz", name="t1")
    assert not t1.geometry.same_as(flair.geometry)
    k = flair.array.shape[0] // 2
    prompt = ObjectPrompt(1, [Box2D(k, 90, 90, 120, 120)], name="box")
    return flair, t1, prompt


class ChannelEngine(ClassicalEngine):
    """The classical engine declaring ``accepts_channels``: records what ``prepare`` gets, uses channel 0."""

    accepts_channels = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[np.ndarray] = []

    def prepare(self, volume, **kwargs):
        self.seen.append(volume)
        return super().prepare(volume[0] if volume.ndim == 4 else volume, **kwargs)


def test_extra_sequences_reach_engines_that_accept_channels(study, monkeypatch):
    import mrisegassist.prompt as registry

    flair, t1, prompt = study
    engine = ChannelEngine()
    engine.name = "classical"
    monkeypatch.setitem(registry._cache, ("classical", "cpu", None), engine)
    result = Service("cpu").prompt(PromptRequest(flair, [prompt], extra={"t1": t1}))
    (array,) = engine.seen
    assert array.shape == (2,) + flair.array.shape and array.dtype == np.float32
    assert np.array_equal(array[0], flair.array.astype(np.float32))
    assert np.array_equal(array[1], resample_to(t1, flair.geometry, "linear").array.astype(np.float32))
    plain = ClassicalEngine()
    assert np.array_equal(result.array, fuse(plain.segment(plain.prepare(flair.array), [prompt.validate(
        flair.array.shape)])))
    # without extra sequences the engine gets the prompted volume as it is
    Service("cpu").prompt(PromptRequest(flair, [prompt]))
    assert engine.seen[-1].shape == flair.array.shape


def test_engines_without_channels_get_the_prompted_volume(study, monkeypatch):
    flair, t1, prompt = study
    engine = get_engine("classical")
    monkeypatch.setattr(engine, "accepts_channels", False)  # an engine that reads one sequence
    seen = []
    original = engine.prepare
    monkeypatch.setattr(engine, "prepare", lambda volume, **k: seen.append(volume.shape) or original(volume, **k))
    Service("cpu").prompt(PromptRequest(flair, [prompt], extra={"t1": t1}))
    assert seen == [flair.array.shape]


def test_wire_round_trip_and_volume_references(study):
    flair, t1, prompt = study
    request = PromptRequest(flair, [dataclasses.replace(prompt, z_range=(3, 20), bounds=(80, 80, 130, 130))],
                            cascade="D", no_cascade=[2], labels=[LabelInfo(1, "lesion", (1.0, 0.5, 0.0), "x~y")],
                            extra={"t1": t1})
    decoded = wire.loads(wire.dumps(request), 1 << 30)
    assert decoded.objects == request.objects and decoded.labels == request.labels
    assert decoded.volume.geometry == flair.geometry and np.array_equal(decoded.volume.array, flair.array)
    assert decoded.volume.array.dtype == flair.array.dtype and decoded.volume.array.flags.writeable
    assert np.array_equal(decoded.extra["t1"].array, t1.array) and decoded.cascade == "D"
    # the second time only the fingerprints travel
    known, store = set(), wire.VolumeStore()
    first = wire.dumps(request, known=known)
    wire.loads(first, 1 << 30, store)
    second = wire.dumps(request, known=known)
    assert len(second) < 10_000 < len(first)
    again = wire.loads(second, 1 << 30, store)
    assert np.array_equal(again.volume.array, flair.array) and np.array_equal(again.extra["t1"].array, t1.array)
    with pytest.raises(wire.MissingVolume):
        wire.loads(second, 1 << 30, wire.VolumeStore())


def test_wire_sends_label_maps_as_the_box_of_their_voxels():
    """BraTS 2013 pat0001's expert labels (uint8 -> uint16 as results carry them): only the tumour's box travels,
    the volume comes back voxel-identical; an empty map, a whole-filled one and an int16 MRI survive too."""
    labels = read_volume(data_path("brats2013-deepmedic", "pat0001") / "labels.nii.gz", kind="label")
    labels = labels.with_array(labels.array.astype(np.uint16))
    assert 0 < np.count_nonzero(labels.array) < labels.array.size // 20
    for compress in (False, True):
        data = wire.dumps(labels, compress)
        back = wire.loads(data, 1 << 30)
        assert back.geometry == labels.geometry and back.array.dtype == np.uint16
        assert np.array_equal(back.array, labels.array) and back.array.flags.writeable
        assert len(data) < labels.array.nbytes // 4
    box, nz = union_bbox([labels.array]), np.argwhere(labels.array)
    assert [(s.start, s.stop) for s in box] == list(zip(nz.min(axis=0), nz.max(axis=0) + 1))
    assert np.array_equal(label_counts(labels.array, 8)[1:], np.bincount(labels.array.ravel(), minlength=8)[1:])
    empty = labels.with_array(np.zeros_like(labels.array))
    assert union_bbox([empty.array]) is None and not label_counts(empty.array, 3)[1:].any()
    assert np.array_equal(wire.loads(wire.dumps(empty), 1 << 30).array, empty.array)
    full = labels.with_array(np.ones_like(labels.array))
    assert np.array_equal(wire.loads(wire.dumps(full), 1 << 30).array, full.array)
    mri = labels.with_array((labels.array.astype(np.int16) - 1) * 7)  # negative background: nothing to crop
    assert np.array_equal(wire.loads(wire.dumps(mri), 1 << 30).array, mri.array)


def _with_message(data: bytes, edit) -> bytes:
    """``data`` (a wire archive) with its message.json edited by ``edit(dict)``."""
    import json

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            body = src.read(info)
            if info.filename == wire.MESSAGE:
                message = json.loads(body)
                edit(message)
                body = json.dumps(message).encode()
            dst.writestr(info.filename, body)
    return out.getvalue()


def test_wire_refuses_cropped_volumes_with_bad_boxes_or_over_the_limit():
    geometry = read_volume(data_path("brats2013-deepmedic", "pat0001") / "labels.nii.gz", kind="label").geometry
    array = np.zeros(geometry.shape, np.uint16)
    array[10:20, 30:50, 40:60] = 3
    data = bytes(wire.dumps(Volume(array, geometry)))

    def outside(message):
        message["__volume__"]["crop"] = [geometry.shape[0] - 5, 0, 0]

    def huge(message):
        message["__volume__"]["shape"] = [4096, 4096, 4096]

    with pytest.raises(InputError, match="bad box"):
        wire.loads(_with_message(data, outside), 1 << 30)
    with pytest.raises(InputError, match="over the limit"):
        wire.loads(_with_message(data, huge), 1 << 30)
    assert np.array_equal(wire.loads(data, 1 << 30).array, array)


def test_wire_refuses_damaged_oversized_and_foreign_messages(study):
    flair, _, prompt = study
    data = bytes(wire.dumps(PromptRequest(flair, [prompt])))
    with pytest.raises(InputError, match="not a MRISegAssist archive"):
        wire.loads(data[: len(data) // 2], 1 << 30)
    damaged = bytearray(data)
    damaged[1000] ^= 0xFF  # inside the volume's voxels
    with pytest.raises(InputError, match="checksum"):
        wire.loads(bytes(damaged), 1 << 30)
    with pytest.raises(InputError, match="over the limit"):
        wire.loads(data, 4 << 20)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("message.json", '{"__type__": "Popen", "args": ["rm"]}')
    with pytest.raises(InputError, match="unknown message type"):
        wire.loads(buffer.getvalue(), 1 << 20)
    with pytest.raises(InputError, match="object arrays"):
        wire.dumps(np.array([object()]))


def test_service_checks_before_any_work(study):
    flair, _, prompt = study
    service = Service("cpu")
    with pytest.raises(InputError, match="unknown engine"):
        service.prompt(PromptRequest(flair, [prompt], "nope"))
    with pytest.raises(InputError, match="unknown cascade"):
        service.prompt(PromptRequest(flair, [prompt], cascade="E"))
    with pytest.raises(InputError, match="more than once"):
        service.prompt(PromptRequest(flair, [prompt, prompt]))
    with pytest.raises(InputError, match="no object"):
        service.prompt(PromptRequest(flair, []))
    assert service.cache.prepared == 0
