"""Every timm vision-transformer family vqz adapts (ViT, DeiT, DeiT-III, Swin, EVA, BEiT), built from
tiny configs with random weights."""
import copy

import pytest
import torch

timm = pytest.importorskip("timm")

import vqz  # noqa: E402
from vqz.algorithms.repq import channel_balance, fold_into_layernorm  # noqa: E402
from vqz.eval.images import sqnr  # noqa: E402
from vqz.nn import QuantAttentionBase, QuantLinear, attention_wrapper  # noqa: E402
from vqz.pipelines import adapter_for  # noqa: E402

SMALL = dict(pretrained=False, img_size=32, num_classes=10)
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", dict(patch_size=4, embed_dim=64, depth=2, num_heads=2)),
    "deit": ("deit_tiny_distilled_patch16_224", dict(patch_size=4, embed_dim=64, depth=2, num_heads=2)),
    "deit3": ("deit3_small_patch16_224", dict(patch_size=4, embed_dim=64, depth=2, num_heads=2)),
    # 16x16 then 8x8 tokens in windows of 4: both stages shift their windows (the -100 mask runs)
    "swin": ("swin_tiny_patch4_window7_224", dict(patch_size=2, embed_dim=32, depths=(2, 2),
                                                 num_heads=(2, 4), window_size=4)),
    # EVA-02: rotary embeddings, SwiGLU MLP with its inner norm, q/v biases on the attention
    "eva": ("eva02_tiny_patch14_224", dict(patch_size=4, embed_dim=64, depth=2, num_heads=2,
                                           scale_mlp=True)),
    "beit": ("beit_base_patch16_224", dict(patch_size=4, embed_dim=64, depth=2, num_heads=2)),
}
ADAPTERS = {"vit": "timm-vit", "deit": "timm-vit", "deit3": "timm-vit", "swin": "timm-swin",
            "eva": "timm-eva", "beit": "timm-beit"}


def build(family: str, seed: int = 0) -> torch.nn.Module:
    name, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    model = timm.create_model(name, **SMALL, **kwargs).eval()
    with torch.no_grad():  # timm zero-initialises some biases and scales: make every term count
        for n, p in model.named_parameters():
            if n.endswith(("q_bias", "v_bias", "relative_position_bias_table")):
                p.normal_(0, 0.5)
            if n.endswith(("gamma_1", "gamma_2", "ls1.gamma", "ls2.gamma")):
                p.uniform_(0.5, 1.0)
    return model


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def attention_modules(model) -> dict:
    return {n: m for n, m in model.named_modules() if attention_wrapper(m) is not None}


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_wrappers_equal_timm_with_quantization_off(family):
    model = build(family)
    found = attention_modules(model)
    assert len(found) == (4 if family == "swin" else 2)
    spec = vqz.config.get_preset("vit-w8a8").attn
    wrapped = copy.deepcopy(model)
    for name, module in attention_modules(wrapped).items():
        wrapper = attention_wrapper(module)(module, spec.operands, spec.probs)
        wrapper.act_enabled = False
        parent, _, attr = name.rpartition(".")
        setattr(wrapped.get_submodule(parent), attr, wrapper)
    x = images(4, 1)
    assert (wrapped(x) - model(x)).abs().max() <= 1e-5


@torch.no_grad()
def test_swin_window_attention_with_its_shift_mask():
    block = build("swin").layers[0].blocks[1]  # the shifted-window block
    assert any(block.shift_size) and block.attn_mask is not None
    attn = block.attn
    spec = vqz.config.get_preset("vit-w8a8").attn
    wrapper = attention_wrapper(attn)(attn, spec.operands, spec.probs)
    wrapper.act_enabled = False
    x = torch.randn(2 * block.attn_mask.shape[0], block.window_area, 32)
    assert (wrapper(x, mask=block.attn_mask) - attn(x, mask=block.attn_mask)).abs().max() <= 1e-5
    assert (wrapper(x) - attn(x)).abs().max() <= 1e-5
    # the mask matters: a wrapper that ignored it would fail the first check
    assert (attn(x, mask=block.attn_mask) - attn(x)).abs().max() > 1e-2


