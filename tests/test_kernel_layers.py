"""Quantized layers on the kernel path: the runtime layout built from the stored format, the forward
through the custom ops against QuantLinear's pure-torch reference, and torch.compile.

`runtime.run` goes through the custom ops, whose CPU implementation is the reference of each kernel,
so without a GPU these tests still check the layout building and the op sequence; with one they
check the Triton kernels inside real layers.
"""
import copy
from dataclasses import replace

import pytest
import torch

import vqz
from vqz.config import get_preset
from vqz.kernels import kernel_kind, prepare_model, runtime
from vqz.nn import QuantLinear

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _two_level(name):
    cfg = get_preset(name)
    return replace(cfg, weight=replace(cfg.weight, int_group_scales=16),
                   act=replace(cfg.act, int_group_scales=16) if cfg.act.granularity == "group"
                   else cfg.act)


CONFIGS = {"w4a4-svd two-level": get_preset("w4a4-svd-fast"), "w4a4 two-level": _two_level("w4a4"),
           "w4a8 two-level": _two_level("w4a8"), "w8a8": get_preset("w8a8"),
           "w4a4-svd two-level rotated": replace(get_preset("w4a4-svd-fast"), rotate=True)}


def _quantized(mlp, cfg):
    torch.manual_seed(1)
    calib = [torch.randn(16, 128) for _ in range(2)]
    return vqz.quantize(mlp, cfg, calib=calib).to(DEVICE)


def _layers(model):
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_runtime_forward_matches_reference(mlp, name):
    model = _quantized(mlp, CONFIGS[name])
    assert prepare_model(model) == 2
    x = torch.randn(5, 3, 128, device=DEVICE)
    for layer in _layers(model):
        assert layer.kernel_kind == "int8"
        want = layer.reference_forward(x)
        got = runtime.run(layer, x)
        assert got.shape == want.shape
        # fp32 layers: the folded branch factor diag(1/λ) H L1 differs from L1 by fp32 rounding
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        x = torch.randn(5, 3, layer.out_features, device=DEVICE) * 3


@torch.no_grad()
def test_bf16_branch_differs_from_reference_by_bf16_rounding_only(mlp):
    """In a bf16 layer the folded down factor and x̂ L1 are rounded to bf16 (the reference keeps
    x̂ L1 in fp32): the outputs stay within a few bf16 ulps of the output's scale."""
    torch.manual_seed(1)
    calib = [torch.randn(16, 128, dtype=torch.bfloat16) for _ in range(2)]
    model = vqz.quantize(mlp.to(torch.bfloat16), CONFIGS["w4a4-svd two-level rotated"],
                         calib=calib).to(DEVICE)
    prepare_model(model)
    x = torch.randn(7, 128, device=DEVICE, dtype=torch.bfloat16)
    for layer in _layers(model):
        want = layer.reference_forward(x).float()
        got = runtime.run(layer, x).float()
        assert (got - want).abs().max() <= 2e-2 * want.abs().max()
        x = torch.randn(7, layer.out_features, device=DEVICE, dtype=torch.bfloat16) * 3


@pytest.mark.parametrize("name", ["w4a4-svd two-level", "w4a8 two-level"])
@torch.no_grad()
def test_speed_and_memory_layouts_give_identical_results(mlp, name):
    model = _quantized(mlp, CONFIGS[name])
    x = torch.randn(9, 128, device=DEVICE)
    layer = _layers(model)[0]
    runtime.prepare(layer, "speed")
    speed = runtime.run(layer, x)
    assert layer.kernel_weight.dtype == torch.int8
    runtime.prepare(layer, "memory")
    assert layer.kernel_weight is None  # only the packed 4-bit codes stay resident
    assert torch.equal(runtime.run(layer, x), speed)
    assert "kernel_weight" not in layer.state_dict() and "kernel_wscale" not in layer.state_dict()


def test_kernel_kind_per_preset(mlp):
    kinds = {}
    for name in ["w4a4-svd", "w8a8", "fp8", "w4a16", "w8a8-static", "nvfp4-svd"]:
        layer = _layers(_quantized(copy.deepcopy(mlp), name))[0]
        kinds[name] = kernel_kind(layer)
    learned_clip = get_preset("w8a8").with_overrides(
        act=replace(get_preset("w8a8").act, learnable=True))  # a QAT export: no kernel knows the clip
    kinds["learned clip"] = kernel_kind(_layers(_quantized(copy.deepcopy(mlp), learned_clip))[0])
    for name in ["two-level", "two-level rotated"]:
        layer = _layers(_quantized(copy.deepcopy(mlp), CONFIGS[f"w4a4-svd {name}"]))[0]
        kinds[name] = kernel_kind(layer)
    assert kinds == {"w4a4-svd": None, "w8a8": "int8", "fp8": "fp8", "w4a16": "w4a16",
                     "w8a8-static": None, "nvfp4-svd": None, "learned clip": None, "two-level": "int8",
                     "two-level rotated": "int8"}


def test_unknown_layout_is_refused(mlp):
    layer = _layers(_quantized(mlp, "w8a8"))[0]
    with pytest.raises(ValueError, match="layout"):
        runtime.prepare(layer, "fast")


@pytest.mark.parametrize("config", [CONFIGS["w4a4-svd two-level"], get_preset("nvfp4-svd")],
                         ids=["w4a4-svd two-level", "nvfp4-svd"])
@torch.no_grad()
def test_compile_fullgraph_traces_quantized_model(mlp, config):
    model = _quantized(mlp, config)
    x = torch.randn(4, 128, device=DEVICE)
    prepare_model(model)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    assert torch.allclose(compiled(x), eager, rtol=1e-3, atol=1e-3 * eager.abs().max().item())


@pytest.mark.skipif(not CUDA, reason="the kernel path of QuantLinear.forward needs CUDA")
@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_cuda_forward_dispatches_to_kernels_and_matches_reference(mlp, name):
    calib = [torch.randn(16, 128, dtype=torch.bfloat16) for _ in range(2)]
    model = vqz.quantize(mlp.to(torch.bfloat16), CONFIGS[name], calib=calib).to(DEVICE)
    x = torch.randn(333, 128, device=DEVICE, dtype=torch.bfloat16)
    layer = _layers(model)[0]
    y = layer(x)
    assert layer.kernel_kind == "int8"  # prepared on first use
    want = layer.reference_forward(x).float()
    # bf16 model: the reference rounds the branch and the product to bf16 on the way
    assert (y.float() - want).norm() / want.norm() < 1e-2
