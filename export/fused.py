"""The ONNX Runtime flavour's decoder: ONNX Runtime's fused operators and an in-place KV cache.

The decoder is traced through the same ``Owl3Model`` under ``attention_kernels(FusedKernels(...))``, so only the
attention math changes; projections, norms, gate and MLP are the model's own code. Each kernel is a PyTorch
custom operator with a reference implementation (what ONNX Runtime computes, runnable here for tests) that the
exporter translates to one ``com.microsoft`` operator (the self-attention by default to a few standard ones):

- ``RotaryEmbedding`` on q and k (positions from ``position_ids``; cos/sin caches of ``max_position_embeddings``
  rows, one pair of initializers shared by every layer);
- causal self-attention with the KV cache in place (one custom operator, GroupQueryAttention's interface):
  ``past_key_i`` / ``past_value_i`` are buffers of a request's capacity [B, nkv, capacity, hd] (capacity >=
  ``total_sequence_length``) whose first ``total - seq`` rows hold the past; the step writes its ``seq`` new
  rows and ``present_*`` is that same buffer. Bound to one ``OrtValue`` for input and output (IO binding),
  nothing is copied: a decode step reads the cache and writes one row, whatever the context. ``seqlens_k``
  [B] int32 = total - 1, ``total_sequence_length`` [] int32. Two kernels (``FusedKernels``): "grouped"
  (the default, ``cache_attention``: ScatterND writes the rows in place, one MatMul per KV head for the scores
  and one for the values, so each cache row is read once per step) and "gqa" (ONNX Runtime's
  ``GroupQueryAttention``, whose CPU kernel reads each KV head once per query head: 23.2 ms for 24 layers at
  4,096 tokens here against 13.8 ms grouped, bench/attention_kernels.py; on CUDA it is flash attention). The
  cache and the attention are fp32 in every precision: fp16 exports keep attention in fp32 (their fp32
  islands; ONNX Runtime documents no fp32 softmax for its fp16 CPU kernel), at twice the cache memory of an
  fp16 cache; casting the cache at every step instead would undo the in-place cache;
- ``MultiHeadAttention`` for the hyper layers' cross-attention over the visual memory: the GQA groups are folded
  into the query length (num_heads = nkv, query [B, g*L, nkv*hd]) so K/V are used as stored, and the
  ``visible_images`` rule is its additive ``attention_bias`` [B, 1, g*L, M].

RMSNorm becomes ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` by the maintained
rewriter's rules (``onnxscript.rewriter.ort_fusions``) in fp32 graphs. fp16 graphs keep the model's RMSNorm
(explicit fp32 islands): fused, they flipped one of the demo validation's 82 image positions (top-1 0.988
against the 0.99 gate; the unfused norm passes), and the norm is a small part of a decode step.
The rewriter's GQA rule does not apply either way: it fuses a graph that concatenates the cache (ours did not
even match: the grouped broadcast and the explicit mask differ from the patterns it knows), and a rewrite must keep
a graph's meaning, while the in-place cache changes the graph's inputs. Hence the kernels above, one custom
operator each, instead of hand-written pattern code. (Its full ``optimize_for_ort`` fuses the SigLIP graph too,
but it serializes the model, which the meta-traced graphs without weights cannot be: the vision graph relies
on ONNX Runtime's own load-time fusions.)
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript
import torch
from onnx.defs import OpSchema
from torch import Tensor

from owl3.config import Owl3Config
from owl3.export.graphs import DecoderGraph
from owl3.export.specs import ATTENTION_KERNELS
from owl3.model.attention import attention_kernels, compute_dtype, grouped_attention, rope_inv_freq, rotate_half
from owl3.model.hyper import cross_mask
from owl3.model.owl3 import Owl3Model

MS_DOMAIN = "com.microsoft"
_MS = onnxscript.values.Opset(MS_DOMAIN, 1)
COS_CACHE, SIN_CACHE = "rotary.cos_cache", "rotary.sin_cache"


# ---- ONNX schemas of the three contrib operators (ONNX has none; the exporter needs them to emit nodes) -----


def register_contrib_schemas() -> None:
    """Register ONNX Runtime's RotaryEmbedding, GroupQueryAttention, MultiHeadAttention and the RMSNorm
    fusions (the inputs and attributes used here, as ONNX Runtime's ContribOperators.md documents them), once
    per process, so the exporter can emit them and ``onnx.checker`` can check the graphs."""
    floats = ["tensor(float)", "tensor(float16)"]
    options = OpSchema.FormalParameterOption

    def param(name: str, types: str, required: bool = True) -> OpSchema.FormalParameter:
        return OpSchema.FormalParameter(name, types, param_option=options.Single if required else options.Optional)

    def attribute(name: str, kind: OpSchema.AttrType, required: bool = False) -> OpSchema.Attribute:
        return OpSchema.Attribute(name, kind, "", required=required)

    ints, floating = OpSchema.AttrType.INT, OpSchema.AttrType.FLOAT
    schemas = [
        OpSchema(
            "RotaryEmbedding", MS_DOMAIN, 1,
            inputs=[param("input", "T"), param("position_ids", "M"), param("cos_cache", "T"), param("sin_cache", "T")],
            outputs=[param("output", "T")],
            type_constraints=[("T", floats, ""), ("M", ["tensor(int64)"], "")],
            attributes=[attribute("interleaved", ints), attribute("num_heads", ints),
                        attribute("rotary_embedding_dim", ints), attribute("scale", floating)],
        ),
        OpSchema(
            "GroupQueryAttention", MS_DOMAIN, 1,
            inputs=[param("query", "T"), param("key", "T", False), param("value", "T", False),
                    param("past_key", "T", False), param("past_value", "T", False), param("seqlens_k", "M"),
                    param("total_sequence_length", "M"), param("cos_cache", "T", False),
                    param("sin_cache", "T", False)],
            outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
            type_constraints=[("T", floats, ""), ("M", ["tensor(int32)"], "")],
            attributes=[attribute("num_heads", ints, True), attribute("kv_num_heads", ints, True),
                        attribute("do_rotary", ints), attribute("rotary_interleaved", ints),
                        attribute("scale", floating)],
        ),
        OpSchema(
            "MultiHeadAttention", MS_DOMAIN, 1,
            inputs=[param("query", "T"), param("key", "T", False), param("value", "T", False),
                    param("bias", "T", False), param("key_padding_mask", "M", False),
                    param("attention_bias", "T", False)],
            outputs=[param("output", "T")],
            type_constraints=[("T", floats, ""), ("M", ["tensor(int32)"], "")],
            attributes=[attribute("num_heads", ints, True), attribute("scale", floating)],
        ),
        # The rewriter's RMSNorm fusions: ONNX Runtime registers the first in the ONNX domain (since version 1).
        OpSchema(
            "SimplifiedLayerNormalization", "", 1,
            inputs=[param("X", "T"), param("scale", "V")],
            outputs=[param("Y", "V"), param("inv_std_var", "U", False)],
            type_constraints=[("T", floats, ""), ("U", floats, ""), ("V", floats, "")],
            attributes=[attribute("axis", ints), attribute("epsilon", floating), attribute("stash_type", ints)],
        ),
        OpSchema(
            "SkipSimplifiedLayerNormalization", MS_DOMAIN, 1,
            inputs=[param("input", "T"), param("skip", "T"), param("gamma", "T"), param("bias", "T", False)],
            outputs=[param("output", "T"), param("mean", "U", False), param("inv_std_var", "U", False),
                     param("input_skip_bias_sum", "T", False)],
            type_constraints=[("T", floats, ""), ("U", ["tensor(float)"], "")],
            attributes=[attribute("epsilon", floating)],
        ),
    ]  # fmt: skip
    for schema in schemas:
        if not onnx.defs.has(schema.name, schema.domain):
            onnx.defs.register_schema(schema)


# ---- the kernels as PyTorch custom operators: reference math, shapes for tracing, ONNX translation ---------


@torch.library.custom_op("owl3::rotary_embedding", mutates_args=())
def rotary_embedding(x: Tensor, position_ids: Tensor, cos_cache: Tensor, sin_cache: Tensor, num_heads: int) -> Tensor:
    """x [B, L, n*hd] rotated (rotate-half convention) at ``position_ids`` [B, L]; caches [max_pos, hd/2]."""
    b, length, width = x.shape
    cos = torch.cat((cos_cache[position_ids],) * 2, dim=-1)[:, :, None]  # [B, L, 1, hd]
    sin = torch.cat((sin_cache[position_ids],) * 2, dim=-1)[:, :, None]
    heads = x.view(b, length, num_heads, width // num_heads)
    return (heads * cos + rotate_half(heads) * sin).reshape(b, length, width)


@rotary_embedding.register_fake
def _(x: Tensor, position_ids: Tensor, cos_cache: Tensor, sin_cache: Tensor, num_heads: int) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("owl3::group_query_attention", mutates_args=())
def group_query_attention(
    q: Tensor, k: Tensor, v: Tensor, past_key: Tensor, past_value: Tensor, seqlens_k: Tensor,
    total_sequence_length: Tensor, num_heads: int, kv_num_heads: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Causal GQA over the in-place cache (module docstring); equal lengths across the batch."""
    b, length, _ = q.shape
    total = int(total_sequence_length)
    start = total - length
    hd = past_key.shape[-1]
    present = []
    for past, new in ((past_key, k), (past_value, v)):
        buffer = past.clone()
        buffer[:, :, start:total] = new.view(b, length, kv_num_heads, hd).transpose(1, 2)
        present.append(buffer)
    keys = torch.arange(total)
    allowed = keys[None, :] <= torch.arange(length)[:, None] + start
    mask = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, torch.finfo(q.dtype).min)
    heads = q.view(b, length, num_heads, hd).transpose(1, 2)
    out = grouped_attention(heads, present[0][:, :, :total], present[1][:, :, :total], mask[None, None])
    return out.transpose(1, 2).reshape(b, length, num_heads * hd), present[0], present[1]


