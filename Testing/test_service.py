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
from mrisegassist.prompt.fusion import fuse
from mrisegassist.service import PromptRequest, Service, wire
from mrisegassist.volume import read_volume, resample_to


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