@pytest.fixture(scope="module")
def quantized():
    """{family: (model, its w8a8-quantized copy)}, calibrated on 8 random images."""
    out = {}
    for family in FAMILIES:
        model = build(family)
        out[family] = model, vqz.quantize(copy.deepcopy(model), "w8a8",
                                          calib=[images(4, 10), images(4, 11)])
    return out


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_w8a8_quantizes_every_family(family, quantized):
    model, q = quantized[family]
    assert adapter_for(model).name == ADAPTERS[family]
    x = images(8, 100)
    out = q(x)
    assert torch.isfinite(out).all()
    assert sqnr(out, model(x)) >= 25.0
    wrappers = [m for m in q.modules() if isinstance(m, QuantAttentionBase)]
    assert len(wrappers) == len(attention_modules(model))
    for w in wrappers:
        # q·scale, k, post-Softmax probabilities (log√2) and v, all calibrated
        assert len(w.act_quantizers()) == 4 and all(t.calibrated for t in w.act_quantizers())
        assert w.probs_quantizer.spec.format == "logsqrt2:8"
        assert isinstance(w.qkv, QuantLinear) and isinstance(w.proj, QuantLinear)
    summary = vqz.summary(q)
    assert summary.recipe.startswith("vit-w8a8") and "'w8a8'" in summary.recipe
    assert not isinstance(q.patch_embed.proj, QuantLinear)


@pytest.mark.parametrize("family", ["swin", "eva", "beit"])
@torch.no_grad()
def test_save_load_keeps_adopted_tables_and_biases(family, quantized, tmp_path):
    _, q = quantized[family]
    fresh = vqz.load(build(family, seed=1), vqz.save(q, tmp_path / "q.safetensors"))
    x = images(3, 5)
    assert torch.equal(fresh(x), q(x))


# Which LayerNorm -> consumer pairs RepQ folds: everywhere norm2 -> MLP input; norm1 -> qkv where
# qkv carries its own bias (not EVA/BEiT, whose q/v biases sit on the attention module).
FOLDS_NORM1 = {"vit": True, "deit": True, "deit3": True, "swin": True, "eva": False, "beit": False}


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_repq_fold_preserves_the_function(family):
    model = build(family)
    pairs = adapter_for(model).norm_consumers(model)
    blocks = 4 if family == "swin" else 2
    assert sum(n.endswith("norm2") for n in pairs) == blocks
    assert sum(n.endswith("norm1") for n in pairs) == (blocks if FOLDS_NORM1[family] else 0)
    if family == "eva":
        assert all(len(c) == 2 for c in pairs.values())  # SwiGLU: fc1_g and fc1_x
    x = images(8, 3)
    ranges = {}

    def record(name):
        def hook(module, args, out):
            ranges[name] = out.flatten(0, -2).aminmax(dim=0)
        return hook
    hooks = [model.get_submodule(n).register_forward_hook(record(n)) for n in pairs]
    ref = model(x)
    for h in hooks:
        h.remove()
    for norm, consumers in pairs.items():
        lo, hi = ranges[norm]
        divisor, shift = channel_balance(lo * 3, hi, bits=4)  # skewed ranges: a non-trivial shift
        fold_into_layernorm(model.get_submodule(norm), [model.get_submodule(c) for c in consumers],
                            divisor, shift)
    assert (model(x) - ref).abs().max() <= 1e-4


def test_swin_blocks_that_pad_their_windows_are_not_folded():
    name, kwargs = FAMILIES["swin"]
    torch.manual_seed(0)
    model = timm.create_model(name, **dict(SMALL, img_size=20), **dict(kwargs, window_size=6)).eval()
    pairs = adapter_for(model).norm_consumers(model)
    # 10x10 tokens in windows of 6 pad; the 5x5 stage shrinks its window to 5 and does not
    assert not any(n.startswith("layers.0.") and n.endswith("norm1") for n in pairs)
    assert "layers.1.blocks.0.norm1" in pairs


@pytest.mark.parametrize("family", ["eva", "beit"])
@torch.no_grad()
def test_qkv_read_through_its_weight_stays_float_without_attention(family):
    model = build(family)
    q = vqz.quantize(copy.deepcopy(model), vqz.config.get_preset("w8a8"))  # no attn: not wrapped
    rows = {r["name"]: r for r in vqz.summary(q)}
    assert "reads this layer's weight directly" in rows["blocks.0.attn.qkv"]["status"]
    assert rows["blocks.0.attn.proj"]["status"] == "quantized"
    x = images(4, 2)
    assert sqnr(q(x), model(x)) >= 25.0


@pytest.mark.parametrize("family", ["eva", "beit"])
@torch.no_grad()
def test_qkv_read_through_its_weight_gets_input_statistics(family):
    model = build(family)
    # GPTQ needs qkv's input rows, though timm's attention never calls qkv (F.linear on its weight)
    q = vqz.quantize(copy.deepcopy(model), "w8a8", calib=[images(4, 10)], gptq=True)
    assert isinstance(q.blocks[0].attn.qkv, QuantLinear)
    x = images(4, 2)
    assert sqnr(q(x), model(x)) >= 25.0
