"""A literal, per-sample transcription of the official hyper-layer procedure (spec §4, steps 1-8).

It loops over samples, slices the query rows from q0 on, builds the boolean "True = attend" mask and
applies MI-RoPE image by image, exactly as the spec describes the official code. The native model does
the same math vectorised (padded images, a per-token visible-image count and a select); the tests hold
the two equal. It uses the native model's weights and its stock Qwen2 pieces only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from owl3.model.attention import rope_cos_sin, rotate_half
from owl3.model.qwen2 import repeat_kv


def official_layer(layer, x: Tensor, image_embeds: Tensor | None, media_offset: Tensor | None, theta: float) -> Tensor:
    """One decoder layer in prefill (no cache), positions 0..L-1, no padding."""
    attn = layer.self_attn
    b, length, _ = x.shape
    nh, nkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(b, length, nh, hd).transpose(1, 2)
    k = attn.k_proj(h).view(b, length, nkv, hd).transpose(1, 2)
    v = attn.v_proj(h).view(b, length, nkv, hd).transpose(1, 2)
    positions = torch.arange(length)[None].expand(b, length)
    cos, sin = rope_cos_sin(positions, hd, theta, x.dtype)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    ctx = F.scaled_dot_product_attention(q, repeat_kv(k, attn.groups), repeat_kv(v, attn.groups), is_causal=True)
    ctx = ctx.transpose(1, 2).reshape(b, length, nh * hd)
    if hasattr(attn, "v_kv_proj") and image_embeds is not None:
        ctx = _mix_visual(attn, layer.input_layernorm(image_embeds), q, ctx, media_offset, theta)
    out = x + attn.o_proj(ctx)
    return out + layer.mlp(layer.post_attention_layernorm(out))


def _mix_visual(attn, vis: Tensor, q: Tensor, ctx: Tensor, media_offset: Tensor, theta: float) -> Tensor:
    nh, nkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    n_all, p, _ = vis.shape
    kv = attn.v_kv_proj(vis).view(n_all, p, nkv, 2, hd)
    out = ctx.clone()
    for s in range(ctx.shape[0]):
        offsets = media_offset[s]
        if not bool((offsets[:, 1] >= 0).all()):
            continue  # a sample without images: pure Qwen2
        start, end = (int(t) for t in offsets[-1])
        seen = offsets[:, 1] - start
        q0 = int((seen != 0).nonzero()[0])
        keys = kv[start:end, :, :, 0, :].to(torch.float32)  # [n, P, nkv, hd]
        values = kv[start:end, :, :, 1, :]
        inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        rotated = []
        for i in range(end - start):
            position = int((seen > i).nonzero()[0])  # the index right after the i-th placeholder
            emb = torch.cat((position * inv_freq, position * inv_freq))
            rotated.append(keys[i] * emb.cos() + rotate_half(keys[i]) * emb.sin())
        k_img = torch.stack(rotated).to(values.dtype)
        k_img = k_img.permute(2, 0, 1, 3).reshape(1, nkv, -1, hd)  # key index = image * P + patch
        v_img = values.permute(2, 0, 1, 3).reshape(1, nkv, -1, hd)
        image_of_key = torch.arange(k_img.shape[2]) // p
        allowed = image_of_key[None, :] < seen[q0:, None]  # [L - q0, n*P], True = attend
        vctx = F.scaled_dot_product_attention(
            q[s : s + 1, :, q0:],
            repeat_kv(k_img, attn.groups),
            repeat_kv(v_img, attn.groups),
            attn_mask=allowed[None, None],
        )
        vctx = vctx.transpose(1, 2).reshape(-1, nh, hd)
        text = ctx[s, q0:].view(-1, nh, hd)
        gate = torch.sigmoid(F.linear(text, attn.gate_proj[0].weight, attn.gate_proj[0].bias))
        out[s, q0:] = (text * (1 - gate) + vctx * gate).reshape(-1, nh * hd)
    return out


def official_logits(model, input_ids: Tensor, pixel_values: Tensor | None, media_offset: Tensor | None) -> Tensor:
    """Whole-model prefill through ``official_layer``: [B, L, V] fp32."""
    theta = model.config.text.rope_theta
    image_embeds = model.encode_images(pixel_values) if pixel_values is not None else None
    x = model.language_model.model.embed_tokens(input_ids)
    for layer in model.language_model.model.layers:
        x = official_layer(layer, x, image_embeds, media_offset, theta)
    x = model.language_model.model.norm(x)
    return F.linear(x, model.language_model.output_weight()).float()
