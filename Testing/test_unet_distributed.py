"""Training in 2 processes (torch.distributed, gloo on CPU) gives the 1-process result with the same global batch:
same loss curve and same weights within float tolerance (summation order differs). Real cases: ms-lesjak
patient07 and patient26 (FLAIR, expert lesion masks), a tiny 2D U-Net, fixed seeds."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import data_path
from mrisegassist.errors import InputError
from mrisegassist.unet.data import discover_cases, load_training_case
from mrisegassist.unet.distributed import DistributedRun
from mrisegassist.unet.networks import build_network, load_state
from mrisegassist.unet.train import TrainConfig, train

#: 1 vs 2 processes: per-epoch mean loss, and the trained networks' class probabilities on real slices.
#: Differences come only from the order of float sums (gradient all-reduce, split convolutions). Weights are
#: not compared one by one: Adam turns float noise in directions the output ignores (conv biases before
#: instance normalisation, a common shift of all logits) into steps of up to the learning rate.
LOSS_ATOL = 1e-4
PROB_ATOL = 1e-3


def _config(tmp_path, name: str, **kw) -> TrainConfig:
    base = dict(out=str(tmp_path / name), cases=str(data_path("ms-lesjak")), inputs=["flair"], labels="ms",
                dims="2d", val_cases=[], val_fraction=0.0, epochs=3, steps_per_epoch=2, batch_size=4, patch=64,
                lr=5e-3, channels=[8, 16, 32, 64], seed=3, threads=1, name=name)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow
@pytest.mark.data
def test_two_processes_match_one_process(tmp_path):
    single = train(_config(tmp_path, "one"), log=lambda m: None)
    double = train(_config(tmp_path, "two", nproc=2), progress=None, log=lambda m: None)
    one = [h["loss"] for h in single["history"]]
    two = [h["loss"] for h in double["history"]]
    assert len(one) == len(two) == 3
    assert one[-1] < one[0]  # it trains
    np.testing.assert_allclose(two, one, rtol=0, atol=LOSS_ATOL)
    cfg = _config(tmp_path, "x")
    files = next(f for f in discover_cases(cfg.cases) if f.name == "patient07")
    case = load_training_case(files, cfg.inputs, cfg.resolved_spacing(), {"flair": "zscore"}, [1])
    k, j, i = (n // 2 for n in case.image.shape[1:])  # 4 central axial slices, a 64 x 64 crop at the centre
    crop = case.image[:, k - 2:k + 2, j - 32:j + 32, i - 32:i + 32]
    slices = torch.from_numpy(np.ascontiguousarray(crop.transpose(1, 0, 2, 3)))
    probs = []
    for name in ("one", "two"):
        state = torch.load(tmp_path / name / "last.pt", weights_only=True)
        net = build_network(state["spec"])
        load_state(net, state["model"], name)
        with torch.no_grad():
            probs.append(torch.softmax(net.eval()(slices.float()), dim=1))
    worst = float((probs[0] - probs[1]).abs().max())
    assert worst < PROB_ATOL, worst
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_global_batch_must_divide_and_no_env_means_one_process(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    run = DistributedRun.from_env()
    assert not run.active and run.is_main
    net = torch.nn.Conv2d(1, 2, 1)
    assert run.wrap(net) is net and run.same(1.5) == 1.5
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert DistributedRun.from_env().local_rank == 1 and not DistributedRun.from_env().is_main
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(InputError, match="divide"):
        train(dataclasses.replace(_config(tmp_path, "x"), nproc=3, batch_size=4))
