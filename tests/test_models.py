"""Registry and ViT: timm compatibility, errors, hooks, measurements."""
from __future__ import annotations

import pytest
import timm
import torch

import models
from models.registry import ModelArgumentError, UnknownModelError
from optimizer import no_weight_decay_names
from utils import count_macs, count_params

IMAGENET_VITS = ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
                 "vit_large_patch16_224", "vit_huge_patch14_224"]


def test_timm_weights_load_strictly_and_give_the_same_logits():
    """One size: every size's layout is timm's (the test below), the code is the same."""
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224").eval()
    ours = models.create_model("vit_tiny_patch16_224").eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", IMAGENET_VITS)
def test_state_dict_layout_equals_timm(name):
    """timm's name stays timm's (its entry and pretrained_cfg); ours builds the same model."""
    with torch.device("meta"):
        ours_model, theirs_model = models.create_model(name), timm.create_model(name)
        ours = models.create_model(name, num_classes=1000).state_dict()
        theirs = timm.create_model(name, num_classes=1000).state_dict()  # timm's ViT-H/14 is headless
    assert ours_model.pretrained_cfg == theirs_model.pretrained_cfg == timm.models.get_pretrained_cfg(name).to_dict()
    assert ours_model.num_classes == theirs_model.num_classes
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_registry_lists_and_suggests():
    assert "vit_small_patch16_224" in models.list_models()
    found = models.list_models("vit_*_patch4_32")
    assert {"vit_base_patch4_32", "vit_small_patch4_32", "vit_tiny_patch4_32"} <= set(found)
    assert found == sorted(found) and all(n.startswith("vit_") and n.endswith("_patch4_32") for n in found)
    with pytest.raises(UnknownModelError, match="did you mean vit_small_patch16_224"):
        models.create_model("vit_smal_patch16_224")
    with pytest.raises(ModelArgumentError, match="did you mean embed_dim"):
        models.create_model("vit_tiny_patch4_32", embed_dimm=32)


def test_register_model_requires_the_model_class_annotation():
    with pytest.raises(TypeError, match="annotate the return type"):
        @models.register_model
        def unannotated_model(**kwargs):
            return torch.nn.Linear(1, 1)


def test_cifar_models_run_at_32():
    for name in models.list_models("vit_*_32"):
        model = models.create_model(name, depth=1).eval()  # a distilled ViT trains on (cls, dist) pairs
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_params_and_macs_of_vit_small():
    model = models.create_model("vit_small_patch16_224")
    assert count_params(model) == 22_050_664  # timm's ViT-S/16
    assert count_macs(model, 224) / 1e9 == pytest.approx(4.60, abs=0.01)  # attention included


def test_no_weight_decay_covers_biases_norms_tokens():
    model = models.create_model("vit_tiny_patch4_32", depth=2)
    skip = no_weight_decay_names(model)
    assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= skip
    assert "blocks.0.attn.qkv.weight" not in skip and "head.weight" not in skip


def test_adapt_pretrained_resamples_position_embedding():
    small = models.create_model("vit_tiny_patch4_32", depth=1)
    large = models.create_model("vit_tiny_patch4_32", depth=1, img_size=64)
    state = large.adapt_pretrained(small.state_dict())
    assert state["pos_embed"].shape == large.pos_embed.shape == (1, 1 + 16 * 16, 192)
    large.load_state_dict(state)
    torch.testing.assert_close(state["pos_embed"][:, 0], small.pos_embed[:, 0])  # CLS untouched
