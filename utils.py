"""Process setup (single, torchrun, slurm), stop signals, seeding, and model measurements
(parameters, MACs, and the one step timer behind --throughput and tools/benchmark*.py)."""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import os
import random
import re
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from config import ConfigError
from errors import UserError


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


def init_distributed(device: str = "auto", timeout_s: int = 1800, source: str = "--device") -> DistEnv:
    """Start the process group when launched with several processes; pick the device.

    NCCL on CUDA, gloo on the CPU. ``timeout_s`` (DIST_TIMEOUT) bounds how long any
    collective waits for a dead or stuck rank. With several processes each takes the GPU of
    its LOCAL_RANK: one ``cuda:N`` (DEVICE, set by ``source``) for all is refused here, before
    NCCL would fail on a duplicate GPU.
    """
    rank, world, local = _launcher_ranks()
    if world > 1 and device.startswith("cuda:"):
        raise ConfigError(f"{source}: DEVICE: {device} with {world} processes puts every rank on one GPU "
                          f"(NCCL refuses a duplicate GPU); use cuda or auto, which give each process the "
                          f"GPU of its LOCAL_RANK, and CUDA_VISIBLE_DEVICES to choose the GPUs")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA device "
                        f"(torch.cuda.is_available() is False); use --device cpu or auto")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
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


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective breaking because another rank went away (it failed
    and aborted the process group): this rank's own traceback would only distract."""
    if isinstance(error, getattr(dist, "DistBackendError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "was aborted"))


def data_parallel(model: nn.Module, env: DistEnv) -> nn.Module:
    """``model`` in DDP on this rank's device. Every trainable parameter of a registered model
    gets a gradient every step (tests/test_backbones.py), so DDP looks for no unused ones.
    Buffers are broadcast from rank 0 before every forward only where training updates them
    (BatchNorm's running statistics): the models' other buffers are derived from their
    sizes or drawn alike on every rank (a Performer's features), and re-sending them would be
    ~10 MB of nothing per step for ViT-dis-S."""
    updated = any(isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
                  for m in model.modules())
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
        broadcast_buffers=updated)


class StopSignal:
    """SIGTERM (preemption, scancel), SIGUSR1 (slurm's warning before the time limit,
    ``srun --signal``) or SIGINT (Ctrl-C) asks training to stop at the next step boundary
    and save. The handler only sets a flag; the training loop reads it, and all ranks agree
    on it every step. A second Ctrl-C, a second or more after the first, stops at once
    (KeyboardInterrupt) without saving; a launcher passing on the same Ctrl-C within that
    second does not count."""
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._interrupted_at: Optional[float] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._interrupted_at is not None and now - self._interrupted_at > 1.0:
                raise KeyboardInterrupt
            self._interrupted_at = self._interrupted_at or now
        self.received = self.received or signal.Signals(signum).name

    def requested(self) -> bool:
        return self.received is not None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


# ------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_fn(model: nn.Module, batch: torch.Tensor, train: bool,
            autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
            optimizer: Optional[torch.optim.Optimizer] = None, classes: Optional[int] = None
            ) -> Callable[[], None]:
    """One forward pass without gradients (``train=False``), or forward + cross-entropy on
    random labels (of ``classes``, else probed with a one-image pass, which a compiled model
    would compile separately) + backward + optimizer step (SGD with lr 0 unless
    ``optimizer`` is given), on ``batch``; ends with a device synchronisation so that timing
    it is honest."""
    model.train(train)
    if not train:
        def forward() -> None:
            with torch.no_grad(), autocast():
                model(batch)
            synchronize(batch.device)
        return forward
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.0)
    if classes is None:
        with torch.no_grad(), autocast():
            classes = model(batch[:1]).shape[-1]
    labels = torch.randint(0, classes, (batch.shape[0],), device=batch.device)

    def train_step() -> None:
        with autocast():
            loss = F.cross_entropy(model(batch).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(batch.device)
    return train_step


def alternating_times(fns: dict[str, Callable[[], None]], rounds: int, warmup: int = 1
                      ) -> dict[str, list[float]]:
    """Seconds per call of each function over ``rounds`` rounds: one call of each per round,
    the order reversed every other round, so that load from other processes (and the
    machine warming up) hits every candidate alike. Compare medians, or ratios per round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def peak_memory_mib(fn: Callable[[], None], device: torch.device) -> float:
    """Peak memory one call of ``fn`` needs above what was in use before it: the CUDA
    allocator's peak, or on Linux this process's peak resident size (its high-water mark
    reset through /proc/self/clear_refs, after glibc returned freed memory), so calls can
    alternate in one process."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        return (torch.cuda.max_memory_allocated(device) - start) / 2**20
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the OS: RSS = what is live
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = _status_mib("VmRSS:")
    fn()
    return _status_mib("VmHWM:") - start


def images_per_second(fn: Callable[[], None], batch_size: int, rounds: int, warmup: int = 3) -> float:
    """Median images/s of ``fn`` (one batch per call; see ``step_fn``)."""
    return batch_size / statistics.median(alternating_times({"fn": fn}, rounds, warmup)["fn"])


def throughput(config, model: nn.Module, env: DistEnv, autocast, logger) -> int:
    """--throughput: images/s of forward passes and of training steps, after warm-up."""
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(False)  # one output in training mode too; the same work
    batch = torch.randn(config.DATA.BATCH_SIZE, config.MODEL.IN_CHANS, config.DATA.IMG_SIZE,
                        config.DATA.IMG_SIZE, device=env.device)
    if config.TRAIN.CHANNELS_LAST:
        batch = batch.contiguous(memory_format=torch.channels_last)
    rounds = 30 if env.device.type == "cuda" else 5
    speed = {mode: images_per_second(step_fn(model, batch, mode == "train", autocast), batch.size(0), rounds)
             for mode in ("eval", "train")}
    logger.info(f"throughput {config.MODEL.NAME} batch {batch.size(0)}: "
                f"eval {speed['eval']:.1f} img/s, train step {speed['train']:.1f} img/s")
    return 0
