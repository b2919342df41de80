import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vqz import QuantSpec
from vqz.kernels import dispatch
from vqz.nn import QuantConv2d, QuantLinear, QuantMatMul
from vqz.quantizer import Quantizer

W4 = QuantSpec("int4", "group", 16)
A8 = QuantSpec("int8", "token", dynamic=True)


def test_split_conv_is_the_sum_of_separately_quantized_halves():
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 16, 3, padding=1)
    x = torch.randn(2, 24, 8, 8)
    # The skip half has a 30x larger range, and weights that balance its contribution.
    x[:, 10:] *= 30
    with torch.no_grad():
        conv.weight[:, 10:] /= 30
    q = QuantConv2d.from_float(conv, QuantSpec("int8", "channel"), A8, splits=(10,))
    manual = 0
    for (s, e) in ((0, 10), (10, 24)):
        xq = Quantizer(A8)(x[:, s:e].movedim(1, -1)).movedim(-1, 1)
        w = conv.weight[:, s:e].reshape(16, -1)
        wq = Quantizer(QuantSpec("int8", "channel")).fit(w)(w).reshape(16, e - s, 3, 3)
        manual = manual + F.conv2d(xq, wq, None, padding=1)
    manual = manual + conv.bias[:, None, None]
    with torch.no_grad():
        assert torch.allclose(q(x), manual, atol=1e-4, rtol=1e-5)
        unsplit = QuantConv2d.from_float(conv, QuantSpec("int8", "channel"), A8)
        ref = conv(x)
        # the split keeps the small-range half from being crushed by the large one's scale
        assert (q(x) - ref).norm() < 0.5 * (unsplit(x) - ref).norm()


def test_conv_splits_are_validated():
    conv = nn.Conv2d(8, 8, 3, groups=2)
    with pytest.raises(ValueError, match="groups=1"):
        QuantConv2d.from_float(conv, W4, None, splits=(4,))
    with pytest.raises(ValueError, match="increasing"):
        QuantConv2d.from_float(nn.Conv2d(8, 8, 1), W4, None, splits=(9,))


def test_depthwise_and_padding_modes_match_float_at_8_bit():
    torch.manual_seed(0)
    for conv in (nn.Conv2d(16, 16, 3, padding=1, groups=16, padding_mode="circular"),
                 nn.Conv2d(16, 8, 3, stride=2, dilation=2, padding=2)):
        x = torch.randn(2, 16, 9, 9)
        q = QuantConv2d.from_float(conv, QuantSpec("int8", "channel"), None)
        with torch.no_grad():
            ref, out = conv(x), q(x)
        assert out.shape == ref.shape
        assert (out - ref).norm() / ref.norm() < 0.01


def test_linear_reference_formula_with_smoothing_and_branch():
    torch.manual_seed(0)
    lin = nn.Linear(32, 24)
    lam = torch.rand(32) + 0.5
    l1, l2 = torch.randn(32, 4) * 0.1, torch.randn(4, 24) * 0.1
    q = QuantLinear.from_float(lin, W4, A8, smooth=lam, lowrank=(l1, l2))
    x = torch.randn(5, 32)
    xs = x / lam
    r = lin.weight * lam - (l1 @ l2).T
    expected = Quantizer(A8)(xs) @ Quantizer(W4).fit(r)(r).T + xs @ l1 @ l2 + lin.bias
    with torch.no_grad():
        assert torch.allclose(q(x), expected, atol=1e-5)
        q.act_enabled = False
        assert torch.allclose(q(x), xs @ Quantizer(W4).fit(r)(r).T + xs @ l1 @ l2 + lin.bias, atol=1e-5)


def test_linear_keeps_bf16_inputs_in_bf16():
    lin = nn.Linear(64, 32).to(torch.bfloat16)
    q = QuantLinear.from_float(lin, W4, A8)
    out = q(torch.randn(3, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_matmul_quantizes_both_operands_along_k():
    torch.manual_seed(0)
    a, b = torch.randn(2, 4, 8, 32), torch.randn(2, 4, 32, 8)
    mm = QuantMatMul(A8, A8)
    expected = Quantizer(A8)(a) @ Quantizer(A8)(b.transpose(-1, -2)).transpose(-1, -2)
    assert torch.equal(mm(a, b), expected)
    assert (mm(a, b) - a @ b).norm() / (a @ b).norm() < 0.02
    static = QuantMatMul(QuantSpec("int8", "tensor"), None)
    static.observe(a, b)
    static.finalize_activations()
    assert static.a_quantizer.scale.item() == pytest.approx(a.abs().max().item() / 127)


def test_dispatch_point_hands_the_layer_to_a_registered_kernel(monkeypatch):
    calls = []

    def run(layer, x):
        calls.append(layer)
        return layer.reference_forward(x) + 1

    monkeypatch.setattr(dispatch, "_LINEAR_KERNELS", [])
    dispatch.register_linear_kernel(lambda layer, x: x.shape[0] == 3, run)
    q = QuantLinear.from_float(nn.Linear(16, 8), W4, A8)
    x = torch.randn(3, 16)
    assert torch.equal(q(x), q.reference_forward(x) + 1) and calls == [q]
    q(torch.randn(2, 16))  # not accepted: the reference runs
    assert calls == [q]
