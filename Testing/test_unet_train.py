"""Short U-Net training runs on real cases (tiny network, small crops): the loss goes down, resume continues,
and the result is directly usable by ``segment`` (API and CLI)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import data_path
from mrisegassist.cli import main
from mrisegassist.errors import CheckpointError, InputError
from mrisegassist.unet.data import (class_indices, discover_cases, load_training_case, make_transforms, pad_case,
                                    read_manifest)
from mrisegassist.unet.entries import get_model
from mrisegassist.unet.networks import build_network, default_spec, load_state
from mrisegassist.unet.train import TrainConfig, train
from mrisegassist.volume import read_volume

TINY = [8, 16, 32, 64]


def _config(tmp_path, **kw) -> TrainConfig:
    base = dict(out=str(tmp_path / "model"), cases=str(data_path("ms-lesjak")), inputs=["flair"], labels="ms",
                dims="2d", val_cases=["patient07"], epochs=2, steps_per_epoch=8, batch_size=4, patch=64, lr=5e-3,
                channels=TINY, seed=1, threads=2, name="tiny-ms")
    base.update(kw)
    return TrainConfig(**base)


def _fixed_batch(cfg: TrainConfig):
    files = [f for f in discover_cases(cfg.cases) if f.name == "patient26"][0]
    case = pad_case(load_training_case(files, cfg.inputs, cfg.resolved_spacing(), {"flair": "zscore"}, [1]),
                    cfg.patch, cfg.dims)
    case.indices = class_indices(case, 2)
    transforms = make_transforms(cfg.dims, cfg.patch, 2)
    transforms.set_random_state(seed=123)
    samples = [transforms({"image": case.image, "label": case.label[None], "indices": case.indices})[0]
               for _ in range(16)]
    return torch.stack([s["image"] for s in samples]), torch.stack([s["label"] for s in samples])


@torch.no_grad()
def _loss(net, batch) -> float:
    from monai.losses import DiceCELoss

    net.eval()
    return float(DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)(net(batch[0]),
                                                                                                  batch[1]))


def test_short_training_lowers_loss_then_resumes_and_segments(tmp_path):
    cfg = _config(tmp_path)
    result = train(cfg, log=lambda m: None)
    assert result["epochs"] == 2 and len(result["history"]) == 2
    history = result["history"]
    assert all("patient07" in h["validation"]["cases"] for h in history)  # per-label Dice every epoch
    assert set(history[-1]["validation"]["cases"]["patient07"]["dice"]) == {"MS lesion"}

    spec = default_spec("2d", 1, 2)
    spec["channels"], spec["strides"] = TINY, [2, 2, 2]
    torch.manual_seed(cfg.seed)
    initial = build_network(spec)  # the weights training started from
    trained = build_network(spec)
    state = torch.load(tmp_path / "model" / "last.pt", weights_only=True)
    load_state(trained, state["model"], "last.pt")
    batch = _fixed_batch(cfg)
    before, after = _loss(initial, batch), _loss(trained, batch)
    assert after < before - 0.05, (before, after)

    # resume through the CLI for one more epoch
    code = main(["train", "--cases", cfg.cases, "--inputs", "flair", "--labels", "ms", "--model-dim", "2d",
                 "--epochs", "3", "--steps-per-epoch", "4", "--batch-size", "4", "--patch", "64",
                 "--val-cases", "patient07", "--seed", "1", "--out", cfg.out, "--resume", "--json",
                 "--config", str(_write_json(tmp_path, {"channels": TINY, "lr": 5e-3, "name": "tiny-ms"}))])
    assert code == 0
    resumed = torch.load(tmp_path / "model" / "last.pt", weights_only=True)
    assert resumed["epoch"] == 3 and len(resumed["history"]) == 3
    assert resumed["history"][:2] == state["history"]  # continued, not restarted

    # resuming with other inputs is refused
    with pytest.raises(CheckpointError, match="differs"):
        train(_config(tmp_path, inputs=["flair", "t1"], epochs=4, resume=True), log=lambda m: None)

    # the output folder is a usable model: segment through the CLI with a reference mask
    entry = get_model(tmp_path / "model")
    assert entry.sha256 and entry.inputs == ["flair"] and entry.training["cases"] == ["patient26"]
    out = tmp_path / "seg.nii.gz"
    flair = data_path("ms-lesjak", "patient07", "flair.nii.gz")
    assert main(["segment", "--model", str(tmp_path / "model"), "--input", f"flair={flair}", "-o", str(out),
                 "--ref-mask", str(data_path("ms-lesjak", "patient07", "lesions.nii.gz")), "--json"]) == 0
    seg = read_volume(out, kind="label")
    assert seg.geometry.same_as(read_volume(flair).geometry)
    assert set(np.unique(seg.array)) <= {0, 1}


def _write_json(tmp_path, data):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(data))
    return path


def test_case_discovery_and_manifest(tmp_path):
    cases = discover_cases(data_path("brats2013-deepmedic"))
    assert [c.name for c in cases] == ["pat0001", "pat0002", "pat0003", "pat0004"]
    assert set(cases[0].images) == {"flair", "t1c"} and cases[0].labels.name == "labels.nii.gz"
    gli = discover_cases(data_path("brats-gli-00001"))  # BraTS-2023 names, no labels
    assert set(gli[0].images) == {"flair", "t1", "t1c", "t2"} and gli[0].labels is None
    ms = discover_cases(data_path("ms-lesjak"))
    assert ms[0].labels.name == "lesions.nii.gz" and "t1c" in ms[0].images  # t1post -> t1c
    folder = data_path("brats2013-deepmedic", "pat0002")
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"case,FLAIR,t1c,label\nA,{folder}/flair.nii.gz,{folder}/t1c.nii.gz,{folder}/labels.nii.gz\n")
    (row,) = read_manifest(manifest)
    assert row.name == "A" and set(row.images) == {"flair", "t1c"} and row.labels.name == "labels.nii.gz"
    with pytest.raises(InputError, match="no label map"):
        load_training_case(gli[0], ["flair"], [1, 1, None], {}, [1, 2, 3, 4])
    with pytest.raises(InputError, match=r"label value\(s\) \[2, 4\]"):
        load_training_case(cases[1], ["flair"], [1, 1, None], {}, [1, 3])
    with pytest.raises(InputError, match="validation case"):
        train(TrainConfig(out=str(tmp_path / "x"), cases=str(data_path("brats2013-deepmedic")),
                          val_cases=["nope"]), log=lambda m: None)
