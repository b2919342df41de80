"""Generic preset names resolve to a model family's recipe; family recipes refuse other families."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import vqz
from vqz.config import FAMILY_PRESETS, check_preset_name, get_preset, preset_family, resolve_config

timm = pytest.importorskip("timm")


def _vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                             depth=1, embed_dim=32, num_heads=2, num_classes=10).eval()


def _images(n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_family_tables_name_real_presets():
    for family, names in FAMILY_PRESETS.items():
        for generic, recipe in names.items():
            assert get_preset(recipe).name == recipe and preset_family(recipe) == family
            assert resolve_config(generic, family).name == recipe
            check_preset_name(generic)
    assert resolve_config("w8a8").name == "w8a8" and preset_family("w8a8") is None
    assert resolve_config("w6a6", "vit").attn is not None
    with pytest.raises(ValueError, match="'w6a6' names a family recipe only.*'vit-w6a6'"):
        get_preset("w6a6")  # no generic w6a6: on a model outside the family it is an error
    with pytest.raises(ValueError, match="unknown preset"):
        check_preset_name("w3a3")


def test_generic_name_on_a_vit_runs_the_vit_recipe_and_records_it(tmp_path):
    calib = [_images(seed=1)]
    by_generic = vqz.quantize(_vit(), "w8a8", calib=calib)
    by_family = vqz.quantize(_vit(), "vit-w8a8", calib=calib)
    x = _images(seed=2)
    with torch.no_grad():
        assert torch.equal(by_generic(x), by_family(x))
    assert vqz.summary(by_generic).recipe == ("vit-w8a8 (asked for 'w8a8', this model family's "
                                              "recipe of that name)")
    assert vqz.summary(by_family).recipe == "vit-w8a8"
    assert str(vqz.summary(by_generic)).startswith("recipe: vit-w8a8")
    loaded = vqz.load(_vit(), vqz.save(by_generic, tmp_path / "q.safetensors"))
    assert vqz.summary(loaded).recipe == vqz.summary(by_generic).recipe
    # a config object is used as given
    plain = vqz.quantize(_vit(), get_preset("w8a8"))
    assert vqz.api.quant_state(plain).config.attn is None


def test_generic_name_needing_calibration_says_so():
    with pytest.raises(ValueError, match="'vit-w8a8' uses static activation scales.*calib="):
        vqz.quantize(_vit(), "w8a8")


def test_other_models_keep_the_generic_recipes():
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    vqz.quantize(mlp, "w8a8")
    assert vqz.api.quant_state(mlp).config == get_preset("w8a8")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_classifier_refuses_a_depth_recipe_before_changing_anything():
    model = _vit()
    before, modules = _state(model), [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"'depth-w8a8' is a recipe for depth estimators.*"
                                         r"VisionTransformer is one of the timm vision-transformer "
                                         r"classifiers.*use 'vit-w8a8' \(or just 'w8a8'"):
        vqz.quantize(model, "depth-w8a8", calib=[_images()])
    with pytest.raises(ValueError, match="'depth-w4a8' is a recipe for depth.*'w8a8'"):
        vqz.quantize(model, "depth-w4a8", calib=[_images()])  # no ViT w4a8: points at the generic ones
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_depth_model_refuses_a_vit_recipe_before_changing_anything():
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_depth import tiny_dpt

    model, size = tiny_dpt()
    before = _state(model)
    with pytest.raises(ValueError, match=r"'vit-w4a4' is a recipe for timm vision-transformer "
                                         r"classifiers.*DPTForDepthEstimation is one of the depth "
                                         r"estimators.*use 'depth-w4a4' \(or just 'w4a4'"):
        vqz.quantize(model, "vit-w4a4", calib=[{"pixel_values": torch.randn(1, 3, size, size)}])
    assert not hasattr(model, vqz.api.STATE_ATTR)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_model_of_no_family_refuses_family_recipes():
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    with pytest.raises(ValueError, match="'vit-w8a8' is a recipe for timm vision-transformer.*"
                                         "Sequential is not one of them.*generic preset"):
        vqz.quantize(mlp, "vit-w8a8", calib=[torch.randn(4, 16)])
    assert isinstance(mlp[0], nn.Linear)
