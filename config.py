"""Configuration: yacs defaults (every key commented), YAML files with BASE inheritance,
overrides (flags.py's, --opts), validation that fails before any work is done, keys that
moved, and reading a saved config (a checkpoint's, a run folder's) in today's keys.

Errors are ``ConfigError``s: one line naming the key and the file it came from; main.py
prints it and exits with code 2. Importing this module loads no torch: flag and key
mistakes answer at once; checks that need the model registry or a consumer's table of
choices (lr_scheduler.SCHEDULES) import it when they run.

Values are typed by their defaults: an int may stand for a float, nothing else converts
(a string is never read as a number). ``MODEL.<FAMILY>`` sections are not in the defaults:
a model family is a module of ``models/`` and its section holds the constructor arguments
of the chosen model, checked against the class's signature (model_config.py).
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import re
from typing import Any, Optional

import yaml
from yacs.config import CfgNode as CN

from errors import UserError, one_line

_C = CN()
_C.BASE = [""]  # YAML files this one inherits from, relative to it; later files override

# ----------------------------------------------------------------------------- data
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128  # per-process batch size
_C.DATA.DATA_PATH = ""  # dataset root (imagenet/folder: holds train/ and val/; wds: a folder of
# train-*.tar and val-*.tar shards (tools/make_shards.py), or a brace pattern naming shards of both splits)
_C.DATA.DATASET = "imagenet"  # imagenet | folder | wds (webdataset tar shards) | cifar10 | cifar100 | digits | fake |
# the evaluation sets (--eval; DATA.DATA_PATH is the set's folder, docs/DATA.md): imagenet-v2 | imagenet-real |
# imagenet-a | imagenet-r | imagenet-sketch | imagenet-c
_C.DATA.CLASS_MAP = ""  # imagenet/folder/the sets: file naming the model's classes in index order (timm's
# --class-map: .txt, one class folder name per line; .pkl {name: index}); folders are matched to it by name
_C.DATA.IMG_SIZE = 224  # input resolution (square)
_C.DATA.INTERPOLATION = "bicubic"  # resize interpolation (data.transforms.INTERPOLATIONS): bicubic | bilinear |
# nearest | random
_C.DATA.PIN_MEMORY = True  # pin host memory in the loader (CUDA only)
_C.DATA.NUM_WORKERS = 8  # loader worker processes per rank
_C.DATA.DOWNLOAD = True  # cifar: try to download when the files are missing
_C.DATA.REPEATED_AUG = False  # repeated-augmentation sampler (DeiT): 3 views per image
_C.DATA.MEAN = [0.485, 0.456, 0.406]  # normalisation mean (ImageNet)
_C.DATA.STD = [0.229, 0.224, 0.225]  # normalisation std (ImageNet)
_C.DATA.FAKE_SIZE = 1280  # fake: number of synthetic training images (val: a quarter)
_C.DATA.SKIP_BAD_IMAGES = False  # imagenet/folder/wds: use the next readable image instead of an unreadable
# one and log the count every epoch; False stops with an error naming the file
_C.DATA.DECODER = "auto"  # image decoding: auto (Pillow's decoder, an RGB image kept as decoded, 1.05x
# faster; a JPEG decoded only down to a random-resized crop's bottom edge, data/decode.py) | pil (torchvision's
# loader: open, then convert("RGB"), a copy); the same pixels | nvjpeg (image folders: JPEGs decoded, cropped,
# resized and flipped on the training device, nvjpeg on CUDA; no RandAugment, colour jitter or small-image
# crops, data/device_decode.py)
_C.DATA.SHUFFLE_BUFFER = 1000  # wds: samples each loader worker holds to shuffle its stream of shards (>= 1)

# ---------------------------------------------------------------------------- model
_C.MODEL = CN()
_C.MODEL.NAME = "vit_small_patch16_224"  # registered model name (models.list_models())
_C.MODEL.NUM_CLASSES = 1000  # classifier outputs
_C.MODEL.IN_CHANS = 3  # input channels
_C.MODEL.DROP_RATE = 0.0  # dropout before the classifier
_C.MODEL.DROP_PATH_RATE = 0.1  # stochastic depth rate (linearly increasing over depth)
_C.MODEL.LABEL_SMOOTHING = 0.1  # label smoothing (ignored when mixup/cutmix is active)
_C.MODEL.PRETRAINED = ""  # weights to fine-tune from: a file, a hub-style folder (DIR or local-dir:DIR), timm:<name>.<tag> or hf-hub:<org>/<repo>
_C.MODEL.HEAD_MAP = ""  # fine-tuning: the rows of the pretrained classifier to keep, with --pretrained: a file
# of class indices, or a map built from timm's class lists, <from>-to-<to> (models.weights.SYNSET_LISTS), e.g.
# imagenet-22k-to-imagenet-1k (a 21,841-class head to ImageNet's 1,000)
_C.MODEL.RESUME = "auto"  # auto: the newest valid checkpoint in the run folder, if any | a checkpoint file
# (--resume CKPT; --eval evaluates it) | '' (empty): start afresh even if the run folder holds checkpoints
# Family sections MODEL.<FAMILY> (VIT, DAT, ... one per module of models/): the model's
# constructor arguments upper-cased (MODEL.VIT.QKV_BIAS), checked against its signature.

# ---------------------------------------------------------------------------- train
_C.TRAIN = CN()
_C.TRAIN.EPOCHS = 300  # total epochs
_C.TRAIN.WARMUP_EPOCHS = 20  # linear warmup epochs
_C.TRAIN.WEIGHT_DECAY = 0.05  # decoupled weight decay (not on biases/norms/tokens)
_C.TRAIN.BASE_LR = 5e-4  # learning rate for a total batch of TRAIN.LR_BASE_BATCH
_C.TRAIN.WARMUP_LR = 5e-7  # warmup start lr (scaled like BASE_LR)
_C.TRAIN.MIN_LR = 5e-6  # final lr (scaled like BASE_LR)
_C.TRAIN.LR_BASE_BATCH = 512  # lrs are scaled by total_batch / LR_BASE_BATCH; 0 disables
_C.TRAIN.CLIP_GRAD = 5.0  # clipping limit (max gradient norm; see CLIP_MODE); 0: no clipping (the norm is logged)
_C.TRAIN.CLIP_MODE = "norm"  # how CLIP_GRAD clips (timm's dispatch_clip_grad): norm: the total norm at most
# CLIP_GRAD | value: every gradient element within +-CLIP_GRAD | agc: adaptive clipping (NFNets), each unit's
# gradient norm at most CLIP_GRAD x its weight norm (e.g. 0.01); the logged grad norm is the true one before clipping
_C.TRAIN.ACCUMULATION_STEPS = 1  # gradient accumulation steps per optimizer step
_C.TRAIN.LAYER_DECAY = 1.0  # layer-wise lr decay (e.g. 0.65 for fine-tuning); 1.0 disables
_C.TRAIN.COMPILE = False  # wrap the model in torch.compile
_C.TRAIN.CHANNELS_LAST = False  # channels-last memory format for the model and inputs
_C.TRAIN.GRAD_CHECKPOINT = False  # recompute each block's activations in backward: less memory, more time
_C.TRAIN.SAVE_EVERY_STEPS = 0  # also save a resumable mid-epoch checkpoint every N optimizer steps; 0 = off
_C.TRAIN.MAX_BAD_STEPS = 20  # stop after this many consecutive skipped non-finite (NaN/inf) steps
_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = "cosine"  # a schedule of lr_scheduler.SCHEDULES: cosine | linear | step | multistep
# (at MILESTONES) | plateau (when val top-1 stops improving; per epoch: its warmup too)
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30  # step: epochs between decays
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1  # step, multistep, plateau: lr multiplier at each decay
_C.TRAIN.LR_SCHEDULER.MILESTONES = []  # multistep: epochs (from the start, warmup included) at which the lr
# is multiplied by DECAY_RATE, increasing, e.g. [30, 60, 90]
_C.TRAIN.LR_SCHEDULER.PATIENCE_EPOCHS = 10  # plateau: epochs without a better val top-1 before a decay
_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = "adamw"  # adamw | sgd | lamb
_C.TRAIN.OPTIMIZER.EPS = 1e-8  # adamw/lamb epsilon
_C.TRAIN.OPTIMIZER.BETAS = [0.9, 0.999]  # adamw/lamb betas
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9  # sgd momentum (nesterov)
_C.TRAIN.EMA = CN()
_C.TRAIN.EMA.ENABLED = False  # keep an exponential moving average of the weights (timm)
_C.TRAIN.EMA.DECAY = 0.9998  # EMA decay per optimizer step
_C.TRAIN.EMA.WARMUP = False  # timm's decay warmup: decay min(DECAY, 1 - (1 + step / WARMUP_GAMMA) ** -WARMUP_POWER),
# so the early EMA follows the fast-changing weights instead of remembering the random start
_C.TRAIN.EMA.WARMUP_POWER = 0.75  # EMA warmup: 3/4 reaches 0.999 after 10k steps, 2/3 after 31.6k (longer runs)
_C.TRAIN.EMA.WARMUP_GAMMA = 1.0  # EMA warmup: steps are divided by this (larger: slower warmup)
_C.TRAIN.LOSS = CN()
_C.TRAIN.LOSS.NAME = "ce"  # ce: cross-entropy (soft targets under mixup, else MODEL.LABEL_SMOOTHING) | bce: timm's
# BinaryCrossEntropy, one sigmoid per class on the (mixup) targets, DeiT III
_C.TRAIN.LOSS.BCE_TARGET_THRESH = -1.0  # bce: targets above this become 1, the rest 0 (DeiT III: 0.0, with
# MODEL.LABEL_SMOOTHING 0); negative: targets stay soft (timm's default)
_C.TRAIN.DISTILL = CN()
_C.TRAIN.DISTILL.TYPE = "none"  # DeiT's knowledge distillation: none | soft (KL to the teacher's softened
# distribution) | hard (cross-entropy to the teacher's top-1)
_C.TRAIN.DISTILL.TEACHER = ""  # teacher architecture: a registered model name or a timm model name; empty: the
# model (MODEL.NAME and its MODEL.<FAMILY> section) saved in TEACHER_WEIGHTS, a checkpoint of this repo
_C.TRAIN.DISTILL.TEACHER_WEIGHTS = ""  # teacher weights: a checkpoint or weights file, a hub-style folder,
# timm:<name>.<tag> or hf-hub:<org>/<repo> (as --pretrained); required with TYPE soft or hard
_C.TRAIN.DISTILL.ALPHA = 0.5  # loss = (1 - ALPHA) x the label loss + ALPHA x the distillation loss
_C.TRAIN.DISTILL.TAU = 1.0  # soft: temperature of both softmaxes

# ------------------------------------------------------------------------ augmentation
_C.AUG = CN()
_C.AUG.COLOR_JITTER = 0.4  # color jitter factor (0 disables)
_C.AUG.AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"  # timm's policy: rand-... (RandAugment), augmix-..., original, v0,
# 3a (DeiT III's 3-Augment: grayscale, solarize or blur, one per image; color jitter stays on) | trivialaugment
# (torchvision's TrivialAugmentWide) | none
_C.AUG.REPROB = 0.25  # random erasing probability
_C.AUG.REMODE = "pixel"  # random erasing mode: const | rand | pixel
_C.AUG.RECOUNT = 1  # random erasing count
_C.AUG.HFLIP = 0.5  # horizontal flip probability
_C.AUG.SCALE = [0.08, 1.0]  # random-resized-crop area range (images > 32 px)
_C.AUG.CROP_PAD = 4  # images <= 32 px: random crop after this much zero padding (0: none); src: reflect padding
_C.AUG.TRAIN_CROP = "auto"  # auto: random-resized crop (AUG.SCALE) above 32 px, resize + padded random crop at
# <= 32 px | rrc: random-resized crop at any size | src: DeiT III's simple random crop (shorter side resized to
# IMG_SIZE, reflect-padded by CROP_PAD, random crop)
_C.AUG.MIXUP = 0.8  # mixup alpha (0 disables)
_C.AUG.CUTMIX = 1.0  # cutmix alpha (0 disables)
_C.AUG.CUTMIX_MINMAX = []  # cutmix min/max ratio; overrides alpha when set ([] = unset)
_C.AUG.MIXUP_PROB = 1.0  # probability of applying mixup or cutmix to a batch
_C.AUG.MIXUP_SWITCH_PROB = 0.5  # probability of cutmix instead of mixup when both are on
_C.AUG.MIXUP_MODE = "batch"  # batch | pair | elem
_C.AUG.MIXUP_OFF_EPOCH = 0  # turn mixup and cutmix off from this epoch on (label smoothing stays); 0: never

# ----------------------------------------------------------------------------- test
_C.TEST = CN()
_C.TEST.CROP_PCT = 0.875  # center-crop fraction (timm's crop_pct; 224/256): resize to IMG_SIZE / CROP_PCT as
# TEST.RESIZE says, then center-crop IMG_SIZE; 1.0 with RESIZE square resizes straight to IMG_SIZE x IMG_SIZE
_C.TEST.RESIZE = "shorter"  # shorter: the shorter side, keeping the aspect (Swin/DeiT; timm's crop_mode center) |
# square: both sides (DAT; timm's squash)
_C.TEST.BATCH_SIZE = 0  # eval batch per process; 0 = DATA.BATCH_SIZE
_C.TEST.USE_EMA = False  # --eval: evaluate the checkpoint's EMA weights (--use-ema)
_C.TEST.EVAL_SETS = []  # --eval: evaluate these sets of the ImageNet family (IMAGENET_SETS), each found under
# DATA.DATA_PATH (docs/DATA.md), into one table (sets.md, sets.json, sets.png); [] evaluates DATA.DATASET

# ----------------------------------------------------------------------------- misc
_C.AMP_DTYPE = "auto"  # mixed precision (amp.py): off: float32 everywhere (--no-amp) | auto: bf16 on a GPU that
# has it, else fp16 (loss-scaled); float32 on the CPU | bfloat16 | float16: that dtype on any device, CPU autocast
# included (--amp DTYPE)
_C.OUTPUT = "output"  # root of run folders: OUTPUT/<MODEL.NAME>/<TAG>/
_C.TAG = "default"  # run name
_C.SEED = 0  # random seed (each rank adds its rank)
_C.DETERMINISTIC = False  # deterministic algorithms (for bit-exact resume tests)
_C.DEVICE = "auto"  # auto | cpu | cuda | cuda:N
_C.DIST_TIMEOUT = 1800  # seconds a collective waits for the other ranks before the run fails
_C.OVERWRITE = False  # train into a folder holding another run: move that run aside (--overwrite)
_C.SAVE_FREQ = 1  # save ckpt_epoch_N.pth every SAVE_FREQ epochs (and at the last epoch)
_C.KEEP_CKPTS = 3  # keep the newest K epoch checkpoints (0 keeps all)
_C.PRINT_FREQ = 10  # log a step line every PRINT_FREQ optimizer steps
_C.MODE = "train"  # train | eval: evaluate the weights of MODEL.RESUME or MODEL.PRETRAINED and exit (--eval) |
# throughput: measure images/s and exit (--throughput)
_C.WANDB = CN()
_C.WANDB.ENABLED = False  # log to Weights & Biases (offline mode when there is no API key)
_C.WANDB.PROJECT = "vit-research"  # wandb project
_C.WANDB.ENTITY = ""  # wandb entity (team); empty = default
_C.WANDB.MODE = "auto"  # auto (online with an API key, else offline) | online | offline
_C.TENSORBOARD = CN()
_C.TENSORBOARD.ENABLED = False  # TensorBoard event files in the run folder's tensorboard/ (torch.utils.tensorboard,
# needs the tensorboard package): per-step loss, lr, grad norm and per-epoch metrics, the tags wandb gets


# Allowed values: a tuple, or "module.TABLE", the consumer's table whose keys are the names
# (read by ``choices`` when validating: the consumers import torch).
CHOICES = {
    "DATA.DATASET": ("imagenet", "folder", "wds", "cifar10", "cifar100", "digits", "fake", "imagenet-v2",
                     "imagenet-real", "imagenet-a", "imagenet-r", "imagenet-sketch", "imagenet-c"),
    "DATA.DECODER": ("auto", "pil", "nvjpeg"),
    "DATA.INTERPOLATION": "data.transforms.INTERPOLATIONS",
    "TRAIN.LR_SCHEDULER.NAME": "lr_scheduler.SCHEDULES",
    "TRAIN.CLIP_MODE": ("norm", "value", "agc"),
    "TRAIN.LOSS.NAME": ("ce", "bce"),
    "TRAIN.DISTILL.TYPE": ("none", "soft", "hard"),
    "AUG.TRAIN_CROP": ("auto", "rrc", "src"),
    "TRAIN.OPTIMIZER.NAME": ("adamw", "sgd", "lamb"),
    "AUG.REMODE": ("const", "rand", "pixel"),
    "AUG.MIXUP_MODE": ("batch", "pair", "elem"),
    "TEST.RESIZE": ("shorter", "square"),
    "AMP_DTYPE": ("off", "auto", "bfloat16", "float16"),
    "MODE": ("train", "eval", "throughput"),
    "WANDB.MODE": ("auto", "online", "offline"),
}
POSITIVE = ("DATA.BATCH_SIZE", "DATA.IMG_SIZE", "DATA.SHUFFLE_BUFFER", "MODEL.NUM_CLASSES", "MODEL.IN_CHANS",
            "TRAIN.EPOCHS", "TRAIN.ACCUMULATION_STEPS", "SAVE_FREQ", "PRINT_FREQ",
            "TRAIN.MAX_BAD_STEPS", "DIST_TIMEOUT", "TRAIN.DISTILL.TAU",
            "TRAIN.EMA.WARMUP_POWER", "TRAIN.EMA.WARMUP_GAMMA", "TRAIN.LR_SCHEDULER.DECAY_RATE")
NON_NEGATIVE = ("DATA.NUM_WORKERS", "TRAIN.WARMUP_EPOCHS", "TRAIN.WEIGHT_DECAY", "TRAIN.BASE_LR",
                "TRAIN.WARMUP_LR", "TRAIN.MIN_LR", "TRAIN.CLIP_GRAD", "KEEP_CKPTS",
                "AUG.MIXUP", "AUG.CUTMIX", "AUG.CROP_PAD", "AUG.REPROB", "TEST.BATCH_SIZE", "MODEL.DROP_RATE",
                "MODEL.DROP_PATH_RATE", "MODEL.LABEL_SMOOTHING", "TRAIN.LR_BASE_BATCH",
                "TRAIN.SAVE_EVERY_STEPS", "AUG.MIXUP_OFF_EPOCH", "TRAIN.LR_SCHEDULER.PATIENCE_EPOCHS")
UNIT_INTERVAL = ("AUG.HFLIP", "AUG.REPROB", "AUG.MIXUP_PROB", "AUG.MIXUP_SWITCH_PROB",
                 "MODEL.DROP_RATE", "MODEL.DROP_PATH_RATE", "MODEL.LABEL_SMOOTHING",
                 "TRAIN.EMA.DECAY", "TRAIN.DISTILL.ALPHA")
# Datasets that read no DATA.DATA_PATH: a path given for them would be recorded but unused.
BUNDLED = {"digits": "scikit-learn's 8x8 digits ship with it", "fake": "synthetic images"}
FILES = ("MODEL.PRETRAINED", "MODEL.RESUME", "MODEL.HEAD_MAP", "TRAIN.DISTILL.TEACHER_WEIGHTS", "DATA.CLASS_MAP")
# The ImageNet family of evaluation sets (TEST.EVAL_SETS); all but imagenet are DATA.DATASET values for --eval only.
IMAGENET_SETS = ("imagenet", "imagenet-v2", "imagenet-real", "imagenet-a", "imagenet-r", "imagenet-sketch",
                 "imagenet-c")
# AUG.AUTO_AUGMENT: timm's policies (a name, then '-'-separated options) and torchvision's TrivialAugmentWide.
AUTO_AUGMENT = re.compile(r"(rand|augmix|original|originalr|v0|v0r|3a)(-.*)?|trivialaugment|none|")

# Keys that moved or were merged into another (one key per concept): an old config is a
# one-line error naming the new key, and a saved config is read in today's keys (saved_config).
MOVED = {"MODEL.DAT.HEAD_MAP": "MODEL.HEAD_MAP", "AMP": "AMP_DTYPE", "TRAIN.AUTO_RESUME": "MODEL.RESUME",
         "TEST.CROP": "TEST.CROP_PCT", "EVAL_MODE": "MODE", "THROUGHPUT_MODE": "MODE"}
MOVED.update({f"MODEL.VIT.{old}": f"MODEL.VIT.ATTN_ARGS.{new}" for old, new in (
    ("LAI_SCHEDULE", "SCHEDULE"), ("LAI_MODE", "WINDOW"), ("LAI_BY", "BY"),
    ("REL_MODE", "POSITIONS"), ("REL_SPAN", "SPAN"), ("REL_LOG_BUCKETS", "LOG_BUCKETS"),
    ("REL_SHARE", "SHARE"), ("PERFORMER_FEATURES", "FEATURES"), ("PERFORMER_REDRAW", "REDRAW"),
    ("DEFORM_POINTS", "POINTS"))})
# What an old value of a merged key is now.
MERGED = {"AMP": "AMP false is AMP_DTYPE off",
          "TRAIN.AUTO_RESUME": "MODEL.RESUME auto, the default, resumes from the run folder; '' starts afresh",
          "TEST.CROP": "TEST.CROP false is TEST.CROP_PCT 1.0 with TEST.RESIZE square",
          "EVAL_MODE": "EVAL_MODE true is MODE eval", "THROUGHPUT_MODE": "THROUGHPUT_MODE true is MODE throughput"}
# Keys that are gone, and why.
REMOVED = {"MODEL.TYPE": "the family is MODEL.NAME's (models.model_info), whose section MODEL.<FAMILY> holds its "
                         "arguments",
           "TRAIN.START_EPOCH": "a run starts at epoch 0 or where the checkpoint it resumes stopped"}


class ConfigError(UserError):
    """A bad configuration: the message is one line naming the key and where it came from."""

    label = "config error"


def get_defaults() -> CN:
    return _C.clone()


def source_of(cfg: CN, key: str) -> str:
    """The file (or flag) that set ``key`` in a config from ``load_config``; 'defaults'."""
    return cfg.__dict__.get("origin", {}).get(key, "defaults")


def choices(key: str) -> tuple[str, ...]:
    """The allowed values of ``key`` (CHOICES): its tuple, or the names in its consumer's table."""
    allowed = CHOICES[key]
    if isinstance(allowed, str):
        module, table = allowed.rsplit(".", 1)
        return tuple(getattr(importlib.import_module(module), table))
    return allowed


