"""`vqz bench kernels`: the quantized linear paths against cuBLAS BF16 on the layer shapes of FLUX,
SDXL, PixArt-Σ, Wan 2.1 and ViT-B, plus a FLUX transformer block, BF16 vs w4a4-svd.

Layer times are medians of CUDA-graph replays (launch gaps removed, the same for every path), each
replay cycling through enough copies of the weights and inputs to exceed the L2 cache; the block is
timed eagerly (median of 20 calls after warm-up). Ratios are only
meaningful within one run on one card.
"""
from __future__ import annotations

import functools
import json
import math
import statistics

import torch
import torch.nn.functional as F

# (model, layer, M tokens, N, K)
SHAPES = [
    ("FLUX 1024²", "attn qkv", 4608, 9216, 3072), ("FLUX 1024²", "mlp up", 4608, 12288, 3072),
    ("FLUX 1024²", "mlp down", 4608, 3072, 12288), ("FLUX 1024²", "attn out", 4608, 3072, 3072),
    ("FLUX 512²", "attn qkv", 1024, 9216, 3072), ("FLUX 512²", "mlp up", 1024, 12288, 3072),
    ("FLUX 512²", "mlp down", 1024, 3072, 12288), ("FLUX 512²", "attn out", 1024, 3072, 3072),
    ("SDXL 1024² (64² level)", "ff in (GEGLU)", 4096, 5120, 640),
    ("SDXL 1024² (32² level)", "ff in (GEGLU)", 1024, 10240, 1280),
    ("PixArt-Σ 1024²", "mlp up", 4096, 4608, 1152), ("PixArt-Σ 1024²", "mlp down", 4096, 1152, 4608),
    ("Wan 2.1 14B", "ffn up", 8192, 13824, 5120), ("Wan 2.1 14B", "ffn down", 8192, 5120, 13824),
    ("ViT-B batch 64", "qkv", 12608, 2304, 768), ("ViT-B batch 64", "mlp up", 12608, 3072, 768),
]
W4A16_TOKENS = (1, 16)
RANK, GROUP, LEVELS = 32, 64, 16
_CACHE_BYTES = 256 << 20  # rotate through copies totalling this much, well past any L2


def _graph_time_ms(fns: list, reps: int = 20) -> float:
    """Median time of one call, from CUDA-graph replays of all `fns` in sequence."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    return statistics.median(times)


def _eager_time_ms(fn, reps: int = 20) -> float:
    """Median time of one eager call (for whole blocks, whose many kernels include Python work)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _copies(bytes_each: int) -> int:
    return max(2, math.ceil(_CACHE_BYTES / max(bytes_each, 1)))


