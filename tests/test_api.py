import copy

import pytest
import torch
from torch import nn

import vqz
from vqz.config import preset_family
from vqz.eval.images import sqnr
from vqz.nn import QuantConv2d, QuantLinear


def _batches(n=4, shape=(16, 128), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _sqnr_of(model, preset, x, **kw):
    ref = model(x)
    q = vqz.quantize(copy.deepcopy(model), preset, **kw)
    with torch.no_grad():
        out = q(x)
    assert torch.isfinite(out).all()
    return sqnr(out, ref)


@torch.no_grad()
def test_w8a8_keeps_35db_and_w4a4_is_worse(mlp):
    x = torch.randn(64, 128)
    s8 = _sqnr_of(mlp, "w8a8", x)
    s4 = _sqnr_of(mlp, "w4a4", x)
    assert s8 >= 35.0
    assert 5.0 < s4 < s8 - 10


# family recipes (vit-*, depth-*) refuse models of no family: tests/test_family_presets.py
@pytest.mark.parametrize("preset", [p for p in vqz.presets() if preset_family(p) is None])
def test_every_preset_quantizes_linear_and_conv(convnet, preset):
    x = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        ref = convnet(x)
    q = vqz.quantize(copy.deepcopy(convnet), preset, calib=[torch.rand(2, 3, 12, 12) for _ in range(3)])
    assert isinstance(q.head, QuantLinear) and isinstance(q.stem, QuantConv2d)
    with torch.no_grad():
        out = q(x)
    assert torch.isfinite(out).all()
    floor = 30.0 if preset in ("w8a8", "w8a8-static", "fp8") else 8.0
    assert sqnr(out, ref) > floor


def test_returns_obj_and_summary_lists_every_weight_layer(convnet):
    result = vqz.quantize(convnet, "w4a8")
    assert result is convnet
    rows = {r["name"]: r for r in vqz.summary(convnet)}
    assert rows["head"]["weight"] == "int4 per-group" and rows["head"]["group"] == "64"
    assert rows["head"]["act"] == "int8 per-token asym" and rows["head"]["calib"] == "dynamic"
    assert rows["seq"]["status"] == "full precision: unsupported layer type"
    assert rows["embed"]["status"] == "full precision: unsupported layer type"
    assert isinstance(convnet.seq, nn.Conv1d) and isinstance(convnet.embed, nn.Embedding)
    assert "head" in str(vqz.summary(convnet))


def test_static_preset_calibrates_activation_scales(mlp):
    calib = _batches()
    vqz.quantize(mlp, "w8a8-static", calib=calib)
    scale = mlp.fc1.act_quantizer.scale
    assert scale.numel() == 1 and scale.item() > 0
    # minmax-free MSE observer: the range is at most the calibration data's range
    lo = min(b.min().item() for b in calib)
    hi = max(b.max().item() for b in calib)
    assert scale.item() * 255 <= (hi - lo) * 1.0001
    assert vqz.summary(mlp)[0]["calib"] == "mse"


@pytest.mark.parametrize("form", ["tensors", "tuples", "dicts", "generator", "callable"])
def test_calibration_input_forms(mlp, form):
    batches = _batches()
    seen = []
    if form == "tensors":
        calib = batches
    elif form == "tuples":
        calib = [(b,) for b in batches]
    elif form == "dicts":
        calib = [{"x": b} for b in batches]
    elif form == "generator":
        calib = (b for b in batches)
    else:
        def calib(model):
            seen.append(model)
            for b in batches:
                model(b)
    vqz.quantize(mlp, "w4a4-svd", calib=calib, exclude=["fc2"])
    assert mlp.fc1.smooth is not None and mlp.fc1.rank == 32
    if form == "callable":
        assert seen == [mlp]  # one pass for the smoothing statistics; activations are dynamic
    assert not isinstance(mlp.fc2, QuantLinear)


def test_svd_branch_beats_naive_w4a4_on_outliers(mlp):
    # Outlier input channels, as large models have: smoothing + the branch must absorb them.
    gain = torch.ones(128)
    gain[torch.randperm(128)[:4]] = 40.0
    calib = [b * gain for b in _batches(8)]
    x = torch.randn(64, 128) * gain
    naive = _sqnr_of(mlp, "w4a4", x)
    svd = _sqnr_of(mlp, "w4a4-svd", x, calib=calib)
    assert svd > naive + 4


def test_rules_and_exclusions(mlp):
    cfg = vqz.QuantConfig(
        "mix", weight=vqz.QuantSpec("int8", "channel"), act=None,
        rules=[vqz.LayerRule("fc2", weight=vqz.QuantSpec("int4", "group", 32)),
               vqz.LayerRule("*", types=("Conv2d",), skip=True)])
    vqz.quantize(mlp, cfg)
    assert mlp.fc1.weight_spec.format == "int8" and mlp.fc1.act_quantizer is None
    assert mlp.fc2.weight_spec.format == "int4" and mlp.fc2.weight_spec.group_size == 32


def test_rule_can_unskip_what_an_earlier_rule_skipped(mlp):
    cfg = vqz.config.get_preset("w8a8").with_overrides(
        rules=(vqz.LayerRule("fc*", skip=True), vqz.LayerRule("fc2", skip=False)))
    vqz.quantize(mlp, cfg)
    assert not isinstance(mlp.fc1, QuantLinear) and isinstance(mlp.fc2, QuantLinear)
    assert {r["name"]: r["status"] for r in vqz.summary(mlp)}["fc1"] == "full precision: excluded by a rule"


def test_overrides_change_group_size_and_rank(mlp):
    vqz.quantize(mlp, "w4a8", group_size=32)
    assert mlp.fc1.weight_spec.group_size == 32
    assert mlp.fc1.qweight.scale.shape == (512, 4)


def test_group_size_not_dividing_channels_pads_the_last_group():
    torch.manual_seed(0)
    layer = nn.Linear(100, 8)  # 100 = 64 + 36
    q = vqz.quantize(nn.Sequential(layer), "w4a16").__getitem__(0)
    padded = nn.Linear(128, 8)
    with torch.no_grad():
        padded.weight.zero_()
        padded.weight[:, :100] = layer.weight
        padded.bias.copy_(layer.bias)
    qp = vqz.quantize(nn.Sequential(padded), "w4a16").__getitem__(0)
    assert torch.equal(q.dequantized_weight(), qp.dequantized_weight()[:, :100])


def test_shared_module_is_quantized_once_under_every_name():
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    vqz.quantize(model, "w8a8")
    assert isinstance(model[0], QuantLinear) and model[0] is model[2]


def test_training_flags_are_kept(mlp):
    mlp.train()
    vqz.quantize(mlp, "w8a8-static", calib=_batches())
    assert mlp.training and mlp.fc1.training


# ---- bad input -----------------------------------------------------------------------------

def test_unknown_preset_lists_presets(mlp):
    with pytest.raises(ValueError, match="w4a4-svd"):
        vqz.quantize(mlp, "w3a3")


@pytest.mark.parametrize("fmt", ["int9", "int1", "uint12", "e5m3"])
def test_bits_out_of_range(fmt):
    with pytest.raises(ValueError, match="bits|2..8|range"):
        vqz.QuantSpec(fmt, "channel")


def test_bad_group_size():
    with pytest.raises(ValueError, match="group_size"):
        vqz.QuantSpec("int4", "group", 0)
    with pytest.raises(ValueError, match="group_size"):
        vqz.QuantSpec("int4", "group")


def test_unknown_override(mlp):
    with pytest.raises(ValueError, match="rankk.*valid"):
        vqz.quantize(mlp, "w8a8", rankk=3)


def test_static_preset_without_calibration(mlp, guard):
    check = guard(mlp)
    with pytest.raises(ValueError, match="calib"):
        vqz.quantize(mlp, "w8a8-static")
    check()


def test_non_module_object():
    with pytest.raises(TypeError, match="nn.Module"):
        vqz.quantize([1, 2, 3], "w8a8")
    with pytest.raises(TypeError, match="config"):
        vqz.quantize(nn.Linear(4, 4), 8)


def test_unsupported_type_in_rule():
    with pytest.raises(ValueError, match="Conv3d"):
        vqz.LayerRule("*", types=("Conv3d",))


def test_nan_in_calibration_names_the_layer_and_leaves_the_model(mlp, guard):
    mlp.train()
    check = guard(mlp)
    bad = _batches()
    bad[2][3, 5] = float("nan")
    with pytest.raises(ValueError, match="'fc1'.*NaN"):
        vqz.quantize(mlp, "w8a8-static", calib=bad)
    check()


def test_failing_forward_loop_leaves_the_model_untouched(convnet, guard):
    check = guard(convnet)

    def loop(model):
        model(torch.rand(1, 3, 8, 8))
        raise RuntimeError("user loop failed")
    with pytest.raises(RuntimeError, match="user loop failed"):
        vqz.quantize(convnet, "w8a8-static", calib=loop)
    check()
    # and the same model quantizes fine afterwards
    vqz.quantize(convnet, "w8a8")


def test_layers_the_calibration_never_reaches(guard):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.used(x)
    model = Branchy()
    check = guard(model)
    with pytest.raises(ValueError, match="unused"):
        vqz.quantize(model, "w8a8-static", calib=[torch.randn(4, 8)])
    check()


def test_empty_calibration_and_prompts_on_a_module(mlp, guard):
    check = guard(mlp)
    with pytest.raises(ValueError, match="empty"):
        vqz.quantize(mlp, "w8a8-static", calib=[])
    with pytest.raises(TypeError, match="pipeline"):
        vqz.quantize(mlp, "w8a8-static", calib=["a photo of a cat"])
    check()


def test_quantizing_twice_is_refused(mlp):
    vqz.quantize(mlp, "w8a8")
    with pytest.raises(ValueError, match="already quantized"):
        vqz.quantize(mlp, "w8a8")


def test_model_without_quantizable_layers():
    with pytest.raises(ValueError, match="no layer"):
        vqz.quantize(nn.Sequential(nn.ReLU()), "w8a8")


def test_rank_larger_than_the_layer_allows(mlp, guard):
    check = guard(mlp)
    with pytest.raises(ValueError, match="rank.*fc1"):
        vqz.quantize(mlp, "w4a4-svd", calib=_batches(), rank=200)  # fc1 is 128 -> 512
    check()


def test_preset_rank_skips_the_branch_on_layers_smaller_than_it():
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10))
    vqz.quantize(model, "w4a4-svd", calib=[torch.randn(8, 64)])
    assert model[0].rank == 32 and model[2].rank == 0 and model[2].lora_down is None
    assert [r["rank"] for r in vqz.summary(model)] == [32, 0]


def test_svd_quantization_is_reproducible():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256))
    calib = [torch.randn(32, 256)]
    a = vqz.quantize(copy.deepcopy(model), "w4a4-svd", calib=calib, alpha=0.5)
    torch.randn(100)  # the global RNG moves on between the two runs
    b = vqz.quantize(copy.deepcopy(model), "w4a4-svd", calib=calib, alpha=0.5)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
