import copy
import math

import pytest
import torch

from vqz.formats import (
    E2M1, E2M3, E3M2, E4M3, E5M2, MXFP4, NF4, NVFP4, BlockCodes, FPFormat, IntFormat, LogFormat,
    get_format, pack_codes, unpack_codes,
)

# Positive halves of the OCP MX element formats, code 0 upwards, worked out by hand.
E2M1_POS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
E2M3_POS = [
    0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875,  # subnormals: m/8
    1.0, 1.125, 1.25, 1.375, 1.5, 1.625, 1.75, 1.875,
    2.0, 2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 3.75,
    4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5,
]
E3M2_POS = [
    0.0, 0.0625, 0.125, 0.1875,  # subnormals: m/4 * 2^-2
    0.25, 0.3125, 0.375, 0.4375,
    0.5, 0.625, 0.75, 0.875,
    1.0, 1.25, 1.5, 1.75,
    2.0, 2.5, 3.0, 3.5,
    4.0, 5.0, 6.0, 7.0,
    8.0, 10.0, 12.0, 14.0,
    16.0, 20.0, 24.0, 28.0,
]
FP_FORMATS = [E2M1, E2M3, E3M2, E4M3, E5M2]
TORCH_FP8 = [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)]
INT_FORMATS = [IntFormat(b, signed=s) for b in range(2, 9) for s in (True, False)]
LOG_FORMATS = [LogFormat(b, base) for b in range(2, 9) for base in ("2", "sqrt2")]


def all_codes(fmt):
    return torch.arange(2**fmt.bits, dtype=torch.uint8)


@pytest.mark.parametrize("fmt,pos", [(E2M1, E2M1_POS), (E2M3, E2M3_POS), (E3M2, E3M2_POS)])
def test_mx_element_tables(fmt, pos):
    expected = torch.tensor(pos + [-v for v in pos])  # the sign bit mirrors the positive half
    got = fmt.decode(all_codes(fmt))
    assert torch.equal(got, expected)
    assert torch.equal(got.signbit(), expected.signbit())
    assert fmt.max_value == pos[-1] and fmt.min_value == -pos[-1]


@pytest.mark.parametrize("fmt,fp8", TORCH_FP8)
def test_fp8_decode_matches_torch(fmt, fp8):
    codes = all_codes(fmt)
    torch.testing.assert_close(fmt.decode(codes), codes.view(fp8).float(), rtol=0, atol=0,
                               equal_nan=True)


@pytest.mark.parametrize("fmt,fp8", TORCH_FP8)
def test_fp8_round_matches_torch_cast(fmt, fp8):
    g = torch.Generator().manual_seed(0)
    grid = fmt.decode(all_codes(fmt))
    grid = grid[grid.isfinite() & (grid >= 0)].sort().values
    ties = (grid[1:] + grid[:-1]) / 2  # exact in float32
    min_normal = 2.0 ** (1 - fmt.bias)
    lo, hi = math.log2(min_normal) - fmt.man_bits - 2, math.log2(fmt.max_value)
    spread = 2.0 ** (lo + (hi - lo) * torch.rand(20000, generator=g))  # below min subnormal..max
    subnormal = torch.rand(5000, generator=g) * min_normal
    x = torch.cat([spread, subnormal, ties, grid]).clamp(max=fmt.max_value)
    x = torch.cat([x, -x])
    expected = x.to(fp8).float()
    assert torch.equal(fmt.round(x), expected)
    assert torch.equal(fmt.decode(fmt.encode(x)), expected)


def test_ties_to_even():
    x = torch.tensor([2.5, 3.5, 0.25, 0.75, 5.0, 1.25, -2.5, -5.0])
    assert E2M1.round(x).tolist() == [2.0, 4.0, 0.0, 1.0, 4.0, 1.0, -2.0, -4.0]
    int4 = get_format("int4")
    assert int4.round(torch.tensor([0.5, 1.5, -2.5, 2.5])).tolist() == [0.0, 2.0, -2.0, 2.0]
    assert int4.encode(torch.tensor([0.5, 1.5, -2.5])).tolist() == [0, 2, -2]


