"""Samplers for distributed evaluation."""
from __future__ import annotations

from typing import Iterator

from torch.utils.data import Sampler


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
