import copy
import math

import pytest
import torch

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import Attention, VisionTransformer  # noqa: E402

import vqz  # noqa: E402
from vqz.eval.images import sqnr  # noqa: E402
from vqz.formats import get_format  # noqa: E402
from vqz.nn import QuantAttention, QuantLinear  # noqa: E402
from vqz.nn.attention import log_sqrt2_attn_v, split_log_sqrt2  # noqa: E402
from vqz.pipelines import adapter_for  # noqa: E402
from vqz.quantizer import Quantizer  # noqa: E402


def _vit(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
                             num_classes=10).eval()


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


@pytest.fixture(scope="module")
def vit_and_quantized():
    model = _vit()
    calib = [_images(8, s) for s in range(4)]
    return model, vqz.quantize(copy.deepcopy(model), "vit-w8a8", calib=calib), calib


@pytest.mark.parametrize("qk_norm", [False, True])
@torch.no_grad()
def test_quant_attention_equals_timm_with_quantization_off(qk_norm):
    torch.manual_seed(0)
    attn = Attention(64, num_heads=4, qkv_bias=True, qk_norm=qk_norm,
                     norm_layer=torch.nn.LayerNorm).eval()
    cfg = vqz.config.get_preset("vit-w8a8").attn
    q = QuantAttention(attn, cfg.operands, cfg.probs)
    q.act_enabled = False
    x = torch.randn(2, 17, 64)
    mask = torch.rand(17, 17) > 0.2
    mask.fill_diagonal_(True)
    for kwargs in ({}, {"attn_mask": mask}, {"is_causal": True}):
        assert (q(x, **kwargs) - attn(x, **kwargs)).abs().max() <= 1e-5
    assert q.qkv is attn.qkv and q.proj is attn.proj


def test_log_sqrt2_reparam_equals_dequantized_product():
    torch.manual_seed(0)
    probs = torch.randn(2, 4, 33, 33).mul(3).softmax(-1)
    v = torch.randn(2, 4, 33, 16)
    for bits in (4, 6, 8):
        quantizer = Quantizer(vqz.QuantSpec(f"logsqrt2:{bits}")).fit(probs.reshape(-1, 33))
        codes = quantizer.quantize(probs)
        reference = quantizer.dequantize(codes) @ v
        out = log_sqrt2_attn_v(codes["codes"], codes["scale"], v, bits)
        assert torch.allclose(out, reference, rtol=1e-5, atol=1e-6)
        # every code lands in exactly one log2 part, with the same value (√2 on odd codes)
        even, odd = split_log_sqrt2(codes["codes"], bits)
        log2 = get_format(f"log2:{bits}")
        both = log2.decode(even) + log2.decode(odd) * math.sqrt(2)
        assert torch.allclose(both, get_format(f"logsqrt2:{bits}").decode(codes["codes"]),
                              rtol=1e-6, atol=0)


@torch.no_grad()
def test_vit_w8a8_quantizes_attention_products(vit_and_quantized):
    model, q, _ = vit_and_quantized
    x = _images(8, 100)
    assert sqnr(q(x), model(x)) >= 25.0
    attns = [m for m in q.modules() if isinstance(m, QuantAttention)]
    assert len(attns) == len(q.blocks) == 2
    for block in q.blocks:
        a = block.attn
        assert isinstance(a, QuantAttention) and isinstance(a.qkv, QuantLinear)
        assert isinstance(a.proj, QuantLinear)
        # q, k, v, and the softmax probabilities, all calibrated
        assert len(a.act_quantizers()) == 4 and all(t.calibrated for t in a.act_quantizers())
        assert a.probs_quantizer.spec.format == "logsqrt2:8"
    assert not isinstance(q.head, QuantLinear) and not isinstance(q.patch_embed.proj, QuantLinear)


@torch.no_grad()
def test_vit_w4a4_is_finite_and_worse(vit_and_quantized):
    model, q8, calib = vit_and_quantized
    q4 = vqz.quantize(copy.deepcopy(model), "vit-w4a4", calib=calib)
    x = _images(8, 100)
    out4 = q4(x)
    assert torch.isfinite(out4).all()
    assert sqnr(out4, model(x)) < sqnr(q8(x), model(x)) - 5


@torch.no_grad()
def test_vit_save_load_round_trip(vit_and_quantized, tmp_path):
    _, q, _ = vit_and_quantized
    path = vqz.save(q, tmp_path / "vit.safetensors")
    fresh = vqz.load(_vit(seed=1), path)
    x = _images(4, 7)
    assert torch.equal(fresh(x), q(x))
    assert [p.kind for p in vqz.api.quant_state(fresh).plan.layers].count("Attention") == 2


def test_summary_lists_attention_layers(vit_and_quantized):
    _, q, _ = vit_and_quantized
    rows = {r["name"]: r for r in vqz.summary(q)}
    for i in range(2):
        row = rows[f"blocks.{i}.attn"]
        assert row["type"] == "Attention" and row["status"] == "quantized"
        assert "logsqrt2:8" in row["act"] and "int8" in row["act"]
        assert rows[f"blocks.{i}.attn.qkv"]["status"] == "quantized"
    assert rows["head"]["status"].startswith("full precision")
    assert "Attention" in str(vqz.summary(q))


def test_attention_is_opt_in_and_adapter_claims_vit():
    model = _vit()
    assert adapter_for(model).name == "timm-vit"
    for preset in ("w8a8", "w4a4-svd", "fp8"):
        assert vqz.config.get_preset(preset).attn is None
    # a config object is used as given: the generic w8a8, not the ViT recipe its name resolves to
    q = vqz.quantize(copy.deepcopy(model), vqz.config.get_preset("w8a8"))
    assert not any(isinstance(m, QuantAttention) for m in q.modules())
    cfg = vqz.config.get_preset("vit-w8a8")
    assert vqz.QuantConfig.from_dict(cfg.to_dict()) == cfg
    excluded = vqz.quantize(copy.deepcopy(model), "vit-w8a8", calib=[_images(2, 0)],
                            exclude=["blocks.1.attn"])
    assert isinstance(excluded.blocks[0].attn, QuantAttention)
    assert not isinstance(excluded.blocks[1].attn, QuantAttention)