@pytest.mark.parametrize("fmt", FP_FORMATS + INT_FORMATS, ids=lambda f: f.name)
def test_saturation(fmt):
    big = torch.tensor([fmt.max_value * 1.5, 1e30, math.inf, -fmt.max_value * 1.5, -1e30,
                        -math.inf])
    top, bottom = fmt.max_value, fmt.min_value
    expected = torch.tensor([top] * 3 + [bottom] * 3)
    assert torch.equal(fmt.round(big), expected)
    assert torch.equal(fmt.decode(fmt.encode(big)), expected)


def test_nan():
    nan = torch.tensor([math.nan])
    for fmt in (E4M3, E5M2):  # formats with a NaN code
        assert fmt.round(nan).isnan().all() and fmt.decode(fmt.encode(nan)).isnan().all()
    assert E4M3.encode(nan).item() == 0x7F
    for fmt in (E2M1, E2M3, E3M2, NF4, get_format("int4"), get_format("uint4"),
                get_format("log2:4")):  # no NaN code: +max
        assert fmt.round(nan).item() == fmt.max_value
        assert fmt.decode(fmt.encode(nan)).item() == fmt.max_value


def test_nf4_table_and_nearest():
    table = NF4.decode(torch.arange(16, dtype=torch.uint8))
    assert table[0] == -1.0 and table[7] == 0.0 and table[15] == 1.0
    assert torch.equal(table, torch.tensor(sorted(table.tolist())))
    assert table[9].item() == pytest.approx(0.16093020141124725)
    assert torch.equal(NF4.encode(table), torch.arange(16, dtype=torch.uint8))
    x = torch.randn(10000, generator=torch.Generator().manual_seed(1)) * 0.6  # some beyond +-1
    nearest = (x[:, None] - table[None, :]).abs().argmin(-1)
    assert torch.equal(NF4.encode(x).long(), nearest)
    assert torch.equal(NF4.round(x), table[nearest])
    ties = (table[1:] + table[:-1]) / 2
    assert torch.equal(NF4.encode(ties).long(), torch.arange(15))  # documented: lower index


@pytest.mark.parametrize("fmt", FP_FORMATS + [NF4] + INT_FORMATS + LOG_FORMATS,
                         ids=lambda f: f.name)
def test_every_code_round_trips(fmt):
    if isinstance(fmt, IntFormat):
        codes = torch.arange(fmt.qmin, fmt.qmax + 1).to(torch.int8 if fmt.signed else torch.uint8)
    elif fmt.name == "log2:8":  # codes 150..254 underflow float32 (documented)
        codes = torch.tensor(list(range(150)) + [255], dtype=torch.uint8)
    else:
        codes = all_codes(fmt)
    values = fmt.decode(codes)
    back = fmt.encode(values)
    assert back.dtype == codes.dtype
    finite = values.isfinite()
    assert torch.equal(back[finite], codes[finite])
    assert fmt.decode(back[values.isnan()]).isnan().all()  # any NaN code -> a NaN code
    assert torch.equal(fmt.round(values)[finite], values[finite])


def test_int_ranges_and_dtypes():
    int4, uint4 = get_format("int4"), get_format("uint4")
    assert (int4.qmin, int4.qmax, int4.max_value, int4.min_value) == (-8, 7, 7.0, -8.0)
    assert (uint4.qmin, uint4.qmax, uint4.max_value, uint4.min_value) == (0, 15, 15.0, 0.0)
    assert int4.encode(torch.tensor([-9.0])).item() == -8
    assert uint4.encode(torch.tensor([-3.0, 16.0])).tolist() == [0, 15]
    assert int4.encode(torch.zeros(1)).dtype == torch.int8
    assert uint4.encode(torch.zeros(1)).dtype == torch.uint8