@group_query_attention.register_fake
def _(q, k, v, past_key, past_value, seqlens_k, total_sequence_length, num_heads, kv_num_heads):
    return torch.empty_like(q), torch.empty_like(past_key), torch.empty_like(past_value)


@torch.library.custom_op("owl3::cache_attention", mutates_args=())
def cache_attention(
    q: Tensor, k: Tensor, v: Tensor, past_key: Tensor, past_value: Tensor, write_index: Tensor, visible: Tensor,
    num_heads: int, kv_num_heads: int, head_dim: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Causal attention over the in-place cache with each KV head's queries in one product (the "grouped"
    self-attention, module docstring). q [B, S, nh*hd] and k, v [B, S, nkv*hd] (rotated); past_* [B, nkv, cap,
    hd]; ``write_index`` [B, S, nkv, 3] int64: (sample, KV head, row) of each new row; ``visible`` [B, nkv,
    g*S, cap] bool: query i of group member g (row g*S + i) may read that cache row. -> out, present_key,
    present_value (the buffers with the new rows written). Rows never visible must be finite (probability 0
    times them)."""
    b, length, _ = q.shape
    groups = num_heads // kv_num_heads
    present = []
    for past, new in ((past_key, k), (past_value, v)):
        buffer = past.clone()
        buffer[write_index[..., 0], write_index[..., 1], write_index[..., 2]] = new.view(b, length, kv_num_heads, -1)
        present.append(buffer)
    grouped = (q * head_dim**-0.5).view(b, length, kv_num_heads, groups, head_dim)
    queries = grouped.permute(0, 2, 3, 1, 4).reshape(b, kv_num_heads, groups * length, head_dim)
    scores = (queries @ present[0].transpose(-1, -2)).masked_fill(~visible, torch.finfo(q.dtype).min)
    out = torch.softmax(scores, dim=-1) @ present[1]  # [B, nkv, g*S, hd]
    out = out.view(b, kv_num_heads, groups, length, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(b, length, num_heads * head_dim), present[0], present[1]


@cache_attention.register_fake
def _(q, k, v, past_key, past_value, write_index, visible, num_heads, kv_num_heads, head_dim):
    return torch.empty_like(q), torch.empty_like(past_key), torch.empty_like(past_value)


@torch.library.custom_op("owl3::multi_head_attention", mutates_args=())
def multi_head_attention(q: Tensor, k: Tensor, v: Tensor, attention_bias: Tensor, num_heads: int) -> Tensor:
    """q [B, S, n*hd] over k, v [B, n, M, hd] with ``attention_bias`` [B, 1, S, M] -> [B, S, n*hd]."""
    b, length, width = q.shape
    heads = q.view(b, length, num_heads, width // num_heads).transpose(1, 2)
    out = grouped_attention(heads, k, v, attention_bias)
    return out.transpose(1, 2).reshape(b, length, width)


@multi_head_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, attention_bias: Tensor, num_heads: int) -> Tensor:
    return torch.empty_like(q)


def _rotary_onnx(x, position_ids, cos_cache, sin_cache, num_heads: int):
    return _MS.RotaryEmbedding(x, position_ids, cos_cache, sin_cache, interleaved=0, num_heads=num_heads)


def _gqa_onnx(q, k, v, past_key, past_value, seqlens_k, total, num_heads: int, kv_num_heads: int):
    return _MS.GroupQueryAttention(
        q, k, v, past_key, past_value, seqlens_k, total, num_heads=num_heads, kv_num_heads=kv_num_heads, _outputs=3
    )


def _cache_attention_onnx(
    q, k, v, past_key, past_value, write_index, visible, num_heads: int, kv_num_heads: int, head_dim: int
):
    """``cache_attention`` in standard operators: 16 per layer, the step's indices and mask coming from the
    graph-wide ``FusedKernels`` geometry. ONNX Runtime's ``ScatterND`` copies nothing when its output is the
    same memory as its input (IO binding), so the step's rows are written in place."""
    op, groups = onnxscript.opset18, num_heads // kv_num_heads

    def ints(*values: int):
        return op.Constant(value_ints=list(values))

    present_key = op.ScatterND(past_key, write_index, op.Reshape(k, ints(0, 0, kv_num_heads, head_dim)))
    present_value = op.ScatterND(past_value, write_index, op.Reshape(v, ints(0, 0, kv_num_heads, head_dim)))
    scaled = op.Mul(q, op.Constant(value_float=head_dim**-0.5))
    grouped = op.Reshape(scaled, ints(0, 0, kv_num_heads, groups, head_dim))  # [B, S, nkv, g, hd]
    columns = op.Reshape(op.Transpose(grouped, perm=[0, 2, 4, 3, 1]), ints(0, 0, head_dim, -1))  # [B, nkv, hd, g*S]
    scores = op.Transpose(op.MatMul(present_key, columns), perm=[0, 1, 3, 2])  # [B, nkv, g*S, cap]
    lowest = op.Constant(value_float=float(np.finfo(np.float32).min))
    probs = op.Softmax(op.Where(visible, scores, lowest), axis=-1)
    out = op.Reshape(op.MatMul(probs, present_value), ints(0, 0, groups, -1, head_dim))  # [B, nkv, g, S, hd]
    out = op.Reshape(op.Transpose(out, perm=[0, 3, 1, 2, 4]), ints(0, 0, -1))  # [B, S, nh*hd], head j*g + g'
    return out, present_key, present_value


