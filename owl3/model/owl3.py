"""mPLUG-Owl3 (240728): SigLIP -> Linear projector -> Qwen2 with hyper layers.

Module names equal the checkpoint keys of spec §1 (``language_model.model.layers.{i}...``,
``vision_model...``, ``vision2text_model``), so the weight name table maps one to one.

Calls are stateless: a request's visual memory (per hyper layer K/V) and the text KV cache are returned
to the caller and passed back in, never kept in a module. The same three steps are the three graphs the
ONNX export produces: ``encode_images`` (vision), ``build_visual_memory`` (visual memory) and
``language_model`` (decoder with KV cache).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from owl3.config import Owl3Config, TextConfig
from owl3.errors import PromptError
from owl3.model.attention import rope_cos_sin
from owl3.model.hyper import HyperAttention
from owl3.model.qwen2 import KVPair, Qwen2Attention, Qwen2DecoderLayer, Qwen2RMSNorm, causal_mask
from owl3.model.siglip import SiglipVisionTransformer
from owl3.placement import media_offset_from_ids, parse_media_offset

IMAGE_CHUNK = 16  # images per vision forward: bounds the [n, heads, P, P] attention weights


@dataclass
class VisualMemory:
    """What a request's images contribute to every decode step, computed once.

    ``kv[j]`` is the (key, value) pair of the j-th hyper layer (``config.hyper_layers[j]``), each
    [B, nkv, n_max*P, hd], keys MI-RoPE-rotated; ``image_counts`` [B] is each sample's number of images.
    """

    kv: list[KVPair]
    image_counts: Tensor


@dataclass
class Owl3Output:
    logits: Tensor  # [B, L, V] fp32
    past_key_values: list[KVPair]  # per layer, [B, nkv, T, hd]
    visual_memory: VisualMemory | None


class Owl3TextModel(nn.Module):
    """Embeddings, decoder layers (hyper where the config says) and the final norm."""

    def __init__(self, config: Owl3Config) -> None:
        super().__init__()
        text = config.text
        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleList(
            Qwen2DecoderLayer(text, attention_for_layer(config, i)) for i in range(text.num_hidden_layers)
        )
        self.norm = Qwen2RMSNorm(text.hidden_size, text.rms_norm_eps)


def attention_for_layer(config: Owl3Config, index: int) -> Qwen2Attention:
    """The attention of decoder layer ``index``: hyper attention where the config says, else Qwen2's."""
    if config.is_hyper(index):
        return HyperAttention(config.text, config.image_tokens)
    return Qwen2Attention(config.text)