def test_log_formats():
    log2 = get_format("log2:4")
    x = torch.tensor([1.0, 0.5, 0.3, 1e-9, 0.0, -0.5, 3.0])
    assert log2.round(x).tolist() == [1.0, 0.5, 0.25, 0.0, 0.0, 0.0, 1.0]
    assert log2.encode(x).tolist() == [0, 1, 2, 15, 15, 15, 0]
    assert log2.encode(torch.tensor([2.0**-14, 2.0**-15])).tolist() == [14, 15]  # 15 is zero
    sqrt2 = get_format("logsqrt2:4")
    assert sqrt2.decode(torch.tensor([1], dtype=torch.uint8)).item() == \
        torch.tensor(2**-0.5).item()
    assert sqrt2.round(torch.tensor([0.7, 1e-9, 0.0])).tolist() == \
        [torch.tensor(2**-0.5).item(), 0.0, 0.0]
    for bits in (4, 8):
        fmt = get_format(f"logsqrt2:{bits}")
        q = torch.arange(2**bits - 1)
        torch.testing.assert_close(fmt.decode(q.to(torch.uint8), torch.float64),
                                   2.0 ** (-q.double() / 2), rtol=1e-6, atol=0)
        assert fmt.decode(torch.tensor([2**bits - 1], dtype=torch.uint8)).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_round_keeps_dtype(dtype):
    x = torch.tensor([0.3, -1.7, 2.6], dtype=dtype)
    for fmt in (E2M1, E4M3, NF4, get_format("int8"), get_format("log2:4"), MXFP4, NVFP4):
        assert fmt.round(x).dtype == dtype
    assert E2M1.round(x).tolist() == [0.5, -1.5, 3.0]


