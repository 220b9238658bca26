"""Training across processes with ``torch.distributed``: DistributedDataParallel, gloo on CPU, NCCL on GPU.

``train(TrainConfig(nproc=N))`` (``mrisegassist train --nproc N``) starts N processes on this machine
(:func:`launch`, ``torch.multiprocessing`` spawn, rendezvous on 127.0.0.1). Under ``torchrun`` (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` set) each process joins that group instead,
so ``torchrun --nproc-per-node 4 -m mrisegassist train ...`` works across nodes too.

The result equals one process's with the same global batch (``batch_size`` = the global batch; it must divide
by the number of processes), up to floating-point summation order:

* every process draws the same global batch (same seeds, same sampling and augmentation), and runs the network
  forward and backward on its own contiguous share of it;
* the loss is the loss of the **global** batch: the logits of all shares are gathered (``all_gather``, no
  gradient through the other processes' shares) so batch-level terms such as the batch Dice are those of the
  whole batch; the gradient of a process's own share is multiplied by the number of processes, so DDP's
  gradient averaging gives exactly the one-process gradient;
* the elapsed time used by the learning-rate schedule and the time limit is rank 0's (broadcast), so every
  process takes the same decisions; checkpoints and the model are written by rank 0 only.

Validation runs in every process (each holds the same weights), which keeps them in step.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import socket
from typing import Callable, Optional

import torch

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: How long a process waits for the others at a collective (rank 0 may be validating or writing).
TIMEOUT = datetime.timedelta(hours=2)


@dataclasses.dataclass
class DistributedRun:
    """This process's place in a run (``world_size`` 1: no distribution, every method is a no-op)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Optional[torch.device] = None

    @classmethod
    def from_env(cls) -> "DistributedRun":
        """From ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun, :func:`launch`); single-process without them."""
        try:
            return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                       int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0))))
        except ValueError:
            return cls()

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self, device: torch.device) -> torch.device:
        """Join the process group (gloo on CPU, NCCL on CUDA: device ``cuda:LOCAL_RANK``); returns the device."""
        import torch.distributed as dist

        if not self.active:
            self.device = device
            return device
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                    rank=self.rank, world_size=self.world_size, timeout=TIMEOUT)
        self.device = device
        return device

    def wrap(self, network: torch.nn.Module) -> torch.nn.Module:
        """The module to run forward/backward through (DDP when distributed; ``network`` keeps the weights)."""
        if not self.active:
            return network
        from torch.nn.parallel import DistributedDataParallel

        cuda = self.device is not None and self.device.type == "cuda"
        return DistributedDataParallel(network, device_ids=[self.device.index] if cuda else None)

    def loss(self, loss_fn: Callable, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``loss_fn(model(x), y)`` of the global batch ``x`` (N, C, ...), ``y`` (N, 1, ...), each process
        computing the network on its own share (see the module docstring)."""
        if not self.active:
            return loss_fn(model(x), y)
        import torch.distributed as dist

        n = x.shape[0]
        if n % self.world_size:
            from ..errors import InputError

            raise InputError(f"batch size {n} does not divide by {self.world_size} processes")
        share = n // self.world_size
        out = model(x[self.rank * share:(self.rank + 1) * share])
        parts = [torch.empty_like(out) for _ in range(self.world_size)]
        dist.all_gather(parts, out.detach().contiguous())
        out.register_hook(lambda grad: grad * self.world_size)  # DDP averages: this makes it the global sum
        parts[self.rank] = out
        return loss_fn(torch.cat(parts), y)

    def same(self, value: float) -> float:
        """Rank 0's ``value`` in every process (time-based decisions must agree)."""
        if not self.active:
            return value
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64,
                         device=self.device if self.device is not None and self.device.type == "cuda" else "cpu")
        dist.broadcast(t, 0)
        return float(t.item())

    def close(self) -> None:
        import torch.distributed as dist

        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def is_main_process() -> bool:
    """False in the processes of a distributed run that are not rank 0 (they write nothing)."""
    return DistributedRun.from_env().is_main


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, nproc: int, port: int, cfg, queue, show_progress: bool, verbose: bool) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = int(cfg.threads) or max(1, cores // nproc)
    torch.set_num_threads(threads)
    from ..progress import tqdm_progress
    from .train import train

    main = rank == 0
    progress, close = tqdm_progress("train", disable=not (main and show_progress))
    run = DistributedRun.from_env()
    try:
        result = train(dataclasses.replace(cfg, threads=threads), progress=progress,
                       log=print if (main and verbose) else (lambda message: None))
    finally:
        close()
        run.close()
    if main:
        queue.put(result)


def launch(cfg, show_progress: bool = True, verbose: bool = True) -> dict:
    """Train ``cfg`` in ``cfg.nproc`` processes on this machine; returns rank 0's summary (as :func:`train`).

    Each process gets ``cfg.threads`` torch threads (default: the cores divided by the processes)."""
    import torch.multiprocessing as mp

    nproc = int(cfg.nproc)
    if cfg.batch_size % nproc:
        from ..errors import InputError

        raise InputError(f"--batch-size {cfg.batch_size} (the global batch) must divide by --nproc {nproc}")
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(nproc, _free_port(), cfg, queue, show_progress, verbose), nprocs=nproc, join=True)
    return queue.get()
