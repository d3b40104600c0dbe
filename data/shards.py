"""Webdataset tar shards as a stream (DATA.DATASET wds): what a cluster reads instead of a
million small files.

Read with Python's tarfile: a shard is read front to back, samples before a range's start
are passed over by their 512-byte headers, and no dependency is added; the files stay in
webdataset's layout, so the ``webdataset`` library reads them too.

Which samples a process reads (``ShardDataset.ranges``):

- Training, epoch e: the shards in an order shuffled by (SEED, e), the same on every rank,
  their samples end to end. With N samples, W processes and batch B, every process takes
  S = N // (W B) steps; rank r reads the contiguous stretch [r S B, (r + 1) S B) of that
  sequence (shards are cut at sample boundaries where stretches meet), and each of its K
  loader workers a contiguous part of whole batches (worker k: S // K batches, one more
  when k < S % K). The last N - W S B samples (fewer than W B) wait for a later epoch; the
  shard order, hence which samples wait, changes every epoch. Each worker shuffles its
  stream with a buffer of DATA.SHUFFLE_BUFFER samples seeded by (SEED, e, rank, worker).
- Evaluation: the shards in name order; rank r reads [r N // W, (r + 1) N // W), its
  workers equal parts of that: every sample exactly once, on any number of processes.

Resuming: an epoch's order depends only on (SEED, epoch, W, B, K), so at an epoch
boundary a resumed run reads what an uninterrupted one reads. Mid-epoch, each worker
passes over the samples of the batches already trained (read, not decoded): with the same
W, B and DATA.NUM_WORKERS the remaining batches hold the same images in the same order
(bit for bit with DATA.NUM_WORKERS 0); with another W, B or worker count the epoch's rest
has the right number of steps but is cut from the new arrangement, so some images of the
epoch are seen twice and others not at all.

Bad samples (an undecodable image, a sample without its .cls or image, a .cls that is no
class index, a shard that is cut short or cannot be opened) stop the run with one line
naming the shard and the sample; with DATA.SKIP_BAD_IMAGES a training sample is replaced
by the next readable one of the worker's stream (the last one at its end: same steps on
every rank) and an evaluation sample is dropped; each is counted (``take_skipped``).
"""
from __future__ import annotations

import bisect
import itertools
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from errors import one_line

from .datasets import DataError
from .decode import PILLOW_ERRORS, decode_whole
from .shardlist import sample_keys, split_member

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")  # webdataset's image extensions


@dataclass
class Record:
    """One sample as read: its place in the split (for counting), where it came from, the
    encoded image and class, or why it cannot be used."""
    position: int
    shard: str
    key: str
    image: Optional[bytearray] = None
    label: Optional[int] = None
    error: Optional[str] = None


def _record(position: int, shard: str, key: str, parts: dict, num_classes: Optional[int]) -> Record:
    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    if image is None:
        return Record(position, shard, key, error=f"no image (.jpg) in the sample (files: {sorted(parts)})")
    if "cls" not in parts:
        return Record(position, shard, key, error="no .cls (class index) in the sample")
    text = parts["cls"].decode("utf-8", "replace").strip()
    try:
        label = int(text)
    except ValueError:
        return Record(position, shard, key, error=f".cls holds {text[:20]!r}, not a class index")
    if label < 0 or (num_classes is not None and label >= num_classes):
        return Record(position, shard, key, error=f"class index {label} is outside 0..{(num_classes or 1) - 1} "
                                                  f"(MODEL.NUM_CLASSES {num_classes})")
    return Record(position, shard, key, image, label)


