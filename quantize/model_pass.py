"""The whole-model pass of the quantizer: every block loaded, quantized, replayed and written, in model order.

Weights stream from the checkpoint one block at a time (``WeightSource``): the vision embeddings and encoder
layers, the projector, the token embeddings, each decoder layer, the final norm and ``lm_head``. What a block
holds is written to the output (``ShardWriter``) and freed before the next block is read, so peak memory is one
block, its Hessians and the calibration activations, never the model.

The calibration activations are one ``SampleState`` per sample: the hidden states entering the next decoder layer,
the token positions, the visual memory's input (projector output of the sample's images, as the hyper layers'
``input_layernorm`` and ``v_kv_proj`` read it) and which images each token sees. Every block runs exactly as in
the model (``owl3.model``), with its quantized layers replacing the float ones before its outputs are kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from owl3.config import Owl3Config
from owl3.model.attention import rope_cos_sin
from owl3.model.hyper import HyperAttention
from owl3.model.owl3 import IMAGE_CHUNK, attention_for_layer
from owl3.model.qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, causal_mask
from owl3.model.siglip import SiglipEncoderLayer, SiglipVisionEmbeddings
from owl3.placement import parse_media_offset
from owl3.quantize.checkpoint_io import ShardWriter, WeightSource
from owl3.quantize.gptq_format import LM_HEAD
from owl3.quantize.layerwise import DECODER_GROUPS, LM_HEAD_GROUPS, VISION_GROUPS, BlockQuantizer

EMBED = "language_model.model.embed_tokens.weight"
REFERENCE_SAMPLES = 2  # samples whose final logits the written checkpoint must reproduce


@dataclass
class SampleState:
    """One calibration sample as the next decoder layer sees it (batch of one)."""

    input_ids: np.ndarray  # [1, L]
    hidden: Tensor | None = None  # [1, L, H]
    images: Tensor | None = None  # [1, n, P, H] projector output
    image_positions: Tensor | None = None  # [1, n] MI-RoPE positions
    visible: Tensor | None = None  # [1, L] images seen by each token


@dataclass
class PassResult:
    records: list[dict[str, Any]]
    reference: list[tuple[int, Tensor]] = field(default_factory=list)  # (sample index, logits [1, L, V])
    seconds: dict[str, float] = field(default_factory=dict)


def quantize_pass(
    config: Owl3Config,
    quantizer: BlockQuantizer,
    source: WeightSource,
    samples: list[dict[str, Any]],
    writer: ShardWriter,
    progress: Callable[[str], None],
) -> PassResult:
    """Quantize the model block by block on ``samples`` (processor outputs); returns records and reference logits."""
    timer: dict[str, float] = {}
    started = time.perf_counter()
    states = [SampleState(s["input_ids"]) for s in samples]
    image_embeds = _vision(config, quantizer, source, [s["pixel_values"] for s in samples], writer, progress)
    _place_images(states, samples, image_embeds, source.device)
    timer["vision"] = time.perf_counter() - started
    _embed(states, source, writer)
    for index in range(config.text.num_hidden_layers):
        layer_started = time.perf_counter()
        _decoder_layer(config, index, quantizer, source, states, writer)
        progress(f"decoder layer {index + 1}/{config.text.num_hidden_layers} quantized{_peak_rss()}")
        timer[f"layer {index}"] = time.perf_counter() - layer_started
    head_started = time.perf_counter()
    reference = _head(config, quantizer, source, states, writer)
    timer["head"] = time.perf_counter() - head_started
    return PassResult(quantizer.records, reference, timer)


# ---- vision -------------------------------------------------------------------------------------------------
def _vision(
    config: Owl3Config,
    quantizer: BlockQuantizer,
    source: WeightSource,
    pixels: list[Any],
    writer: ShardWriter,
    progress: Callable[[str], None],
) -> list[Tensor | None]:
    """Projector outputs [n, P, H] per sample (None without images), the vision tower streamed layer by layer."""
    vision = config.vision
    embeddings = _load(lambda: SiglipVisionEmbeddings(vision), "vision_model.embeddings.", source, quantizer)
    xs = [None if p is None else _chunked(embeddings, torch.from_numpy(p).to(source.device)) for p in pixels]
    writer.add_module("vision_model.embeddings.", embeddings)
    for j in range(vision.layers_run):
        prefix = f"vision_model.encoder.layers.{j}."
        layer = _load(lambda: SiglipEncoderLayer(vision), prefix, source, quantizer)
        quantizer.quantize(layer, prefix, VISION_GROUPS, lambda layer=layer, xs=xs: _map(layer, xs))
        with torch.no_grad():
            xs = _map(layer, xs)
        writer.add_module(prefix, layer)
        progress(f"vision layer {j + 1}/{vision.layers_run} done{_peak_rss()}")
    projector = _load(
        lambda: nn.Linear(vision.hidden_size, config.text.hidden_size), "vision2text_model.", source, quantizer
    )
    with torch.no_grad():
        out = _map(projector, xs)
    writer.add_module("vision2text_model.", projector)
    return out


def _map(module: nn.Module, xs: list[Tensor | None]) -> list[Tensor | None]:
    return [None if x is None else _chunked(module, x) for x in xs]


def _chunked(module: nn.Module, x: Tensor) -> Tensor:
    """``module`` over ``x`` in the chunks ``Owl3Model.encode_images`` uses, so both round alike."""
    return torch.cat([module(chunk) for chunk in x.split(IMAGE_CHUNK)])


def _place_images(states: list[SampleState], samples: list[dict], embeds: list[Tensor | None], device) -> None:
    """Each sample's visual-memory input and visibility, from its media_offset (as ``Owl3Model`` places them)."""
    for state, sample, images in zip(states, samples, embeds, strict=True):
        offsets = sample["media_offset"]
        if images is None or bool((offsets[:, :, 1] < 0).all()):
            continue
        placement = parse_media_offset(offsets, images.shape[0])
        state.images = images[torch.from_numpy(placement.gather_index(images.shape[0])).to(device)]
        state.image_positions = torch.from_numpy(placement.positions).to(device)
        state.visible = torch.from_numpy(placement.seen).to(device)


