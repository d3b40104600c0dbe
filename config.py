"""Configuration: yacs defaults (every key commented), YAML files with BASE inheritance,
command-line overrides, and validation that fails before any work is done.

Errors are raised as ``ConfigError`` with one line naming the key and the file; main.py
prints that line and exits with code 2.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Iterable

import yaml
from yacs.config import CfgNode as CN

_C = CN()
_C.BASE = [""]  # YAML files this one inherits from, relative to it; later files override

# ----------------------------------------------------------------------------- data
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128  # per-process batch size
_C.DATA.DATA_PATH = ""  # dataset root (imagenet/folder: holds train/ and val/)
_C.DATA.DATASET = "imagenet"  # imagenet | folder | cifar10 | cifar100 | digits | fake
_C.DATA.IMG_SIZE = 224  # input resolution (square)
_C.DATA.INTERPOLATION = "bicubic"  # resize interpolation: bicubic | bilinear | nearest | random
_C.DATA.PIN_MEMORY = True  # pin host memory in the loader (CUDA only)
_C.DATA.NUM_WORKERS = 8  # loader worker processes per rank
_C.DATA.DOWNLOAD = True  # cifar: try to download when the files are missing
_C.DATA.REPEATED_AUG = False  # repeated-augmentation sampler (DeiT): 3 views per image
_C.DATA.MEAN = [0.485, 0.456, 0.406]  # normalisation mean (ImageNet)
_C.DATA.STD = [0.229, 0.224, 0.225]  # normalisation std (ImageNet)
_C.DATA.FAKE_SIZE = 1280  # fake: number of synthetic training images (val: a quarter)
_C.DATA.SKIP_BAD_IMAGES = False  # imagenet/folder: use the next readable image instead of an unreadable
# one and log the count every epoch; False stops with an error naming the file

# ---------------------------------------------------------------------------- model
_C.MODEL = CN()
_C.MODEL.TYPE = ""  # model family (vit, dat); derived from MODEL.NAME when empty
_C.MODEL.NAME = "vit_small_patch16_224"  # registered model name (models.list_models())
_C.MODEL.NUM_CLASSES = 1000  # classifier outputs
_C.MODEL.IN_CHANS = 3  # input channels
_C.MODEL.DROP_RATE = 0.0  # dropout before the classifier
_C.MODEL.DROP_PATH_RATE = 0.1  # stochastic depth rate (linearly increasing over depth)
_C.MODEL.LABEL_SMOOTHING = 0.1  # label smoothing (ignored when mixup/cutmix is active)
_C.MODEL.PRETRAINED = ""  # weights to fine-tune from (see --pretrained)
_C.MODEL.RESUME = ""  # checkpoint to resume from (see --resume)
# Family sections: constructor arguments of the model, upper-cased (MODEL.VIT.QKV_BIAS).
# Any key is accepted by the parser and then checked against the model's signature.
_C.MODEL.VIT = CN(new_allowed=True)
_C.MODEL.DAT = CN(new_allowed=True)
_C.MODEL.DAT.HEAD_MAP = ""  # file of class indices mapping a 21,841-class head to 1,000

# ---------------------------------------------------------------------------- train
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0  # set by resume; normally left at 0
_C.TRAIN.EPOCHS = 300  # total epochs
_C.TRAIN.WARMUP_EPOCHS = 20  # linear warmup epochs
_C.TRAIN.WEIGHT_DECAY = 0.05  # decoupled weight decay (not on biases/norms/tokens)
_C.TRAIN.BASE_LR = 5e-4  # learning rate for a total batch of TRAIN.LR_BASE_BATCH
_C.TRAIN.WARMUP_LR = 5e-7  # warmup start lr (scaled like BASE_LR)
_C.TRAIN.MIN_LR = 5e-6  # final lr (scaled like BASE_LR)
_C.TRAIN.LR_BASE_BATCH = 512  # lrs are scaled by total_batch / LR_BASE_BATCH; 0 disables
_C.TRAIN.CLIP_GRAD = 5.0  # max gradient norm; 0 disables clipping (the norm is still logged)
_C.TRAIN.AUTO_RESUME = True  # resume from the newest checkpoint in the output folder
_C.TRAIN.ACCUMULATION_STEPS = 1  # gradient accumulation steps per optimizer step
_C.TRAIN.LAYER_DECAY = 1.0  # layer-wise lr decay (e.g. 0.65 for fine-tuning); 1.0 disables
_C.TRAIN.COMPILE = False  # wrap the model in torch.compile
_C.TRAIN.CHANNELS_LAST = False  # channels-last memory format for the model and inputs
_C.TRAIN.SAVE_EVERY_STEPS = 0  # also save a resumable mid-epoch checkpoint every N optimizer steps; 0 = off
_C.TRAIN.MAX_BAD_STEPS = 20  # stop after this many consecutive skipped non-finite (NaN/inf) steps
_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = "cosine"  # cosine | linear | step
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30  # step: epochs between decays
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1  # step: lr multiplier at each decay
_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = "adamw"  # adamw | sgd | lamb
_C.TRAIN.OPTIMIZER.EPS = 1e-8  # adamw/lamb epsilon
_C.TRAIN.OPTIMIZER.BETAS = [0.9, 0.999]  # adamw/lamb betas
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9  # sgd momentum (nesterov)
_C.TRAIN.EMA = CN()
_C.TRAIN.EMA.ENABLED = False  # keep an exponential moving average of the weights (timm)
_C.TRAIN.EMA.DECAY = 0.9998  # EMA decay per optimizer step

# ------------------------------------------------------------------------ augmentation
_C.AUG = CN()
_C.AUG.COLOR_JITTER = 0.4  # color jitter factor (0 disables)
_C.AUG.AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"  # timm auto-augment policy; 'none' disables
_C.AUG.REPROB = 0.25  # random erasing probability
_C.AUG.REMODE = "pixel"  # random erasing mode: const | rand | pixel
_C.AUG.RECOUNT = 1  # random erasing count
_C.AUG.HFLIP = 0.5  # horizontal flip probability
_C.AUG.SCALE = [0.08, 1.0]  # random-resized-crop area range (images > 32 px)
_C.AUG.CROP_PAD = 4  # images <= 32 px: random crop after this much zero padding (0: none)
_C.AUG.MIXUP = 0.8  # mixup alpha (0 disables)
_C.AUG.CUTMIX = 1.0  # cutmix alpha (0 disables)
_C.AUG.CUTMIX_MINMAX = []  # cutmix min/max ratio; overrides alpha when set ([] = unset)
_C.AUG.MIXUP_PROB = 1.0  # probability of applying mixup or cutmix to a batch
_C.AUG.MIXUP_SWITCH_PROB = 0.5  # probability of cutmix instead of mixup when both are on
_C.AUG.MIXUP_MODE = "batch"  # batch | pair | elem

# ----------------------------------------------------------------------------- test
_C.TEST = CN()
_C.TEST.CROP = True  # resize to IMG_SIZE / CROP_PCT then center-crop; False: resize to IMG_SIZE
_C.TEST.CROP_PCT = 0.875  # center-crop fraction (224/256)
_C.TEST.RESIZE = "shorter"  # shorter: keep aspect (Swin/DeiT) | square: both sides (DAT)
_C.TEST.BATCH_SIZE = 0  # eval batch per process; 0 = DATA.BATCH_SIZE

# ----------------------------------------------------------------------------- misc
_C.AMP = True  # mixed precision on CUDA (no effect on CPU)
_C.AMP_DTYPE = "auto"  # auto (bf16 where supported, else fp16) | bfloat16 | float16
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
_C.EVAL_MODE = False  # evaluate and exit (--eval)
_C.THROUGHPUT_MODE = False  # measure images/s and exit (--throughput)
_C.WANDB = CN()
_C.WANDB.ENABLED = False  # log to Weights & Biases (offline mode when there is no API key)
_C.WANDB.PROJECT = "vit-research"  # wandb project
_C.WANDB.ENTITY = ""  # wandb entity (team); empty = default
_C.WANDB.MODE = "auto"  # auto (online with an API key, else offline) | online | offline


CHOICES = {
    "DATA.DATASET": ("imagenet", "folder", "cifar10", "cifar100", "digits", "fake"),
    "DATA.INTERPOLATION": ("bicubic", "bilinear", "nearest", "random"),
    "TRAIN.LR_SCHEDULER.NAME": ("cosine", "linear", "step"),
    "TRAIN.OPTIMIZER.NAME": ("adamw", "sgd", "lamb"),
    "AUG.REMODE": ("const", "rand", "pixel"),
    "AUG.MIXUP_MODE": ("batch", "pair", "elem"),
    "TEST.RESIZE": ("shorter", "square"),
    "AMP_DTYPE": ("auto", "bfloat16", "float16"),
    "WANDB.MODE": ("auto", "online", "offline"),
}
POSITIVE = ("DATA.BATCH_SIZE", "DATA.IMG_SIZE", "MODEL.NUM_CLASSES", "MODEL.IN_CHANS",
            "TRAIN.EPOCHS", "TRAIN.ACCUMULATION_STEPS", "SAVE_FREQ", "PRINT_FREQ",
            "TRAIN.MAX_BAD_STEPS", "DIST_TIMEOUT")
NON_NEGATIVE = ("DATA.NUM_WORKERS", "TRAIN.WARMUP_EPOCHS", "TRAIN.WEIGHT_DECAY", "TRAIN.BASE_LR",
                "TRAIN.WARMUP_LR", "TRAIN.MIN_LR", "TRAIN.CLIP_GRAD", "KEEP_CKPTS",
                "AUG.MIXUP", "AUG.CUTMIX", "AUG.CROP_PAD", "AUG.REPROB", "TEST.BATCH_SIZE", "MODEL.DROP_RATE",
                "MODEL.DROP_PATH_RATE", "MODEL.LABEL_SMOOTHING", "TRAIN.LR_BASE_BATCH",
                "TRAIN.SAVE_EVERY_STEPS")
UNIT_INTERVAL = ("AUG.HFLIP", "AUG.REPROB", "AUG.MIXUP_PROB", "AUG.MIXUP_SWITCH_PROB",
                 "MODEL.DROP_RATE", "MODEL.DROP_PATH_RATE", "MODEL.LABEL_SMOOTHING",
                 "TRAIN.EMA.DECAY", "TEST.CROP_PCT")


class ConfigError(ValueError):
    """A bad configuration: the message is one line naming the key and where it came from."""


def get_defaults() -> CN:
    return _C.clone()


def framework_model_keys(family: str) -> set[str]:
    """Keys of MODEL.<FAMILY> that the framework reads itself (not model arguments)."""
    section = _C.MODEL.get(family.upper(), None)
    return set(section.keys()) if section is not None else set()


def _flat_keys(tree: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat_keys(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1]


def _read_yaml(path: str, chain: tuple[str, ...]) -> list[tuple[str, dict]]:
    """[(file, mapping)] for ``path`` and its BASE files, bases first."""
    path = os.path.abspath(path)
    if path in chain:
        cycle = " -> ".join(os.path.relpath(p) for p in chain + (path,))
        raise ConfigError(f"{path}: BASE cycle: {cycle}")
    if not os.path.isfile(path):
        where = f" (BASE of {chain[-1]})" if chain else ""
        raise ConfigError(f"{path}: config file not found{where}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys")
    layers: list[tuple[str, dict]] = []
    for base in data.pop("BASE", None) or []:
        if base:
            layers += _read_yaml(os.path.join(os.path.dirname(path), base), chain + (path,))
    return layers + [(path, data)]


def _merge(cfg: CN, mapping: dict, source: str, origin: dict[str, str]) -> None:
    try:
        cfg.merge_from_other_cfg(CN(mapping))
    except KeyError as e:
        key = str(e.args[0]).replace("Non-existent config key: ", "")
        raise ConfigError(f"{source}: unknown config key {key}") from None
    except ValueError as e:
        raise ConfigError(f"{source}: {_yacs_message(e)}") from None
    for key in _flat_keys(mapping):
        origin[key] = source


def _yacs_message(e: Exception) -> str:
    text = " ".join(str(e).split())
    if "Type mismatch" in text and "for config key:" in text:
        key = text.split("for config key:")[-1].strip()
        return f"wrong type for {key}: {text.split(' with values ')[-1].split(' for config key')[0]}"
    return text


def _opts_mapping(opts: list[str]) -> list[tuple[str, Any]]:
    if len(opts) % 2:
        raise ConfigError(f"--opts: expected KEY VALUE pairs, got an odd count ({len(opts)})")
    pairs = []
    for key, raw in zip(opts[0::2], opts[1::2]):
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        pairs.append((key, raw if value is None and raw not in ("null", "~", "None") else value))
    return pairs


def _set_opt(cfg: CN, key: str, value: Any, origin: dict[str, str]) -> None:
    node, parts = cfg, key.split(".")
    for depth, part in enumerate(parts):
        is_last = depth == len(parts) - 1
        if part not in node and not (is_last and node.is_new_allowed()):
            raise ConfigError(f"--opts: unknown config key {key}")
        if is_last:
            break
        node = node[part]
    mapping: dict = value
    for part in reversed(parts):
        mapping = {part: mapping}
    _merge(cfg, mapping, "--opts", origin)


def _get(cfg: CN, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def validate(cfg: CN, origin: dict[str, str]) -> None:
    """Checks that need the whole config; raise ConfigError naming the key and its source."""
    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{origin.get(key, 'defaults')}: {key}: {message}")

    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            fail(key, f"{_get(cfg, key)!r} is not one of {', '.join(allowed)}")
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            fail(key, f"must be > 0, got {_get(cfg, key)}")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            fail(key, f"must be >= 0, got {_get(cfg, key)}")
    for key in UNIT_INTERVAL:
        if not 0 <= _get(cfg, key) <= 1:
            fail(key, f"must be in [0, 1], got {_get(cfg, key)}")
    if len(cfg.TRAIN.OPTIMIZER.BETAS) != 2:
        fail("TRAIN.OPTIMIZER.BETAS", "needs two values")
    if len(cfg.DATA.MEAN) != cfg.MODEL.IN_CHANS or len(cfg.DATA.STD) != cfg.MODEL.IN_CHANS:
        fail("DATA.MEAN", f"MEAN/STD need {cfg.MODEL.IN_CHANS} values (MODEL.IN_CHANS)")
    if not 0 < cfg.TRAIN.LAYER_DECAY <= 1:
        fail("TRAIN.LAYER_DECAY", f"must be in (0, 1], got {cfg.TRAIN.LAYER_DECAY}")
    if cfg.TRAIN.WARMUP_EPOCHS > cfg.TRAIN.EPOCHS:
        fail("TRAIN.WARMUP_EPOCHS", f"{cfg.TRAIN.WARMUP_EPOCHS} exceeds TRAIN.EPOCHS")
    if cfg.AUG.CUTMIX_MINMAX and len(cfg.AUG.CUTMIX_MINMAX) != 2:
        fail("AUG.CUTMIX_MINMAX", "needs [min, max] or []")
    if not (cfg.DEVICE in ("auto", "cpu", "cuda") or cfg.DEVICE.startswith("cuda:")):
        fail("DEVICE", f"{cfg.DEVICE!r} is not auto, cpu, cuda or cuda:N")
    for key in ("MODEL.PRETRAINED", "MODEL.RESUME", "MODEL.DAT.HEAD_MAP"):
        path = _get(cfg, key)
        if path and not os.path.isfile(path):
            fail(key, f"file not found: {path}")
    if cfg.DATA.DATASET in ("imagenet", "folder") and not cfg.DATA.DATA_PATH:
        fail("DATA.DATA_PATH", f"required for DATA.DATASET {cfg.DATA.DATASET} (--data-path)")
    if cfg.DATA.DATA_PATH and cfg.DATA.DATASET in ("imagenet", "folder") \
            and not os.path.isdir(cfg.DATA.DATA_PATH):
        fail("DATA.DATA_PATH", f"dataset folder not found: {cfg.DATA.DATA_PATH}")
    _validate_model(cfg, origin, fail)


def _validate_model(cfg: CN, origin: dict[str, str], fail) -> None:
    import models  # importing registers every model

    try:
        info = models.model_info(cfg.MODEL.NAME)
    except models.UnknownModelError as e:
        fail("MODEL.NAME", str(e))
    if cfg.MODEL.TYPE and cfg.MODEL.TYPE != info.family:
        fail("MODEL.TYPE", f"{cfg.MODEL.TYPE!r} does not match {cfg.MODEL.NAME} (family {info.family!r})")
    for family in ("VIT", "DAT"):
        extra = set(cfg.MODEL[family]) - framework_model_keys(family)
        if extra and family.lower() != info.family:
            key = f"MODEL.{family}.{sorted(extra)[0]}"
            fail(key, f"section MODEL.{family} does not apply to {cfg.MODEL.NAME} (family {info.family})")
    try:
        models.model_kwargs(cfg)
    except (models.ModelArgumentError, TypeError) as e:
        section = f"MODEL.{info.family.upper()}"
        arg = getattr(e, "arg", None)
        if arg and f"{section}.{arg.upper()}" in origin:
            fail(f"{section}.{arg.upper()}", str(e))
        keys = [k for k in origin if k.startswith(section + ".")]
        source = origin.get(keys[0], "defaults") if keys else "defaults"
        raise ConfigError(f"{source}: {section}: {e}") from None


def load_config(cfg_file: str | None = None, opts: list[str] | None = None,
                overrides: dict[str, Any] | None = None) -> CN:
    """Defaults <- cfg_file (with its BASEs) <- ``overrides`` (from flags) <- ``opts``."""
    cfg = get_defaults()
    origin: dict[str, str] = {}
    if cfg_file:
        for source, mapping in _read_yaml(cfg_file, ()):
            _merge(cfg, mapping, os.path.relpath(source), origin)
    for key, value in (overrides or {}).items():
        _set_opt(cfg, key, value, origin)
        origin[key] = f"--{key.split('.')[-1].lower().replace('_', '-')}"
    for key, value in _opts_mapping(list(opts or [])):
        _set_opt(cfg, key, value, origin)
    if not cfg.MODEL.TYPE:
        import models
        try:
            cfg.MODEL.TYPE = models.model_info(cfg.MODEL.NAME).family
        except models.UnknownModelError:
            pass  # reported by validate() with the key's source
    validate(cfg, origin)
    cfg.freeze()
    return cfg


def config_from_args(args: argparse.Namespace) -> CN:
    """Fold main.py's flags into the config (flags win over the YAML, --opts over both)."""
    flags = {
        "DATA.BATCH_SIZE": args.batch_size, "DATA.DATA_PATH": args.data_path,
        "OUTPUT": args.output, "TAG": args.tag, "MODEL.RESUME": args.resume,
        "MODEL.PRETRAINED": args.pretrained, "TRAIN.ACCUMULATION_STEPS": args.accumulation_steps,
        "SEED": args.seed, "DEVICE": args.device, "AMP": args.amp,
        "EVAL_MODE": args.eval or None, "THROUGHPUT_MODE": args.throughput or None,
        "OVERWRITE": getattr(args, "overwrite", False) or None,
    }
    overrides = {k: v for k, v in flags.items() if v is not None}
    if args.resume:
        overrides["TRAIN.AUTO_RESUME"] = False  # an explicit --resume is never overridden
    return load_config(args.cfg, args.opts, overrides)


def dump_config(cfg: CN, path: str) -> None:
    with open(path, "w") as f:
        f.write(cfg.dump())
