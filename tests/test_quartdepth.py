"""QuartDepth: activation polishing, weight compensation, weight reconstruction, depth presets."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import vqz
from vqz.algorithms.adaround import capture_block_io, reconstruct_block
from vqz.algorithms.quartdepth import compensate_layer, compensated_weight, polish_alpha
from vqz.eval.images import sqnr
from vqz.nn import QuantLinear, QuantWeight
from vqz.nn.polish import PolishedQuantLinear, polish, unpolish

K, N = 64, 32


def heavy_tailed(n: int, seed: int) -> torch.Tensor:
    """Student-t rows whose channels span two decades of scale (depth backbones look like this)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, K, generator=g) / torch.rand(n, K, generator=g).clamp_min(0.05).sqrt()
    return t * torch.logspace(-1, 1, K)


def test_polish_round_trips():
    torch.manual_seed(0)
    x = torch.randn(300, K) * torch.logspace(-3, 3, K)
    x[0] = 0.0
    alpha = torch.rand(K) * 2 + 1e-3
    p = polish(x, alpha)
    assert torch.allclose(unpolish(p, alpha), x, rtol=1e-5, atol=1e-7)
    assert torch.equal(polish(-x, alpha), -p) and (p[0] == 0).all()
    assert (p.abs() <= (x.abs() / alpha) / torch.log(torch.tensor(2.0)) + 1e-6).all()
    # α: the per-channel percentile of |x|, floored away from zero for dead channels
    rows = heavy_tailed(1000, 1)
    rows[:, 3] = 0
    a = polish_alpha(rows, 90.0)
    assert torch.allclose(a[:3], torch.quantile(rows[:, :3].abs(), 0.9, dim=0))
    assert a[3] > 0


def _layer_error(layer, linear, x) -> float:
    with torch.no_grad():
        return sqnr(layer(x), linear(x))


@pytest.mark.parametrize("bits,gain", [(8, 5.0), (4, 0.5)])
def test_polishing_beats_uniform(bits, gain):
    torch.manual_seed(0)
    linear = nn.Linear(K, N)
    calib, test = heavy_tailed(2048, 2), heavy_tailed(2048, 3)
    spec = vqz.QuantSpec(f"int{bits}", "tensor", symmetric=False, observer="mse")
    plain, polished = (cls.from_float(linear, None, spec) for cls in (QuantLinear, PolishedQuantLinear))
    polished.act_quantizer.alpha.copy_(polish_alpha(calib))
    for layer in (plain, polished):
        layer.observe(calib)
        layer.finalize_activations()
    assert _layer_error(polished, linear, test) >= _layer_error(plain, linear, test) + gain


def test_compensated_weight_is_the_damped_least_squares_solution():
    torch.manual_seed(0)
    w, x = torch.randn(N, K), heavy_tailed(512, 4)
    x_hat = x + 0.1 * torch.randn_like(x)
    assert torch.equal(compensated_weight(w, x, x), w)  # nothing to compensate
    damp = 0.01
    delta = compensated_weight(w, x, x_hat, damp) - w
    h = x_hat.T @ x_hat
    lhs = (h + damp * h.diagonal().mean() * torch.eye(K)) @ delta.T
    assert torch.allclose(lhs, x_hat.T @ ((x - x_hat) @ w.T), rtol=1e-3, atol=1e-2)