# ---- language model -----------------------------------------------------------------------------------------
def _embed(states: list[SampleState], source: WeightSource, writer: ShardWriter) -> None:
    table = source.tensor(EMBED, dtype=torch.float16)  # a lookup: kept in its stored dtype, rows cast on use
    for state in states:
        state.hidden = F.embedding(torch.from_numpy(state.input_ids).to(source.device), table).to(source.compute)
    writer.add(EMBED, table)


def _decoder_layer(
    config: Owl3Config,
    index: int,
    quantizer: BlockQuantizer,
    source: WeightSource,
    states: list[SampleState],
    writer: ShardWriter,
) -> None:
    prefix = f"language_model.model.layers.{index}."
    layer = _load(lambda: Qwen2DecoderLayer(config.text, attention_for_layer(config, index)), prefix, source, quantizer)

    def run() -> list[Tensor]:
        return [decoder_step(config, layer, state) for state in states]

    quantizer.quantize(layer, prefix, DECODER_GROUPS, run)
    with torch.no_grad():
        for state, hidden in zip(states, run(), strict=True):
            state.hidden = hidden
    writer.add_module(prefix, layer)


def decoder_step(config: Owl3Config, layer: Qwen2DecoderLayer, state: SampleState) -> Tensor:
    """One decoder layer on one sample's full sequence (prefill, causal, its visual memory when it has one)."""
    x = state.hidden
    length = x.shape[1]
    positions = torch.arange(length, device=x.device)[None]
    rope = rope_cos_sin(positions, config.text.head_dim, config.text.rope_theta, x.dtype)
    mask = causal_mask(length, 0, 1, x.dtype, x.device)
    visual = None
    if state.images is not None and isinstance(layer.self_attn, HyperAttention):
        visual = layer.self_attn.visual_kv(layer.input_layernorm(state.images), state.image_positions)
    out, _ = layer(x, rope, mask, None, visual, state.visible if visual is not None else None)
    return out


def _head(
    config: Owl3Config, quantizer: BlockQuantizer, source: WeightSource, states: list[SampleState], writer: ShardWriter
) -> list[tuple[int, Tensor]]:
    """Final norm and lm_head (quantized with the override); returns reference logits of a few samples."""
    text = config.text
    norm = _load(
        lambda: Qwen2RMSNorm(text.hidden_size, text.rms_norm_eps), "language_model.model.norm.", source, quantizer
    )
    with torch.no_grad():
        normed = [norm(state.hidden) for state in states]
    writer.add_module("language_model.model.norm.", norm)
    weight_name = EMBED if text.tie_word_embeddings else f"{LM_HEAD}.weight"
    chosen = _reference_samples(states)
    if LM_HEAD not in quantizer.plan:  # float: kept in fp16, projected in vocabulary chunks (bounded memory)
        weight = source.tensor(weight_name, dtype=torch.float16)
        if not text.tie_word_embeddings:
            writer.add(f"{LM_HEAD}.weight", weight)
        with torch.no_grad():
            return [(i, _chunked_projection(normed[i], weight).cpu()) for i in chosen]
    holder = nn.Module()
    with torch.device("meta"):
        holder.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
    holder.to_empty(device=source.device)
    with torch.no_grad():
        holder.lm_head.weight.copy_(source.tensor(weight_name, full_precision=True))
        holder.lm_head.weight.requires_grad_(False)
    quantizer.quantize(holder, "language_model.", LM_HEAD_GROUPS, lambda: [holder.lm_head(x) for x in normed])
    writer.add_module(f"{LM_HEAD}.", holder.lm_head)  # a quantized lm_head is written untied
    with torch.no_grad():
        return [(i, holder.lm_head(normed[i]).float().cpu()) for i in chosen]


def _chunked_projection(hidden: Tensor, weight: Tensor, rows: int = 16384) -> Tensor:
    """``hidden @ weight.T`` in fp32 from an fp16 weight, ``rows`` vocabulary rows at a time: [1, L, V]."""
    return torch.cat([F.linear(hidden, part.to(hidden.dtype)) for part in weight.split(rows)], dim=-1)


def _peak_rss() -> str:
    """ ", peak RSS 3.2 GiB" where the platform reports it (Linux: kilobytes), else ""."""
    try:
        import resource
    except ImportError:
        return ""
    return f", peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"


def _reference_samples(states: list[SampleState]) -> list[int]:
    """The first sample with images and the first without (when there are such)."""
    with_images = [i for i, s in enumerate(states) if s.images is not None][:1]
    without = [i for i, s in enumerate(states) if s.images is None][:1]
    return (with_images + without)[:REFERENCE_SAMPLES] or [0]


def _load(build: Callable[[], nn.Module], prefix: str, source: WeightSource, quantizer: BlockQuantizer) -> nn.Module:
    """Build a module on the meta device (no allocation, no init) and fill it from the checkpoint."""
    with torch.device("meta"):
        module = build()
    return source.load(module, prefix, quantizer.plan)
