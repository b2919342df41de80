"""GPTQ (Frantar et al. 2022): round a linear weight column by column, spreading each column's
rounding error over the columns not yet rounded so that the layer's output on calibration inputs,
not the weight itself, stays close.

For y = x Wᵀ with inputs X [S, K], the output error of a rounded weight Q is tr((W-Q) H (W-Q)ᵀ)/2
with the Hessian H = 2 XᵀX / S [K, K]. Columns are processed in order (no act-order); after column
j is rounded, the error e_j = (w_j - q_j) / U_jj updates w_{j+1..} -= e_j U_j,{j+1..}, where U is
the upper Cholesky factor of H⁻¹. Updates inside a block of columns are applied eagerly, those to
later blocks once per block (lazy batch updates).
"""
from __future__ import annotations

import torch
from dataclasses import replace

from ..config import QuantSpec
from ..formats import BlockCodes, BlockFormat
from ..quantizer import Quantizer, split_two_level


def input_hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2 XᵀX / S [K, K] (float32) of input rows x [S, K]."""
    x = x.reshape(-1, x.shape[-1]).float()
    return 2.0 * (x.T @ x) / max(x.shape[0], 1)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, *, damp: float = 0.01,
                  block: int = 128) -> dict[str, torch.Tensor]:
    """GPTQ-round `w` [N, K] for inputs with Hessian `hessian` [K, K] (see `input_hessian`).

    Returns what `Quantizer(spec).quantize(w)` returns, with the same keys, shapes and dtypes:
    {"codes": [N, K], "scale": [] / [N] / [N, G], "zero_point" (asymmetric INT), "tensor_scale"
    (NVFP4)}; `Quantizer(spec).dequantize(result)` is the rounded weight. Group scales (and block
    scales of MXFP4/NVFP4) are chosen by the spec's observer when the sweep reaches the group's
    first column, from the group's columns as updated so far; tensor and channel scales once, from
    w. `damp`: fraction of the mean Hessian diagonal added to the diagonal. `block`: columns per
    lazy update (rounded up to a multiple of the group size, so no group straddles two blocks).
    """
    if spec.dynamic:
        raise ValueError("GPTQ rounds a weight with static scales; the spec has dynamic=True")
    if spec.granularity == "channel" and spec.axis % 2 != 0:
        raise NotImplementedError("GPTQ supports per-output-channel scales (axis=0) only")
    w = w.detach().float().clone()
    k = w.shape[1]
    h = hessian.detach().to(w.device, torch.float32).clone()
    if h.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}] for a weight of shape {tuple(w.shape)}, "
                         f"got {tuple(h.shape)}")

    # A column that never sees input has no effect on the output: round it as zero.
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = _inverse_cholesky(h, damp)

    grouped = spec.granularity == "group"
    g = spec.group_size if grouped else k
    block = max(1, -(-block // g)) * g if grouped else block
    rounding = _BlockRounding(spec, w) if spec.fmt.block_size else _ElementRounding(spec, w)
    codes = []
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if grouped and (i1 + i) % g == 0:
                rounding.start_group(w1[:, i:i + g])
            c, q = rounding.round(w1[:, i:i + 1])
            codes.append(c)
            e = (w1[:, i] - q[:, 0]) / u1[i, i]
            w1[:, i + 1:] -= e[:, None] * u1[i, i + 1:]
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return {"codes": torch.cat(codes, dim=1), **rounding.params()}


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (h + damp·mean(diag h)·I)⁻¹; the damping grows tenfold (up to 4
    times) while float32 finds the matrix not positive definite."""
    eye = torch.eye(h.shape[0], device=h.device)
    mean_diag = h.diagonal().mean()
    for attempt in range(5):
        chol, info = torch.linalg.cholesky_ex(h + damp * 10 ** attempt * mean_diag * eye)
        if info.item() == 0:
            # cholesky_solve against I, not cholesky_inverse: the latter is ~20x slower on CPU
            return torch.linalg.cholesky(torch.cholesky_solve(eye, chol), upper=True)
    raise RuntimeError("GPTQ: the input Hessian is not positive definite even with damping "
                       f"{damp * 10 ** 4:g}; check the calibration inputs for NaN or inf")