class _Layer:
    """One random layer in every form the paths need (bf16, FP8 row-wise, two-level INT4 codes)."""

    def __init__(self, n, k, seed):
        from vqz.config import QuantSpec
        from vqz.formats import pack_codes
        from vqz.quantizer import Quantizer

        from . import reference

        g = torch.Generator(device="cuda").manual_seed(seed)
        self.w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) / k**0.5
        spec = QuantSpec("int4", "group", GROUP, int_group_scales=LEVELS)
        q = Quantizer(spec).fit(self.w.float()).quantize(self.w.float())
        self.packed, self.mult = pack_codes(q["codes"], 4), q["group_scale"]
        self.unit = q["scale"].reshape(-1)
        self.w8 = reference.unpack_int4(self.packed, self.mult, k, GROUP)
        self.w_fp8 = (self.w.float() / self.w.float().abs().amax(1, keepdim=True) * 448).to(
            torch.float8_e4m3fn)
        self.s_fp8 = self.w.float().abs().amax(1)[None, :] / 448
        self.w16_scale = (torch.rand(n, -(-k // 128), device="cuda", generator=g) / 10)
        self.l1 = torch.randn(k, RANK, device="cuda", generator=g, dtype=torch.bfloat16) / k**0.5
        self.l2 = torch.randn(RANK, n, device="cuda", generator=g, dtype=torch.bfloat16) / RANK**0.5
        self.smooth = torch.rand(k, device="cuda", generator=g) + 0.5
        self.bias = torch.randn(n, device="cuda", generator=g, dtype=torch.bfloat16)

    @functools.cached_property
    def w16_words(self) -> torch.Tensor:
        """The same codes in the W4A16 kernel's layout, built only for the W4A16 timings."""
        from . import reference

        return reference.w4a16_words(self.packed, self.w.shape[1], 128)


def _paths(layer: _Layer, x: torch.Tensor) -> dict:
    from . import act_quant, int4_weights
    from .int8_gemm import int8_gemm

    k = x.shape[1]

    # layer.l1 stands for the folded down factor diag(1/λ) H L1 (kernels/runtime.py)
    def fused(with_branch, memory, rotate=False):
        def run():
            a, unit = act_quant.act_quant_group(x, layer.smooth, rotate=rotate)
            xl1 = x @ layer.l1 if with_branch else None
            w = int4_weights.unpack_int4(layer.packed, layer.mult, k, GROUP) if memory else layer.w8
            return int8_gemm(a, w, unit, layer.unit, xl1=xl1, l2=layer.l2 if with_branch else None,
                             bias=layer.bias)
        return run

    def unfused():
        a, unit = act_quant.act_quant_group(x, layer.smooth)
        y = int8_gemm(a, layer.w8, unit, layer.unit, bias=layer.bias)
        return y + (x @ layer.l1) @ layer.l2

    a_fp8 = x.float().div(x.float().abs().amax(1, keepdim=True) / 448).to(torch.float8_e4m3fn)
    s_a = x.float().abs().amax(1, keepdim=True) / 448

    def fp8_gemm():
        return torch._scaled_mm(a_fp8, layer.w_fp8.t(), scale_a=s_a, scale_b=layer.s_fp8,
                                bias=layer.bias, out_dtype=torch.bfloat16)

    def int8_only():
        return int8_gemm(a_fp8.view(torch.int8), layer.w8, s_a.reshape(-1), layer.unit)

    return {"bf16": lambda: F.linear(x, layer.w, layer.bias), "fp8 _scaled_mm": fp8_gemm,
            "unfused w4a4+r32": unfused, "fused w4a4+r32 speed": fused(True, False),
            "fused w4a4+r32 memory": fused(True, True), "w4a4 no branch": fused(False, False),
            "fused w4a4+r32 speed rotated": fused(True, False, rotate=True),
            "int8 GEMM alone": int8_only}


def bench_shape(m, n, k) -> dict:
    layer_bytes = n * k * 2 + m * k * 2
    count = _copies(layer_bytes)
    layers = [_Layer(n, k, seed) for seed in range(min(count, 4))]
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(count)]
    paths = [_paths(layers[i % len(layers)], xs[i]) for i in range(count)]
    out = {name: _graph_time_ms([p[name] for p in paths]) for name in paths[0]}
    return {**out, **_floors(m, n, k)}


def bench_w4a16(m, n, k) -> dict:
    from .int4_weights import w4a16_gemm

    count = _copies(n * k * 2)
    layers = [_Layer(n, k, seed) for seed in range(count)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bf16 = _graph_time_ms([lambda layer=layer: F.linear(x, layer.w) for layer in layers])
    # the scale table is per 128 columns here: w4a16's default group
    w4 = _graph_time_ms([lambda layer=layer: w4a16_gemm(x, layer.w16_words, layer.w16_scale, k, 128)
                         for layer in layers])
    return {"bf16": bf16, "w4a16": w4, "speedup": bf16 / w4,
            "floor_bf16_ms": n * k * 2 / BANDWIDTH * 1e3, "floor_w4_ms": n * k * 0.53 / BANDWIDTH * 1e3}


def bench_nvfp4(m, n, k) -> dict:
    """NVFP4 on its kernels against the pure-torch format: the activations' fake quantization (bf16
    x [m, k]; bytes floor: x read twice, x̂ written), the weight's dequantization ([n, k] to bf16;
    floor: 0.56 B read, 2 B written a weight), and the whole layer (both, then the 16-bit product)
    against F.linear in BF16."""
    from vqz.config import QuantSpec
    from vqz.formats import NVFP4
    from vqz.nn.weight import QuantWeight

    from .nvfp4 import nvfp4_decode, nvfp4_round
    from .ops import OUT_DTYPES, _nvfp4_decode

    count = _copies(n * k * 2 + m * k * 2)
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(count)]
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(min(count, 4))]
    qws = [QuantWeight.from_float(w, QuantSpec("nvfp4", observer="minmax")) for w in ws]

    def torch_decode(qw):  # the format's decode, as the op's reference runs it
        return _nvfp4_decode(qw.codes, qw.scale, qw.tensor_scale, k,
                             OUT_DTYPES.index(torch.bfloat16))

    def decode(qw):
        return nvfp4_decode(qw.codes, qw.scale, qw.tensor_scale, k, torch.bfloat16)

    pairs = [(xs[i], ws[i % len(ws)], qws[i % len(ws)]) for i in range(count)]
    out = {"act_torch": _graph_time_ms([lambda x=x: NVFP4.round(x) for x, _, _ in pairs]),
           "act_kernel": _graph_time_ms([lambda x=x: nvfp4_round(x) for x, _, _ in pairs]),
           "weight_torch": _graph_time_ms([lambda q=q: torch_decode(q) for _, _, q in pairs]),
           "weight_kernel": _graph_time_ms([lambda q=q: decode(q) for _, _, q in pairs]),
           "bf16": _graph_time_ms([lambda x=x, w=w: F.linear(x, w) for x, w, _ in pairs]),
           "layer": _graph_time_ms([lambda x=x, q=q: F.linear(nvfp4_round(x), decode(q))
                                    for x, _, q in pairs])}
    return {**out, "floor_act_ms": 6 * m * k / BANDWIDTH * 1e3,
            "floor_weight_ms": 2.56 * n * k / BANDWIDTH * 1e3}


BANDWIDTH = 3.0e12  # bytes/s (device-to-device copy, read + write), replaced by the measured value
INT8_PEAK = 1.0e15  # ops/s of the INT8 GEMM alone on a large square, replaced by the measured value


def _floors(m, n, k) -> dict:
    """The two lower bounds of the fused speed-layout W4A4 path: bytes (x read twice from L2 counted
    once, int8 codes written and read, int8 weights, bf16 output) and INT8 math."""
    moved = 2 * m * k + 2 * m * k + n * k + 2 * m * n
    return {"floor_bytes_ms": moved / BANDWIDTH * 1e3, "floor_math_ms": 2 * m * n * k / INT8_PEAK * 1e3}


def measure_ceilings() -> None:
    global BANDWIDTH, INT8_PEAK
    from .int8_gemm import int8_gemm

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    BANDWIDTH = 2 * src.numel() / (_graph_time_ms([lambda: dst.copy_(src)], reps=10) / 1e3)
    a = torch.randint(-128, 128, (8192, 8192), dtype=torch.int8, device="cuda")
    one = torch.ones(8192, device="cuda")
    INT8_PEAK = 2 * 8192**3 / (_graph_time_ms([lambda: int8_gemm(a, a, one, one)], reps=5) / 1e3)


def bench_flux_block(tokens=4096, text_tokens=512) -> dict:
    """A FluxTransformerBlock (FLUX.1 width 3072, 24 heads) forward, BF16 vs w4a4-svd-fast (two-level
    scales) on the kernels (speed layout), random weights, with diffusers' separate q/k/v
    projections and with them fused (`fuse_projections()`, one GEMM per stream): eager, and replayed
    from a CUDA graph (what torch.compile's "reduce-overhead" mode does), which removes the CPU
    launch costs. Keys: `<precision>_<projections>_<eager|graph>_ms`."""
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    torch.manual_seed(0)
    block = FluxTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128)
    block = block.to("cuda", torch.bfloat16).eval().requires_grad_(False)
    inputs = dict(hidden_states=torch.randn(1, tokens, 3072, device="cuda", dtype=torch.bfloat16),
                  encoder_hidden_states=torch.randn(1, text_tokens, 3072, device="cuda",
                                                    dtype=torch.bfloat16),
                  temb=torch.randn(1, 3072, device="cuda", dtype=torch.bfloat16))
    result = {}
    with torch.no_grad():
        ref = block(**inputs)[0].float()
        for projections in ("separate", "fused"):
            if projections == "fused":
                block.attn.fuse_projections()
            result.update(_time_block(block, inputs, ref, projections))
    for projections in ("separate", "fused"):
        for mode in ("eager", "graph"):
            key = f"{projections}_{mode}"
            result[f"speedup_{key}"] = result[f"bf16_{key}_ms"] / result[f"w4a4_svd_{key}_ms"]
    return result


