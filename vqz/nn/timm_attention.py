"""Quantized restatements of timm's attention classes: ViT/DeiT `Attention`, Swin `WindowAttention`,
EVA `EvaAttention` (rotary embeddings) and BEiT `Attention` (relative position bias).

Each computes q, k, v and the additive biases exactly as timm's non-fused path does and leaves the
products to `QuantAttentionBase.attend`. timm is never imported at module level: a wrapper exists
only for a module timm built, and helpers (timm's relative-position lookups, rotary embedding) are
taken from that module's own class.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from .attention import QuantAttentionBase, mask_bias


class QuantAttention(QuantAttentionBase):
    """timm `Attention` (ViT, DeiT, DeiT-III; timm >= 1.0.20 defines it in timm.layers)."""

    WRAPS = (("Attention", ("timm.layers.attention", "timm.models.vision_transformer")),)
    CHILDREN = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop")

    def __init__(self, attention: nn.Module, *args, **kwargs):
        super().__init__(attention, *args, **kwargs)
        self.head_dim = attention.head_dim
        self.attn_dim = getattr(attention, "attn_dim", self.num_heads * self.head_dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = self.attend(q, k, v, mask_bias(N, q, attn_mask, is_causal))
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class QuantWindowAttention(QuantAttentionBase):
    """timm Swin `WindowAttention`: relative position bias, then the shifted-window (0/-100) mask."""

    WRAPS = (("WindowAttention", ("timm.models.swin_transformer",)),)
    CHILDREN = ("qkv", "attn_drop", "proj", "proj_drop", "relative_position_bias_table",
                "relative_position_index", "window_size", "window_area")

    def __init__(self, attention: nn.Module, *args, **kwargs):
        super().__init__(attention, *args, **kwargs)
        self._rel_pos_bias = type(attention)._get_rel_pos_bias  # timm's lookup, on our adopted table

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [num_windows·B, N, C]; mask [num_windows, N, N] or None."""
        B_, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        # timm adds mask[w] to window w of every image (windows are image-major): the same per row
        window_mask = None if mask is None else mask.repeat(B_ // mask.shape[0], 1, 1).unsqueeze(1)
        x = self.attend(q, k, v, self._rel_pos_bias(self), window_mask)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, -1)))


class _SeparateBiasQkv(QuantAttentionBase):
    """EVA and BEiT: a bias-free fused `qkv` Linear with the q and v biases on the attention module
    (k's is a zero buffer); timm applies them through F.linear on `qkv.weight`, which a quantized
    `qkv` does not have, so the wrapper adds them after calling `qkv`."""

    @classmethod
    def weight_read_children(cls, module: nn.Module) -> tuple[str, ...]:
        reads = getattr(module, "qkv", None) is not None and module.q_bias is not None \
            and not module.qkv_bias_separate
        return ("qkv",) if reads else ()

    def fused_qkv(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        if self.q_bias is not None:
            qkv = qkv + torch.cat((self.q_bias, self.k_bias, self.v_bias))
        return qkv


class QuantEvaAttention(_SeparateBiasQkv):
    """timm `EvaAttention`: fused or separate q/k/v projections, optional q/k norms, rotary
    embeddings on the non-prefix tokens, optional scale norm and gate."""

    WRAPS = (("EvaAttention", ("timm.models.eva",)),)
    CHILDREN = ("qkv", "q_proj", "k_proj", "v_proj", "q_bias", "k_bias", "v_bias", "q_norm",
                "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop", "num_prefix_tokens",
                "rotate_half", "qkv_bias_separate")

    def __init__(self, attention: nn.Module, *args, **kwargs):
        super().__init__(attention, *args, **kwargs)
        self._rotate = sys.modules[type(attention).__module__].apply_rot_embed_cat  # timm's RoPE

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:
            qkv = self.fused_qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            q, k, v = (p(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            npt, half = self.num_prefix_tokens, bool(self.rotate_half)
            q, k = (torch.cat([t[:, :, :npt], self._rotate(t[:, :, npt:], rope, half=half)],
                              dim=2).type_as(v) for t in (q, k))
        x = self.norm(self.attend(q, k, v, mask_bias(N, q, attn_mask, is_causal))
                      .transpose(1, 2).reshape(B, N, C))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class QuantBeitAttention(_SeparateBiasQkv):
    """timm BEiT `Attention`: its own relative position bias (with the cls-token rows), then the
    model's shared one when the model has it."""

    WRAPS = (("Attention", ("timm.models.beit",)),)
    CHILDREN = ("qkv", "q_bias", "k_bias", "v_bias", "attn_drop", "proj", "proj_drop",
                "relative_position_bias_table", "relative_position_index", "window_size",
                "qkv_bias_separate")

    def __init__(self, attention: nn.Module, *args, **kwargs):
        super().__init__(attention, *args, **kwargs)
        self._rel_pos_bias = type(attention)._get_rel_pos_bias  # timm's lookup, on our adopted table

    def forward(self, x: torch.Tensor,
                shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.fused_qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        own = None if self.relative_position_bias_table is None else self._rel_pos_bias(self)
        x = self.attend(q, k, v, own, shared_rel_pos_bias)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))
