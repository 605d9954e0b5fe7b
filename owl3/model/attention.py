"""Attention and rotary math shared by text self-attention and hyper cross-attention.

Two numerics modes:

- official (default): rotary cos/sin cast to the activation dtype before multiplying, SDPA for text
  self-attention, the gate in the activation dtype: what the 240728 code does in bf16/fp16.
- fp32 islands (``with fp32_islands():``): rotary, attention softmax and the hyper gate run in fp32 inside
  fp16/bf16 models. The fp16 ONNX export traces under it, since fp16 overflow to NaN in norms and
  attention is a top failure of exported LLMs. RMSNorm is always fp32 (as the official code does).
  It is a scoped switch read at call (and trace) time, never a fork of the model.

A second scoped switch, ``attention_kernels(kernels)``, replaces the attention math (rotary, the KV cache,
softmax attention, the hyper cross-attention) by other kernels with the same meaning: the ONNX Runtime
export traces under ``owl3.export.fused.FusedKernels`` to emit ONNX Runtime's fused operators with an
in-place KV cache. The projections, norms, gate and MLP stay the model's own code.

``grouped_attention`` computes GQA by broadcasting each KV head over its query heads instead of
repeating K/V, so no reshape ever involves the key length: a zero-length key axis (no visual memory)
stays valid when exported to ONNX, where ``Reshape`` reads a runtime 0 as "copy this dimension".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol

import torch
from torch import Tensor

_FP32_ISLANDS: ContextVar[bool] = ContextVar("owl3_fp32_islands", default=False)


class AttentionKernels(Protocol):
    """Attention math for ``Qwen2Attention`` and ``HyperAttention`` (see ``attention_kernels``)."""

    def self_attention(
        self, q: Tensor, k: Tensor, v: Tensor, past: Any, num_heads: int, num_kv_heads: int
    ) -> tuple[Tensor, Tensor, Any]:
        """Projected q [B, L, nh*hd], k, v [B, L, nkv*hd] and the layer's past -> (context [B, L, nh*hd],
        rotated q [B, nh, L, hd], present)."""
        ...

    def cross_attention(self, q: Tensor, k: Tensor, v: Tensor, visible_images: Tensor, image_tokens: int) -> Tensor:
        """Rotated q [B, nh, L, hd] over visual k, v [B, nkv, M, hd], key m visible to token t iff
        m // image_tokens < visible_images[b, t] -> [B, L, nh, hd]."""
        ...


_KERNELS: ContextVar[AttentionKernels | None] = ContextVar("owl3_attention_kernels", default=None)


@contextmanager
def attention_kernels(kernels: AttentionKernels) -> Iterator[None]:
    """Within this block, attention runs on ``kernels`` instead of the model's own math."""
    token = _KERNELS.set(kernels)
    try:
        yield
    finally:
        _KERNELS.reset(token)


def active_kernels() -> AttentionKernels | None:
    return _KERNELS.get()


@contextmanager
def fp32_islands() -> Iterator[None]:
    """Within this block, rotary, softmax and the gate of half-precision models compute in fp32."""
    token = _FP32_ISLANDS.set(True)
    try:
        yield
    finally:
        _FP32_ISLANDS.reset(token)


def islands_active() -> bool:
    return _FP32_ISLANDS.get()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sensitive math runs in: fp32 under islands, else the activation dtype."""
    return torch.float32 if islands_active() else dtype


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> Tensor:
    """Inverse frequencies 1 / theta^(2i/hd), fp32 [hd/2]."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
    return 1.0 / (theta**exponents)


def rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim (HF rotate-half convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Rotary cos/sin for text tokens: fp32 angles, cast to the compute dtype. [B, L] -> [B, 1, L, hd]."""
    inv_freq = rope_inv_freq(head_dim, theta, position_ids.device)
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, L, hd/2]
    emb = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, L, hd]
    target = compute_dtype(dtype)
    return emb.cos().to(target), emb.sin().to(target)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin, in cos's dtype, returned in x's dtype."""
    xc = x.to(cos.dtype)
    return (xc * cos + rotate_half(xc) * sin).to(x.dtype)


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Softmax attention with grouped KV heads.

    q [B, nh, L, hd]; k, v [B, nkv, T, hd] (T may be 0); mask [B, 1, L, T] additive. Returns [B, nh, L, hd].
    Query head h uses KV head h // (nh / nkv), as repeat_kv would give.
    """
    b, nh, length, hd = q.shape
    nkv = k.shape[1]
    dtype = q.dtype
    work = compute_dtype(dtype)
    q5 = q.to(work).reshape(b, nkv, nh // nkv, length, hd)  # [B, nkv, groups, L, hd]
    scores = torch.matmul(q5, k.to(work)[:, :, None].transpose(-1, -2)) * (hd**-0.5)  # [B, nkv, g, L, T]
    scores = scores + mask.to(work)[:, :, None]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(work)  # softmax itself always in fp32
    out = torch.matmul(probs, v.to(work)[:, :, None])  # [B, nkv, g, L, hd]
    return out.reshape(b, nh, length, hd).to(dtype)
