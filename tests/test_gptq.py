import copy

import pytest
import torch
from torch import nn

import vqz
from vqz.algorithms.gptq import gptq_quantize, input_hessian
from vqz.config import QuantSpec
from vqz.formats import BlockCodes
from vqz.nn import QuantLinear
from vqz.nn.weight import QuantWeight
from vqz.quantizer import Quantizer


def _correlated_inputs(k, rows, seed, mixing_seed=0, dead=()):
    """Rows [rows, k] of Z A: a fixed random mixing A of Z whose first 8 directions have 8x the
    standard deviation, so the channels are correlated and anisotropic."""
    mix = torch.randn(k, k, generator=torch.Generator().manual_seed(mixing_seed)) / k ** 0.5
    std = torch.ones(k)
    std[:8] = 8.0
    z = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)) * std
    x = z @ mix
    x[:, list(dead)] = 0.0
    return x


def _errors(spec, n=96, k=256):
    """(output error, weight error) of GPTQ over those of round-to-nearest, on held-out inputs."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    x_calib, x_test = _correlated_inputs(k, 1024, seed=2), _correlated_inputs(k, 1024, seed=3)
    quantizer = Quantizer(spec)
    q_gptq = quantizer.dequantize(gptq_quantize(w, input_hessian(x_calib), spec))
    q_rtn = Quantizer(spec).fit(w)(w)
    out_err = [(x_test @ (w - q).T).norm().item() for q in (q_gptq, q_rtn)]
    w_err = [(w - q).norm().item() for q in (q_gptq, q_rtn)]
    return out_err[0] / out_err[1], w_err[0] / w_err[1]


@pytest.mark.parametrize("spec", [QuantSpec("int4", "group", 64), QuantSpec("int3", "channel"),
                                  QuantSpec("int4", "group", 64, symmetric=False, observer="mse"),
                                  QuantSpec("nvfp4")], ids=lambda s: f"{s.format}-{s.granularity}")
def test_gptq_trades_weight_error_for_output_error(spec):
    out_ratio, w_ratio = _errors(spec)
    assert out_ratio < 0.8
    assert w_ratio >= 1.0


def _reencoded_codes(spec, q, values):
    """Codes of `values` [N, K] re-encoded with the scales stored in `q`."""
    if spec.fmt.block_size:
        ones = spec.fmt.elem.encode(torch.ones_like(values))
        step = spec.fmt.decode(BlockCodes(ones, q["scale"], q.get("tensor_scale")))
        return spec.fmt.elem.encode(values / step)
    quantizer = Quantizer(spec)
    quantizer.load_state_dict({name: t for name, t in q.items() if name != "codes"})
    return quantizer.quantize(values)["codes"]


@pytest.mark.parametrize("spec", [
    QuantSpec("int4", "group", 64), QuantSpec("int4", "group", 64, symmetric=False),
    QuantSpec("int3", "channel"), QuantSpec("e4m3", "channel"), QuantSpec("int8", "tensor"),
    QuantSpec("nf4", "group", 32), QuantSpec("int4", "group", 64, observer="mse"),
    QuantSpec("nvfp4"), QuantSpec("mxfp4")], ids=lambda s: f"{s.format}-{s.granularity}")
def test_result_is_on_the_grid_and_laid_out_like_round_to_nearest(spec):
    k = 200  # not a multiple of the group or block size: a partial last group
    w = torch.randn(48, k, generator=torch.Generator().manual_seed(0))
    q = gptq_quantize(w, input_hessian(_correlated_inputs(k, 512, seed=1)), spec, block=48)
    rtn = Quantizer(spec).fit(w).quantize(w)
    assert {n: (t.shape, t.dtype) for n, t in q.items()} == \
        {n: (t.shape, t.dtype) for n, t in rtn.items()}
    values = Quantizer(spec).dequantize(q)
    assert torch.isfinite(values).all()
    assert torch.equal(_reencoded_codes(spec, q, values), q["codes"])
    # Held by a QuantWeight (packed codes), it dequantizes to the same values.
    assert torch.equal(QuantWeight.from_quantized(q, spec)(), values)


def test_block_size_does_not_change_the_result():
    w = torch.randn(32, 160, generator=torch.Generator().manual_seed(0))
    h = input_hessian(_correlated_inputs(160, 512, seed=1))
    for spec in (QuantSpec("int4", "group", 32), QuantSpec("int4", "channel")):
        results = [gptq_quantize(w, h, spec, block=b) for b in (1, 50, 1000)]
        for r in results[1:]:
            assert torch.equal(r["codes"], results[0]["codes"])
            assert torch.allclose(r["scale"], results[0]["scale"])


def test_dead_input_channel_gives_no_nan():
    k = 128
    x = _correlated_inputs(k, 512, seed=1, dead=(3, 70))
    w = torch.randn(32, k, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec("int4", "group", 64)
    q = gptq_quantize(w, input_hessian(x), spec)
    values = Quantizer(spec).dequantize(q)
    assert torch.isfinite(values).all() and torch.isfinite(q["scale"]).all()
    assert (values[:, [3, 70]] == 0).all()  # the column never matters: rounded as zero

    model = nn.Sequential(nn.Linear(k, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    batches = [_correlated_inputs(k, 64, seed=s, dead=(3,)) for s in range(2)]
    vqz.quantize(model, "w4a4-svd", gptq=True, calib=batches, alpha=0.5, rank=8)
    with torch.no_grad():
        assert torch.isfinite(model(batches[0])).all()


class _MLP(nn.Module):
    def __init__(self, k=128, hidden=256):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(k, hidden), nn.GELU(), nn.Linear(hidden, k)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("preset,overrides", [("w4a8", {}), ("w4a4-svd", {"alpha": 0.5})])
def test_end_to_end_gptq_lowers_output_error_and_round_trips(tmp_path, preset, overrides):
    torch.manual_seed(0)
    model = _MLP().eval()
    batches = [_correlated_inputs(128, 128, seed=s) for s in range(4)]
    held_out = _correlated_inputs(128, 512, seed=100)
    with torch.no_grad():
        reference = model(held_out)
    errors = {}
    for gptq in (False, True):
        q = vqz.quantize(copy.deepcopy(model), preset, gptq=gptq, calib=batches, **overrides)
        with torch.no_grad():
            errors[gptq] = ((q(held_out) - reference).norm() / reference.norm()).item()
    assert isinstance(q.fc1, QuantLinear)
    assert errors[True] < 0.95 * errors[False]

    path = vqz.save(q, tmp_path / "q.safetensors")
    loaded = vqz.load(copy.deepcopy(model), path)
    saved_state, loaded_state = q.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    assert all(torch.equal(saved_state[n], loaded_state[n]) for n in saved_state)
    with torch.no_grad():
        assert torch.equal(loaded(held_out), q(held_out))


def test_conv_layers_ignore_gptq(convnet):
    calib = [torch.rand(2, 3, 12, 12) for _ in range(2)]
    plain = vqz.quantize(copy.deepcopy(convnet), "w4a8", calib=calib)
    with_gptq = vqz.quantize(copy.deepcopy(convnet), "w4a8", gptq=True, calib=calib)
    assert torch.equal(plain.stem.qweights[0].codes, with_gptq.stem.qweights[0].codes)
