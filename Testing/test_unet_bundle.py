"""MONAI bundle folders are read as data (issue 14.3): no code from a model folder runs unless the user passes
--trust-model-code; allowed networks with literal arguments load, everything else is refused with exit code 2."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import data_path
from mrisegassist.cli import main
from mrisegassist.errors import InputError
from mrisegassist.unet.bundle import UntrustedCodeError
from mrisegassist.unet.entries import SHIPPED_DIR, get_model, list_models
from mrisegassist.unet.inference import UNetSegmenter
from mrisegassist.unet.networks import build_network

NET = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
       "channels": [4, 8, 8, 8, 8], "strides": [2, 2, 2, 2], "num_res_units": 1, "norm": "instance"}
META = {"name": "tiny bundle", "license": "test", "network_data_format": {
    "inputs": {"image": {"num_channels": 1, "spatial_shape": [128, 128], "channel_def": {"0": "FLAIR"}}},
    "outputs": {"pred": {"num_channels": 2, "channel_def": {"0": "background", "1": "lesion"}}}}}


def _bundle(folder: Path, config: dict, weights: bool = True) -> Path:
    (folder / "configs").mkdir(parents=True)
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    (folder / "configs" / "metadata.json").write_text(json.dumps(META))
    if weights:
        (folder / "models").mkdir()
        spec = {("name" if k == "_target_" else k): (v.rpartition(".")[2] if k == "_target_" else v)
                for k, v in NET.items()}
        torch.manual_seed(0)
        torch.save(build_network(spec).state_dict(), folder / "models" / "model.pt")
    return folder


def _evil(marker: Path) -> str:
    """A config expression that would create ``marker`` if anything evaluated it."""
    return f"$open({str(marker)!r}, 'w').close()"


def test_fault_case_from_the_issue_is_refused_without_running_code(tmp_path, capsys):
    """Issue 14.3: a bundle whose configs/inference.json has a "$..." expression that would create a file."""
    marker = tmp_path / "PWNED"
    config = {"imports": ["$import os"], "network_def": dict(NET, channels=_evil(marker) + " or [4, 8, 8, 8, 8]")}
    bundle = _bundle(tmp_path / "bundle", config)
    flair = data_path("ms-lesjak", "patient07", "flair.nii.gz")
    out = tmp_path / "out.nii.gz"
    code = main(["segment", "--model", str(bundle), "-i", f"flair={flair}", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "inference.json" in err and "network_def.channels" in err and "Python expression" in err
    assert "--trust-model-code" in err and "Traceback" not in err
    assert not marker.exists() and not out.exists()
    with pytest.raises(UntrustedCodeError):  # the API (the Slicer logic and web app load through get_model)
        UNetSegmenter(bundle)
    assert not marker.exists()


@pytest.mark.parametrize("network_def, construct", [
    (dict(NET, _target_="builtins.exec"), "'_target_' 'builtins.exec' is not an allowed MONAI network"),
    (dict(NET, _target_="monai.bundle.ConfigParser"), "not an allowed MONAI network"),
    (dict(NET, _target_="torch.nn.Module"), "not an allowed MONAI network"),
    (dict(NET, norm={"_target_": "torch.nn.InstanceNorm2d", "num_features": 4}), "holds '_target_'"),
    (dict(NET, _requires_="$print('x')"), "holds '_requires_'"),
    (dict(NET, channels="%other.json#channels"), "is a macro"),
    ("$monai.networks.nets.UNet(2, 1, 2, (4, 8), (2,))", "network_def is a Python expression"),
])
def test_constructs_outside_the_allow_list_are_refused(tmp_path, network_def, construct):
    bundle = _bundle(tmp_path / "b", {"network_def": network_def})
    with pytest.raises(UntrustedCodeError, match=construct) as info:
        get_model(bundle)
    assert str(bundle / "configs" / "inference.json") in str(info.value)
    assert isinstance(info.value, InputError)  # CLI exit status 2


def test_official_layout_loads_without_evaluating_anything(tmp_path):
    """The Model Zoo bundles keep "$" expressions outside network_def (imports, device, paths, the network's
    .to(device)); they are ignored, "@" references to literals are followed, and the network is built."""
    marker = tmp_path / "PWNED"
    config = {"imports": [_evil(marker)], "bundle_root": ".", "device": _evil(marker), "n_out": 2,
              "network_def": dict(NET, out_channels="@n_out"), "network": "$@network_def.to(@device)",
              "preprocessing": {"_target_": "Compose", "transforms": [
                  {"_target_": "LoadImaged", "keys": "image"},
                  {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True}]}}
    bundle = _bundle(tmp_path / "bundle", config)
    entry = get_model(bundle)
    assert entry.network["name"] == "UNet" and entry.network["out_channels"] == 2 and not entry.trusted_code
    assert entry.inputs == ["flair"] and entry.normalization == {"flair": "nonzero"} and entry.array_order == "kji"
    case_flair = data_path("ms-lesjak", "patient07", "flair.nii.gz")
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", "--model", str(bundle), "-i", f"flair={case_flair}", "-o", str(out), "--json"]) == 0
    assert out.is_file() and not marker.exists()


def test_trust_model_code_hands_the_config_to_monai(tmp_path):
    """With the explicit flag the bundle's own config runs (here: the expression creates its file)."""
    marker = tmp_path / "RAN"
    config = {"network_def": dict(NET, channels=_evil(marker) + " or [4, 8, 8, 8, 8]")}
    bundle = _bundle(tmp_path / "bundle", config)
    with pytest.raises(UntrustedCodeError):
        get_model(bundle)
    entry = get_model(bundle, trust_code=True)
    assert entry.trusted_code and not marker.exists()  # reading the metadata runs nothing
    net = UNetSegmenter(entry).network
    assert marker.exists() and isinstance(net, torch.nn.Module)


