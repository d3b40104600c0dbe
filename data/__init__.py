"""Datasets, transforms and loaders."""
from .build import Loaders, build_loaders, build_mixup, eval_loader
from .datasets import DataError, Digits, build_dataset
from .samplers import ShardedEvalSampler
from .transforms import build_transform

__all__ = ["Loaders", "build_loaders", "build_mixup", "eval_loader", "DataError", "Digits", "build_dataset",
           "ShardedEvalSampler", "build_transform"]
