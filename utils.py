"""Process setup (single, torchrun, slurm), seeding, and model measurements."""
from __future__ import annotations

import datetime
import itertools
import os
import random
import re
import subprocess
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``gpu[03-05,9],cpu1`` -> ``gpu03``."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass  # no scontrol on this machine: parse the common forms ourselves
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not head:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = head.group(1), head.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _launcher_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or slurm variables; (0, 1, 0) otherwise."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun / torch.distributed.launch
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:  # srun
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        env.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "localhost"))))
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        env["RANK"], env["WORLD_SIZE"] = str(rank), str(world)
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        return rank, world, int(env["LOCAL_RANK"])
    return 0, 1, 0


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Start the process group when launched with several processes; pick the device.

    NCCL on CUDA, gloo on the CPU. ``timeout_s`` (DIST_TIMEOUT) bounds how long any
    collective waits for a dead or stuck rank.
    """
    rank, world, local = _launcher_ranks()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local % max(1, torch.cuda.device_count())}"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def abort_distributed() -> None:
    """Tear down the process group after a failure on this rank without waiting for peers
    (destroy_process_group may block in a collective that will never complete). The peers'
    next collective then fails: at once under gloo (the connection closes), under NCCL
    within DIST_TIMEOUT; srun --kill-on-bad-exit and torchrun also stop them."""
    if not dist.is_initialized():
        return
    try:
        from torch.distributed.distributed_c10d import _abort_process_group
        _abort_process_group()
    except Exception:  # older torch or a backend without abort
        dist.destroy_process_group()


class _SkipSampler(Sampler):
    """The wrapped sampler's order without its first ``skip`` indices."""

    def __init__(self, sampler: Sampler, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def skip_batches(loader: DataLoader, batches: int) -> DataLoader:
    """The same loader without its first ``batches`` batches, for resuming mid-epoch.

    Indices are skipped in the sampler, so skipped images are never loaded. With the
    epoch's seeds and the checkpoint's RNG state restored this replays the rest of the
    epoch exactly when augmentation runs in the main process (DATA.NUM_WORKERS 0); loader
    workers restart their random streams, so with workers the remaining batches hold the
    same images in the same order but with fresh random augmentations.
    """
    if batches <= 0:
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size,
                      sampler=_SkipSampler(loader.sampler, batches * loader.batch_size),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last, timeout=loader.timeout,
                      worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                      prefetch_factor=loader.prefetch_factor, persistent_workers=False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed for one rank's epoch: augmentation, dropout and data order then depend only on
    (seed, rank, epoch), so a run resumed at an epoch boundary replays the same numbers."""
    return (seed * 1_000_003 + epoch * 7_919 + rank) % 2**31


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    if env.distributed:
        dist.all_reduce(tensor)
    return tensor.tolist()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_macs(model: nn.Module, img_size: int, in_chans: int = 3) -> float:
    """Multiply-accumulates of one forward pass on one image (torch's flop counter / 2).

    torch's counter knows the CUDA attention kernels but not the CPU one, so SDPA on the
    CPU is counted with the same formula; the figure does not depend on the device.
    """
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters())
    x = torch.zeros(1, in_chans, img_size, img_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    counter = FlopCounterMode(display=False, custom_mapping={cpu_sdpa: _cpu_sdpa_flops})
    with torch.no_grad(), counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / 2
