"""Hyper attention: the gated visual cross-attention of mPLUG-Owl3 (spec §4 steps 3-7, §6).

A hyper layer runs ordinary Qwen2 self-attention and then, for the tokens that see at least one image,
mixes a cross-attention over the visual memory into the pre-``o_proj`` context through a sigmoid gate
computed from that context. The cross-attention reuses the rotated text query, the layer's
``input_layernorm`` and its ``o_proj``; only ``v_kv_proj`` and ``gate_proj`` are its own.

Visibility is one tensor, ``visible_images`` [B, L] (long): how many of its sample's images each query
token sees. Prompt token t sees ``seen(t)`` = the images whose ``<|image|>`` placeholder precedes it
(0 up to and including the first placeholder, so those tokens keep the pure self-attention context);
decode tokens see all images of their sample. Key m of the memory belongs to image ``m // P``, and the key
is visible to token t iff ``m // P < visible_images[t]``. Padding images of a sample with fewer images than
the batch maximum are therefore never visible, and a row that sees nothing is gated out by a select, so
no NaN can arise even with zero images.

The visual K/V of every hyper layer are computed once per request (``visual_kv``) and reused at every
decode step; the official code recomputes them each step from identical inputs, with identical results.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from owl3.config import TextConfig
from owl3.model.attention import active_kernels, compute_dtype, grouped_attention, rope_inv_freq, rotate_half
from owl3.model.qwen2 import KVPair, Qwen2Attention


class HyperAttention(Qwen2Attention):
    """Qwen2 self-attention plus gated cross-attention over a visual memory (hyper layers only)."""

    def __init__(self, config: TextConfig, image_tokens: int) -> None:
        super().__init__(config)
        self.rope_theta = config.rope_theta
        self.image_tokens = image_tokens  # P: visual keys per image
        hd = config.head_dim
        # Output layout (head, {K,V}, dim): reshape to [.., nkv, 2, hd], K = [..., 0, :], V = [..., 1, :].
        self.v_kv_proj = nn.Linear(config.hidden_size, 2 * self.num_kv_heads * hd, bias=True)
        # Gate weights are shared by all heads; applied to each head's hd-slice of the context.
        self.gate_proj = nn.Sequential(nn.Linear(hd, hd, bias=True), nn.Sigmoid())

    def visual_kv(self, normed_images: Tensor, positions: Tensor) -> KVPair:
        """Visual keys and values of this layer, MI-RoPE applied once.

        normed_images [B, n, P, H]: ``input_layernorm`` of each sample's image embeddings (padded to n).
        positions [B, n] (long): MI-RoPE position of each image, the index right after its placeholder.
        Returns (k, v), each [B, nkv, n*P, hd]; key index = image * P + patch.
        """
        b, n, p, _ = normed_images.shape
        kv = self.v_kv_proj(normed_images).view(b, n, p, self.num_kv_heads, 2, self.head_dim)
        k, v = kv[..., 0, :], kv[..., 1, :]  # [B, n, P, nkv, hd]
        # MI-RoPE in fp32: every key of image i rotated by the same angle, at positions[b, i].
        inv_freq = rope_inv_freq(self.head_dim, self.rope_theta, normed_images.device)
        angles = positions.to(torch.float32)[..., None] * inv_freq  # [B, n, hd/2]
        emb = torch.cat((angles, angles), dim=-1)[:, :, None, None, :]  # [B, n, 1, 1, hd]
        k32 = k.to(torch.float32)
        k = (k32 * emb.cos() + rotate_half(k32) * emb.sin()).to(v.dtype)
        k = k.permute(0, 3, 1, 2, 4).reshape(b, self.num_kv_heads, n * p, self.head_dim)
        v = v.permute(0, 3, 1, 2, 4).reshape(b, self.num_kv_heads, n * p, self.head_dim)
        return k, v

    def forward(
        self,
        h: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor,
        past: KVPair | None,
        visual: KVPair | None = None,
        visible_images: Tensor | None = None,
    ) -> tuple[Tensor, KVPair]:
        ctx, q, present = self.self_attention(h, rope, mask, past)
        if visual is None:
            return self.o_proj(ctx), present
        if visible_images is None:
            raise ValueError("visual memory given without visible_images")
        b, length, _ = ctx.shape
        k_vis, v_vis = visual
        kernels = active_kernels()
        if kernels is not None:
            vctx = kernels.cross_attention(q, k_vis, v_vis, visible_images, self.image_tokens)
        else:
            vctx = self._cross_attention(q, k_vis, v_vis, visible_images)
        ctx_heads = ctx.view(b, length, self.num_heads, self.head_dim)
        work = compute_dtype(ctx.dtype)  # the gate and the mix run in fp32 under fp32 islands
        # The gate is computed from the self-attention context: sigmoid(Linear(ctx)) = gate_proj (Linear, Sigmoid).
        gate = torch.sigmoid(self.gate_proj[0](ctx_heads).to(work))
        mixed = (ctx_heads.to(work) * (1 - gate) + vctx.to(work) * gate).to(ctx.dtype)
        sees_images = (visible_images > 0)[:, :, None, None]
        ctx = torch.where(sees_images, mixed, ctx_heads).reshape(b, length, self.num_heads * self.head_dim)
        return self.o_proj(ctx), present

    def _cross_attention(self, q: Tensor, k_vis: Tensor, v_vis: Tensor, visible_images: Tensor) -> Tensor:
        """Rotated q [B, nh, L, hd] over the visual memory with the ``visible_images`` rule -> [B, L, nh, hd]."""
        return grouped_attention(
            q, k_vis, v_vis, cross_mask(visible_images, k_vis.shape[2], self.image_tokens, q.dtype)
        ).transpose(1, 2)


def cross_mask(visible_images: Tensor, keys: int, image_tokens: int, dtype: torch.dtype) -> Tensor:
    """Additive mask [B, 1, L, M]: key m is visible to token t iff m // image_tokens < visible_images[b, t]."""
    # Truncating division (the keys are non-negative): floor division would export as Div plus a sign
    # fix-up comparing booleans with Equal, which TensorRT's parser rejects.
    key_image = torch.div(torch.arange(keys, device=visible_images.device), image_tokens, rounding_mode="trunc")
    allowed = key_image[None, None, :] < visible_images[:, :, None]  # [B, L, M]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=visible_images.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
