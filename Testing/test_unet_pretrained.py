"""Downloadable pretrained models (MONAI Model Zoo BraTS SegResNet, Swin UNETR BraTS 2021 fold 1): architectures
checked at random initialisation against the publishers' configs, input conventions mapped to ours and checked on
a shared BraTS-2023-named case, downloads from a local HTTP server on 127.0.0.1 (no real download happens)."""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import threading

import numpy as np
import pytest
import torch

from conftest import data_path
from mrisegassist.cli import main
from mrisegassist.prompt import weights
from mrisegassist.unet.entries import SHIPPED_DIR, get_model
from mrisegassist.unet.inference import UNetSegmenter, load_model_case
from mrisegassist.unet.networks import ArrayOrder, AveragedSoftmax
from mrisegassist.unet.postprocess import decode_brats_sigmoid
from mrisegassist.unet.preprocess import ModelGrid, foreground_bbox, prepare_inputs
from mrisegassist.volume import read_volume

# The publishers' network arguments, typed from their configs (not from our model.json):
# Project-MONAI/model-zoo models/brats_mri_segmentation/configs/inference.json "network_def"
SEGRESNET_CONFIG = dict(blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], init_filters=16, in_channels=4,
                        out_channels=3, dropout_prob=0.2)
# Project-MONAI/research-contributions SwinUNETR/BRATS21 README "Training" / test.py
SWINUNETR_CONFIG = dict(in_channels=4, out_channels=3, feature_size=48, use_checkpoint=True)
GLI, GLI_DIR = "BraTS-GLI-00001-000", "brats-gli-00001"