def _mixed_data(rows, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[torch.rand(rows, k, generator=g) < 0.01] *= 20  # outliers
    return x


@pytest.mark.parametrize("fmt,bound", [(MXFP4, 0.2), (NVFP4, 0.12)])
def test_block_error_and_shapes(fmt, bound):
    x = _mixed_data(16, 100, seed=2)  # 100 is not a multiple of 16 or 32
    bc = fmt.encode(x)
    assert isinstance(bc, BlockCodes)
    n_blocks = -(-100 // fmt.block_size)
    assert bc.codes.shape == (16, 100) and bc.scales.shape == (16, n_blocks)
    assert bc.codes.dtype == bc.scales.dtype == torch.uint8
    y = fmt.decode(bc)
    assert y.shape == x.shape
    assert ((y - x).norm() / x.norm()).item() < bound
    assert torch.equal(fmt.round(x), y)


@pytest.mark.parametrize("fmt", [MXFP4, NVFP4], ids=lambda f: f.name)
def test_block_zeros(fmt):
    y = fmt.round(torch.zeros(3, 40))
    assert torch.equal(y, torch.zeros(3, 40))
    mixed = torch.zeros(2, 64)
    mixed[0, :5] = torch.tensor([1.0, -2.0, 3.0, 0.5, 6.0])
    torch.testing.assert_close(fmt.round(mixed), mixed)  # zero blocks stay exactly zero
    assert torch.equal(fmt.round(mixed)[1], torch.zeros(64))
    if fmt is MXFP4:
        assert fmt.encode(mixed).scales[1].tolist() == [0, 0]


def _e2m1_values_with_max(rows, blocks, block, g):
    """Random E2M1 values [rows, blocks * block] where every block holds a +-6."""
    table = torch.tensor(E2M1_POS + [-v for v in E2M1_POS])
    v = table[torch.randint(0, 16, (rows, blocks, block), generator=g)]
    v[..., 0] = 6.0 * torch.where(torch.rand(rows, blocks, generator=g) < 0.5, -1.0, 1.0)
    return v


def test_mxfp4_exact_and_scale_codes():
    g = torch.Generator().manual_seed(3)
    v = _e2m1_values_with_max(4, 3, 32, g)
    e = torch.randint(-20, 20, (4, 3, 1), generator=g)
    x = (v * 2.0 ** e.float()).flatten(1)
    bc = MXFP4.encode(x)
    assert torch.equal(bc.scales.long(), e[..., 0] + 127)
    assert bc.tensor_scale is None
    assert torch.equal(MXFP4.decode(bc), x)
    hand = torch.zeros(4, 32)
    hand[0, 3], hand[1, 7], hand[2, 0], hand[3, 1] = 6.0, -12.0, 7.0, 0.75
    assert MXFP4.encode(hand).scales[:, 0].tolist() == [127, 128, 127, 124]
    assert MXFP4.round(hand)[2, 0].item() == 6.0  # 7 saturates within its block


def test_nvfp4_exact_and_scale_codes():
    g = torch.Generator().manual_seed(4)
    e4m3 = E4M3.decode(torch.arange(1, 127, dtype=torch.uint8))  # positive finite scales
    s = e4m3[torch.randint(0, len(e4m3), (4, 5), generator=g)]
    s[0, 0] = 448.0  # sets the tensor scale to exactly 1/8
    x = (_e2m1_values_with_max(4, 5, 16, g) * s[..., None] / 8).flatten(1)
    bc = NVFP4.encode(x)
    assert bc.tensor_scale.dim() == 0 and bc.tensor_scale.item() == 0.125
    assert torch.equal(E4M3.decode(bc.scales), s)
    assert torch.equal(NVFP4.decode(bc), x)
    hand = torch.zeros(1, 48)
    hand[0, 0], hand[0, 16], hand[0, 32] = 2688.0, 6.0, 1e-6  # tensor scale 1.0
    bc = NVFP4.encode(hand)
    assert bc.tensor_scale.item() == 1.0
    assert bc.scales[0].tolist() == [0x7E, 0x38, 0]  # 448, 1.0, and a scale that rounds to 0
    assert torch.equal(bc.codes[0, 32:], torch.zeros(16, dtype=torch.uint8))
    assert torch.equal(NVFP4.decode(bc)[0, 32:], torch.zeros(16))
    assert NVFP4.encode(torch.zeros(2, 16)).tensor_scale.item() == 1.0


def test_pack_layout():
    packed = pack_codes(torch.tensor([1, 2, 3], dtype=torch.uint8), 4)
    assert packed.tolist() == [0x21, 0x03]
    packed = pack_codes(torch.tensor([-1, 2], dtype=torch.int8), 4)
    assert packed.tolist() == [0x2F]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_pack_round_trip(bits, signed):
    fmt = IntFormat(bits, signed=signed)
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(fmt.qmin, fmt.qmax + 1, (3, 5, 7), generator=g)
    codes[0, 0, :2] = torch.tensor([fmt.qmin, fmt.qmax])
    codes = codes.to(torch.int8 if signed else torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == (4 if bits <= 4 else 7)
    back = unpack_codes(packed, bits, 7, signed)
    assert back.dtype == codes.dtype and torch.equal(back, codes)


def test_get_format_names():
    for b in range(2, 9):
        assert get_format(f"int{b}") == IntFormat(b) and get_format(f"int{b}").signed
        assert get_format(f"uint{b}").qmax == 2**b - 1
        assert get_format(f"log2:{b}").bits == b and get_format(f"logsqrt2:{b}").bits == b
    assert get_format("e2m1") is E2M1 and get_format("fp4") is E2M1
    assert get_format("e2m3") is E2M3 and get_format("e3m2") is E3M2
    assert get_format("e4m3") is E4M3 and get_format("fp8") is E4M3 and E4M3.nan_inf == "fn"
    assert get_format("e5m2") is E5M2 and E5M2.nan_inf == "ieee"
    assert get_format("nf4") is NF4 and get_format("mxfp4") is MXFP4
    assert get_format("nvfp4") is NVFP4 and NVFP4.block_size == 16 and MXFP4.block_size == 32
    assert get_format("int4") is get_format("int4") and get_format("int4").block_size is None
    e3m4 = get_format("e3m4")
    assert isinstance(e3m4, FPFormat) and e3m4.nan_inf == "none" and e3m4.max_value == 31.0
    assert FPFormat(4, 3).name != E4M3.name  # a different NaN convention is a different format
    assert len({get_format("int4"), IntFormat(4), get_format("uint4")}) == 2


@pytest.mark.parametrize("name,word", [
    ("int9", "2..8"), ("int1", "2..8"), ("e0m3", "exponent"), ("e5m3", "3..8"),
    ("log2:9", "2..8"), ("bogus", "mxfp4"),
])
def test_get_format_errors(name, word):
    with pytest.raises(ValueError, match=word):
        get_format(name)


def test_formats_are_immutable():
    with pytest.raises(AttributeError):
        E4M3.max_value = 1.0
    assert copy.deepcopy(NVFP4) is NVFP4
