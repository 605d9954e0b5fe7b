"""Autoregressive generation for the PyTorch reference: images once, visual memory once, then KV-cached steps.

Defaults reproduce the official effective decoding (greedy, spec §8): stop on any of the model's
``eos_token_ids`` (``<|im_end|>``, ``<|endoftext|>``), finished rows padded with ``pad_token_id`` 0.
Sampling follows the transformers order: repetition penalty, then temperature, top-k and top-p.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from owl3.errors import PromptError, UsageError
from owl3.runtime.sampling import SamplingConfig  # one definition for both backends (torch-free)


def apply_repetition_penalty(scores: Tensor, history: Tensor, penalty: float) -> Tensor:
    """Penalise every token id in ``history`` [B, T]: negative scores times penalty, positive ones divided."""
    if penalty == 1.0:
        return scores
    picked = torch.gather(scores, 1, history)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, history, picked)


def warp_for_sampling(scores: Tensor, cfg: SamplingConfig) -> Tensor:
    """Temperature, then top-k, then top-p (nucleus, always keeping the most likely token)."""
    scores = scores / cfg.temperature
    if cfg.top_k > 0:
        k = min(cfg.top_k, scores.shape[-1])
        threshold = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - cfg.top_p)
        remove_sorted[..., -1] = False
        remove = remove_sorted.scatter(1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def next_tokens(scores: Tensor, history: Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> Tensor:
    """scores [B, V] fp32 -> token ids [B]."""
    scores = apply_repetition_penalty(scores, history, cfg.repetition_penalty)
    if not cfg.do_sample:
        return scores.argmax(dim=-1)
    probs = warp_for_sampling(scores, cfg).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _check_request(model: torch.nn.Module, input_ids: Tensor, max_new_tokens: int) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise PromptError(
            f"input_ids must be [B, L] with L >= 1, found {list(input_ids.shape)}",
            where="generate",
            fix="tokenise the prompt with owl3.Owl3Processor",
        )
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be >= 1, found {max_new_tokens}", where="generate", fix="pass >= 1")
    limit = model.config.text.max_position_embeddings
    total = input_ids.shape[1] + max_new_tokens
    if total > limit:
        raise PromptError(
            f"prompt of {input_ids.shape[1]} tokens plus {max_new_tokens} new tokens exceeds the model's "
            f"context of {limit}",
            where="generate",
            fix="shorten the prompt, use fewer images or lower max_new_tokens",
        )


@torch.inference_mode()
def stream_generate(
    model: torch.nn.Module,
    input_ids: Tensor,
    pixel_values: Tensor | None = None,
    media_offset: Tensor | None = None,
    *,
    max_new_tokens: int = 100,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    sampling: SamplingConfig | None = None,
    **sampling_options: object,
) -> Iterator[Tensor]:
    """Yield one token per sample per step, [B] long; finished samples yield ``pad_token_id``.

    Stops when every sample has produced an end token or after ``max_new_tokens`` steps. Sampling
    options (do_sample, temperature, top_k, top_p, repetition_penalty, seed) may be given directly.
    """
    cfg = sampling or SamplingConfig(**sampling_options)  # type: ignore[arg-type]
    _check_request(model, input_ids, max_new_tokens)
    eos = model.eos_token_ids if eos_token_id is None else eos_token_id
    stop = torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long, device=model.device)
    generator = None
    if cfg.do_sample and cfg.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(cfg.seed)
    history = input_ids.to(model.device)
    out = model(history, pixel_values, media_offset)
    finished = torch.zeros(history.shape[0], dtype=torch.bool, device=model.device)
    for _ in range(max_new_tokens):
        token = next_tokens(out.logits[:, -1], history, cfg, generator)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        yield token
        finished |= torch.isin(token, stop)
        if bool(finished.all()):
            return
        history = torch.cat((history, token[:, None]), dim=1)
        out = model(token[:, None], past_key_values=out.past_key_values, visual_memory=out.visual_memory)


def generate(model: torch.nn.Module, input_ids: Tensor, **kwargs: object) -> Tensor:
    """All new tokens [B, K] (K <= max_new_tokens); the prompt is not included."""
    steps = list(stream_generate(model, input_ids, **kwargs))  # type: ignore[arg-type]
    if not steps:
        return torch.zeros(input_ids.shape[0], 0, dtype=torch.long)
    return torch.stack(steps, dim=1)
