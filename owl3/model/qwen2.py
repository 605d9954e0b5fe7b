"""Qwen2 decoder building blocks (spec §4 step 2, §5, §6).

Written to export cleanly: the KV cache is explicit (past K/V in, present K/V out), the attention mask is
an explicit additive tensor, and no module keeps state between calls. Rotary and attention math live in
``owl3.model.attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from owl3.config import TextConfig
from owl3.model.attention import active_kernels, apply_rope, grouped_attention, islands_active

KVPair = tuple[Tensor, Tensor]  # (key, value), each [B, nkv, T, hd], keys post-RoPE


class Qwen2RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back to the input dtype, then scaled (weight * normed)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """GQA: [B, nkv, T, hd] -> [B, nkv*groups, T, hd], each KV head repeated for its query heads."""
    if groups == 1:
        return x
    b, nkv, t, hd = x.shape
    return x[:, :, None].expand(b, nkv, groups, t, hd).reshape(b, nkv * groups, t, hd)


def causal_mask(query_len: int, past_len: int, batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Additive mask [B, 1, L, past+L]: query t (absolute past+t) sees keys j <= past+t."""
    keys = torch.arange(past_len + query_len, device=device)
    queries = torch.arange(query_len, device=device)[:, None] + past_len
    allowed = keys[None, :] <= queries
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None].expand(batch, 1, query_len, past_len + query_len)


class Qwen2MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2Attention(nn.Module):
    """Text self-attention with an explicit KV cache. q/k/v carry a bias, o_proj does not."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.groups = config.num_kv_groups
        hidden, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * hd, bias=True)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(self.num_heads * hd, hidden, bias=False)

    def self_attention(
        self, h: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, past: KVPair | None
    ) -> tuple[Tensor, Tensor, KVPair]:
        """h [B,L,H] -> (ctx [B,L,nh*hd] before o_proj, rotated q [B,nh,L,hd], present (k, v))."""
        b, length, _ = h.shape
        kernels = active_kernels()
        if kernels is not None:  # fused kernels (the ONNX Runtime export): rotary, cache and attention in one
            return kernels.self_attention(
                self.q_proj(h), self.k_proj(h), self.v_proj(h), past, self.num_heads, self.num_kv_heads
            )
        q = self.q_proj(h).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        if islands_active():  # fp32 softmax inside half-precision models (fp16 export)
            ctx = grouped_attention(q, k, v, mask)
        else:  # the official kernel
            ctx = F.scaled_dot_product_attention(
                q, repeat_kv(k, self.groups), repeat_kv(v, self.groups), attn_mask=mask
            )
        ctx = ctx.transpose(1, 2).reshape(b, length, self.num_heads * self.head_dim)
        return ctx, q, (k, v)

    def forward(
        self,
        h: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor,
        past: KVPair | None,
        visual: KVPair | None = None,
        visible_images: Tensor | None = None,
    ) -> tuple[Tensor, KVPair]:
        """Plain Qwen2 attention; a non-hyper layer never receives visual memory."""
        if visual is not None:
            raise ValueError("visual memory was passed to a non-hyper attention layer")
        ctx, _, present = self.self_attention(h, rope, mask, past)
        return self.o_proj(ctx), present


class Qwen2DecoderLayer(nn.Module):
    """Pre-RMSNorm attention and SwiGLU MLP with residuals. ``attention`` is chosen per layer by the caller."""

    def __init__(self, config: TextConfig, attention: Qwen2Attention) -> None:
        super().__init__()
        self.self_attn = attention
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor,
        past: KVPair | None,
        visual: KVPair | None = None,
        visible_images: Tensor | None = None,
    ) -> tuple[Tensor, KVPair]:
        attn_out, present = self.self_attn(self.input_layernorm(x), rope, mask, past, visual, visible_images)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present
