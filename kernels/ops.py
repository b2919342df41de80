"""The kernels as `torch.library` custom ops (namespace `vqz`), so `torch.compile(fullgraph=True)`
traces through them: CUDA runs Triton, every other device the pure-torch reference, and a fake
implementation gives the compiler output shapes. An optional tensor comes back empty ([0]) where the
op has nothing to return.
"""
from __future__ import annotations

import torch

from vqz.formats import NVFP4, BlockCodes, unpack_codes

from . import reference
from .dispatch import triton_available


def _empty(like: torch.Tensor, *shape) -> torch.Tensor:
    return like.new_empty(shape or (0,), dtype=torch.float32)


def _act_quant_group(x: torch.Tensor, smooth: torch.Tensor | None, group: int, levels: int,
                    bits: int, rotate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.act_quant_group(x, smooth, group=group, levels=levels, bits=bits,
                                     rotate=rotate)


act_quant_group = torch.library.custom_op("vqz::act_quant_group", mutates_args=())(_act_quant_group)


@act_quant_group.register_fake
def _(x, smooth, group, levels, bits, rotate):
    m, k = x.shape
    return x.new_empty(m, k, dtype=torch.int8), _empty(x, m)


def _act_quant_token(x: torch.Tensor, smooth: torch.Tensor | None, mode: str,
                    rotate: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, scale, zp = reference.act_quant_token(x, smooth, mode=mode, rotate=rotate)
    return a, scale, zp if zp is not None else _empty(x)


act_quant_token = torch.library.custom_op("vqz::act_quant_token", mutates_args=())(_act_quant_token)


@act_quant_token.register_fake
def _(x, smooth, mode, rotate):
    m, k = x.shape
    dtype = torch.float8_e4m3fn if mode == "e4m3" else torch.int8
    return (x.new_empty(m, k, dtype=dtype), _empty(x, m),
            _empty(x, m) if mode == "int8-asym" else _empty(x))


# The op's activation and output dtype travel as indices into ACTIVATION_NAMES and OUT_DTYPES: with
# `str?` and `ScalarType` arguments the op failed in the dispatcher ("vector::reserve") once
# diffusers pipelines had run in the process (torch 2.11, CUDA).
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTIVATION_NAMES = reference.ACTIVATION_NAMES


def _int8_gemm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
              zero_point: torch.Tensor | None, colsum_b: torch.Tensor | None,
              xl1: torch.Tensor | None, l2: torch.Tensor | None, bias: torch.Tensor | None,
              activation: int, out_dtype: int) -> torch.Tensor:
    return reference.int8_gemm(a, b, scale_a, scale_b, zero_point=zero_point, colsum_b=colsum_b,
                               xl1=xl1, l2=l2, bias=bias, activation_name=ACTIVATION_NAMES[activation],
                               out_dtype=OUT_DTYPES[out_dtype])


int8_gemm = torch.library.custom_op("vqz::int8_gemm", mutates_args=())(_int8_gemm)


@int8_gemm.register_fake
def _(a, b, scale_a, scale_b, zero_point, colsum_b, xl1, l2, bias, activation, out_dtype):
    return a.new_empty(a.shape[0], b.shape[0], dtype=OUT_DTYPES[out_dtype])


def _unpack_int4(packed: torch.Tensor, multiplier: torch.Tensor, k: int, group: int) -> torch.Tensor:
    return reference.unpack_int4(packed, multiplier, k, group)


unpack_int4 = torch.library.custom_op("vqz::unpack_int4", mutates_args=())(_unpack_int4)


@unpack_int4.register_fake
def _(packed, multiplier, k, group):
    return packed.new_empty(packed.shape[0], k, dtype=torch.int8)


def _w4a16_gemm(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, k: int, group: int,
                bias: torch.Tensor | None) -> torch.Tensor:
    return reference.w4a16_gemm(x, words, scale, k, group, bias)


w4a16_gemm = torch.library.custom_op("vqz::w4a16_gemm", mutates_args=())(_w4a16_gemm)


@w4a16_gemm.register_fake
def _(x, words, scale, k, group, bias):
    return x.new_empty(x.shape[0], scale.shape[0])


def _nvfp4_round(x: torch.Tensor) -> torch.Tensor:
    return NVFP4.round(x)


nvfp4_round = torch.library.custom_op("vqz::nvfp4_round", mutates_args=())(_nvfp4_round)


@nvfp4_round.register_fake
def _(x):
    return torch.empty_like(x)


def _nvfp4_decode(packed: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor, k: int,
                  out_dtype: int) -> torch.Tensor:
    codes = unpack_codes(packed, 4, k, signed=False)
    return NVFP4.decode(BlockCodes(codes, scales, tensor_scale)).to(OUT_DTYPES[out_dtype])


nvfp4_decode = torch.library.custom_op("vqz::nvfp4_decode", mutates_args=())(_nvfp4_decode)


@nvfp4_decode.register_fake
def _(packed, scales, tensor_scale, k, out_dtype):
    return packed.new_empty(packed.shape[0], k, dtype=OUT_DTYPES[out_dtype])


def _triton_functions() -> dict:
    """The CUDA implementation of every op, by name, with the op's argument list."""
    from . import act_quant, int4_weights, nvfp4
    from . import int8_gemm as gemm

    def act_group(x, smooth, group, levels, bits, rotate):
        return act_quant.act_quant_group(x, smooth, group=group, levels=levels, bits=bits,
                                         rotate=rotate)

    def act_token(x, smooth, mode, rotate):
        a, scale, zp = act_quant.act_quant_token(x, smooth, mode=mode, rotate=rotate)
        return a, scale, zp if zp is not None else _empty(x)

    def int8(a, b, scale_a, scale_b, zero_point, colsum_b, xl1, l2, bias, activation, out_dtype):
        return gemm.int8_gemm(a, b, scale_a, scale_b, zero_point=zero_point, colsum_b=colsum_b,
                              xl1=xl1, l2=l2, bias=bias, activation=ACTIVATION_NAMES[activation],
                              out_dtype=OUT_DTYPES[out_dtype])

    def unpack(packed, multiplier, k, group):
        return int4_weights.unpack_int4(packed, multiplier, k, group)

    def w4a16(x, words, scale, k, group, bias):
        return int4_weights.w4a16_gemm(x, words, scale, k, group, bias)

    def decode(packed, scales, tensor_scale, k, out_dtype):
        return nvfp4.nvfp4_decode(packed, scales, tensor_scale, k, OUT_DTYPES[out_dtype])

    return {"act_quant_group": act_group, "act_quant_token": act_token, "int8_gemm": int8,
            "unpack_int4": unpack, "w4a16_gemm": w4a16, "nvfp4_round": nvfp4.nvfp4_round,
            "nvfp4_decode": decode}


# The same functions without the custom-op dispatch: the references for tensors off CUDA (where
# every op runs its reference anyway), the Triton launches for eager CUDA calls. The dispatcher
# costs 10-35 us a call (pytorch/pytorch#177109), about what a small layer's kernels take on Hopper;
# only torch.compile needs the ops themselves.
CUSTOM = {"act_quant_group": act_quant_group, "act_quant_token": act_quant_token,
          "int8_gemm": int8_gemm, "unpack_int4": unpack_int4, "w4a16_gemm": w4a16_gemm,
          "nvfp4_round": nvfp4_round, "nvfp4_decode": nvfp4_decode}
PLAIN = {"act_quant_group": _act_quant_group, "act_quant_token": _act_quant_token,
         "int8_gemm": _int8_gemm, "unpack_int4": _unpack_int4, "w4a16_gemm": _w4a16_gemm,
         "nvfp4_round": _nvfp4_round, "nvfp4_decode": _nvfp4_decode}
TRITON_ON_CUDA = triton_available() and torch.cuda.is_available()
DIRECT = _triton_functions() if TRITON_ON_CUDA else {}
for _name, _launch in DIRECT.items():
    CUSTOM[_name].register_kernel("cuda")(_launch)