class _ElementRounding:
    """Element formats (INT, FP, NF4): the spec's own Quantizer, fit once on w (tensor, channel)
    or on each group's current columns (group: [N, 1] scales, gathered into [N, G])."""

    def __init__(self, spec: QuantSpec, w: torch.Tensor):
        self.spec = spec
        self.grouped = spec.granularity == "group"
        self.quantizer = None if self.grouped else Quantizer(spec).fit(w)
        self.scales, self.zero_points = [], []
        self.levels = spec.int_group_scales
        if self.levels:
            # Two-level scales: each row's unit is fixed from the whole weight; a group's
            # multiplier is chosen from its updated columns (clipped at L if they grew).
            self.unit = split_two_level(Quantizer(spec).fit(w).scale, self.levels)[0]
            self.spec = replace(spec, int_group_scales=0)

    def start_group(self, cols: torch.Tensor) -> None:
        self.quantizer = Quantizer(self.spec).fit(cols)
        if self.levels:
            scale = self.quantizer.scale
            self.quantizer.scale = self.unit * torch.ceil(scale / self.unit).clamp(1, self.levels)
        self.scales.append(self.quantizer.scale.detach().clone())
        if not self.spec.symmetric:
            self.zero_points.append(self.quantizer.zero_point.detach().clone())

    def round(self, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """col [N, 1] -> (codes [N, 1], dequantized values [N, 1] float32)."""
        q = self.quantizer.quantize(col)
        return q["codes"], self.quantizer.dequantize(q)

    def params(self) -> dict[str, torch.Tensor]:
        if not self.grouped:
            out = {"scale": self.quantizer.scale.detach().clone()}
            if not self.spec.symmetric:
                out["zero_point"] = self.quantizer.zero_point.detach().clone()
            return out
        out = {"scale": torch.cat(self.scales, dim=1)}
        if self.levels:
            out["group_scale"] = torch.round(out["scale"] / self.unit).to(torch.uint8)
            out["scale"] = self.unit
        if not self.spec.symmetric:
            out["zero_point"] = torch.cat(self.zero_points, dim=1)
        return out


class _BlockRounding:
    """Block formats (MXFP4, NVFP4): each block's scale comes from the format's own encode of the
    block's current columns; its columns are then rounded one by one with that scale. The NVFP4
    tensor scale is computed once from w, as round-to-nearest would."""

    def __init__(self, spec: QuantSpec, w: torch.Tensor):
        self.fmt = spec.fmt
        self.tensor_scale = self.fmt.encode(w).tensor_scale
        # The same format without a tensor scale, applied to x / tensor_scale: block scales relative
        # to the fixed tensor scale instead of one recomputed from each block.
        self.bare = BlockFormat(self.fmt.elem, self.fmt.block_size, self.fmt.scale_format, False)
        self.one = None
        self.scales = []

    def _relative(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.tensor_scale is None else x / self.tensor_scale

    def start_group(self, cols: torch.Tensor) -> None:
        self.block_scale = self.bare.encode(self._relative(cols)).scales[:, :1]  # [N, 1] codes
        if self.one is None:
            self.one = self.fmt.elem.encode(torch.ones(cols.shape[0], 1, device=cols.device))
        # The decoded block scale, relative to the tensor scale: 1.0 decoded with it.
        self.step = self.bare.decode(BlockCodes(self.one, self.block_scale, None))
        self.scales.append(self.block_scale)

    def round(self, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """col [N, 1] -> (element codes [N, 1], dequantized values [N, 1] float32)."""
        x = self._relative(col)
        codes = self.fmt.elem.encode(torch.where(self.step > 0, x / self.step, 0.0))
        return codes, self.fmt.decode(BlockCodes(codes, self.block_scale, self.tensor_scale))

    def params(self) -> dict[str, torch.Tensor]:
        out = {"scale": torch.cat(self.scales, dim=1)}
        if self.tensor_scale is not None:
            out["tensor_scale"] = self.tensor_scale
        return out
