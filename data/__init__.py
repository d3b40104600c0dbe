"""Datasets, transforms and loaders."""
from .build import Loaders, build_loaders, build_mixup
from .datasets import DataError, Digits, build_dataset
from .samplers import ShardedEvalSampler
from .transforms import build_transform

__all__ = ["Loaders", "build_loaders", "build_mixup", "DataError", "Digits", "build_dataset",
           "ShardedEvalSampler", "build_transform"]