def read_shard(path: str, start: int, stop: int, first: int, expected: int,
               num_classes: Optional[int]) -> Iterator[Record]:
    """Samples ``start`` .. ``stop - 1`` of a shard as Records; ``first`` is the shard's
    first position in the split, ``expected`` its sample count (index.json)."""
    seen, key, parts = -1, None, {}
    try:
        tar = tarfile.open(path, "r:")
    except (OSError, tarfile.TarError) as e:
        for i in range(start, stop):
            yield Record(first + i, path, f"#{i}", error=f"cannot open the shard: {one_line(e)}")
        return
    with tar:
        try:
            while True:
                member = tar.next()
                if member is None:
                    break
                name = split_member(member.name) if member.isfile() else None
                if name is None:
                    continue
                if name[0] != key:
                    if key is not None and seen >= start:
                        yield _record(first + seen, path, key, parts, num_classes)
                    seen, key, parts = seen + 1, name[0], {}
                    if seen >= stop:
                        return
                if seen >= start:  # read straight from the file: tarfile's file objects cost more than this
                    tar.fileobj.seek(member.offset_data)
                    data = bytearray(member.size)
                    if tar.fileobj.readinto(data) != member.size:
                        raise tarfile.ReadError("unexpected end of data")
                    parts[name[1]] = data
            if key is not None and start <= seen < stop:
                yield _record(first + seen, path, key, parts, num_classes)
            seen += 1
        except (OSError, tarfile.TarError, EOFError) as e:  # cut inside a sample (truncated file)
            if start <= seen < stop:
                yield Record(first + seen, path, key or f"#{seen}",
                             error=f"the shard ends inside this sample ({one_line(e)}): a truncated file?")
            seen += 1
    for i in range(max(seen, start), stop):
        yield Record(first + i, path, f"#{i}", error=f"missing: the shard holds {seen} of the {expected} samples "
                                                     f"its index lists (a truncated file?)")


