"""Samplers: every validation image exactly once across ranks, per-epoch seeding, and
skipping the batches a mid-epoch checkpoint already trained on."""
from __future__ import annotations

import copy
import itertools
from typing import Iterator

from torch.utils.data import DataLoader, IterableDataset, Sampler


class ShardedEvalSampler(Sampler[int]):
    """Rank r takes indices r, r + world, r + 2 world, ...: every image exactly once.

    torch's DistributedSampler pads with duplicates so that all ranks get equal shares,
    which makes the accuracy depend on the number of processes. Ranks here may differ by
    one image; evaluation sums correct counts and image counts over ranks.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed for one rank's epoch: augmentation, dropout and data order then depend only on
    (seed, rank, epoch), so a run resumed at an epoch boundary replays the same numbers."""
    return (seed * 1_000_003 + epoch * 7_919 + rank) % 2**31


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
    same images in the same order but with fresh random augmentations (random erasing, on the
    device and seeded per batch, data/device.py, stays the same)."""
    if batches <= 0:
        return loader
    if isinstance(loader.dataset, IterableDataset):  # wds shards: each worker passes over its part
        dataset = copy.copy(loader.dataset)
        dataset.skip = batches
        return DataLoader(dataset, batch_size=loader.batch_size, num_workers=loader.num_workers,
                          collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                          timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                          prefetch_factor=loader.prefetch_factor, persistent_workers=False)
    return DataLoader(loader.dataset, batch_size=loader.batch_size,
                      sampler=_SkipSampler(loader.sampler, batches * loader.batch_size),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last, timeout=loader.timeout,
                      worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                      prefetch_factor=loader.prefetch_factor, persistent_workers=False)
