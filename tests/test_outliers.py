import copy

import pytest
import torch

import vqz
from vqz.eval.images import sqnr
from vqz.eval.outliers import inject_outliers


def _dit():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=3, out_channels=3, num_layers=2,
        num_attention_heads=2, attention_head_dim=32, num_embeds_ada_norm=10).eval()


def _inputs():
    return dict(hidden_states=torch.randn(4, 3, 8, 8), timestep=torch.tensor([10, 200, 500, 900]),
                class_labels=torch.tensor([0, 3, 5, 9]))


def test_dit_outliers_keep_the_function_and_break_naive_w4a4():
    model = _dit()
    x = _inputs()
    with torch.no_grad():
        ref = model(**x).sample
        injected = copy.deepcopy(model)
        names = inject_outliers(injected, scale=50, fraction=0.05)
        assert names == ["transformer_blocks.0", "transformer_blocks.1"]
        out = injected(**x).sample
        assert (out - ref).abs().max() < 1e-3 * ref.abs().max()
        w4a8_clean = vqz.quantize(copy.deepcopy(model), "w4a8")(**x).sample
        w4a8_injected = vqz.quantize(copy.deepcopy(injected), "w4a8")(**x).sample
    assert sqnr(w4a8_injected, ref) < sqnr(w4a8_clean, ref) - 3


def test_timm_block_outliers_keep_the_function():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert len(inject_outliers(model, scale=50)) == 2
        assert torch.allclose(model(x), ref, atol=1e-4 * ref.abs().max().item())


def test_model_without_attention_blocks():
    with pytest.raises(ValueError, match="no attention block"):
        inject_outliers(torch.nn.Sequential(torch.nn.Linear(4, 4)))
