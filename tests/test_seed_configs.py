"""The seeds' recipes as configs: seed 004's CIFAR-10 ViT (the model of its summary, to the
parameter) and seed 003's ViT-B/16 ImageNet recipe, key by key."""
from __future__ import annotations

import pytest
import torch

import models
from config import load_config
from model_config import build_model
from lr_scheduler import scaled_lrs
from utils import count_params

SEED004 = "configs/vit/vit_seed004_patch2_32_cifar10.yaml"
SEED003 = "configs/vit/vit_base_patch16_224_seed003.yaml"


def test_seed004_model_has_the_summarys_parameters_layer_by_layer(tmp_path):
    """The seed's torchinfo summary: 2,725,632 parameters without a classifier (its head is
    an Identity); per block 384 + 148,224 (attention) + 384 + 148,032 (MLP); 49,536 for CLS and
    257 position embeddings, 2,496 for the 2x2 patch embedding, 384 for the final norm."""
    cfg = load_config(SEED004, ["DATA.DATA_PATH", str(tmp_path)])
    model = build_model(cfg)
    assert count_params(model) == 2_725_632 + 192 * 10 + 10  # + the 10-class head
    model.reset_classifier(0)
    assert count_params(model) == 2_725_632
    assert len(model.blocks) == 9 and model.patch_embed.grid_size == (16, 16)
    block = model.blocks[0]
    assert count_params(block.attn) == 148_224 and count_params(block.mlp) == 148_032
    assert count_params(block.norm1) == count_params(block.norm2) == 384
    assert model.pos_embed.numel() + model.cls_token.numel() == 49_536
    assert count_params(model.patch_embed) == 2_496 and count_params(model.norm) == 384
    assert block.attn.num_heads == 12 and model(torch.randn(1, 3, 32, 32)).shape == (1, 192)


def test_seed004_recipe_keys(tmp_path):
    cfg = load_config(SEED004, ["DATA.DATA_PATH", str(tmp_path)])
    assert (cfg.DATA.DATASET, cfg.DATA.IMG_SIZE, cfg.DATA.BATCH_SIZE) == ("cifar10", 32, 128)
    assert (cfg.TRAIN.EPOCHS, cfg.TRAIN.WARMUP_EPOCHS, cfg.TRAIN.WEIGHT_DECAY) == (100, 10, 0.1)
    assert scaled_lrs(cfg, total_batch=256) == pytest.approx((1e-3, 1e-6, 1e-6))  # 1e-3 per 256 images
    assert (cfg.TRAIN.OPTIMIZER.NAME, cfg.TRAIN.LR_SCHEDULER.NAME) == ("adamw", "cosine")
    assert (cfg.MODEL.LABEL_SMOOTHING, cfg.MODEL.DROP_PATH_RATE) == (0.1, 0.1)
    assert (cfg.AUG.AUTO_AUGMENT, cfg.AUG.HFLIP, cfg.AUG.CROP_PAD, cfg.AUG.REPROB) == ("trivialaugment", 0.5, 4, 0.1)
    assert cfg.AUG.MIXUP == cfg.AUG.CUTMIX == 0.0


def test_seed003_recipe_keys(tmp_path):
    cfg = load_config(SEED003, ["DATA.DATA_PATH", str(tmp_path)])
    assert cfg.MODEL.NAME == "vit_base_patch16_224" and cfg.DATA.IMG_SIZE == 224
    with torch.device("meta"):
        assert count_params(models.create_model(cfg.MODEL.NAME)) == 86_567_656  # ViT-B/16
    assert (cfg.TRAIN.EPOCHS, cfg.TRAIN.WARMUP_EPOCHS) == (300, 30)
    assert cfg.DATA.BATCH_SIZE == 384  # per GPU; lr 0.01 at the seed's 4 GPUs
    assert scaled_lrs(cfg, total_batch=4 * 384)[0] == pytest.approx(0.01)
    assert scaled_lrs(cfg, total_batch=8 * 384)[0] == pytest.approx(0.02)  # scaled linearly beyond
    assert cfg.TRAIN.WEIGHT_DECAY == 0.1 and cfg.TRAIN.OPTIMIZER.NAME == "adamw"
    assert (cfg.TRAIN.CLIP_GRAD, cfg.TRAIN.CLIP_MODE) == (1.0, "norm")
    assert cfg.AUG.AUTO_AUGMENT.startswith("rand-m9")
    assert (cfg.AUG.MIXUP, cfg.AUG.CUTMIX, cfg.MODEL.LABEL_SMOOTHING) == (0.2, 1.0, 0.1)
