"""Short U-Net training runs on real cases (tiny network, small crops): the loss goes down, resume continues,
and the result is directly usable by ``segment`` (API and CLI)."""
from __future__ import annotations

import json
import re
from pathlib import Path

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


@pytest.fixture(scope="module")
def glioma_crop():
    """pat0002 on the model grid, cut to 24 slices through the tumour (a small real crop)."""
    files = [f for f in discover_cases(data_path("brats2013-deepmedic")) if f.name == "pat0002"][0]
    case = load_training_case(files, ["flair", "t1c"], [1.0, 1.0, None], {"flair": "zscore", "t1c": "zscore"},
                              [1, 2, 3, 4])
    k = int(np.argmax((case.label == 4).sum(axis=(1, 2))))
    sub = slice(k - 12, k + 12)
    return type(case)(case.name, case.image[:, sub].copy(), case.label[sub].copy(), case.fg[sub].copy())


def test_25d_training_crops_match_inference_slices(glioma_crop):
    """The neighbouring-slice channels a 2.5D model is trained on are laid out exactly as inference builds them
    (sequence-major: channel c * 3 + (d + 1) = sequence c at slice offset d)."""
    from mrisegassist.unet.inference import _slices

    patch = max(glioma_crop.label.shape[1:])
    case = pad_case(glioma_crop, patch, "2d")
    case.indices = class_indices(case, 5)
    transforms = make_transforms("2d", patch, 5, [0, 0, 0, 0, 1], context=1, augment="none", n_sequences=2)
    transforms.set_random_state(seed=4)
    for _ in range(4):
        sample = transforms({"image": case.image, "label": case.label[None], "indices": case.indices})[0]
        image, label = sample["image"].numpy(), sample["label"].numpy()
        assert image.shape == (6, patch, patch) and label.shape == (1, patch, patch)
        k = [k for k in range(1, case.label.shape[0] - 1) if np.array_equal(case.label[k], label[0])
             and np.array_equal(case.image[:, k], image[[1, 4]])]
        assert len(k) == 1 and (label == 4).any()
        np.testing.assert_array_equal(image, _slices(case.image, k[0], k[0] + 1, 1)[0])


def test_strong_augmentation_treats_each_sequence_alike_across_its_slices(glioma_crop):
    """Strong augmentation: shapes and labels stay valid; a sequence's neighbouring slices get the same intensity
    transform (identical slices stay identical unless noise was drawn); the two sequences get independent ones."""
    slice_ = glioma_crop.image[:, 12:13]
    same = np.repeat(slice_[:1], 2, axis=0)  # both sequences = the FLAIR slice ...
    image = np.repeat(same, 9, axis=1)  # ... repeated on 9 identical slices
    label = np.repeat(glioma_crop.label[12:13], 9, axis=0)
    case = pad_case(type(glioma_crop)("x", image, label, np.ones(label.shape, bool)), 96, "2d")
    case.indices = class_indices(case, 5)
    transforms = make_transforms("2d", 96, 5, None, context=1, augment="strong", n_sequences=2)
    transforms.set_random_state(seed=0)
    identical_slices = different_sequences = 0
    for _ in range(20):
        s = transforms({"image": case.image, "label": case.label[None], "indices": case.indices})[0]
        x, y = s["image"].numpy(), s["label"].numpy()
        assert x.shape == (6, 96, 96) and np.isfinite(x).all() and set(np.unique(y)) <= {0, 1, 2, 3, 4}
        identical_slices += np.abs(x[0] - x[1]).max() < 1e-5 and np.abs(x[3] - x[5]).max() < 1e-5
        different_sequences += np.abs(x[1] - x[4]).max() > 1e-3
    assert identical_slices >= 8  # Gaussian noise (p = 0.25) is the only per-voxel change
    assert different_sequences >= 10