def correlated(n: int, seed: int, rank: int = 16) -> torch.Tensor:
    """Heavy-tailed rows driven by a few shared factors, as real features are: one channel's
    quantization error is then partly predictable from the others, which compensation exploits."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(rank, K, generator=torch.Generator().manual_seed(99))
    z = torch.randn(n, rank, generator=g) / torch.rand(n, rank, generator=g).clamp_min(0.05).sqrt()
    return z @ mix * torch.logspace(-1, 1, K) + 0.05 * torch.randn(n, K, generator=g)


@pytest.mark.parametrize("w_bits", [4, 8])
def test_compensation_reduces_layer_output_error(w_bits):
    torch.manual_seed(0)
    linear = nn.Linear(K, N)
    calib, test = correlated(2048, 5), correlated(2048, 6)
    w_spec = vqz.QuantSpec(f"int{w_bits}", "channel", observer="mse")
    a_spec = vqz.QuantSpec("int4", "tensor", symmetric=False, observer="mse")
    plain = QuantLinear.from_float(linear, w_spec, a_spec)
    plain.observe(calib)
    plain.finalize_activations()
    compensated = copy.deepcopy(plain)
    target = compensate_layer(compensated, linear.weight, calib)
    assert isinstance(compensated.qweight, QuantWeight) and target.shape == (N, K)
    before, after = _layer_error(plain, linear, test), _layer_error(compensated, linear, test)
    assert after >= before + 2.0, (before, after)  # on inputs it never saw


class MlpBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(K), nn.Linear(K, 4 * K), nn.GELU(), \
            nn.Linear(4 * K, K)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def test_reconstruction_reduces_block_output_error():
    torch.manual_seed(0)
    model = nn.Sequential(MlpBlock()).eval()
    batches = [torch.randn(16, 10, K) for _ in range(4)]
    cfg = vqz.QuantConfig("rtn-w4a8", weight=vqz.QuantSpec("int4", "channel", observer="minmax"),
                          act=vqz.QuantSpec("int8", "tensor", symmetric=False))
    io = capture_block_io(model, ["0"], lambda: [model(x) for x in batches])
    q = vqz.quantize(copy.deepcopy(model), cfg, calib=batches)
    rtn_codes = q[0].fc1.qweight.codes.clone()
    before, after = reconstruct_block(q[0], io["0"], {"fc1": model[0].fc1.weight,
                                                      "fc2": model[0].fc2.weight}, steps=200)
    assert after <= 0.7 * before, (before, after)
    # still an INT4 weight with the round-to-nearest scales; only rounding directions moved by <= 1
    assert isinstance(q[0].fc1.qweight, QuantWeight) and q[0].fc1.qweight.spec == cfg.weight
    moved = (q[0].fc1.qweight().float() - QuantWeight.from_float(model[0].fc1.weight, cfg.weight)())
    assert moved.abs().max() <= q[0].fc1.qweight.scale.max() + 1e-6 and not torch.equal(
        q[0].fc1.qweight.codes, rtn_codes)
    with torch.no_grad():  # the learned rounding holds on new inputs too
        x = torch.randn(16, 10, K)
        fresh = vqz.quantize(copy.deepcopy(model), cfg, calib=batches)
        assert sqnr(q(x), model(x)) > sqnr(fresh(x), model(x))


# ---------------------------------------------------------------- end to end on depth models

sys.path.insert(0, str(Path(__file__).parent))
from test_depth import tiny_depth_anything, tiny_dpt  # noqa: E402


def _calib(size, n=3):
    g = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(2, 3, size, size, generator=g)} for _ in range(n)]


@pytest.mark.parametrize("build", [tiny_depth_anything, tiny_dpt])
def test_depth_w8a8_end_to_end(build, tmp_path):
    from vqz.pipelines.depth import depth_forward

    model, size = build()
    x = torch.randn(2, 3, size, size)
    q = vqz.quantize(build()[0], "w8a8", calib=_calib(size))
    out = depth_forward(q, x)
    assert torch.isfinite(out).all() and sqnr(out, depth_forward(model, x)) >= 25.0
    assert vqz.summary(q).recipe.startswith("depth-w8a8")
    polished = [m for m in q.modules() if isinstance(m, PolishedQuantLinear)]
    assert len(polished) >= 4 * 6 and all(m.act_quantizer.calibrated for m in polished)
    assert all((m.act_quantizer.alpha > 0).all() and not torch.equal(m.act_quantizer.alpha,
               torch.ones_like(m.act_quantizer.alpha)) for m in polished)
    loaded = vqz.load(type(model)(model.config).eval(), vqz.save(q, tmp_path / "q.safetensors"))
    assert torch.equal(depth_forward(loaded, x), out)


def test_depth_w4a8_end_to_end():
    from vqz.pipelines.depth import depth_forward

    model, size = tiny_dpt()
    calib, x = _calib(size), torch.randn(2, 3, size, size)
    ref = depth_forward(model, x)
    q = vqz.quantize(tiny_dpt()[0], "w4a8", calib=calib, reconstruct=30)
    assert vqz.api.quant_state(q).config.name == "depth-w4a8"
    out = depth_forward(q, x)
    assert torch.isfinite(out).all()
    naive = vqz.quantize(tiny_dpt()[0], "depth-w4a8", calib=calib, polish=False, compensate=False,
                         reconstruct=0)
    assert sqnr(out, ref) >= sqnr(depth_forward(naive, x), ref) - 0.5


def test_reconstruct_needs_named_blocks():
    mlp = nn.Sequential(nn.Linear(8, 8))
    cfg = vqz.config.get_preset("w8a8-static").with_overrides(reconstruct=10)
    with pytest.raises(ValueError, match="knows no blocks of Sequential.*reconstruct=0"):
        vqz.quantize(mlp, cfg, calib=[torch.randn(4, 8)])
    assert type(mlp[0]) is nn.Linear
