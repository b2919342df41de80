import math

import pytest
import torch
import torch.nn.functional as F

from vqz.config import QuantSpec
from vqz.quantizer import Quantizer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def sqnr(x, q):
    return 10 * math.log10(x.pow(2).sum() / (x - q).pow(2).sum())


def mse(x, q):
    return (x - q).pow(2).mean().item()


def heavy_tailed(*shape):
    return torch.distributions.StudentT(3.0).sample(shape)


def calibrated(spec, *batches):
    q = Quantizer(spec)
    for b in batches:
        q.observe(b)
    q.finalize()
    return q


def test_int8_per_channel_weight():
    w = torch.randn(64, 256) * torch.rand(64, 1) * 3
    q = Quantizer(QuantSpec("int8", "channel")).fit(w)
    assert q.scale.shape == (64,)
    assert torch.equal(q.scale, w.abs().amax(1) * (1 / 127))  # times the reciprocal, as on CUDA
    assert sqnr(w, q(w)) >= 38


def test_mse_observer_beats_minmax_on_heavy_tails():
    w = heavy_tailed(64, 256)
    errors = {}
    for observer in ("minmax", "mse"):
        q = Quantizer(QuantSpec("int4", "group", 64, observer=observer)).fit(w)
        assert q.scale.shape == (64, 4)
        errors[observer] = mse(w, q(w))
    assert errors["mse"] < 0.9 * errors["minmax"]


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_observer_clips_outliers(symmetric):
    x = torch.randn(512, 64)
    x[3, 7], x[100, 1] = 40.0, -30.0
    spec = dict(symmetric=symmetric)
    p = calibrated(QuantSpec("int8", observer="percentile", percentile=99.9, **spec), x)
    m = calibrated(QuantSpec("int8", **spec), x)
    assert p.scale < 0.25 * m.scale
    if symmetric:
        expected = torch.quantile(x.abs().flatten(), 0.999) / 127
        assert p.scale == pytest.approx(expected.item(), rel=0.02)


def test_dynamic_per_token_int8():
    x = torch.randn(4, 16, 64) * torch.rand(4, 16, 1) * 10
    q = Quantizer(QuantSpec("int8", "token", dynamic=True)).quantize(x)
    assert q["codes"].dtype == torch.int8 and q["codes"].shape == x.shape
    assert (q["codes"].abs().amax(-1) == 127).all()
    assert q["scale"].shape == (4, 16, 1)
    assert torch.equal(q["scale"], x.abs().amax(-1, keepdim=True) * (1 / 127))


ELEMENT_FORMATS = ["int4", "int8", "e4m3", "e2m1", "nf4"]
SCALE_SOURCES = [("tensor", False), ("tensor", True), ("channel", False), ("channel", True),
                 ("token", True), ("group", False), ("group", True)]


@pytest.mark.parametrize("granularity,dynamic", SCALE_SOURCES)
@pytest.mark.parametrize("fmt,symmetric", [(f, True) for f in ELEMENT_FORMATS]
                         + [("int4", False), ("int8", False)])