def test_cross_validation_folds_restart_and_table(tmp_path):
    """Leave-one-case-out: every labelled case is held out once and never trained on; finished folds are not
    trained again; the summary is the mean and sample sd of the folds."""
    from mrisegassist.unet.crossval import cross_validate, existing_fold, load_results

    cfg = _config(tmp_path, out="", val_cases=[], epochs=1, steps_per_epoch=2, context=1, augment="strong",
                  tta_flips=[[1]])
    out = tmp_path / "cv"
    result = cross_validate(cfg, out, recipe="tiny.json", log=lambda m: None)
    assert [f.held_out for f in result.folds] == ["patient07", "patient26"]
    for fold in result.folds:
        assert fold.held_out not in fold.training_cases and fold.training_cases
        entry = get_model(out / f"fold-{fold.held_out}")
        assert entry.context == 1 and entry.tta_flips == [[1]] and entry.network["in_channels"] == 3
        assert 0.0 <= fold.scores["Dice MS lesion"] <= 1.0 and fold.scores["ml reference"] > 1.0
    dice = [f.scores["Dice MS lesion"] for f in result.folds]
    mean, sd = result.summary()["Dice MS lesion"]
    assert mean == pytest.approx(np.mean(dice)) and sd == pytest.approx(np.std(dice, ddof=1))
    stamp = (out / "fold-patient07" / "model.pt").stat().st_mtime_ns
    logs = []
    again = cross_validate(cfg, out, recipe="tiny.json", log=logs.append)
    assert (out / "fold-patient07" / "model.pt").stat().st_mtime_ns == stamp
    assert not any("training on" in m for m in logs) and again.to_dict() == result.to_dict()
    table = load_results(out).table()
    assert "| patient07 |" in table and "| patient26 |" in table and "mean ± sd" in table
    files = [f for f in discover_cases(data_path("ms-lesjak")) if f.name == "patient26"][0]
    with pytest.raises(InputError, match="was trained on patient26"):
        existing_fold(get_model(out / "fold-patient07"), files, tmp_path / "x", "note")


def _tiny_state(seed: int = 0) -> dict:
    spec = default_spec("2d", 1, 2)
    spec["channels"], spec["strides"] = TINY, [2, 2, 2]
    torch.manual_seed(seed)
    return build_network(spec).state_dict()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pickled-object", "not-a-training-checkpoint"])
def test_resume_from_a_damaged_checkpoint_names_the_file(tmp_path, damage):
    """A damaged ``last.pt`` stops ``--resume`` before any work with a CheckpointError naming the file (never a raw
    UnpicklingError), and the file is left as it was."""
    import argparse

    from mrisegassist.unet.train import save_checkpoint

    cfg = _config(tmp_path, resume=True)
    last = tmp_path / "model" / "last.pt"
    last.parent.mkdir()
    if damage == "garbage":
        last.write_bytes(b"\x80\x04not a checkpoint at all" * 10)
    elif damage == "truncated":
        save_checkpoint(last, {"model": _tiny_state(), "optimizer": {}, "epoch": 1, "best": 0.1, "history": [],
                               "spec": {}})
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "pickled-object":
        torch.save({"model": _tiny_state(), "config": argparse.Namespace(lr=1)}, last)  # needs full unpickling
    else:
        save_checkpoint(last, _tiny_state())  # the weights alone: nothing to resume
    before = last.read_bytes()
    message = "not a training checkpoint" if damage == "not-a-training-checkpoint" else "cannot load as a weights-only checkpoint"
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(last))}: .*{message}"):
        train(cfg, log=lambda m: None)
    assert last.read_bytes() == before and sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]
    assert main(["train", "--cases", cfg.cases, "--inputs", "flair", "--labels", "ms", "--out", cfg.out,
                 "--resume"]) != 0  # the CLI reports it as an error (no traceback: test_fault_injection's rule)


def test_checkpoint_writes_are_verified_and_keep_the_previous_file(tmp_path, monkeypatch):
    """``torch.save`` that stops half-way (no error raised): the read-back check refuses the file, the previous
    checkpoint stays, and no temporary file is left."""
    from mrisegassist.errors import WriteError
    from mrisegassist.unet import train as train_module

    path = tmp_path / "last.pt"
    first = {"model": _tiny_state(0), "epoch": 1}
    train_module.save_checkpoint(path, first)
    before = path.read_bytes()
    real = torch.save

    def half(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:
            fh.truncate(Path(f).stat().st_size // 2)

    monkeypatch.setattr(train_module.torch, "save", half)
    with pytest.raises(WriteError, match=r"last\.pt: cannot write .*previous file is kept"):
        train_module.save_checkpoint(path, {"model": _tiny_state(1), "epoch": 2})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    monkeypatch.setattr(train_module.torch, "save", real)
    loaded = train_module.load_checkpoint(path)
    assert loaded["epoch"] == 1 and all(torch.equal(loaded["model"][k], v) for k, v in first["model"].items())


@pytest.mark.parametrize("text,message", [("[1, 2]", "must be a JSON object of options, not a list"),
                                          ('"lr"', "not a str"), ("{bad", "not valid JSON"),
                                          ('{"lr": 1, "typo": 2}', "unknown training option")])
def test_training_config_that_is_not_an_object_is_a_clear_input_error(tmp_path, text, message):
    path = tmp_path / "recipe.json"
    path.write_text(text)
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: .*{message}"):
        TrainConfig.from_json(path)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
