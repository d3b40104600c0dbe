"""DeiT's knowledge distillation (TRAIN.DISTILL): the teacher and the loss that asks for it.

The teacher is built once per rank, on that rank's device, in eval mode with no gradients,
and runs inside the step's autocast on the same (mixed) images as the student. Its
architecture is TRAIN.DISTILL.TEACHER (a registered or a timm model name) or, for a
checkpoint of this repo, the model its saved config names; its weights are
TRAIN.DISTILL.TEACHER_WEIGHTS, loaded strictly. Its saved config must agree with the
student's image size and class count; a teacher trained with another DATA.MEAN/STD gets the
student's images renormalised to its own (``Renormalized``, one log line).

A student with a distillation token (``vit_*_distilled_*``) returns (class, distillation)
logits in training: the labels train the first, the teacher the second, as in DeiT. Any
other student (a plain ViT, a variant, DAT) has one head, which both losses train.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ConfigError, get_defaults, saved_config, source_of
from model_config import model_args


class DistillationLoss:
    """DeiT's ``DistillationLoss``: ``(1 - alpha) x base(class logits, labels) + alpha x
    distillation(distillation logits, teacher logits)``.

    soft: KL divergence between the two distributions softened by ``tau``, times tau^2,
    summed and divided by the number of logits (DeiT's exact scaling); hard: cross-entropy
    to the teacher's top-1 class."""

    def __init__(self, base: nn.Module, teacher: nn.Module, kind: str, alpha: float, tau: float) -> None:
        if kind not in ("soft", "hard"):
            raise ValueError(f"distillation kind {kind!r} is not soft or hard")
        self.base, self.teacher, self.kind, self.alpha, self.tau = base, teacher, kind, alpha, tau

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(images).float()

    def __call__(self, images: torch.Tensor, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, (tuple, list)):
            outputs, distill_out = outputs
        else:
            distill_out = outputs  # one head: it learns from the labels and from the teacher
        base_loss = self.base(outputs, targets)
        teacher = self.teacher_logits(images)
        distill_out = distill_out.float()
        if self.kind == "soft":
            T = self.tau
            distill_loss = F.kl_div(F.log_softmax(distill_out / T, dim=1), F.log_softmax(teacher / T, dim=1),
                                    reduction="sum", log_target=True) * (T * T) / distill_out.numel()
        else:
            distill_loss = F.cross_entropy(distill_out, teacher.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distill_loss * self.alpha


def _teacher_model(config, ckpt: dict) -> tuple[nn.Module, str]:
    """(teacher with fresh weights, its name) from TRAIN.DISTILL.TEACHER or the checkpoint's config."""
    import timm

    import models
    d = config.TRAIN.DISTILL
    key = "TRAIN.DISTILL.TEACHER"
    saved = saved_config(ckpt.get("config"))
    name = d.TEACHER or (saved.MODEL.NAME if saved is not None else "")
    if not name:
        raise ConfigError(f"{source_of(config, key)}: {key}: {d.TEACHER_WEIGHTS} holds no config of this repo "
                          f"saying which model it is: name the teacher's architecture")
    if saved is not None and saved.MODEL.NAME == name and name in models.list_models():
        try:
            kwargs = model_args(saved)
            size = saved.DATA.IMG_SIZE
        except (KeyError, AttributeError) as e:
            raise ConfigError(f"{source_of(config, key)}: {key}: the config saved in {d.TEACHER_WEIGHTS} "
                              f"lacks {e}: name the teacher's architecture") from None
        if size != config.DATA.IMG_SIZE:
            raise ConfigError(f"{source_of(config, 'DATA.IMG_SIZE')}: DATA.IMG_SIZE: the teacher in "
                              f"{d.TEACHER_WEIGHTS} takes {size} px images, the student {config.DATA.IMG_SIZE}")
        return models.create_model(name, **kwargs), name
    if name in models.list_models():
        params = models.model_info(name).parameters()
        wanted = {"num_classes": config.MODEL.NUM_CLASSES, "in_chans": config.MODEL.IN_CHANS,
                  "img_size": config.DATA.IMG_SIZE}
        return models.create_model(name, **{k: v for k, v in wanted.items() if k in params}), name
    return timm.create_model(name, pretrained=False, num_classes=config.MODEL.NUM_CLASSES,
                             in_chans=config.MODEL.IN_CHANS), name


class Renormalized(nn.Module):
    """A teacher trained on images normalised with another DATA.MEAN/STD than the student's:
    each channel of the student's input mapped to the teacher's normalisation first,
    ``x * std_s / std_t + (mean_s - mean_t) / std_t``. Exact: both normalisations are affine
    in the pixels, and mixup, cutmix and crops mix or move pixels linearly."""

    def __init__(self, teacher: nn.Module, student: tuple[list, list], trained: tuple[list, list]) -> None:
        super().__init__()
        self.teacher = teacher
        (mean_s, std_s), (mean_t, std_t) = (tuple(torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                                                  for v in pair) for pair in (student, trained))
        self.register_buffer("scale", std_s / std_t, persistent=False)
        self.register_buffer("shift", (mean_s - mean_t) / std_t, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images * self.scale.to(images.dtype) + self.shift.to(images.dtype))


def _teacher_normalisation(config, ckpt: dict) -> Optional[tuple[list, list]]:
    """(DATA.MEAN, DATA.STD) the teacher was trained with, from its saved config (a key it
    lacks: the defaults it ran with); None without a saved config of this repo."""
    saved = saved_config(ckpt.get("config"))
    if saved is None:
        return None
    data, defaults = saved.get("DATA", {}), get_defaults().DATA
    return list(data.get("MEAN", defaults.MEAN)), list(data.get("STD", defaults.STD))


def build_teacher(config, device: torch.device, logger: logging.Logger) -> nn.Module:
    """The teacher of TRAIN.DISTILL, weights loaded (strict), frozen, in eval mode on ``device``;
    fed the student's images in its own normalisation (``Renormalized``) when its saved config
    says it was trained with another DATA.MEAN/STD."""
    from models.weights import load_weights, read_weights, state_dict_of
    from utils import count_params

    source = config.TRAIN.DISTILL.TEACHER_WEIGHTS
    ckpt = read_weights(source)
    teacher, name = _teacher_model(config, ckpt)
    load_weights(teacher, state_dict_of(ckpt, source), source)
    classes = getattr(teacher, "num_classes", config.MODEL.NUM_CLASSES)
    if classes != config.MODEL.NUM_CLASSES:
        raise ConfigError(f"{source_of(config, 'TRAIN.DISTILL.TEACHER_WEIGHTS')}: TRAIN.DISTILL.TEACHER_WEIGHTS: "
                          f"the teacher {name} predicts {classes} classes, the student {config.MODEL.NUM_CLASSES} "
                          f"(MODEL.NUM_CLASSES)")
    trained, student = _teacher_normalisation(config, ckpt), (list(config.DATA.MEAN), list(config.DATA.STD))
    if trained is not None and trained != student:
        if len(trained[0]) != len(student[0]):
            raise ConfigError(f"{source_of(config, 'DATA.MEAN')}: DATA.MEAN: the teacher in {source} was trained on "
                              f"{len(trained[0])}-channel images, the student's data have {len(student[0])}")
        teacher = Renormalized(teacher, student, trained)
        logger.info(f"distillation: the teacher was trained with DATA.MEAN {trained[0]} STD {trained[1]}, the student's "
                    f"data are normalised with {student[0]} / {student[1]}: the teacher's input is renormalised")
    teacher.to(device).eval().requires_grad_(False)
    logger.info(f"distillation {config.TRAIN.DISTILL.TYPE}: teacher {name} ({count_params(teacher) / 1e6:.2f}M "
                f"params) from {source}, alpha {config.TRAIN.DISTILL.ALPHA}, tau {config.TRAIN.DISTILL.TAU}")
    return teacher


def build_distillation(config, model: nn.Module, criterion: nn.Module, device: torch.device,
                       logger: logging.Logger) -> Optional[DistillationLoss]:
    """The DistillationLoss of TRAIN.DISTILL around ``criterion``, or None (TYPE none). A
    student with a distillation token returns both heads' logits only when it distils;
    without a teacher it trains the mean that evaluation uses."""
    kind = config.TRAIN.DISTILL.TYPE
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(kind != "none")
    if kind == "none":
        return None
    teacher = build_teacher(config, device, logger)
    return DistillationLoss(criterion, teacher, kind, config.TRAIN.DISTILL.ALPHA, config.TRAIN.DISTILL.TAU)