def resume_file(cfg: CN) -> str:
    """The checkpoint MODEL.RESUME names; '' for auto and for none."""
    return "" if cfg.MODEL.RESUME == "auto" else cfg.MODEL.RESUME


def _old_key(full: str, source: str) -> ConfigError:
    """The one-line error for a key of MOVED or REMOVED."""
    if full in REMOVED:
        return ConfigError(f"{source}: {full} was removed: {REMOVED[full]}")
    how = f" ({MERGED[full]})" if full in MERGED else ""
    return ConfigError(f"{source}: {full} moved to {MOVED[full]}{how}")


# ------------------------------------------------------------------------- reading files
class _DuplicateKey(Exception):
    """A mapping names ``key`` (dotted path) twice, at ``lines``: PyYAML would keep the last
    silently, dropping the first block."""

    def __init__(self, key: str, lines: tuple[int, int]) -> None:
        super().__init__(key)
        self.key, self.lines = key, lines


class _Loader(yaml.SafeLoader):
    """YAML as PyYAML reads it, except as YAML 1.2 does, as users mean it: 5e-4 is a number
    (a quoted "5e-4" stays a string), and only true and false are booleans (``AMP_DTYPE: off``
    is the string off, not false); a key given twice in one mapping is _DuplicateKey."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_keys(node, "", set())
        return super().construct_document(node)


def _check_keys(node: yaml.Node, prefix: str, seen: set[int]) -> None:
    """Raise _DuplicateKey for the first mapping under ``node`` that names a key twice."""
    if id(node) in seen:  # an alias: checked where its anchor is
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[Any, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if key.value in lines:
                    raise _DuplicateKey(f"{prefix}{key.value}", (lines[key.value], line))
                lines[key.value] = line
            _check_keys(value, f"{prefix}{getattr(key, 'value', '?')}.", seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_keys(item, f"{prefix.rstrip('.')}[{i}].", seen)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))
_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {first: [r for r in resolvers if r[0] != _BOOL]
                                   for first, resolvers in _Loader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _read_yaml(path: str, chain: tuple[str, ...]) -> list[tuple[str, dict]]:
    """[(file, mapping)] for ``path`` and its BASE files, bases first."""
    path = os.path.abspath(path)
    if path in chain:
        cycle = " -> ".join(os.path.relpath(p) for p in chain + (path,))
        raise ConfigError(f"{path}: BASE cycle: {cycle}")
    where = f" (BASE of {os.path.relpath(chain[-1])})" if chain else ""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found{where}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {one_line(e)}") from None
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e.key} is given twice, at lines {e.lines[0]} and {e.lines[1]}{where}: "
                          f"merge them into one (YAML would keep only the second)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}{where}") from None
    if data is None:
        raise ConfigError(f"{path}: the config file is empty{where}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys, got {type(data).__name__}")
    bases = data.pop("BASE", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: BASE must be a list of files, e.g. BASE: [base.yaml]")
    layers: list[tuple[str, dict]] = []
    for base in bases:
        if base:
            layers += _read_yaml(os.path.join(os.path.dirname(path), base), chain + (path,))
    return layers + [(path, data)]


# --------------------------------------------------------------------------------- merging
def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    """``value`` for a key whose default is ``default``: the same type (an int widens to a
    float; a list stands for a list of the default's element type); ConfigError otherwise."""
    def fail(expected: str) -> None:
        raise ConfigError(f"{source}: wrong type for {key}: expected {expected}, got {value!r}")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if isinstance(default, bool):
        isinstance(value, bool) or fail("true or false")
    elif isinstance(default, int):
        isinstance(value, int) and not isinstance(value, bool) or fail("an integer")
    elif isinstance(default, float):
        number(value) or fail("a number")
        value = float(value)
    elif isinstance(default, str):
        isinstance(value, str) or fail("a string")
    elif isinstance(default, (list, tuple)):
        isinstance(value, (list, tuple)) or fail("a list")
        if default and all(number(v) for v in default):
            all(number(v) for v in value) or fail("a list of numbers")
            value = [float(v) if isinstance(default[0], float) else v for v in value]
        elif default and all(isinstance(v, str) for v in default):
            all(isinstance(v, str) for v in value) or fail("a list of strings")
        value = list(value)
    return value


def _unknown(node: CN, key: str, full: str, source: str) -> ConfigError:
    import difflib
    close = difflib.get_close_matches(str(key), [str(k) for k in node], n=1, cutoff=0.7)
    hint = f" (did you mean {full.rsplit('.', 1)[0] + '.' if '.' in full else ''}{close[0]}?)" if close else ""
    return ConfigError(f"{source}: unknown config key {full}{hint}")


def _merge(node: CN, mapping: dict, source: str, origin: dict[str, str], sections: dict,
           prefix: str = "") -> None:
    """Merge a YAML mapping into the config tree, key by key, typed by the defaults.
    Unknown mappings under MODEL are family sections, kept aside in ``sections``."""
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if full in MOVED or full in REMOVED:
            raise _old_key(full, source)
        if prefix == "MODEL." and key not in node and isinstance(value, dict):
            name = str(key).upper()
            _merge_section(sections.setdefault(name, {}), value, source, origin, f"MODEL.{name}.")
            continue
        if key not in node:
            raise _unknown(node, key, full, source)
        if isinstance(node[key], CN):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {full} is a section: expected a mapping, got {value!r}")
            _merge(node[key], value, source, origin, sections, full + ".")
            continue
        node[key] = _coerce(full, value, value_of(_C, full), source)
        origin[full] = source


def _merge_section(section: dict, mapping: dict, source: str, origin: dict[str, str],
                   prefix: str) -> None:
    """A family section: any key (checked later against the model), upper-cased."""
    for key, value in mapping.items():
        name = str(key).upper()
        full = f"{prefix}{name}"
        if full in MOVED:
            raise _old_key(full, source)
        if isinstance(value, dict):
            if not isinstance(section.get(name), dict):
                section[name] = {}
            _merge_section(section[name], value, source, origin, full + ".")
        else:
            section[name] = copy.deepcopy(value)
            origin[full] = source


def _set(cfg: CN, key: str, value: Any, source: str, origin: dict[str, str], sections: dict) -> None:
    """One ``KEY VALUE`` from the command line, as a one-key mapping."""
    mapping: Any = value
    for part in reversed(key.split(".")):
        mapping = {part: mapping}
    _merge(cfg, mapping, source, origin, sections)


def _opts_pairs(opts: list[str]) -> list[tuple[str, Any]]:
    """--opts KEY VALUE ...: values parsed as YAML ('null', '~' and 'None' are null)."""
    if len(opts) % 2:
        raise ConfigError(f"--opts: expected KEY VALUE pairs, got an odd count ({len(opts)})")
    pairs = []
    for key, raw in zip(opts[0::2], opts[1::2]):
        try:
            value = yaml.load(raw, Loader=_Loader)
        except yaml.YAMLError:
            value = raw
        except _DuplicateKey as e:
            raise ConfigError(f"--opts {key}: {e.key} is given twice in {raw}") from None
        pairs.append((key, None if raw == "None" else value))
    return pairs


def value_of(cfg: CN, key: str) -> Any:
    """The value of a dotted key (``value_of(cfg, "TRAIN.EMA.DECAY")``)."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


# ------------------------------------------------------------------------------ checking
def validate(cfg: CN, origin: dict[str, str]) -> None:
    """Checks of the framework's keys that need the whole config; ConfigError naming the
    key and its source."""
    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{origin.get(key, 'defaults')}: {key}: {message}")

    for key in CHOICES:
        allowed = choices(key)
        if value_of(cfg, key) not in allowed:
            fail(key, f"{value_of(cfg, key)!r} is not one of {', '.join(allowed)}")
    for key in POSITIVE:
        if value_of(cfg, key) <= 0:
            fail(key, f"must be > 0, got {value_of(cfg, key)}")
    for key in NON_NEGATIVE:
        if value_of(cfg, key) < 0:
            fail(key, f"must be >= 0, got {value_of(cfg, key)}")
    for key in UNIT_INTERVAL:
        if not 0 <= value_of(cfg, key) <= 1:
            fail(key, f"must be in [0, 1], got {value_of(cfg, key)}")
    if len(cfg.TRAIN.OPTIMIZER.BETAS) != 2:
        fail("TRAIN.OPTIMIZER.BETAS", "needs two values")
    for key in ("DATA.MEAN", "DATA.STD"):
        if len(value_of(cfg, key)) != cfg.MODEL.IN_CHANS:
            fail(key, f"needs {cfg.MODEL.IN_CHANS} values (MODEL.IN_CHANS), got {value_of(cfg, key)}")
    if not all(s > 0 for s in cfg.DATA.STD):
        fail("DATA.STD", f"every value must be > 0 (inputs are divided by it), got {cfg.DATA.STD}")
    if not 0 < cfg.TRAIN.LAYER_DECAY <= 1:
        fail("TRAIN.LAYER_DECAY", f"must be in (0, 1], got {cfg.TRAIN.LAYER_DECAY}")
    if cfg.TRAIN.WARMUP_EPOCHS > cfg.TRAIN.EPOCHS:
        fail("TRAIN.WARMUP_EPOCHS", f"{cfg.TRAIN.WARMUP_EPOCHS} exceeds TRAIN.EPOCHS")
    if cfg.AUG.CUTMIX_MINMAX and len(cfg.AUG.CUTMIX_MINMAX) != 2:
        fail("AUG.CUTMIX_MINMAX", "needs [min, max] or []")
    _validate_recipe(cfg, fail)
    _validate_decoder(cfg, fail)
    if not (cfg.DEVICE in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", cfg.DEVICE)):
        fail("DEVICE", f"{cfg.DEVICE!r} is not auto, cpu, cuda or cuda:N")
    if not cfg.OUTPUT:
        fail("OUTPUT", "needs a folder (the root of run folders)")
    if not cfg.TAG or cfg.TAG in (".", "..") or "/" in cfg.TAG or os.sep in cfg.TAG:
        fail("TAG", f"{cfg.TAG!r} is not a run name: use a non-empty name without path separators")
    if cfg.MODE == "eval" and resume_file(cfg) and cfg.MODEL.PRETRAINED:
        fail("MODEL.PRETRAINED", f"--eval with both --resume ({cfg.MODEL.RESUME}) and --pretrained "
                                 f"({cfg.MODEL.PRETRAINED}): pass the one to evaluate")
    for key in FILES:
        path = resume_file(cfg) if key == "MODEL.RESUME" else value_of(cfg, key)
        if path.startswith("local-dir:"):  # timm's name for a hub-style folder
            if not os.path.isdir(path[len("local-dir:"):]):
                fail(key, f"folder not found: {path}")
            continue
        named = _named_head_map(path, fail) if key == "MODEL.HEAD_MAP" else \
            path.startswith(("timm:", "hf-hub:")) or os.path.isdir(path)
        if path and not named and not os.path.isfile(path):
            fail(key, f"file not found: {path}")
    for name in cfg.TEST.EVAL_SETS:
        if name not in IMAGENET_SETS:
            fail("TEST.EVAL_SETS", f"{name!r} is not one of {', '.join(IMAGENET_SETS)}")
    if cfg.TEST.EVAL_SETS and cfg.MODE != "eval":
        fail("TEST.EVAL_SETS", "only --eval reads it")
    if cfg.TEST.EVAL_SETS and not os.path.isdir(cfg.DATA.DATA_PATH):
        fail("DATA.DATA_PATH", f"--eval-sets looks for each set under DATA.DATA_PATH (--data-path ROOT), "
                               f"{'not found: ' + cfg.DATA.DATA_PATH if cfg.DATA.DATA_PATH else 'which is empty'}")
    if cfg.DATA.DATASET in IMAGENET_SETS[1:]:
        if cfg.MODE != "eval":
            fail("DATA.DATASET", f"{cfg.DATA.DATASET} is an evaluation set: use it with --eval")
        if not os.path.isdir(cfg.DATA.DATA_PATH):
            fail("DATA.DATA_PATH", f"DATA.DATASET {cfg.DATA.DATASET} needs the set's folder (--data-path), "
                                   f"{'not found: ' + cfg.DATA.DATA_PATH if cfg.DATA.DATA_PATH else 'none given'}")
    if cfg.DATA.DATA_PATH and cfg.DATA.DATASET in BUNDLED and not cfg.TEST.EVAL_SETS:
        launched = " (train.sh, evaluate.sh and train_slurm.sh pass $DATA_PATH as --data-path)" \
            if origin.get("DATA.DATA_PATH") == "--data-path" else ""
        fail("DATA.DATA_PATH", f"DATA.DATASET {cfg.DATA.DATASET} reads no folder ({BUNDLED[cfg.DATA.DATASET]}): "
                               f"leave DATA.DATA_PATH empty{launched}")
    if cfg.DATA.DATASET in ("imagenet", "folder") and not cfg.DATA.DATA_PATH:
        fail("DATA.DATA_PATH", f"required for DATA.DATASET {cfg.DATA.DATASET} (--data-path)")
    if cfg.DATA.DATA_PATH and cfg.DATA.DATASET in ("imagenet", "folder") \
            and not os.path.isdir(cfg.DATA.DATA_PATH):
        fail("DATA.DATA_PATH", f"dataset folder not found: {cfg.DATA.DATA_PATH}")
    if cfg.DATA.DATASET == "wds":
        if not cfg.DATA.DATA_PATH:
            fail("DATA.DATA_PATH", "required for DATA.DATASET wds: a folder of train-*.tar and val-*.tar shards "
                                   "or a brace pattern naming them (--data-path)")
        from data.shardlist import ShardPathError, find_shards  # loads the data package (torch), as models do
        try:
            find_shards(cfg.DATA.DATA_PATH, need_train=cfg.MODE != "eval")
        except ShardPathError as e:
            fail("DATA.DATA_PATH", str(e))
        if cfg.DATA.REPEATED_AUG and cfg.MODE != "eval":
            fail("DATA.REPEATED_AUG", "not available with DATA.DATASET wds (shards are read as streams, not "
                                      "sampled by index): set DATA.REPEATED_AUG False")


def _named_head_map(path: str, fail) -> bool:
    """Whether MODEL.HEAD_MAP names a map of timm's class lists (models.weights.named_head_map)
    rather than a file; a name of that form with an unknown list fails."""
    if not path or os.path.isfile(path):
        return False
    from models.weights import WeightsError, named_head_map  # loads torch, as the model checks do
    try:
        return named_head_map(path) is not None
    except WeightsError as e:
        fail("MODEL.HEAD_MAP", str(e))
        return False


def _validate_decoder(cfg: CN, fail) -> None:
    """DATA.DECODER nvjpeg: the workers send encoded files, so nothing may need their pixels
    (data/device_decode.py)."""
    if cfg.DATA.DECODER != "nvjpeg":
        return
    if cfg.DATA.DATASET not in ("imagenet", "folder") + IMAGENET_SETS[1:]:
        fail("DATA.DECODER", f"nvjpeg decodes image files: DATA.DATASET imagenet, folder or the ImageNet "
                             f"evaluation sets, not {cfg.DATA.DATASET}; use DATA.DECODER auto")
    if cfg.DATA.INTERPOLATION == "nearest":
        fail("DATA.INTERPOLATION", "DATA.DECODER nvjpeg resizes with bicubic, bilinear or random: use one of "
                                   "them or DATA.DECODER auto")
    if cfg.MODE != "train":
        return
    pillow = "runs in the loader workers on Pillow images, which DATA.DECODER nvjpeg does not make (its " \
             "workers send the encoded files): "
    aug = cfg.AUG
    if aug.AUTO_AUGMENT not in ("", "none"):
        fail("AUG.AUTO_AUGMENT", f"{aug.AUTO_AUGMENT} {pillow}set AUG.AUTO_AUGMENT none or DATA.DECODER auto")
    if aug.COLOR_JITTER > 0:
        fail("AUG.COLOR_JITTER", f"colour jitter {pillow}set AUG.COLOR_JITTER 0 or DATA.DECODER auto")
    if aug.TRAIN_CROP == "src" or aug.TRAIN_CROP == "auto" and cfg.DATA.IMG_SIZE <= 32:
        what = "src (DeiT III's simple random crop)" if aug.TRAIN_CROP == "src" else \
            f"auto at DATA.IMG_SIZE {cfg.DATA.IMG_SIZE} (<= 32: resize and padded random crop)"
        fail("AUG.TRAIN_CROP", f"{what} {pillow}set AUG.TRAIN_CROP rrc or DATA.DECODER auto")


def _validate_recipe(cfg: CN, fail) -> None:
    """The training-recipe keys that depend on each other (schedules, augmentation, loss,
    clipping, distillation, logging): a combination that cannot do what it says is an error."""
    train, aug = cfg.TRAIN, cfg.AUG
    if not 0 < cfg.TEST.CROP_PCT <= 1:
        fail("TEST.CROP_PCT", f"must be in (0, 1], got {cfg.TEST.CROP_PCT}")
    if not AUTO_AUGMENT.fullmatch(aug.AUTO_AUGMENT):
        fail("AUG.AUTO_AUGMENT", f"{aug.AUTO_AUGMENT!r} is no policy: rand-..., augmix-..., original, originalr, "
                                 f"v0, v0r, 3a (timm's), trivialaugment or none")
    sched = train.LR_SCHEDULER
    if sched.NAME == "multistep":
        m = sched.MILESTONES
        if not m or not all(isinstance(e, int) and 0 < e < train.EPOCHS for e in m) or list(m) != sorted(set(m)):
            fail("TRAIN.LR_SCHEDULER.MILESTONES", f"multistep needs increasing epochs between 0 and TRAIN.EPOCHS "
                                                  f"({train.EPOCHS}), e.g. [30, 60]; got {list(m)}")
    elif sched.MILESTONES:
        fail("TRAIN.LR_SCHEDULER.MILESTONES", f"only the multistep schedule reads it (NAME is {sched.NAME})")
    if sched.NAME == "plateau" and sched.DECAY_RATE >= 1:
        fail("TRAIN.LR_SCHEDULER.DECAY_RATE", f"plateau lowers the lr: needs a rate < 1, got {sched.DECAY_RATE}")
    if train.CLIP_MODE != "norm" and not train.CLIP_GRAD:
        fail("TRAIN.CLIP_MODE", f"{train.CLIP_MODE} clipping needs TRAIN.CLIP_GRAD > 0 (0 turns clipping off)")
    mixing = aug.MIXUP > 0 or aug.CUTMIX > 0 or bool(aug.CUTMIX_MINMAX)
    if mixing and cfg.MODE == "train" and cfg.DATA.BATCH_SIZE % 2:
        on = " and ".join(f"{key} {value_of(cfg, key)}" for key in ("AUG.MIXUP", "AUG.CUTMIX", "AUG.CUTMIX_MINMAX")
                          if value_of(cfg, key))
        fail("DATA.BATCH_SIZE", f"{cfg.DATA.BATCH_SIZE} is odd: mixup/cutmix ({on}) pair each image with another of "
                                f"its batch (timm's Mixup), so the per-process batch must be even; or turn them off")
    if aug.MIXUP_OFF_EPOCH and not mixing:
        fail("AUG.MIXUP_OFF_EPOCH", "mixup and cutmix are off already (AUG.MIXUP and AUG.CUTMIX are 0)")
    if aug.MIXUP_OFF_EPOCH > train.EPOCHS:
        fail("AUG.MIXUP_OFF_EPOCH", f"{aug.MIXUP_OFF_EPOCH} is after the last epoch (TRAIN.EPOCHS {train.EPOCHS})")
    thresh, smoothing = train.LOSS.BCE_TARGET_THRESH, cfg.MODEL.LABEL_SMOOTHING
    if train.LOSS.NAME == "bce" and thresh >= 0 and smoothing / cfg.MODEL.NUM_CLASSES > thresh:
        fail("TRAIN.LOSS.BCE_TARGET_THRESH", f"{thresh} is below every smoothed target (MODEL.LABEL_SMOOTHING "
                                             f"{smoothing} / {cfg.MODEL.NUM_CLASSES} classes): all would become 1; "
                                             f"set MODEL.LABEL_SMOOTHING 0 (DeiT III) or a higher threshold")
    if thresh >= 1:
        fail("TRAIN.LOSS.BCE_TARGET_THRESH", f"{thresh} is above every target (targets are at most 1): all would "
                                             f"become 0")
    if train.LOSS.NAME != "bce" and thresh >= 0:
        fail("TRAIN.LOSS.BCE_TARGET_THRESH", f"only the bce loss reads it (TRAIN.LOSS.NAME is {train.LOSS.NAME})")
    distill = train.DISTILL
    if distill.TYPE == "none" and (distill.TEACHER or distill.TEACHER_WEIGHTS):
        key = "TRAIN.DISTILL.TEACHER" if distill.TEACHER else "TRAIN.DISTILL.TEACHER_WEIGHTS"
        fail(key, "a teacher is given but TRAIN.DISTILL.TYPE is none: set soft or hard")
    if distill.TYPE != "none" and not distill.TEACHER_WEIGHTS:
        fail("TRAIN.DISTILL.TEACHER_WEIGHTS", f"distillation ({distill.TYPE}) needs the teacher's trained weights")
    if cfg.TEST.USE_EMA and cfg.MODE != "eval":
        fail("TEST.USE_EMA", "only --eval reads it (training validates the EMA beside the model when "
                             "TRAIN.EMA.ENABLED)")
    if cfg.TENSORBOARD.ENABLED and importlib.util.find_spec("tensorboard") is None:
        fail("TENSORBOARD.ENABLED", "needs the tensorboard package: pip install tensorboard")


# ----------------------------------------------------------------------------- loading
def load_config(cfg_file: Optional[str] = None, opts: Optional[list[str]] = None,
                overrides: Optional[dict[str, tuple[Any, str]]] = None) -> CN:
    """Defaults <- cfg_file (with its BASEs) <- ``overrides`` (key -> (value, the flag that
    set it), flags.py) <- ``opts``; then the model section (model_config.py)."""
    from model_config import attach_model_section, check_teacher  # they import the registry (torch)

    cfg = get_defaults()
    origin: dict[str, str] = {}
    sections: dict[str, dict] = {}
    if cfg_file:
        for source, mapping in _read_yaml(cfg_file, ()):
            _merge(cfg, mapping, os.path.relpath(source), origin, sections)
    for key, (value, flag) in (overrides or {}).items():
        _set(cfg, key, value, flag, origin, sections)
    for key, value in _opts_pairs(list(opts or [])):
        _set(cfg, key, value, "--opts", origin, sections)
    validate(cfg, origin)
    attach_model_section(cfg, origin, sections)
    check_teacher(cfg, origin)
    if cfg.MODE == "eval" and origin.get("TAG") not in ("--tag", "--opts"):
        from run_folder import eval_tag  # an evaluation's own folder, not a config's training run
        cfg.TAG, origin["TAG"] = eval_tag(cfg), "--eval"
    cfg.__dict__["origin"] = origin  # source_of(); not a key, so never dumped
    cfg.freeze()
    return cfg


# ------------------------------------------------------------------------ saved configs
# Keys that say what to do now, not what the run is: they may differ on every resume.
RUN_CONTROL = ("MODEL.RESUME", "MODEL.PRETRAINED", "MODE", "OVERWRITE", "TEST.USE_EMA")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _in_todays_keys(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened saved config with MOVED keys at their new place, MERGED keys' values in
    the key they joined and REMOVED keys dropped."""
    old = {key: flat[key] for key in flat if key in MERGED}
    out = {key: value for key, value in flat.items() if key not in MOVED and key not in REMOVED}
    for key, value in flat.items():
        if key in MOVED and key not in MERGED:
            out.setdefault(MOVED[key], value)
    if old.get("AMP") is False:
        out["AMP_DTYPE"] = "off"
    if old.get("TEST.CROP") is False:
        out.update({"TEST.CROP_PCT": 1.0, "TEST.RESIZE": "square"})
    if "TRAIN.AUTO_RESUME" in old and not out.get("MODEL.RESUME"):
        out["MODEL.RESUME"] = "auto" if old["TRAIN.AUTO_RESUME"] else ""
    if "EVAL_MODE" in old or "THROUGHPUT_MODE" in old:
        out["MODE"] = "eval" if old.get("EVAL_MODE") else "throughput" if old.get("THROUGHPUT_MODE") else "train"
    return out


def saved_config(text: Any) -> Optional[CN]:
    """The config saved with a run (a checkpoint's ``config``, a run folder's config.yaml),
    in today's keys (MOVED, MERGED, REMOVED), not merged with the defaults: a key it lacks is
    missing; None when ``text`` is not the YAML of a config of this repo."""
    if not isinstance(text, str):
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("MODEL"), dict):
        return None
    tree: dict[str, Any] = {}
    for key, value in _in_todays_keys(_flatten(data)).items():
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        if value == {}:  # an empty section: keep what a moved key put there
            node.setdefault(last, {})
        else:
            node[last] = value
    return CN(tree)


def changed_keys(saved_text: str, cfg: CN) -> list[tuple[str, Any, Any]]:
    """(key, saved value, value now) for every key in which ``cfg`` differs from a saved
    config (YAML text, e.g. a checkpoint's), run-control keys left out."""
    tree = saved_config(saved_text)
    if tree is None:
        return []
    saved, now = _flatten(tree), _flatten(yaml.safe_load(cfg.dump()))
    return [(key, saved.get(key), value) for key, value in now.items()
            if key not in RUN_CONTROL and saved.get(key) != value]


def dump_config(cfg: CN, path: str, history: Optional[str] = None) -> None:
    """Write ``cfg`` to ``path`` (a loadable config). The comment lines after it keep the
    history: those already in the file, then ``history`` (one line) if given."""
    lines = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith("# resumed")]
    if history:
        lines.append(f"# resumed {history}\n")
    with open(path, "w") as f:
        f.write(cfg.dump())
        if lines:
            f.write("# ---- commands that resumed this run with other values (newest last)\n")
            f.writelines(lines)
