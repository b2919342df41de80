import copy

import pytest
import torch

import vqz
from vqz.algorithms.repq import channel_balance, fold_into_layernorm
from vqz.eval.images import sqnr
from vqz.eval.outliers import inject_outliers

timm = pytest.importorskip("timm")


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                             depth=2, embed_dim=64, num_heads=2, num_classes=10).eval()


def _images(n=16, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_fold_preserves_the_function(vit):
    x = _images()
    with torch.no_grad():
        ref = vit(x)
        block = vit.blocks[0]
        y = block.norm1(vit.patch_embed(x))  # only its channel ranges are used
        divisor, shift = channel_balance(y.amin((0, 1)) * 3, y.amax((0, 1)), bits=4)
        fold_into_layernorm(block.norm1, [block.attn.qkv], divisor, shift)
        assert (vit(x) - ref).abs().max() <= 1e-4


def test_repq_absorbs_layernorm_outliers(vit):
    x, calib = _images(seed=1), [_images(seed=2)]
    with torch.no_grad():
        ref = vit(x)
    inject_outliers(vit, scale=50, fraction=0.05)
    with_repq = vqz.quantize(copy.deepcopy(vit), "vit-w6a6", calib=calib)
    without = vqz.quantize(copy.deepcopy(vit), "vit-w6a6", calib=calib, repq=False)
    with torch.no_grad():
        gain = sqnr(with_repq(x), ref) - sqnr(without(x), ref)
    assert gain > 6
    lam = with_repq.blocks[0].norm1.weight.abs()
    assert lam.max() / lam.median() < 20  # the x50 channels were folded back into range


def test_failure_after_the_fold_restores_the_layernorms(vit, guard):
    check = guard(vit)
    calls = []

    def loop(model):
        calls.append(1)
        model(_images(4))
        if len(calls) == 2:  # the activation-observer pass, after RepQ changed the model
            raise RuntimeError("stop")
    with pytest.raises(RuntimeError, match="stop"):
        vqz.quantize(vit, "vit-w8a8", calib=loop)
    check()


def test_save_load_keeps_the_folded_model(vit, tmp_path):
    q = vqz.quantize(vit, "vit-w4a4", calib=[_images(8)])
    skeleton = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                                 depth=2, embed_dim=64, num_heads=2, num_classes=10).eval()
    vqz.load(skeleton, vqz.save(q, tmp_path / "q.safetensors"))
    x = _images(3, seed=5)
    with torch.no_grad():
        assert torch.equal(q(x), skeleton(x))
