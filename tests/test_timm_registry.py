"""One registry, timm's: every model here is a timm model after ``import models`` (names
timm already has stay timm's), the argument checks run in front of ``timm.create_model``,
and timm's own tools and checks see what this repository's do: the optimizer factory's
weight-decay exemptions, ``set_input_size``, and the checks of timm's tests/test_models.py
run through ``timm.create_model`` for one tiny model per family (the per-kind ports are in
tests/test_vit_api.py and tests/test_dat_api.py)."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models import get_pretrained_cfg, model_entrypoint
from timm.optim import create_optimizer_v2

import models
from optimizer import no_weight_decay_names

pytestmark = pytest.mark.usefixtures("one_thread")

VIT = dict(embed_dim=32, depth=1, num_heads=2)
# One tiny model per family (and the ViT kind with a relative-position table).
FAMILIES = {
    "vit": ("vit_tiny_patch4_32", VIT, 32),
    "vit_dis": ("vit_dis_tiny_patch4_32", VIT, 32),
    "deit_distilled": ("vit_tiny_distilled_patch2_32", VIT, 32),
    "dat": ("dat_pp_tiny", dict(dim_stem=16, dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), img_size=64,
                                stage_spec=(("N",), ("N",), ("D",), ("D",))), 64),
}
# timm's checks that cannot apply, and why (README's zoo table says the same).
NO_SET_INPUT_SIZE = {"dat": "DAT takes any input size that is a multiple of 32 (fixed_input_size False): "
                            "there is no input size to set"}
TIMM_NAMES = ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
              "vit_large_patch16_224", "vit_huge_patch14_224"]


def create(family: str, **kwargs) -> torch.nn.Module:
    name, tiny, _ = FAMILIES[family]
    torch.manual_seed(0)
    return timm.create_model(name, **{**tiny, **kwargs})


def test_every_model_is_a_timm_model_and_timms_names_stay_timms():
    ours = models.list_models()
    assert set(ours) <= set(timm.list_models()) and timm.list_models("dat*") == models.list_models("dat*")
    for name in ours:
        cfg = get_pretrained_cfg(name)
        assert cfg is not None and cfg.architecture == name and models.model_info(name).pretrained_cfg == cfg.to_dict()
        module = model_entrypoint(name).__module__
        assert module == ("timm.models.vision_transformer" if name in TIMM_NAMES else models.model_info(name).fn.__module__)
    with torch.device("meta"):  # README's lines (Using a backbone elsewhere), without the memory
        model = timm.create_model("dat_pp_tiny", num_classes=10)
        body = timm.create_model("dat_pp_tiny", features_only=True)
    assert type(model).__name__ == "DAT" and model.pretrained_cfg["architecture"] == "dat_pp_tiny"
    assert len(timm.list_models("dat*")) == 8 and get_pretrained_cfg("dat_pp_tiny").classifier == "cls_head"
    assert body.feature_info.reduction() == [4, 8, 16, 32]
    assert timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05).param_groups


def test_the_checks_run_in_front_of_timm_create_model():
    for create_model in (timm.create_model, models.create_model):
        with pytest.raises(models.ModelArgumentError, match="did you mean depth"):
            create_model("vit_lai_tiny_patch4_32", dpth=1)
        with pytest.raises(models.ModelArgumentError, match=r"attn='lai' by its name.*vit_tiny_patch4_32 with attn='dis'"):
            create_model("vit_lai_tiny_patch4_32", attn="dis", **VIT)
        assert create_model("vit_lai_tiny_patch4_32", attn="lai", **VIT).attn_kind == "lai"
    with pytest.raises(models.ModelArgumentError, match="attn_args.*schedule|schedul"):
        timm.create_model("vit_lai_tiny_patch4_32", attn_args={"schedul": []}, **VIT)


@pytest.mark.parametrize("family", FAMILIES)
def test_timms_optimizer_factory_exempts_what_ours_does(family):
    """create_optimizer_v2 reads no_weight_decay() only; ours also the keywords."""
    model = create(family)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    timms = {names[id(p)] for group in optimizer.param_groups if group["weight_decay"] == 0 for p in group["params"]}
    assert timms == no_weight_decay_names(model)
    tables = {n for n in names.values() if n.endswith(("rel_pos.weight", "rpb", "rpe_table", "relative_position_bias_table"))}
    assert tables <= timms and (tables or family in ("vit", "deit_distilled"))


@pytest.mark.parametrize("attn, attn_args", [("dis", {}), ("dislai", {"positions": "1d"}),
                                             ("performer_dis", {"span": None})])
def test_set_input_size_gives_the_model_built_at_that_size(attn, attn_args):
    model = timm.create_model("vit_tiny_patch4_32", attn=attn, attn_args=attn_args, img_size=16, **VIT).eval()
    model.set_input_size(img_size=32)
    built = timm.create_model("vit_tiny_patch4_32", attn=attn, attn_args=attn_args, **VIT).eval()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}
    model.load_state_dict(built.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), built(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_timms_model_checks_through_timm_create_model(family):
    """timm's test_model_default_cfgs(_non_std), test_model_forward_features (features_only),
    test_model_forward_intermediates and set_input_size, as timm runs them."""
    name, tiny, size = FAMILIES[family]
    model = create(family, num_classes=42).eval()
    cfg, state = model.pretrained_cfg, model.state_dict()
    assert cfg["architecture"] == name and cfg["input_size"] == (3, size, size)
    assert all(c + ".weight" in state for c in models.classifier_names(cfg)) and cfg["first_conv"] + ".weight" in state
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert model(x).shape == (2, 42)
        features = model.forward_features(x)
        spatial = family == "dat"  # timm's non-std models (vit_*, deit*) give tokens
        assert features.shape[-2:] == cfg["pool_size"] if spatial else features.shape[-1] == model.num_features
        assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size)
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, features)
        assert all(t.ndim == 4 and t.shape[0] == 2 for t in intermediates)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
        if spatial:
            model.reset_classifier(0, "")
            assert model(x).shape[-2:] == cfg["pool_size"]
        body = create(family, features_only=True).eval()
        maps = body(x)
        assert [m.shape[1] for m in maps] == body.feature_info.channels()
        assert [size // m.shape[-1] for m in maps] == body.feature_info.reduction()
    if family in NO_SET_INPUT_SIZE:
        pytest.skip(NO_SET_INPUT_SIZE[family])
    model.set_input_size(img_size=2 * size)
    assert model(torch.randn(1, 3, 2 * size, 2 * size)).shape == (1, model.num_features)
