"""Config -> datasets, loaders and the batch-mixing function for training."""
from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from utils import DistEnv, all_reduce_sum, seed_everything

from .datasets import DataError, build_dataset, collate_readable, num_classes_of
from .device import DeviceLoader, device_stage
from .samplers import ShardedEvalSampler, epoch_batches, epoch_seed
from .transforms import build_transform


@dataclass
class Loaders:
    """Batches on the device, normalised there (data/device.py: the workers send uint8)."""
    train: Optional[DeviceLoader]
    val: DeviceLoader
    mixup: Optional[Mixup]
    generator: torch.Generator  # reseeded every epoch: augmentation and order follow (seed, epoch)

    def epoch(self, epoch: int, seed: int, rank: int, skip: int = 0) -> DeviceLoader:
        """Seed everything for ``epoch`` (global RNGs, the loader's generator, the sampler's
        order, the augmentation's and random erasing's per-batch seeds) and return its training
        batches, without the first ``skip`` of them."""
        seed = epoch_seed(seed, rank, epoch)
        seed_everything(seed)
        self.generator.manual_seed(seed)
        streamed = isinstance(self.train.dataset, IterableDataset)  # wds shards order themselves
        (self.train.dataset if streamed else self.train.sampler).set_epoch(epoch)
        return self.train.over(epoch_batches(self.train.loader, seed, skip), seed, start=skip)

    def images_per_epoch(self) -> int:
        """Training images each process draws per epoch, before what does not fill a step."""
        per_process = getattr(self.train.dataset, "per_process", None)
        return per_process if per_process is not None else len(self.train.sampler)

    def skipped_images(self, env: DistEnv) -> list[str]:
        """One line per split with unreadable images met since the last call
        (DATA.SKIP_BAD_IMAGES), counted over all ranks (every rank must call it). Training
        replaced them with the next readable image; evaluation dropped them."""
        lines = []
        for split, loader in (("train", self.train), ("val", self.val)):
            take = getattr(loader.dataset, "take_skipped", None) if loader is not None else None
            count, first = take() if take is not None else (0, None)
            if env.distributed:
                count = int(all_reduce_sum([count], env)[0])
                firsts = [None] * env.world_size
                dist.all_gather_object(firsts, first)
                first = next((f for f in firsts if f), None)
            if count:
                what = "replaced by the next readable image" if split == "train" else "not counted"
                lines.append(f"{split}: skipped {count} unreadable image(s) ({what}), first: {first}")
        return lines


