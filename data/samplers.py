"""Samplers: every validation image exactly once across ranks, per-epoch and per-batch
seeding, and skipping the batches a mid-epoch checkpoint already trained on."""
from __future__ import annotations

import contextlib
import copy
import itertools
import random
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler


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


def derived_seed(*numbers: int) -> int:
    """A seed (0..2**63-1) from a sequence of integers, well mixed (NumPy's SeedSequence): the
    seeds of nearby batches or epochs share no structure."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1, np.uint64)[0] >> 1)


@contextlib.contextmanager
def seeded_random(seed: int):
    """Python's, NumPy's and torch's CPU random state (what timm's and torchvision's
    transforms draw from) seeded with ``seed`` inside, and as they were after."""
    state = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.default_generator.set_state(state[2])


class SeededBatches(Dataset):
    """A map-style dataset whose augmentation is seeded per batch, from (the epoch's seed, the
    batch's indices), whichever loader worker (or the main process) makes the batch.

    Why: loader workers otherwise draw from streams seeded per worker, so a batch's crops and
    flips depend on which worker made it and what it made before. Seeded per batch, an epoch
    resumed after k batches augments batches k+1... as the uninterrupted epoch did, and a run
    is the same with 0, 1 or 8 workers. The main process's own random state (mixing, drop
    path) is left as it was. Anything else is the wrapped dataset's."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list:  # DataLoader fetches batches through it
        with seeded_random(derived_seed(self.seed, *indices)):
            return [self.dataset[i] for i in indices]

    def __getattr__(self, name: str):
        if name == "dataset":  # not yet set (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class _SkipSampler(Sampler):
    """The wrapped sampler's order without its first ``skip`` indices."""

    def __init__(self, sampler: Sampler, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def epoch_batches(loader: DataLoader, seed: int, skip: int = 0) -> DataLoader:
    """``loader`` for one epoch seeded ``seed``: its augmentation seeded per batch
    (``SeededBatches``), without its first ``skip`` batches (a mid-epoch resume).

    Indices are skipped in the sampler, so skipped images are never loaded. The remaining
    batches hold the same images in the same order, augmented alike (random erasing, on the
    device, is seeded per batch too: data/device.py), with any number of workers. Streamed
    shards (wds) order and seed themselves (data/shards.py): their workers pass over the
    skipped batches' samples."""
    if isinstance(loader.dataset, IterableDataset):
        if skip <= 0:
            return loader
        dataset = copy.copy(loader.dataset)
        dataset.skip = skip
        return DataLoader(dataset, batch_size=loader.batch_size, num_workers=loader.num_workers,
                          collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                          timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                          prefetch_factor=loader.prefetch_factor, persistent_workers=False)
    sampler = _SkipSampler(loader.sampler, skip * loader.batch_size) if skip > 0 else loader.sampler
    return DataLoader(SeededBatches(loader.dataset, seed), batch_size=loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last, timeout=loader.timeout,
                      worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                      prefetch_factor=loader.prefetch_factor, persistent_workers=False)