def _shuffled(records: Iterator[Record], size: int, rng: np.random.Generator) -> Iterator[Record]:
    """A shuffle buffer of up to ``size`` records: each record out is a random one of those
    held. It starts giving records out after min(size, 100) (a worker's first batch does not
    wait for the whole buffer to be read) and grows by one with each until full, as
    webdataset's ``shuffle`` does; the rest leave in random order at the end."""
    buffer: list[Record] = []
    start = min(size, 100)
    for record in records:
        buffer.append(record)
        if len(buffer) < size:  # filling: take a second record for each one given out
            buffer.extend(itertools.islice(records, 1))
        if len(buffer) >= start:
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class ShardDataset(IterableDataset):
    """One split of webdataset shards for one process: an epoch's stream of (image, class)
    as described in the module docstring. ``len()`` is what this process yields per epoch
    (training: S B; evaluation: its share), ``total`` the split's size."""

    def __init__(self, shards: list[str], counts: list[int], classes: Optional[list[str]],
                 transform: Optional[Callable], train: bool, rank: int, world_size: int, batch_size: int,
                 seed: int = 0, skip_bad: bool = False, shuffle_buffer: int = 1000,
                 num_classes: Optional[int] = None, fast_decode: bool = True) -> None:
        self.shards, self.counts, self.classes = list(shards), list(counts), classes
        self.transform, self.train = transform, train
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.skip_bad, self.shuffle_buffer = seed % 2**32, skip_bad, shuffle_buffer
        self.num_classes, self.fast_decode = num_classes, fast_decode
        self.starts = [0] + list(itertools.accumulate(self.counts))
        self.total = self.starts[-1]
        self.epoch, self.skip = 0, 0  # skip: batches of this process already trained (mid-epoch resume)
        self.bad = torch.zeros(max(1, self.total), dtype=torch.bool).share_memory_()
        self._keys: dict[int, list[str]] = {}  # shard index -> its sample keys (sample_name)

    # -- which samples ---------------------------------------------------------------
    @property
    def steps(self) -> int:
        return self.total // (self.world_size * self.batch_size)

    @property
    def per_process(self) -> int:
        """Samples each process would draw per epoch before whole steps are cut."""
        return self.total // self.world_size

    def __len__(self) -> int:
        if self.train:
            return self.steps * self.batch_size
        lo, hi = self._rank_range()
        return hi - lo

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_range(self) -> tuple[int, int]:
        if self.train:
            per = self.steps * self.batch_size
            return self.rank * per, (self.rank + 1) * per
        return self.rank * self.total // self.world_size, (self.rank + 1) * self.total // self.world_size

    def ranges(self, worker: int, workers: int) -> tuple[list[tuple[int, int, int]], int]:
        """This worker's (shard index, first sample, end sample) pieces in reading order and
        the number of batches (training) before it whose samples it passes over (resume)."""
        lo, hi = self._rank_range()
        if self.train:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards)).tolist()
            batches = [self.steps // workers + (k < self.steps % workers) for k in range(workers)]
            lo += sum(batches[:worker]) * self.batch_size
            hi = lo + batches[worker] * self.batch_size
            skip = max(0, (self.skip - worker + workers - 1) // workers) if self.skip > worker else 0
        else:
            order = list(range(len(self.shards)))
            lo, hi = lo + (hi - lo) * worker // workers, lo + (hi - lo) * (worker + 1) // workers
            skip = 0
        pieces, at = [], 0
        for s in order:
            a, b = max(lo, at), min(hi, at + self.counts[s])
            if a < b:
                pieces.append((s, a - at, b - at))
            at += self.counts[s]
        return pieces, skip

    def eval_order(self, batch_size: int, num_workers: int) -> list[int]:
        """Evaluation: this process's sample positions in the order a DataLoader with this
        batch size and worker count yields them (each worker's batches taken in turn)."""
        workers = max(1, num_workers)
        batches = []
        for worker in range(workers):
            pieces, _ = self.ranges(worker, workers)
            positions = [self.starts[s] + i for s, a, b in pieces for i in range(a, b)]
            batches.append([positions[i:i + batch_size] for i in range(0, len(positions), batch_size)])
        return [p for turn in itertools.zip_longest(*batches, fillvalue=[]) for batch in turn for p in batch]

    def sample_name(self, position: int) -> str:
        """``<shard>:<key>`` of the sample at ``position`` of the split (webdataset's __url__
        and __key__), read from the shard's headers once per shard."""
        s = bisect.bisect_right(self.starts, position) - 1
        if s not in self._keys:
            try:
                self._keys[s] = list(sample_keys(self.shards[s]))
            except (OSError, tarfile.TarError):
                self._keys[s] = []
        keys, i = self._keys[s], position - self.starts[s]
        return f"{self.shards[s]}:{keys[i] if i < len(keys) else f'#{i}'}"

    # -- reading ---------------------------------------------------------------------
    def _records(self, pieces: list[tuple[int, int, int]]) -> Iterator[Record]:
        for s, a, b in pieces:
            yield from read_shard(self.shards[s], a, b, self.starts[s], self.counts[s], self.num_classes)

    def _image(self, record: Record):
        why = record.error
        if why is None:
            try:
                return decode_whole(record.image, self.fast_decode)  # transformed again to replace a bad sample
            except PILLOW_ERRORS as e:
                why = f"cannot read the image: {one_line(e)}"
        if not self.skip_bad:
            raise DataError(f"bad sample {record.key} in shard {record.shard}: {why} "
                            f"(DATA.SKIP_BAD_IMAGES True skips such samples)")
        self.bad[record.position] = True
        return None

    def _apply(self, image, label: int):
        return (self.transform(image) if self.transform is not None else image), label

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The loader takes batches from its workers in turn, starting with worker 0: after
        # skipping m batches, worker w continues the part of the one that made batch m + w.
        worker = (worker + self.skip) % workers
        pieces, skip = self.ranges(worker, workers)
        records = self._records(pieces)
        if not self.train:
            for record in records:
                image = self._image(record)
                yield None if image is None else self._apply(image, record.label)  # None: dropped
            return
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        stream = _shuffled(records, self.shuffle_buffer, rng)
        for _ in itertools.islice(stream, skip * self.batch_size):
            pass  # batches trained before a mid-epoch checkpoint: read (for the order), not decoded
        pending, last = 0, None
        for record in stream:
            image = self._image(record)
            if image is None:
                pending += 1  # replaced by the next readable sample
                continue
            for _ in range(pending + 1):
                yield self._apply(image, record.label)
            pending, last = 0, (image, record.label)
        if pending:
            if last is None:
                names = ", ".join(sorted({self.shards[s] for s, _, _ in pieces})[:3])
                raise DataError(f"no readable sample in the part of {names} one loader worker reads "
                                f"(every one was skipped as unreadable)")
            for _ in range(pending):
                yield self._apply(*last)

    # -- counting --------------------------------------------------------------------
    def take_skipped(self) -> tuple[int, Optional[str]]:
        """(bad samples met since the last call, the first of them); resets. Call it when no
        loader iterator over this dataset is running."""
        found = self.bad.nonzero().flatten()
        self.bad.zero_()
        if not len(found):
            return 0, None
        position = int(found[0])
        s = bisect.bisect_right(self.starts, position) - 1
        i = position - self.starts[s]
        try:
            key = next(itertools.islice(sample_keys(self.shards[s]), i, None), f"#{i}")
        except (OSError, tarfile.TarError):
            key = f"#{i}"
        return len(found), f"{self.shards[s]} sample {key}"