def ignore_interrupts(worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the main process, which stops at a step boundary and
    saves; a worker killed by it would break the epoch first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _names(items: set, limit: int = 5) -> str:
    names = sorted(items)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_classes(config, train: Dataset, val: Dataset) -> None:
    if train is not None and getattr(train, "classes", None) != getattr(val, "classes", None):
        lacks, extra = set(train.classes) - set(val.classes), set(val.classes) - set(train.classes)
        parts = ([f"val lacks: {_names(lacks)}"] if lacks else []) + \
                ([f"val has extra: {_names(extra)}"] if extra else [])
        raise DataError(f"the class folders of train/ and val/ differ: {'; '.join(parts)}")
    expected = config.MODEL.NUM_CLASSES
    for split, ds in (("train", train), ("val", val)):
        found = num_classes_of(ds) if ds is not None else None
        if found is not None and found != expected and config.DATA.DATASET != "fake":
            raise DataError(f"{config.DATA.DATASET} {split} has {found} classes but MODEL.NUM_CLASSES "
                            f"is {expected}: set MODEL.NUM_CLASSES {found}")


def build_mixup(config) -> Optional[Mixup]:
    aug = config.AUG
    if aug.MIXUP <= 0 and aug.CUTMIX <= 0 and not aug.CUTMIX_MINMAX:
        return None
    return Mixup(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX,
                 cutmix_minmax=list(aug.CUTMIX_MINMAX) or None, prob=aug.MIXUP_PROB,
                 switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING,
                 num_classes=config.MODEL.NUM_CLASSES)


def _stream_loaders(config, train_set, val_set, world_size: int, workers: int, pin: bool,
                    generator: torch.Generator, device: torch.device) -> Loaders:
    """Loaders over ShardDatasets: batches come from one worker each, in turn (data/shards.py)."""
    val_loader = DataLoader(
        val_set, batch_size=config.TEST.BATCH_SIZE or config.DATA.BATCH_SIZE, num_workers=workers,
        pin_memory=pin, drop_last=False, collate_fn=collate_readable, worker_init_fn=ignore_interrupts)
    val_loader = device_stage(val_loader, config, device, train=False)
    train_loader = None
    if train_set is not None:
        if train_set.steps == 0:
            raise DataError(f"the training shards hold {train_set.total} images, fewer than one batch "
                            f"({config.DATA.BATCH_SIZE} x {world_size} processes)")
        train_loader = device_stage(DataLoader(
            train_set, batch_size=config.DATA.BATCH_SIZE, num_workers=workers, pin_memory=pin,
            drop_last=True, generator=generator, collate_fn=collate_readable, worker_init_fn=ignore_interrupts),
            config, device, train=True)
    return Loaders(train=train_loader, val=val_loader, mixup=build_mixup(config), generator=generator)


def eval_loader(config, dataset: Dataset, rank: int, world_size: int,
                device: torch.device | str = "cpu") -> DeviceLoader:
    """Batches of this rank's share of a map-style evaluation set on ``device``: every image
    on exactly one rank (ShardedEvalSampler, no padding), unreadable ones dropped
    (collate_readable)."""
    return device_stage(DataLoader(
        dataset, sampler=ShardedEvalSampler(len(dataset), rank, world_size),
        batch_size=config.TEST.BATCH_SIZE or config.DATA.BATCH_SIZE, num_workers=config.DATA.NUM_WORKERS,
        pin_memory=config.DATA.PIN_MEMORY and torch.cuda.is_available(), drop_last=False,
        persistent_workers=False, collate_fn=collate_readable, worker_init_fn=ignore_interrupts),
        config, device, train=False)


def build_loaders(config, rank: int, world_size: int, train: bool = True,
                  device: torch.device | str = "cpu") -> Loaders:
    """Loaders for this rank, their batches on ``device``. ``train=False`` (evaluation only)
    skips the training set."""
    val_set = build_dataset(config, train=False, transform=build_transform(config, train=False),
                            rank=rank, world_size=world_size)
    train_set = build_dataset(config, train=True, transform=build_transform(config, train=True),
                              rank=rank, world_size=world_size) if train else None
    _check_classes(config, train_set, val_set)
    if getattr(val_set, "total", len(val_set)) == 0:
        raise DataError(f"the {config.DATA.DATASET} validation set is empty")

    workers = config.DATA.NUM_WORKERS
    pin = config.DATA.PIN_MEMORY and torch.cuda.is_available()
    generator = torch.Generator()
    if isinstance(val_set, IterableDataset):  # wds: the datasets split the shards between processes
        return _stream_loaders(config, train_set, val_set, world_size, workers, pin, generator, device)
    val_loader = eval_loader(config, val_set, rank, world_size, device)
    train_loader = None
    if train_set is not None:
        if len(train_set) < config.DATA.BATCH_SIZE * world_size:
            raise DataError(f"the training set has {len(train_set)} images, fewer than one batch "
                            f"({config.DATA.BATCH_SIZE} x {world_size} processes)")
        if config.DATA.REPEATED_AUG:
            sampler = RepeatAugSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True)
        else:
            sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank,
                                         shuffle=True, seed=config.SEED)
        train_loader = device_stage(DataLoader(
            train_set, sampler=sampler, batch_size=config.DATA.BATCH_SIZE, num_workers=workers,
            pin_memory=pin, drop_last=True, generator=generator, collate_fn=collate_readable,
            persistent_workers=False, worker_init_fn=ignore_interrupts), config, device, train=True)
    return Loaders(train=train_loader, val=val_loader, mixup=build_mixup(config),
                   generator=generator)