class Owl3ForCausalLM(nn.Module):
    """The decoder with KV cache: one call serves prefill and decode (``language_model`` in checkpoints)."""

    def __init__(self, config: Owl3Config) -> None:
        super().__init__()
        self.config = config
        self.model = Owl3TextModel(config)
        if not config.text.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    def output_weight(self) -> Tensor:
        tied = self.config.text.tie_word_embeddings
        return self.model.embed_tokens.weight if tied else self.lm_head.weight

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        past_key_values: Sequence[KVPair] | None = None,
        visual_memory: VisualMemory | None = None,
        visible_images: Tensor | None = None,
        logit_positions: Tensor | None = None,
    ) -> tuple[Tensor, list[KVPair]]:
        """input_ids, position_ids [B, L]; visible_images [B, L] long -> (logits [B, L, V] fp32, present).

        ``logit_positions`` [B, K] (long) projects only those positions onto the vocabulary (logits
        [B, K, V]): generation needs the last one, and the full projection of a long prompt costs
        L x V x H multiply-adds and L x V floats.
        """
        text: TextConfig = self.config.text
        x = self.model.embed_tokens(input_ids)
        b, length, _ = x.shape
        past_len = 0 if not past_key_values else past_key_values[0][0].shape[2]
        rope = rope_cos_sin(position_ids, text.head_dim, text.rope_theta, x.dtype)
        mask = causal_mask(length, past_len, b, x.dtype, x.device)
        visual_by_layer = _visual_by_layer(self.config, visual_memory)
        present: list[KVPair] = []
        for i, layer in enumerate(self.model.layers):
            past = past_key_values[i] if past_key_values else None
            x, kv = layer(x, rope, mask, past, visual_by_layer.get(i), visible_images)
            present.append(kv)
        if logit_positions is not None:
            x = torch.gather(x, 1, logit_positions[..., None].expand(-1, -1, x.shape[-1]))
        return self.project(self.model.norm(x)).float(), present

    def project(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits: ``lm_head`` (a float or quantized Linear), or the tied embedding."""
        if self.config.text.tie_word_embeddings:
            return F.linear(hidden, self.model.embed_tokens.weight)
        return self.lm_head(hidden)


def _visual_by_layer(config: Owl3Config, memory: VisualMemory | None) -> dict[int, KVPair]:
    if memory is None:
        return {}
    return dict(zip(config.hyper_layers, memory.kv, strict=True))


class Owl3Model(nn.Module):
    """The whole model. See ``__call__``/``forward`` for the official-compatible entry point."""

    def __init__(self, config: Owl3Config) -> None:
        super().__init__()
        self.config = config
        self.language_model = Owl3ForCausalLM(config)
        self.vision_model = SiglipVisionTransformer(config.vision)
        self.vision2text_model = nn.Linear(config.vision.hidden_size, config.text.hidden_size, bias=True)
        eos = config.text.eos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(eos) if isinstance(eos, list) else (eos,) if eos else ()
        self.image_token_id: int | None = None  # set by the loader from tokenizer.json

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    # ---- graph 1: vision --------------------------------------------------------------------------
    def encode_images(self, pixel_values: Tensor, chunk_size: int = IMAGE_CHUNK) -> Tensor:
        """pixel_values [N, 3, S, S] -> projector output [N, P, H], in the language model's dtype."""
        size = self.config.vision.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise PromptError(
                f"pixel_values must be [N, 3, {size}, {size}], found {list(pixel_values.shape)}",
                where="pixel_values",
                fix="preprocess images with owl3.Owl3Processor",
            )
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        chunks = [self.vision2text_model(self.vision_model(chunk)) for chunk in pixel_values.split(chunk_size, dim=0)]
        return torch.cat(chunks, dim=0)

    # ---- graph 2: visual memory -------------------------------------------------------------------
    def build_visual_memory(self, image_embeds: Tensor, positions: Tensor, image_counts: Tensor) -> VisualMemory:
        """Per hyper layer visual K/V from per-sample image embeddings.

        image_embeds [B, n_max, P, H] (padding rows beyond ``image_counts`` are ignored by visibility),
        positions [B, n_max] MI-RoPE positions, image_counts [B].
        """
        kv = []
        for index in self.config.hyper_layers:
            layer = self.language_model.model.layers[index]
            kv.append(layer.self_attn.visual_kv(layer.input_layernorm(image_embeds), positions))
        return VisualMemory(kv=kv, image_counts=image_counts)

    def memory_from_media(self, image_embeds: Tensor, media_offset: Tensor) -> tuple[VisualMemory, Tensor]:
        """Official placement -> (visual memory, visible_images [B, L] for the prompt tokens)."""
        placement = parse_media_offset(media_offset.cpu().numpy(), image_embeds.shape[0])
        index = torch.from_numpy(placement.gather_index(image_embeds.shape[0])).to(self.device)
        per_sample = image_embeds[index]  # [B, n_max, P, H]
        positions = torch.from_numpy(placement.positions).to(self.device)
        counts = torch.from_numpy(placement.counts).to(self.device)
        memory = self.build_visual_memory(per_sample, positions, counts)
        return memory, torch.from_numpy(placement.seen).to(self.device)

    # ---- the official-compatible entry point ------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        media_offset: Tensor | None = None,
        *,
        past_key_values: Sequence[KVPair] | None = None,
        visual_memory: VisualMemory | None = None,
        position_ids: Tensor | None = None,
    ) -> Owl3Output:
        """Prefill (no past) or continue (with the past and visual memory of an earlier call).

        input_ids [B, L]; pixel_values [N, 3, S, S] for all images of the batch; media_offset [B, L, 2]
        in the official format (derived from ``<|image|>`` tokens when None). Continuation tokens see all
        images of their sample.
        """
        input_ids = input_ids.to(self.device)
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + input_ids.shape[1], device=self.device)
            position_ids = position_ids[None].expand_as(input_ids)
        visible = None
        if past_key_values:
            if pixel_values is not None:
                raise PromptError(
                    "pixel_values given with past_key_values",
                    where="forward",
                    fix="pass images with the prompt; continue with visual_memory from the first call's output",
                )
            if visual_memory is not None:
                visible = visual_memory.image_counts[:, None].expand_as(input_ids)
        elif pixel_values is not None:
            visual_memory, visible = self._prefill_memory(input_ids, pixel_values, media_offset)
        logits, present = self.language_model(input_ids, position_ids, past_key_values, visual_memory, visible)
        return Owl3Output(logits=logits, past_key_values=present, visual_memory=visual_memory)

    def _prefill_memory(
        self, input_ids: Tensor, pixel_values: Tensor, media_offset: Tensor | None
    ) -> tuple[VisualMemory | None, Tensor | None]:
        if media_offset is None:
            media_offset = self._derive_media_offset(input_ids, pixel_values.shape[0])
        if tuple(media_offset.shape[:2]) != tuple(input_ids.shape):
            raise PromptError(
                f"media_offset is {list(media_offset.shape)} but input_ids is {list(input_ids.shape)}",
                where="media_offset",
                fix="media_offset must be [B, L, 2] for input_ids [B, L]",
            )
        if bool((media_offset[:, :, 1] < 0).all()):
            return None, None  # no sample references an image: exactly Qwen2
        memory, seen = self.memory_from_media(self.encode_images(pixel_values), media_offset)
        return memory, seen

    def _derive_media_offset(self, input_ids: Tensor, num_images: int) -> Tensor:
        if self.image_token_id is None:
            raise PromptError(
                "media_offset is None and the model does not know the <|image|> token id",
                where="forward",
                fix="pass media_offset from owl3.Owl3Processor, or load the model with its tokenizer.json",
            )
        placeholders = int((input_ids == self.image_token_id).sum())
        if placeholders != num_images:
            raise PromptError(
                f"{placeholders} <|image|> placeholders in input_ids but {num_images} images in pixel_values",
                where="input_ids / pixel_values",
                fix="give one image (crop, frame) per placeholder",
            )
        return torch.from_numpy(media_offset_from_ids(input_ids.cpu().numpy(), self.image_token_id))

    # ---- generation -------------------------------------------------------------------------------
    def stream_generate(self, input_ids: Tensor, **kwargs: object) -> Iterator[Tensor]:
        """Yield the next token of every sample, [B] long, one step at a time (see owl3.model.generation)."""
        from owl3.model.generation import stream_generate

        return stream_generate(self, input_ids, **kwargs)  # type: ignore[arg-type]

    @torch.inference_mode()
    def generate(self, input_ids: Tensor, **kwargs: object) -> Tensor:
        """Generate up to ``max_new_tokens``; returns only the new tokens [B, K] (greedy by default)."""
        from owl3.model.generation import generate

        return generate(self, input_ids, **kwargs)  # type: ignore[arg-type]