def test_a_refused_user_bundle_does_not_hide_other_models(tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    monkeypatch.setenv("MRISEGASSIST_MODELS", str(tmp_path / "user"))
    _bundle(tmp_path / "user" / "evil", {"network_def": dict(NET, _target_="builtins.eval")})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = [e.name for e in list_models()]
    assert "glioma-2d" in names and "tiny bundle" not in names
    assert any("builtins.eval" in str(w.message) for w in caught)
    assert not marker.exists()


def test_bundle_conventions_read_literally_match_the_shipped_catalog_entry(tmp_path):
    """A bundle laid out like the Model Zoo's brats_mri_segmentation (metadata channel_def T1c/T1/T2/FLAIR, no
    Orientationd, NormalizeIntensityd(nonzero), Activationsd(sigmoid), SlidingWindowInferer 240x240x160) maps
    to the same conventions as the shipped brats-segresnet entry."""
    segresnet = {"_target_": "SegResNet", "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "init_filters": 16,
                 "in_channels": 4, "out_channels": 3, "dropout_prob": 0.2}
    config = {"imports": ["$import glob", "$import os"], "device": "$torch.device('cpu')", "network_def": segresnet,
              "network": "$@network_def.to(@device)",
              "preprocessing": {"_target_": "Compose", "transforms": [
                  {"_target_": "LoadImaged", "keys": "image"},
                  {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True}]},
              "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [240, 240, 160], "sw_batch_size": 1,
                          "overlap": 0.5},
              "postprocessing": {"_target_": "Compose", "transforms": [
                  {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                  {"_target_": "Lambdad", "keys": "pred", "func": "$lambda x: x"}]}}
    folder = tmp_path / "brats_mri_segmentation"
    (folder / "configs").mkdir(parents=True)
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    meta = {"name": "BraTS MRI segmentation", "license": "Apache-2.0", "network_data_format": {
        "inputs": {"image": {"num_channels": 4, "spatial_shape": ["8*n", "8*n", "8*n"],
                             "channel_def": {"0": "T1c", "1": "T1", "2": "T2", "3": "FLAIR"}}},
        "outputs": {"pred": {"num_channels": 3, "channel_def": {"0": "Tumor core", "1": "Whole tumor",
                                                                 "2": "Enhancing tumor"}}}}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    entry = get_model(folder)
    shipped = get_model(SHIPPED_DIR / "brats-segresnet")
    for name in ("inputs", "network", "array_order", "output", "normalization", "roi_size", "overlap",
                 "label_mapping", "regions"):
        assert getattr(entry, name) == getattr(shipped, name), name
    assert [lab["value"] for lab in entry.labels] == [lab["value"] for lab in shipped.labels] == [1, 2, 4]
    assert np.allclose([s or 1.0 for s in entry.spacing], shipped.spacing)  # native (1 mm BraTS) vs explicit 1 mm