def _keys_and_shapes(module: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name, cls, config, n_params", [
    ("brats-segresnet", "SegResNet", SEGRESNET_CONFIG, 4_702_227),  # 18.8 MB of float32, the size of model.pt
    ("brats21-swinunetr", "SwinUNETR", SWINUNETR_CONFIG, 62_191_941),  # README: 62.1 M parameters
])
def test_architecture_matches_the_published_config_at_random_init(name, cls, config, n_params):
    import monai.networks.nets as nets

    reference = getattr(nets, cls)(**config)  # what the official checkpoint was saved from
    entry = get_model(SHIPPED_DIR / name)
    ours = entry.build()
    assert _keys_and_shapes(ours) == _keys_and_shapes(reference)
    assert sum(p.numel() for p in ours.parameters()) == n_params
    torch.manual_seed(0)
    state = {k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    from mrisegassist.unet.networks import load_state

    load_state(ours, state, "random state dict of the published architecture")  # strict: every key, every shape
    assert torch.equal(ours.state_dict()[next(iter(state))], state[next(iter(state))])
    with torch.inference_mode():  # runs (Swin UNETR needs einops): 4 channels in, TC/WT/ET logits out
        assert tuple(ours.eval()(torch.zeros(1, 4, 64, 64, 64)).shape) == (1, 3, 64, 64, 64)


def test_catalog_models_are_listed_with_licence_and_source(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(weights.WEIGHTS_ENV, raising=False)
    assert main(["models", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    for name, catalog in (("brats-segresnet", "monai-brats-mri-segmentation"),
                          ("brats21-swinunetr", "swinunetr-brats21-fold1")):
        row = listed[name]
        assert not row["installed"] and "Apache-2.0" in row["licence"]
        assert row["download"]["url"] == weights.CATALOG[catalog].url and row["download"]["source"]
    assert main(["models"]) == 0
    assert "not downloaded" in capsys.readouterr().out
    flair = data_path(GLI_DIR, f"{GLI}-t2f.nii.gz")
    inputs = [f"{s}={data_path(GLI_DIR, f'{GLI}-{f}.nii.gz')}" for s, f in
              (("t1c", "t1c"), ("t1", "t1n"), ("t2", "t2w"), ("flair", "t2f"))]
    args = ["segment", "--model", "brats-segresnet", *sum((["-i", i] for i in inputs), []), "-o",
            str(tmp_path / "x.nii.gz")]
    assert main(args) == 1  # no weights and no --download: a clear message, nothing written
    err = capsys.readouterr().err
    assert weights.CATALOG["monai-brats-mri-segmentation"].url in err and "--download" in err
    assert not (tmp_path / "x.nii.gz").exists() and flair.exists()


class _Server(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        data = self.server.payload
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def segresnet_server(monkeypatch, tmp_path):
    """127.0.0.1 serving a seeded random SegResNet state dict (the bundle's architecture, saved like MONAI's
    CheckpointSaver: a plain state dict) as the catalog entry, with the md5 of the served bytes."""
    import monai.networks.nets as nets

    torch.manual_seed(1)
    buffer = io.BytesIO()
    torch.save(nets.SegResNet(**SEGRESNET_CONFIG).state_dict(), buffer)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    httpd.payload, httpd.requests = buffer.getvalue(), []
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    official = weights.CATALOG["monai-brats-mri-segmentation"]
    local = dataclasses.replace(official, url=f"http://127.0.0.1:{httpd.server_port}/{official.filename}",
                                md5=hashlib.md5(httpd.payload).hexdigest())
    monkeypatch.setitem(weights.CATALOG, official.name, local)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(weights.WEIGHTS_ENV, raising=False)
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_segresnet_downloaded_and_run_on_a_shared_case(segresnet_server, tmp_path):
    """brats-gli-00001 (t1n/t1c/t2w/t2f): the network sees exactly what the bundle's own preprocessing gives
    (LoadImaged of [T1c, T1, T2, FLAIR] in the files' voxel order, NormalizeIntensityd(nonzero, channel_wise)),
    and the label map comes back on the T1c grid with the BraTS 2018 label names."""
    from monai.transforms import LoadImage, NormalizeIntensity

    files = {s: data_path(GLI_DIR, f"{GLI}-{f}.nii.gz") for s, f in
             (("t1c", "t1c"), ("t1", "t1n"), ("t2", "t2w"), ("flair", "t2f"))}
    seen = []
    segmenter = UNetSegmenter("brats-segresnet", download=True)
    assert len(segresnet_server.requests) == 1 and isinstance(segmenter.network, ArrayOrder)
    pin = tmp_path / "cache" / "mrisegassist" / "weights" / "model_brats_mri_segmentation.pt.sha256-pin"
    assert pin.read_text().strip() == hashlib.sha256(segresnet_server.payload).hexdigest()
    segmenter.network.network.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].numpy().copy()))
    case = load_model_case(segmenter, files)
    labelmap = segmenter.segment(case)

    reference = read_volume(files["t1c"])
    assert labelmap.volume.geometry.same_as(reference.geometry)
    assert [(lab.value, lab.name) for lab in labelmap.labels] == [
        (1, "necrotic / non-enhancing tumour core"), (2, "oedema"), (4, "enhancing tumour")]
    assert set(np.unique(labelmap.volume.array)) <= {0, 1, 2, 4}

    expected = NormalizeIntensity(nonzero=True, channel_wise=True)(
        LoadImage(image_only=True, reader="NibabelReader")([str(files[s]) for s in ("t1c", "t1", "t2", "flair")]))
    expected = np.asarray(expected)
    assert expected.shape == (4, 240, 240, 155)  # channel-first, voxel order [i, j, k] as stored
    grid = ModelGrid.for_geometry(case.geometry, segmenter.entry.spacing)
    assert grid.exact and grid.axes == (0, 1, 2) and not grid.flips  # BraTS grid = model grid [S, P, L]
    _, fg = prepare_inputs(case.images, segmenter.inputs, grid, segmenter.entry.normalization)
    box = foreground_bbox(fg, margin=4)  # [S, P, L] -> the network sees [L, P, S]
    window = seen[0][0]
    sizes = [box[2].stop - box[2].start, box[1].stop - box[1].start, box[0].stop - box[0].start]
    starts = [(w - s) // 2 for w, s in zip(window.shape[1:], sizes)]  # sliding-window padding to the ROI
    inner = window[:, starts[0]:starts[0] + sizes[0], starts[1]:starts[1] + sizes[1], starts[2]:starts[2] + sizes[2]]
    np.testing.assert_allclose(inner, expected[:, box[2], box[1], box[0]], atol=1e-4)
    # the second run finds the verified file in the cache: no new request
    UNetSegmenter("brats-segresnet")
    assert len(segresnet_server.requests) == 1


def test_brats_sigmoid_decoding_and_array_orders():
    """TC/WT/ET channels decode as the bundles do; ArrayOrder round-trips and shows the network [L, P, S] / RAS."""
    probs = np.zeros((3, 1, 1, 5), np.float32)
    probs[1, ..., 1:] = 0.9  # whole tumour
    probs[0, ..., 2:] = 0.9  # tumour core
    probs[2, ..., 3:] = 0.9  # enhancing
    probs[2, ..., 0] = 0.4  # below threshold
    assert decode_brats_sigmoid(probs)[0, 0].tolist() == [0, 2, 1, 3, 3]
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 1, 2, 3, 4)  # [S, P, L]
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, t):
            seen.append(t)
            return t

    for order, expect in (("ijk", x.permute(0, 1, 4, 3, 2)), ("ras", torch.flip(x.permute(0, 1, 4, 3, 2), (2, 3)))):
        out = ArrayOrder(Probe(), order)(x)
        assert torch.equal(seen[-1], expect) and torch.equal(out, x)


def test_averaged_softmax_flips_back():
    """Test-time flips: a left-right-asymmetric network averaged over the identity and the flip."""
    class Left(torch.nn.Module):
        def forward(self, t):  # class 1 wherever the voxel is in the left half of the input
            score = torch.zeros_like(t[:, :1])
            score[..., : t.shape[-1] // 2] = 5.0
            return torch.cat([torch.zeros_like(score), score], dim=1)

    x = torch.zeros(1, 1, 4, 6)
    plain = torch.softmax(Left()(x), 1)
    both = torch.exp(AveragedSoftmax([Left()], flips=[[1]])(x))
    assert torch.allclose(both.sum(1), torch.ones(1, 4, 6), atol=1e-5)
    assert torch.allclose(both[0, 1], (plain[0, 1] + torch.flip(plain[0, 1], (-1,))) / 2, atol=1e-5)