def _time_block(block, inputs, ref, projections: str) -> dict:
    """Eager and CUDA-graph times of `block` in BF16 and quantized (a copy), and the SQNR."""
    import copy

    import vqz
    from vqz.config import get_preset

    from .runtime import prepare_model

    q = vqz.quantize(copy.deepcopy(block), get_preset("w4a4-svd-fast"), calib=lambda b: b(**inputs))
    out = {"kernel_layers_" + projections: prepare_model(q)}
    for name, model in (("bf16", block), ("w4a4_svd", q)):
        out[f"{name}_{projections}_eager_ms"] = _eager_time_ms(lambda: model(**inputs))
        out[f"{name}_{projections}_graph_ms"] = _graph_time_ms([lambda: model(**inputs)])
    y = q(**inputs)[0].float()
    out["sqnr_db_" + projections] = 10 * torch.log10(ref.pow(2).mean()
                                                     / (y - ref).pow(2).mean()).item()
    return out


def run(json_path: str | None = None, quick: bool = False) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("vqz bench kernels needs a CUDA GPU")
    measure_ceilings()
    shapes = SHAPES[:2] if quick else SHAPES
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "bandwidth_TBps": BANDWIDTH / 1e12, "int8_peak_TOPS": INT8_PEAK / 1e12, "layers": []}
    print(f"{result['device']}: copy {BANDWIDTH / 1e12:.2f} TB/s, INT8 GEMM "
          f"{INT8_PEAK / 1e12:.0f} TOP/s (8192³)", flush=True)
    for model, name, m, n, k in shapes:
        row = {"model": model, "layer": name, "M": m, "N": n, "K": k, **bench_shape(m, n, k)}
        result["layers"].append(row)
        print(_format_row(row), flush=True)
    result["w4a16"] = []
    for m in W4A16_TOKENS:
        for _, name, _, n, k in SHAPES[:4]:
            row = {"layer": name, "M": m, "N": n, "K": k, **bench_w4a16(m, n, k)}
            result["w4a16"].append(row)
            print(f"W4A16 M={m} {n}x{k}: bf16 {row['bf16'] * 1e3:.1f} us, w4a16 "
                  f"{row['w4a16'] * 1e3:.1f} us ({row['speedup']:.2f}x)", flush=True)
    result["nvfp4"] = []
    for _, name, m, n, k in SHAPES[1:3]:  # K = 3072 and 12288
        row = {"layer": name, "M": m, "N": n, "K": k, **bench_nvfp4(m, n, k)}
        result["nvfp4"].append(row)
        print(f"NVFP4 {m}x{n}x{k}: activations torch {row['act_torch'] * 1e3:.0f} us, kernel "
              f"{row['act_kernel'] * 1e3:.0f} us (floor {row['floor_act_ms'] * 1e3:.0f}); weight "
              f"torch {row['weight_torch'] * 1e3:.0f} us, kernel {row['weight_kernel'] * 1e3:.0f} us "
              f"(floor {row['floor_weight_ms'] * 1e3:.0f}); layer {row['layer'] * 1e3:.0f} us "
              f"against BF16 {row['bf16'] * 1e3:.0f} us ({row['bf16'] / row['layer']:.2f}x)",
              flush=True)
    if json_path:
        _write(json_path, result)
    if not quick:
        result["flux_block"] = bench_flux_block()
        fb = result["flux_block"]
        for key in ("separate_eager", "separate_graph", "fused_eager", "fused_graph"):
            print(f"FLUX block, {key.replace('_', ' q/k/v, ')}: bf16 {fb[f'bf16_{key}_ms']:.3f} ms, "
                  f"w4a4-svd {fb[f'w4a4_svd_{key}_ms']:.3f} ms ({fb['speedup_' + key]:.2f}x)",
                  flush=True)
        print(f"FLUX block SQNR: separate {fb['sqnr_db_separate']:.1f} dB, fused "
              f"{fb['sqnr_db_fused']:.1f} dB", flush=True)
    if json_path:
        _write(json_path, result)
    return result


def _write(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def _format_row(row: dict) -> str:
    base = row["bf16"]
    cells = " | ".join(f"{name} {row[name] * 1e3:.0f}us ({base / row[name]:.2f}x)"
                       for name in row if isinstance(row[name], float) and not name.startswith("floor"))
    return (f"{row['model']} {row['layer']} M={row['M']} N={row['N']} K={row['K']}: {cells} | "
            f"floors bytes {row['floor_bytes_ms'] * 1e3:.0f}us math {row['floor_math_ms'] * 1e3:.0f}us")
