"""Model loading paths (project checkpoint, MONAI bundle, TorchScript) and their errors, run on a real scan."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import data_path
from mrisegassist.errors import CheckpointError, InputError
from mrisegassist.unet.entries import ModelEntry, get_model, list_models, sha256_file
from mrisegassist.unet.inference import UNetSegmenter
from mrisegassist.unet.networks import build_network
from mrisegassist.volume import load_case

# strides multiply to 16, the size divisor assumed for bundles / TorchScript (inputs padded alike)
SPEC = {"name": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 8, 8, 8],
        "strides": [2, 2, 2, 2], "num_res_units": 1, "norm": "instance", "dropout": 0.0}
LABELS = [{"value": 1, "name": "lesion", "color": [1.0, 0.5, 0.0]}]


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    torch.manual_seed(3)
    return build_network(SPEC).eval()


@pytest.fixture(scope="module")
def case():
    return load_case({"flair": data_path("ms-lesjak", "patient07", "flair.nii.gz")})


def _checkpoint_folder(folder: Path, net: torch.nn.Module, spec=SPEC) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), folder / "model.pt")
    entry = ModelEntry(name="tiny", inputs=["flair"], labels=LABELS, dims="2d", network=spec,
                       spacing=[1.0, 1.0, None], sha256=sha256_file(folder / "model.pt"), licence="test")
    entry.write(folder)
    return folder


def _bundle_folder(folder: Path, net: torch.nn.Module) -> Path:
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    network_def = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
                   "channels": [4, 8, 8, 8, 8], "strides": [2, 2, 2, 2], "num_res_units": 1, "norm": "instance"}
    (folder / "configs" / "inference.json").write_text(json.dumps({"network_def": network_def}))
    meta = {"name": "tiny bundle", "license": "test", "network_data_format": {
        "inputs": {"image": {"num_channels": 1, "spatial_shape": [128, 128], "channel_def": {"0": "FLAIR"}}},
        "outputs": {"pred": {"num_channels": 2, "channel_def": {"0": "background", "1": "lesion"}}}}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    return folder


def test_three_loading_paths_give_the_same_label_map(tmp_path, network, case):
    ckpt = get_model(_checkpoint_folder(tmp_path / "ckpt", network))
    bundle = get_model(_bundle_folder(tmp_path / "bundle", network))
    assert bundle.kind == "bundle" and bundle.inputs == ["flair"] and bundle.dims == "2d"
    assert [lab["name"] for lab in bundle.labels] == ["lesion"]
    ts_path = tmp_path / "ts" / "tiny.ts"
    ts_path.parent.mkdir()
    torch.jit.script(network).save(str(ts_path))
    (ts_path.parent / "tiny.json").write_text(json.dumps(dict(ckpt.to_dict(), kind="torchscript", weights="tiny.ts",
                                                              sha256=sha256_file(ts_path))))
    script = get_model(ts_path)
    assert script.kind == "torchscript"
    maps = []
    for entry in (ckpt, bundle, script):
        labelmap = UNetSegmenter(entry, "cpu").segment(case)
        assert labelmap.volume.geometry.same_as(case.geometry)  # reference geometry
        assert set(np.unique(labelmap.volume.array)) <= {0, 1}
        maps.append(labelmap.volume.array)
    assert maps[0].any()
    assert np.array_equal(maps[0], maps[1]) and np.array_equal(maps[0], maps[2])
    # a .pt checkpoint path with model.json beside it works too
    assert get_model(tmp_path / "ckpt" / "model.pt").network == SPEC


def test_weights_file_of_an_ensemble_member_loads_that_member_alone(tmp_path, network, case):
    """The path of one member's weights file gives that member alone (with its own digest), not the ensemble:
    what a check on a case only that fold model did not see needs."""
    folder = _checkpoint_folder(tmp_path / "ens", network)
    torch.manual_seed(4)
    other = build_network(SPEC).eval()
    torch.save(other.state_dict(), folder / "fold-b.pt")
    data = json.loads((folder / "model.json").read_text())
    data["members"] = [{"weights": "fold-b.pt", "sha256": sha256_file(folder / "fold-b.pt"), "held_out": "b"}]
    (folder / "model.json").write_text(json.dumps(data))
    ensemble = get_model(folder)
    first, second = get_model(folder / "model.pt"), get_model(folder / "fold-b.pt")
    assert len(ensemble.members) == 1 and not first.members and not second.members
    assert (first.weights, first.sha256) == ("model.pt", ensemble.sha256)
    assert (second.weights, second.sha256) == ("fold-b.pt", data["members"][0]["sha256"])
    maps = [UNetSegmenter(e, "cpu").segment(case).volume.array for e in (first, second)]
    direct = UNetSegmenter(folder / "model.pt", "cpu").segment(case).volume.array
    assert np.array_equal(maps[0], direct) and not np.array_equal(maps[0], maps[1])  # two different networks
    # the service keeps loaded models: the ensemble, then one member of it from the same folder, are two models
    from mrisegassist.service import AutoSegmentRequest, Service
    from mrisegassist.volume import read_volume

    service, flair = Service("cpu"), read_volume(data_path("ms-lesjak", "patient07", "flair.nii.gz"))
    ensemble_map = UNetSegmenter(ensemble, "cpu").segment(case).volume.array
    assert not np.array_equal(ensemble_map, maps[1])  # so a cached ensemble would be caught
    for model, expected in ((folder, ensemble_map), (folder / "fold-b.pt", maps[1]), (folder, ensemble_map)):
        got = service.run(AutoSegmentRequest({"flair": flair}, str(model))).array
        assert np.array_equal(got, expected), model
    (folder / "fold-b.pt").write_bytes((folder / "fold-b.pt").read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match="sha256 of fold-b.pt"):  # its digest is checked
        UNetSegmenter(folder / "fold-b.pt", "cpu")


def test_sha256_mismatch_is_a_clear_error(tmp_path, network):
    folder = _checkpoint_folder(tmp_path / "m", network)
    data = json.loads((folder / "model.json").read_text())
    data["sha256"] = "0" * 64
    (folder / "model.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="sha256"):
        UNetSegmenter(folder)


def test_wrong_architecture_names_the_mismatch(tmp_path, network):
    wider = dict(SPEC, channels=[8, 16, 16, 16, 16])
    folder = _checkpoint_folder(tmp_path / "w", network, spec=wider)
    with pytest.raises(CheckpointError, match=r"does not fit the UNet architecture: .*shape mismatches.*checkpoint \(4"):
        UNetSegmenter(folder)
    deeper = dict(SPEC, channels=[4, 8, 8, 8, 8, 8], strides=[2, 2, 2, 2, 2])
    folder = _checkpoint_folder(tmp_path / "d", network, spec=deeper)
    with pytest.raises(CheckpointError, match="missing keys"):
        UNetSegmenter(folder)


def test_unsafe_or_corrupt_files_are_refused(tmp_path, network):
    folder = _checkpoint_folder(tmp_path / "p", network)
    torch.save({"model": network}, folder / "model.pt")  # a pickled module, not a state dict
    entry = get_model(folder)
    entry.sha256 = ""
    with pytest.raises(CheckpointError, match="weights-only"):
        entry.load_network()
    (folder / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot load"):
        entry.load_network()
    (folder / "model.pt").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        entry.load_network()


def test_registry_lookup_errors(tmp_path, monkeypatch, network):
    monkeypatch.setenv("MRISEGASSIST_MODELS", str(tmp_path / "user"))
    _checkpoint_folder(tmp_path / "user" / "tiny", network)
    names = [e.name for e in list_models()]
    assert "tiny" in names
    assert get_model("tiny").folder == tmp_path / "user" / "tiny"
    with pytest.raises(InputError, match="unknown model 'nope'"):
        get_model("nope")
    with pytest.raises(InputError, match="neither model.json"):
        get_model(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text(json.dumps({"name": "x", "kind": "onnx"}))
    with pytest.raises(CheckpointError, match="unknown model kind"):
        get_model(bad)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="device .cuda. requested but CUDA is not available"):
            UNetSegmenter(get_model("tiny"), "cuda")


def test_3d_model_sliding_window_keeps_reference_geometry(tmp_path, case):
    """A 3D U-Net runs through MONAI sliding_window_inference on the cropped brain; output on the FLAIR grid."""
    spec = dict(SPEC, spatial_dims=3, channels=[4, 8, 8], strides=[2, 2])
    torch.manual_seed(0)
    net = build_network(spec)
    folder = _checkpoint_folder(tmp_path / "m3d", net, spec=spec)
    entry = get_model(folder)
    entry.dims, entry.roi_size, entry.spacing = "3d", [64, 64, 64], [1.5, 1.5, 1.5]  # resampled model grid
    labelmap = UNetSegmenter(entry).segment(case)
    assert labelmap.volume.geometry.same_as(case.geometry)
    assert set(np.unique(labelmap.volume.array)) <= {0, 1}


def test_cli_errors_are_clear(tmp_path, capsys):
    from mrisegassist.cli import main

    flair = data_path("ms-lesjak", "patient07", "flair.nii.gz")
    assert main(["segment", "--model", "nope", "-i", f"flair={flair}", "-o", str(tmp_path / "x.nii.gz")]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["segment", "--model", "nope", "-i", "flair", "-o", str(tmp_path / "x.nii.gz")]) == 2
    assert "expected SEQ=PATH" in capsys.readouterr().err
    assert main(["segment", "--model", "nope", "-i", f"flair={tmp_path / 'missing.nii.gz'}", "-o", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "cases").mkdir()
    assert main(["train", "--cases", str(tmp_path / "cases"), "--out", str(tmp_path / "o"), "--labels", "1=lesion"]) == 2
    assert "no cases found" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


def test_model_json_and_weights_copies_are_verified_before_they_replace_the_previous(tmp_path, network, monkeypatch):
    """``model.json`` (ModelEntry.write) and an ensemble member's weights copied by ``card.install`` are staged,
    read back and compared before they replace the previous file: a short write leaves the previous one."""
    import shutil

    from mrisegassist.errors import WriteError
    from mrisegassist.unet.card import copy_verified

    folder = _checkpoint_folder(tmp_path / "m", network)
    entry = get_model(folder)
    before = (folder / "model.json").read_bytes()
    real = Path.write_bytes
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: real(self, data[: len(data) // 2]))
    entry.description = "changed"
    with pytest.raises(WriteError, match=r"model\.json: cannot write .*differ.*previous file is kept"):
        entry.write()
    monkeypatch.setattr(Path, "write_bytes", real)
    assert (folder / "model.json").read_bytes() == before and get_model(folder).description == ""

    source, target = folder / "model.pt", tmp_path / "ens" / "fold-a.pt"
    target.parent.mkdir()
    target.write_bytes(b"previous")
    real_copy = shutil.copyfile
    monkeypatch.setattr(shutil, "copyfile", lambda src, dst: real(Path(dst), Path(src).read_bytes()[:100]))
    with pytest.raises(WriteError, match=r"fold-a\.pt: cannot write .*sha256 differs.*previous file is kept"):
        copy_verified(source, target, entry.sha256)
    assert target.read_bytes() == b"previous" and [p.name for p in target.parent.iterdir()] == ["fold-a.pt"]
    monkeypatch.setattr(shutil, "copyfile", real_copy)
    copy_verified(source, target, entry.sha256)
    assert sha256_file(target) == entry.sha256


@pytest.mark.parametrize("device,message", [
    ("nonsense", r"device 'nonsense': unknown device; use cpu, cuda, cuda:N or mps"),
    ("cuda:x", r"device 'cuda:x': unknown device"), ("tpu", r"device 'tpu': unknown device")])
def test_unet_device_goes_through_the_one_device_rule(device, message):
    """The U-Net's device goes through the rule every layer uses (mrisegassist.devices): a clear InputError, not
    torch's RuntimeError; the same message as the service's request check."""
    from mrisegassist.service.checks import check_device
    from mrisegassist.unet.inference import resolve_device

    with pytest.raises(InputError, match=message):
        resolve_device(device)
    with pytest.raises(InputError, match=message):
        check_device(device)
    with pytest.raises(InputError, match=message):
        UNetSegmenter("ms-lesions-2d", device)
    assert resolve_device(None) == resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match=r"device 'cuda:0' requested but CUDA is not available"):
            resolve_device("cuda:0")