def test_dequantize_quantize_equals_forward(fmt, symmetric, granularity, dynamic):
    group = 32 if granularity == "group" else None
    spec = QuantSpec(fmt, granularity, group, symmetric=symmetric, dynamic=dynamic, axis=-1)
    q = Quantizer(spec)
    if not dynamic:
        q.observe(torch.randn(3, 5, 100))
        q.observe(torch.randn(2, 100))
        q.finalize()
    x = torch.randn(3, 5, 100) * 1.2  # partly outside the calibrated range
    y = q(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(q.dequantize(q.quantize(x)), y)
    assert not torch.equal(y, x) and sqnr(x, y) > 8


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_block_formats(fmt, dynamic):
    x = torch.randn(6, 100)
    q = Quantizer(QuantSpec(fmt, dynamic=dynamic)).fit(x)
    assert q.calibrated and dict(q.state_dict()) == {}
    y = q(x)
    assert torch.equal(y, q.fmt.round(x))
    assert torch.equal(q.dequantize(q.quantize(x)), y)
    assert sqnr(x, y) > 15


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_partial_group_equals_zero_padding(observer, symmetric):
    spec = QuantSpec("int4", "group", 32, symmetric=symmetric, observer=observer, percentile=99.0)
    x = heavy_tailed(7, 100)
    padded = F.pad(x, (0, 28))
    weight, weight_padded = Quantizer(spec).fit(x), Quantizer(spec).fit(padded)
    assert torch.equal(weight(x), weight_padded(padded)[:, :100])
    act, act_padded = calibrated(spec, x), calibrated(spec, padded)
    assert act.scale.shape == (4,)
    assert torch.equal(act(x), act_padded(padded)[:, :100])
    dyn = Quantizer(QuantSpec("int4", "group", 32, symmetric=symmetric, dynamic=True))
    assert torch.equal(dyn(x), dyn(padded)[:, :100])
    assert dyn.quantize(x)["scale"].shape == (7, 4)


@pytest.mark.parametrize("spec", [QuantSpec("int8", "channel", axis=-1),
                                  QuantSpec("int4", "group", 16, symmetric=False)])
def test_streaming_minmax_equals_one_batch(spec):
    x = torch.randn(1000, 64) * torch.rand(64) + torch.rand(64)
    streamed = calibrated(spec, *x.chunk(10))
    whole = calibrated(spec, x)
    assert torch.equal(streamed.scale, whole.scale)
    if not spec.symmetric:
        assert torch.equal(streamed.zero_point, whole.zero_point)
        lo, hi = x.view(1000, 4, 16).amin((0, 2)).clamp(max=0), x.view(1000, 4, 16).amax((0, 2))
        assert torch.allclose(whole.scale, (hi - lo) / 15)
        assert torch.equal(whole.zero_point, (-lo / whole.scale).round())


def test_reservoir_is_bounded_and_uniform():
    q = Quantizer(QuantSpec("int8", "channel", axis=-1, observer="percentile"))
    q.reservoir_rows = 64
    for i in range(60):
        q.observe(torch.rand(50, 8) + (i >= 30))  # first half in [0, 1), second half in [1, 2)
        assert q._samples.shape == (8, min(64, 50 * (i + 1)))
    late = (q._samples >= 1).float().mean().item()
    assert 0.3 < late < 0.7
    q.finalize()
    assert q._samples is None and q.scale.shape == (8,)


def test_uncalibrated_static_quantizer_raises():
    q = Quantizer(QuantSpec("int8"))
    assert not q.calibrated
    with pytest.raises(RuntimeError, match="calibrat"):
        q(torch.randn(4, 8))
    with pytest.raises(ValueError, match="nothing was observed"):
        q.finalize()
    assert Quantizer(QuantSpec("int8", "token", dynamic=True)).calibrated


@pytest.mark.parametrize("spec", [
    QuantSpec("int8", "channel"),
    QuantSpec("int4", "group", 32, symmetric=False, observer="mse"),
    QuantSpec("e4m3", "tensor", observer="percentile"),
    QuantSpec("int4", "group", 32, symmetric=False, learnable=True),
])
def test_state_dict_round_trip(spec):
    w = heavy_tailed(16, 96)
    q = Quantizer(spec).fit(w)
    sd = q.state_dict()
    assert set(sd) == ({"scale"} if spec.symmetric else {"scale", "zero_point"})
    fresh = Quantizer(spec)
    fresh.load_state_dict(sd)
    assert fresh.calibrated
    x = heavy_tailed(16, 96)
    assert torch.equal(fresh(x), q(x))
    assert isinstance(fresh.scale, torch.nn.Parameter) == spec.learnable


def test_dynamic_quantizer_has_no_state():
    q = Quantizer(QuantSpec("int8", "token", dynamic=True))
    q.observe(torch.randn(4, 8))
    q.finalize()
    assert dict(q.state_dict()) == {}


def test_straight_through_gradient_is_one():
    q = calibrated(QuantSpec("int4", observer="percentile", percentile=99.0), torch.randn(64, 32))
    x = (torch.randn(64, 32) * 2).requires_grad_()
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_gradients_and_training(symmetric):
    spec = QuantSpec("int4", "channel", symmetric=symmetric, learnable=True)
    w = torch.randn(16, 64) + 0.5
    q = Quantizer(spec).fit(w)
    params = dict(q.named_parameters())
    assert set(params) == ({"scale"} if symmetric else {"scale", "zero_point"})
    x = w * 1.5 + 0.3  # partly outside the calibrated range
    (q(x) - x).pow(2).sum().backward()
    for p in params.values():
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0

    x.requires_grad_()
    q(x).sum().backward()
    v = x.detach() * (1.0 / q.scale.detach()[:, None])  # as the quantizer computes the code domain
    if symmetric:
        clipped = (v < -8) | (v > 7)
    else:
        v = v + q.zero_point.detach()[:, None]
        clipped = (v < 0) | (v > 15)
    assert clipped.any() and not clipped.all()
    # straight through inside the range (to fp32 rounding of scale * (1 / scale)), 0 outside
    assert torch.allclose(x.grad, (~clipped).float(), atol=1e-6) and (x.grad[clipped] == 0).all()

    with torch.no_grad():
        q.scale.mul_(4)  # a deliberately bad init
    opt = torch.optim.Adam(q.parameters(), lr=0.02)
    initial = mse(w, q(w).detach())
    for _ in range(60):
        opt.zero_grad()
        (q(w) - w).pow(2).sum().backward()
        opt.step()
    assert mse(w, q(w).detach()) < 0.3 * initial
    assert torch.equal(q.dequantize(q.quantize(w)), q(w))


def test_asymmetric_range_includes_zero():
    x = torch.rand(64, 32) + 2
    q = Quantizer(QuantSpec("int8", symmetric=False)).fit(x)
    assert q.zero_point == 0 and q.scale == x.max() * (1 / 255)
    assert torch.equal(q(torch.zeros(3)), torch.zeros(3))


def test_asymmetric_beats_symmetric_on_positive_data():
    x = F.gelu(torch.randn(256, 128) * 2)
    errors = {sym: mse(x, calibrated(QuantSpec("int8", symmetric=sym), x)(x)) for sym in (True, False)}
    assert errors[False] < 0.5 * errors[True]


@pytest.mark.parametrize("spec", [
    QuantSpec("int8", "token", dynamic=True),
    QuantSpec("int4", "group", 32, dynamic=True, symmetric=False),
    QuantSpec("e4m3", "tensor", dynamic=True),
    QuantSpec("int8", "channel"),
    QuantSpec("int4", "group", 32, symmetric=False, observer="mse"),
    QuantSpec("nf4", "tensor", observer="percentile"),
])
def test_all_zero_input_gives_zeros(spec):
    zeros = torch.zeros(8, 64)
    q = Quantizer(spec).fit(zeros)
    assert torch.equal(q(zeros), zeros)
    assert torch.equal(q.dequantize(q.quantize(zeros)), zeros)
    assert torch.isfinite(q(torch.randn(8, 64))).all()


def test_input_validation():
    with pytest.raises(TypeError, match="floating-point"):
        Quantizer(QuantSpec("int8", "token", dynamic=True))(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"axis 2 .*\(4, 8\)"):
        Quantizer(QuantSpec("int8", "channel", axis=2)).fit(torch.randn(4, 8))
    q = Quantizer(QuantSpec("int8", "channel")).fit(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"\(4,\).*\(5, 8\)"):
        q(torch.randn(5, 8))


def test_low_precision_input_keeps_dtype():
    q = Quantizer(QuantSpec("int8", "group", 64, dynamic=True))
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    y = q(x)
    assert y.dtype == torch.bfloat16 and sqnr(x.float(), y.float()) > 30


def test_extra_repr():
    q = Quantizer(QuantSpec("int4", "group", 64, symmetric=False, observer="mse", learnable=True))
    assert repr(q) == "Quantizer(int4, group=64, asym, static=mse, learnable)"
