"""Token choice and incremental text in numpy: the runtime's mirror of ``owl3.model.generation``.

The order and the arithmetic follow the PyTorch reference exactly: repetition penalty over the prompt and
the tokens generated so far, then (when sampling) temperature, top-k and top-p (nucleus, always keeping
the most likely token). Greedy decoding is ``argmax`` with ties going to the lowest id, as in torch.

Seeded sampling uses a numpy ``Generator`` (PCG64): it is reproducible run to run and thread to thread, but
it does not draw the same tokens as ``torch.multinomial`` with the same seed. The distributions are the same.

``stream_text`` turns a token stream into text pieces, holding back incomplete UTF-8 characters.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from owl3.errors import UsageError

REPLACEMENT_CHARACTER = "\ufffd"  # what a byte-level BPE decode gives for a split multi-byte character


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``do_sample=False`` is greedy (argmax, ties to the lowest id).
    The one definition: the PyTorch reference (owl3.model.generation) uses it too."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise UsageError(
                f"temperature must be > 0, found {self.temperature}",
                where="sampling",
                fix="use do_sample=False for greedy decoding",
            )
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0, found {self.top_k}", where="sampling", fix="0 disables it")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], found {self.top_p}", where="sampling", fix="1 disables it")
        if self.repetition_penalty <= 0:
            raise UsageError(
                f"repetition_penalty must be > 0, found {self.repetition_penalty}",
                where="sampling",
                fix="1.0 disables it",
            )

    def generator(self) -> np.random.Generator | None:
        """A fresh per-request random generator (seeded when ``seed`` is set); None for greedy decoding."""
        return np.random.default_rng(self.seed) if self.do_sample else None


def apply_repetition_penalty(scores: np.ndarray, history: np.ndarray, penalty: float) -> np.ndarray:
    """scores [B, V] fp32, history [B, T] int64 -> penalised copy: negative scores times penalty, positive ones
    divided (each id once, however often it occurs in ``history``)."""
    if penalty == 1.0:
        return scores
    picked = np.take_along_axis(scores, history, axis=1)
    picked = np.where(picked < 0, picked * np.float32(penalty), picked / np.float32(penalty)).astype(scores.dtype)
    out = scores.copy()
    np.put_along_axis(out, history, picked, axis=1)
    return out


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row softmax of [B, V] fp32 scores that may hold -inf (at least one finite value per row)."""
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def warp_for_sampling(scores: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """[B, V] fp32 -> warped scores: temperature, then top-k, then top-p (removed tokens get -inf)."""
    scores = (scores / np.float32(cfg.temperature)).astype(np.float32)
    if cfg.top_k > 0:
        k = min(cfg.top_k, scores.shape[-1])
        threshold = -np.partition(-scores, k - 1, axis=-1)[..., k - 1 : k]  # the k-th largest value
        scores = np.where(scores < threshold, np.float32(-np.inf), scores)
    if cfg.top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as torch.sort(descending=False)
        sorted_scores = np.take_along_axis(scores, order, axis=-1)
        cumulative = np.cumsum(softmax(sorted_scores), axis=-1, dtype=np.float32)
        remove_sorted = cumulative <= (1 - cfg.top_p)
        remove_sorted[..., -1] = False  # the most likely token always stays
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        scores = np.where(remove, np.float32(-np.inf), scores)
    return scores


def sample(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of probs [B, V] (rows sum to 1) -> ids [B] int64; zero-probability ids are never drawn."""
    cumulative = np.cumsum(probs.astype(np.float64), axis=-1)
    draws = rng.random(probs.shape[0]) * cumulative[:, -1]
    ids = np.array([np.searchsorted(row, u, side="right") for row, u in zip(cumulative, draws, strict=True)])
    return np.minimum(ids, probs.shape[-1] - 1).astype(np.int64)


def next_tokens(
    scores: np.ndarray, history: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator | None
) -> np.ndarray:
    """scores [B, V] fp32 (last position's logits), history [B, T] prompt + generated ids -> token ids [B]."""
    scores = apply_repetition_penalty(scores.astype(np.float32, copy=False), history, cfg.repetition_penalty)
    if not cfg.do_sample:
        return scores.argmax(axis=-1).astype(np.int64)  # first maximum: ties go to the lowest id
    if rng is None:
        raise UsageError("do_sample=True needs a random generator", where="sampling", fix="pass cfg.generator()")
    return sample(softmax(warp_for_sampling(scores, cfg)), rng)


# ---- tokens to text ------------------------------------------------------------------------------------


def stream_text(
    decode: Callable[[Sequence[int]], str], token_ids: Iterable[int], stop: Collection[int]
) -> Iterator[str]:
    """Text pieces of one sample's token stream whose concatenation is ``decode`` of all ids before a stop id.

    ``decode`` maps ids to text (e.g. ``Owl3Processor.decode``). A decode ending in U+FFFD is a multi-byte
    character split across tokens: it is held back until the rest arrives. What is still held at the end
    (a character cut by ``max_new_tokens``) is flushed, so streamed and non-streamed text agree.
    """
    ids: list[int] = []
    shown = ""
    for token in token_ids:
        if token in stop:
            break
        ids.append(token)
        text = decode(ids)
        if text.endswith(REPLACEMENT_CHARACTER):
            continue  # wait for the rest of the character
        if text.startswith(shown):
            piece, shown = text[len(shown) :], text
            if piece:
                yield piece
    if ids:
        text = decode(ids)
        if text.startswith(shown) and text != shown:
            yield text[len(shown) :]
