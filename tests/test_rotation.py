"""Block-Hadamard rotation of Linear inputs (QuantConfig.rotate): the transform, the layers built
with it (PTQ, GPTQ, SVDQuant branch, LoRA, QAT), their checkpoints, and what is refused."""
import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

import vqz
from vqz import lora
from vqz.config import QuantConfig, QuantSpec, get_preset
from vqz.kernels import kernel_kind
from vqz.nn import QuantLinear
from vqz.nn.rotation import hadamard_rotate
from vqz.qat.linear import QATLinear

W4 = QuantSpec("int4", "group", 64, observer="mse")
A4 = QuantSpec("int4", "group", 64, dynamic=True)
W4A4 = QuantConfig("w4a4", weight=W4, act=A4)


def _sylvester(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_rotation_is_the_orthonormal_block_hadamard_matrix():
    x = torch.randn(3, 5, 192, dtype=torch.float64)
    h = torch.block_diag(*[_sylvester(64)] * 3) / 8
    got = hadamard_rotate(x.float()).double()
    assert torch.allclose(got, x @ h, atol=1e-5)
    assert torch.allclose(hadamard_rotate(hadamard_rotate(x.float())).double(), x, atol=1e-5)
    assert hadamard_rotate(x.to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="blocks of 64"):
        hadamard_rotate(torch.randn(2, 96))


class _Net(nn.Module):
    """Inputs with a few large channels (as LayerNorm outputs have); fc3 has K = 48, which the
    rotation cannot take."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(128, 192), nn.Linear(192, 48), nn.Linear(48, 64)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _inputs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(16, 128, generator=g) for _ in range(n)]
    for x in xs:
        x[:, [5, 70]] *= 30
    return xs


def _error(layer, reference, xs):
    with torch.no_grad():
        return sum((layer(x) - reference(x)).pow(2).mean() for x in xs).item()


# SVDQuant's smoothing already takes the outliers into the weight and its branch: there the
# rotation must keep the branch right (L1 rotated too) and cost nothing.
@pytest.mark.parametrize("extra, ratio", [({}, 0.5), ({"gptq": True}, 0.5),
                                          ({"rank": 16, "smooth": True}, 1.05)],
                         ids=["rtn", "gptq", "svdquant"])
def test_rotation_lowers_the_error_on_outlier_channels(extra, ratio):
    fp = _Net().eval()
    xs = _inputs()
    plain = vqz.quantize(copy.deepcopy(fp), replace(W4A4, **extra), calib=xs)
    rotated = vqz.quantize(copy.deepcopy(fp), replace(W4A4, rotate=True, **extra), calib=xs)
    assert [m.rotate for m in (rotated.fc1, rotated.fc2, rotated.fc3)] == [True, True, False]
    held_out = _inputs(seed=1)  # fc1 reads the input with the large channels
    assert _error(rotated.fc1, fp.fc1, held_out) < ratio * _error(plain.fc1, fp.fc1, held_out)


@torch.no_grad()
def test_rotated_layer_without_rounding_error_is_the_original_function():
    """With 8-bit everything, a layer that rotated only x (or only W) would be far off."""
    fp = _Net().eval()
    cfg = QuantConfig("w8a8", weight=QuantSpec("int8", "channel"),
                      act=QuantSpec("int8", "token", dynamic=True), rotate=True)
    q = vqz.quantize(copy.deepcopy(fp), cfg)
    x = torch.randn(8, 128)
    assert q.fc1.rotate and torch.allclose(q.fc1(x), fp.fc1(x), rtol=0.02, atol=0.02)


def test_rotated_model_round_trips_and_takes_the_kernels(tmp_path):
    fp = _Net().eval()
    xs = _inputs()
    q = vqz.quantize(copy.deepcopy(fp), replace(get_preset("w4a4-svd-fast"), rank=16, rotate=True),
                     calib=xs)
    assert kernel_kind(q.fc1) == "int8" and q.fc1.rotate  # the activation kernels rotate too
    vqz.save(q, tmp_path / "q")
    loaded = vqz.load(_Net().eval(), tmp_path / "q")
    assert loaded.fc1.rotate and not loaded.fc3.rotate
    with torch.no_grad():
        assert torch.equal(loaded(xs[0]), q(xs[0]))


@torch.no_grad()
def test_lora_on_a_rotated_layer_adds_exactly_its_term():
    q = vqz.quantize(_Net().eval(), replace(get_preset("w4a4-svd"), rank=16, rotate=True),
                     calib=_inputs())
    x = torch.randn(6, 128)
    before = q.fc1(x)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 128, generator=g) * 0.1, torch.randn(192, 4, generator=g) * 0.1
    lora.load_lora(q, {"fc1.lora_A.weight": a, "fc1.lora_B.weight": b})
    torch.testing.assert_close(q.fc1(x) - before, (x @ a.T) @ b.T, rtol=1e-4, atol=1e-4)


def test_qat_wrapper_rotates_and_exports_the_same_function():
    torch.manual_seed(0)
    linear = nn.Linear(128, 48)
    learn_w, learn_a = replace(W4, learnable=True), replace(A4, learnable=True)
    x = torch.randn(5, 128)
    full = QATLinear(linear, learn_w, None, rank=48, rotate=True)
    assert torch.allclose(full(x), linear(x), atol=1e-4)  # W H (x H)ᵀ = W x, up to the branch
    layer = QATLinear(linear, learn_w, learn_a, rank=8, rotate=True)
    layer.refactor(0)
    layer.set_fade(0, 0, 1.0)
    exported = layer.to_quant_linear()
    assert isinstance(exported, QuantLinear) and exported.rotate
    assert torch.equal(exported(x), layer(x))


@pytest.mark.parametrize("fields, match", [
    ({"act": replace(A4, dynamic=False, granularity="tensor", group_size=None)}, "dynamic"),
    ({"act": None}, "dynamic"),
    ({"weight": None}, "weight spec"),
    ({"polish": True}, "polish"),
])
def test_configs_the_rotation_cannot_serve_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**{"weight": W4, "act": A4, "rotate": True, **fields})