def _mha_onnx(q, k, v, attention_bias, num_heads: int):
    return _MS.MultiHeadAttention(q, k, v, None, None, attention_bias, num_heads=num_heads)


TRANSLATIONS = {
    torch.ops.owl3.rotary_embedding.default: _rotary_onnx,
    torch.ops.owl3.group_query_attention.default: _gqa_onnx,
    torch.ops.owl3.cache_attention.default: _cache_attention_onnx,
    torch.ops.owl3.multi_head_attention.default: _mha_onnx,
}


# ---- the kernels the model calls under ``attention_kernels`` ------------------------------------------------


class FusedKernels:
    """``AttentionKernels`` on the custom operators, for one decoder run (its graph-level inputs); the
    self-attention ``attention``: "grouped" (``cache_attention``) or "gqa" (``group_query_attention``)."""

    def __init__(
        self, position_ids: Tensor, seqlens_k: Tensor, total: Tensor, cos_cache: Tensor, sin_cache: Tensor,
        attention: str = "grouped",
    ) -> None:  # fmt: skip
        if attention not in ATTENTION_KERNELS:
            raise ValueError(f"unknown self-attention kernel {attention!r}: one of {ATTENTION_KERNELS}")
        self.position_ids, self.seqlens_k, self.total = position_ids, seqlens_k, total
        self.cos_cache, self.sin_cache, self.attention = cos_cache, sin_cache, attention
        self._geometry: tuple[Tensor, Tensor] | None = None

    def geometry(self, q: Tensor, capacity: int, kv_heads: int, groups: int) -> tuple[Tensor, Tensor]:
        """The step's ``cache_attention`` indices and mask, computed once per run for every layer (traced
        once, so the graph holds one copy): sample b's new rows are ``seqlens_k[b] + 1 - S + i``."""
        if self._geometry is None:
            b, length, device = q.shape[0], q.shape[1], q.device
            steps = torch.arange(length, device=device)
            rows = (self.seqlens_k.to(torch.int64) + 1 - length)[:, None] + steps  # [B, S]
            samples, heads = torch.arange(b, device=device), torch.arange(kv_heads, device=device)
            axes = samples[:, None, None], heads[None, None, :], rows[:, :, None]
            write_index = torch.stack(torch.broadcast_tensors(*axes), dim=-1)  # [B, S, nkv, 3]: no transposes
            keys = torch.arange(capacity, device=device)
            visible = keys[None, None, :] <= rows[:, :, None]  # [B, S, cap]: causal
            visible = visible[:, None].expand(b, groups, length, capacity).reshape(b, 1, groups * length, capacity)
            visible = visible.expand(b, kv_heads, groups * length, capacity)  # once: no broadcast in each layer
            self._geometry = (write_index, visible)
        return self._geometry

    def self_attention(
        self, q: Tensor, k: Tensor, v: Tensor, past: tuple[Tensor, Tensor], num_heads: int, num_kv_heads: int
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        dtype, work = q.dtype, compute_dtype(q.dtype)  # fp32 under fp32 islands: rotary, cache and attention
        q = torch.ops.owl3.rotary_embedding(q.to(work), self.position_ids, self.cos_cache, self.sin_cache, num_heads)
        k = torch.ops.owl3.rotary_embedding(k.to(work), self.position_ids, self.cos_cache, self.sin_cache, num_kv_heads)
        if self.attention == "gqa":
            ctx, key, value = torch.ops.owl3.group_query_attention(
                q, k, v.to(work), past[0], past[1], self.seqlens_k, self.total, num_heads, num_kv_heads
            )
        else:
            head_dim = past[0].shape[-1]
            index, visible = self.geometry(q, past[0].shape[2], num_kv_heads, num_heads // num_kv_heads)
            ctx, key, value = torch.ops.owl3.cache_attention(
                q, k, v.to(work), past[0], past[1], index, visible, num_heads, num_kv_heads, head_dim
            )
        b, length, _ = q.shape
        return ctx.to(dtype), q.view(b, length, num_heads, -1).transpose(1, 2), (key, value)

    def cross_attention(self, q: Tensor, k: Tensor, v: Tensor, visible_images: Tensor, image_tokens: int) -> Tensor:
        b, nh, length, hd = q.shape
        nkv = k.shape[1]
        groups = nh // nkv
        work = compute_dtype(q.dtype)  # softmax in fp32 under fp32 islands
        # Query head h = j * groups + g reads KV head j: fold g into the query length, heads = nkv.
        folded = q.view(b, nkv, groups, length, hd).permute(0, 2, 3, 1, 4).reshape(b, groups * length, nkv * hd)
        visible = visible_images[:, None, :].expand(b, groups, length).reshape(b, groups * length)
        bias = cross_mask(visible, k.shape[2], image_tokens, work)  # [B, 1, g*L, M]: no reshape involves M
        out = torch.ops.owl3.multi_head_attention(folded.to(work), k.to(work), v.to(work), bias, nkv)
        out = out.view(b, groups, length, nkv, hd).permute(0, 2, 3, 1, 4)  # the caller casts to its dtype
        return out.reshape(b, length, nh, hd)


def rotary_caches(config: Owl3Config) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_position_embeddings, hd/2] float32: the angles the model computes, position by position."""
    text = config.text
    positions = torch.arange(text.max_position_embeddings, dtype=torch.int64).to(torch.float32)
    angles = positions[:, None] * rope_inv_freq(text.head_dim, text.rope_theta)
    return angles.cos().numpy(), angles.sin().numpy()


class FusedDecoderGraph(DecoderGraph):
    """The decoder with the fused kernels and the in-place cache (``export.specs``: the fused decoder spec)."""

    def __init__(self, model: Owl3Model, attention: str = "grouped") -> None:
        super().__init__(model)
        self.attention = attention
        text = model.config.text
        rows, half = text.max_position_embeddings, text.head_dim // 2
        self.register_buffer("cos_cache", torch.empty(rows, half, dtype=torch.float32))
        self.register_buffer("sin_cache", torch.empty(rows, half, dtype=torch.float32))

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        visible_images: Tensor,
        logit_positions: Tensor,
        seqlens_k: Tensor,
        total_sequence_length: Tensor,
        past: list[Tensor],
        visual: list[Tensor],
    ) -> tuple[Tensor, list[Tensor]]:
        kernels = FusedKernels(
            position_ids, seqlens_k, total_sequence_length, self.cos_cache, self.sin_cache, self.attention
        )
        with attention_kernels(kernels):
            return super().forward(input_ids, position_ids, visible_images, logit_positions, past, visual)


def finish_fused_graph(model: ir.Model, config: Owl3Config, precision: str) -> dict[str, int]:
    """After tracing: give the rotary caches their values (they are the only initializers not read from the
    checkpoint) and, in fp32 graphs, fuse RMSNorm with the maintained rewriter's rules; returns what was fused."""
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

    counts = {"rms_normalization": 0, "skip_rms_normalization": 0}
    if precision == "fp32":
        counts["rms_normalization"] = fuse_rms_normalization(model)
        counts["skip_rms_normalization"] = fuse_skip_rms_normalization(model)
    initializers = model.graph.initializers
    if "cos_cache" in initializers:
        cos, sin = rotary_caches(config)
        for name, values, final in (("cos_cache", cos, COS_CACHE), ("sin_cache", sin, SIN_CACHE)):
            value = initializers.pop(name)
            value.const_value = ir.tensor(values, name=final)
            value.name = final
            initializers[final] = value
    return counts
