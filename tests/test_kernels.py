"""Every Triton kernel against its pure-torch reference (kernels/reference.py).

Without CUDA the kernels run in Triton's interpreter at small sizes (conftest sets TRITON_INTERPRET);
with CUDA the same tests run at full sizes, in bfloat16 too (the interpreter has no bfloat16).
"""
import copy

import pytest
import torch

from vqz.formats import NVFP4, BlockCodes, pack_codes, unpack_codes

triton = pytest.importorskip("triton")
from vqz.kernels import act_quant, int4_weights, int8_gemm, nvfp4, reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ROWS = [1, 7, 333, 4096] if CUDA else [1, 7, 40, 130]  # 130: the large-M tiles
DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float16, torch.float32]
K_AWKWARD = 200  # not a multiple of any block or group


def _x(m, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(k, generator=g).mul(4).exp()  # outlier channels
    return x.to(DEVICE, dtype)


def _twice(fn, *args, **kwargs):
    """Run fn twice; the results must be bitwise identical (deterministic kernels)."""
    first, second = fn(*args, **kwargs), fn(*args, **kwargs)
    for a, b in zip(first if isinstance(first, tuple) else (first,),
                    second if isinstance(second, tuple) else (second,)):
        assert a is None and b is None or torch.equal(a, b)
    return first


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,smooth", [(K_AWKWARD, True), (256, False), (192, False)])
def test_group_activation_kernel_matches_quantizer(m, dtype, k, smooth):
    x = _x(m, k, dtype)
    lam = (torch.rand(k) + 0.5).to(DEVICE) if smooth else None
    a, unit = _twice(act_quant.act_quant_group, x, lam)
    ra, runit = reference.act_quant_group(x, lam)
    assert torch.equal(a, ra) and torch.equal(unit, runit)
    assert a.ne(0).sum() > a.numel() // 10  # a test on mostly-zero codes would prove little


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("mode", ["int8", "int8-asym"] + (["e4m3"] if CUDA else []))
def test_token_activation_kernel_matches_quantizer(m, mode):
    x = _x(m, K_AWKWARD, torch.float16) + (3.0 if mode == "int8-asym" else 0.0)  # one-sided rows
    lam = (torch.rand(K_AWKWARD) + 0.5).to(DEVICE)
    a, scale, zp = _twice(act_quant.act_quant_token, x, lam, mode=mode)
    ra, rscale, rzp = reference.act_quant_token(x, lam, mode=mode)
    assert torch.equal(a.view(torch.uint8), ra.view(torch.uint8)) and torch.equal(scale, rscale)
    assert (zp is None) == (mode != "int8-asym") and (zp is None or torch.equal(zp, rzp))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotated_activation_kernels_match_the_quantizer(m, dtype):
    """The block-Hadamard rotation done in registers gives the reference's codes: the same
    butterflies in the same order (vqz/nn/rotation.py)."""
    k = 320  # five blocks of 64: the last tile of 128 columns is half outside the matrix
    x = _x(m, k, dtype)
    lam = (torch.rand(k) + 0.5).to(DEVICE)
    a, unit = _twice(act_quant.act_quant_group, x, lam, rotate=True)
    ra, runit = reference.act_quant_group(x, lam, rotate=True)
    assert torch.equal(a, ra) and torch.equal(unit, runit)
    assert not torch.equal(a, act_quant.act_quant_group(x, lam)[0])
    for mode in ["int8", "int8-asym"]:
        got = _twice(act_quant.act_quant_token, x, lam, mode=mode, rotate=True)
        want = reference.act_quant_token(x, lam, mode=mode, rotate=True)
        for g, w in zip(got, want):
            assert g is None and w is None or torch.equal(g, w)
    with pytest.raises(ValueError, match="blocks of 64"):
        act_quant.act_quant_group(_x(m, K_AWKWARD, dtype), None, rotate=True)


def _int8(shape, seed):
    return torch.randint(-128, 128, shape, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.int8).to(DEVICE)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k", [K_AWKWARD, 512])
def test_int8_gemm_integer_products_are_exact(m, k):
    a, b = _int8((m, k), 1), _int8((96, k), 2)
    one_m, one_n = torch.ones(m, device=DEVICE), torch.ones(96, device=DEVICE)
    y = _twice(int8_gemm.int8_gemm, a, b, one_m, one_n, out_dtype=torch.float32)
    exact = a.double() @ b.double().T  # exact: every sum is an integer far below 2^53
    assert exact.abs().max() < 2**24  # every sum representable in fp32: compare exactly
    assert torch.equal(y, exact.float())


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("activation", [None, "gelu_tanh", "gelu", "silu"])
# Triton's interpreter multiplies bf16 operands of tl.dot wrongly (3.8), so on CPU the 16-bit case
# is fp16; a GPU checks the bf16 one that bf16 models use.
@pytest.mark.parametrize("asym,rank,l2_dtype",
                         [(False, 32, torch.bfloat16 if CUDA else torch.float16), (True, 0, None),
                          (True, 64, torch.float32)])
def test_int8_gemm_epilogue_matches_reference(m, activation, asym, rank, l2_dtype):
    k, n = K_AWKWARD, 80
    a, b = _int8((m, k), 3), _int8((n, k), 4)
    sa, sb = torch.rand(m, device=DEVICE) / 100, torch.rand(n, device=DEVICE) / 100
    extra = dict(bias=torch.randn(n, device=DEVICE, dtype=torch.float16), activation=activation)
    if asym:
        extra.update(zero_point=torch.randint(-128, 128, (m,), device=DEVICE).float(),
                     colsum_b=b.float().sum(1))
    if rank:
        extra.update(xl1=torch.randn(m, rank, device=DEVICE),
                     l2=torch.randn(rank, n, device=DEVICE, dtype=l2_dtype))
    y = _twice(int8_gemm.int8_gemm, a, b, sa, sb, out_dtype=torch.float32, **extra)
    extra["activation_name"] = extra.pop("activation")
    want = reference.int8_gemm(a, b, sa, sb, out_dtype=torch.float32, **extra)
    # fp32 rounding: xl1 is rounded to l2's dtype in both, and products of 16-bit factors are exact
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("n,k", [(5, K_AWKWARD), (64, 129), (48, 512)])
def test_unpack_int4_matches_reference(n, k):
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    mult = torch.randint(1, 17, (n, -(-k // 64)), generator=g, dtype=torch.uint8)
    packed, mult = pack_codes(codes, 4).to(DEVICE), mult.to(DEVICE)
    got = _twice(int4_weights.unpack_int4, packed, mult, k, 64)
    assert torch.equal(got, reference.unpack_int4(packed, mult, k, 64))
    assert torch.equal(got.cpu(), (codes.int() * mult.cpu().repeat_interleave(64, 1)[:, :k]).to(torch.int8))


@pytest.mark.parametrize("n,k,group", [(6, K_AWKWARD, 64), (70, 512, 128), (64, 96, 32)])
def test_w4a16_layout_is_a_reordering_of_the_packed_codes(n, k, group):
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    words = reference.w4a16_words(pack_codes(codes, 4), k, group)
    rows, groups, t_count = reference.W4A16_ROWS, -(-k // group), group // 32
    assert words.dtype == torch.int32 and words.shape == (-(-n // rows), groups, rows, group // 8)
    assert torch.equal(reference.w4a16_codes(words, n, k, group), codes)
    # row r, group q: word c*T + t holds k = 32t + 16*j2 + 8*j1 + 2c + j0 in nibble (0,4,1,5,2,6,3,7)[o]
    for r, q, c, t, o in [(0, 0, 0, 0, 0), (1, 0, 1, 0, 1), (n - 1, groups - 1, 3, t_count - 1, 7),
                          (n - 1, 0, 2, t_count - 1, 2)]:
        j2, j1, j0 = o >> 2, (o >> 1) & 1, o & 1
        col = q * group + 32 * t + 16 * j2 + 8 * j1 + 2 * c + j0
        word = int(words[r // rows, q, r % rows, c * t_count + t])
        want = int(codes[r, col]) & 0xF if col < k else 0  # K padded with zeros
        assert (word >> (4 * (0, 4, 1, 5, 2, 6, 3, 7)[o])) & 0xF == want


@pytest.mark.parametrize("m", [1, 7, 16, 64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,group", [(K_AWKWARD, 64), (512, 128)])
def test_w4a16_gemm_matches_reference(m, dtype, k, group):
    n = 96  # not a whole number of the layout's row tiles
    g = torch.Generator().manual_seed(6)
    packed = pack_codes(torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8), 4).to(DEVICE)
    words = reference.w4a16_words(packed, k, group)
    scale = (torch.rand(n, -(-k // group), generator=g) / 10).to(DEVICE)
    x = _x(m, k, dtype)
    bias = torch.randn(n, device=DEVICE, dtype=dtype)
    want = reference.w4a16_gemm(x.float(), words, scale, k, group, bias)
    for split_k in (None, 1, 3):  # the default, one split, partials added by the last split
        y = _twice(int4_weights.w4a16_gemm, x, words, scale, k, group, bias, split_k)
        # the kernel rounds only its output to 16 bits
        assert torch.allclose(y.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
        assert (y.float() - want).abs().mean() < 2e-3 * want.abs().mean()


@pytest.mark.parametrize("mode", ["group", "int8-asym", "int8"])
def test_activation_kernels_split_along_k_give_the_same_codes(mode):
    """Row ranges gathered from many K chunks, or found by one program over the whole row without
    the separate range pass (INLINE), equal the one-chunk result."""
    x = _x(33, 1000, torch.float16)
    small = dict(BLOCK_M=16, BLOCK_K=64, CHUNK=128, num_warps=4)
    if mode == "group":
        run = lambda cfg: act_quant.act_quant_group(x, None, config=cfg)  # noqa: E731
    else:
        run = lambda cfg: act_quant.act_quant_token(x, None, mode=mode, config=cfg)  # noqa: E731
    one = run(dict(small, CHUNK=1024))
    for other in (run(small), run(dict(small, BLOCK_M=2, INLINE=True))):
        for a, b in zip(one, other):
            assert a is None and b is None or torch.equal(a, b)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [K_AWKWARD, 256, 24])
def test_nvfp4_kernel_matches_the_format(m, dtype, k):
    x = _x(m, k, dtype)
    x[-1, :16] = 0  # an all-zero block: scale code 0, zero codes
    codes, scales, tensor_scale = _twice(nvfp4.nvfp4_quantize, x)
    want = NVFP4.encode(x)
    assert torch.equal(codes, want.codes) and torch.equal(scales, want.scales)
    assert torch.equal(tensor_scale, want.tensor_scale)
    on_cpu = NVFP4.encode(x.cpu())  # the format itself gives the same codes on every device
    assert torch.equal(want.codes.cpu(), on_cpu.codes) and torch.equal(want.scales.cpu(), on_cpu.scales)
    out = _twice(nvfp4.nvfp4_round, x)
    assert out.dtype == dtype and torch.equal(out, NVFP4.round(x))


def test_nvfp4_kernel_rounds_ties_to_even_and_keeps_signed_zeros():
    """Tensor scale 1 (largest |x| = 448 * 6) and a block of largest |x| 6 (block scale 1): the
    block's values reach E2M1 unscaled, so the ties are exact."""
    ties = [6, 5, 3.5, 2.5, 1.75, 1.25, 0.75, 0.25, -0.25, -5, 0, -0.0, 1, -6, 3, 4.5]
    x = torch.tensor([ties + [2688.0] + [1.0] * 15], device=DEVICE)
    codes, scales, tensor_scale = nvfp4.nvfp4_quantize(x)
    assert tensor_scale.item() == 1.0 and scales.tolist() == [[0x38, 0x7E]]  # E4M3 1.0 and 448
    assert codes[0, :16].tolist() == [7, 6, 6, 4, 4, 2, 2, 0, 8, 14, 0, 8, 2, 15, 5, 6]
    assert torch.equal(codes, NVFP4.encode(x).codes)


def _nvfp4_weight(n, k):
    from vqz.config import QuantSpec
    from vqz.nn.weight import QuantWeight

    w = _x(n, k, torch.float32).cpu()
    w[0, :16] = 0  # an all-zero block
    return QuantWeight.from_float(w, QuantSpec("nvfp4", observer="minmax")).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(5, K_AWKWARD), (64, 256), (9, 24)])
def test_nvfp4_decode_kernel_matches_the_format(n, k, dtype):
    qw = _nvfp4_weight(n, k)
    got = _twice(nvfp4.nvfp4_decode, qw.codes, qw.scale, qw.tensor_scale, k, dtype)
    want = NVFP4.decode(BlockCodes(unpack_codes(qw.codes, 4, k, signed=False), qw.scale,
                                   qw.tensor_scale), dtype)
    assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.skipif(not CUDA, reason="the NVFP4 kernels run on CUDA only")
def test_nvfp4_quantizer_and_weights_run_the_kernels(monkeypatch):
    from vqz.config import QuantSpec
    from vqz.kernels import ops
    from vqz.quantizer import Quantizer

    calls = []
    monkeypatch.setitem(ops.DIRECT, "nvfp4_round", lambda x: calls.append(x.shape) or
                        nvfp4.nvfp4_round(x))
    x = _x(333, K_AWKWARD, torch.bfloat16).reshape(9, 37, K_AWKWARD)
    y = Quantizer(QuantSpec("nvfp4", dynamic=True))(x)
    assert calls == [x.shape] and torch.equal(y, NVFP4.round(x))
    monkeypatch.setitem(ops.DIRECT, "nvfp4_decode", lambda *a: calls.append("decode") or
                        ops._nvfp4_decode(*a))
    qw = _nvfp4_weight(48, K_AWKWARD)
    on_cpu = copy.deepcopy(qw).cpu()
    assert torch.equal(qw(torch.bfloat16), on_cpu(torch.bfloat16).cuda()) and calls[-1] == "decode"


def test_eager_launches_take_the_custom_ops_arguments():
    """Eager CUDA layers call these functions with the custom ops' argument lists (kernels/ops.py):
    each gives its op's reference result."""
    from vqz.kernels import ops

    direct = ops._triton_functions()
    assert set(direct) == set(ops.PLAIN)
    x, lam = _x(7, 128, torch.float16), (torch.rand(128) + 0.5).to(DEVICE)
    args = {"act_quant_group": (x, lam, 64, 16, 4, True),
            "act_quant_token": (x, lam, "int8-asym", False)}
    a, b = _int8((7, 128), 1), _int8((48, 128), 2)
    args["int8_gemm"] = (a, b, torch.rand(7, device=DEVICE), torch.rand(48, device=DEVICE), None,
                         None, None, None, None, 3, 0)
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-8, 8, (48, 128), generator=g, dtype=torch.int8)
    packed = pack_codes(codes, 4).to(DEVICE)
    mult = torch.randint(1, 17, (48, 2), generator=g, dtype=torch.uint8).to(DEVICE)
    args["unpack_int4"] = (packed, mult, 128, 64)
    scale = (torch.rand(48, 4, generator=g) / 10).to(DEVICE)
    args["w4a16_gemm"] = (x, reference.w4a16_words(packed, 128, 32), scale, 128, 32, None)
    args["nvfp4_round"] = (x,)
    qw = _nvfp4_weight(48, 128)
    args["nvfp4_decode"] = (qw.codes, qw.scale, qw.tensor_scale, 128, 1)
    for name, call in args.items():
        got, want = direct[name](*call), ops.PLAIN[name](*call)
        for kernel_out, reference_out in zip(got if isinstance(got, tuple) else (got,),
                                             want if isinstance(want, tuple) else (want,)):
            assert kernel_out.dtype == reference_out.dtype, name
            assert kernel_out.shape == reference_out.shape, name
            tol = 1e-2 * reference_out.float().abs().max()
            assert torch.allclose(kernel_out.float(), reference_out.float(), rtol=1e-2, atol=tol), name
