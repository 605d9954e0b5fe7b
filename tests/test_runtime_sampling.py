"""The runtime's numpy sampling equals the PyTorch reference's on the same scores; incremental text."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from owl3.errors import UsageError
from owl3.model import generation as reference
from owl3.runtime.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    next_tokens,
    softmax,
    stream_text,
    warp_for_sampling,
)


def _scores(seed: int = 0, batch: int = 3, vocab: int = 64) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((batch, vocab)) * 3).astype(np.float32)


def _history(seed: int = 1, batch: int = 3, length: int = 12, vocab: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int64)


def _torch_warp(scores: np.ndarray, **options: float) -> np.ndarray:
    cfg = reference.SamplingConfig(do_sample=True, **options)
    return reference.warp_for_sampling(torch.from_numpy(scores), cfg).numpy()


def test_greedy_is_argmax_with_ties_to_the_lowest_id_like_torch() -> None:
    scores = _scores()
    scores[:, [9, 4, 30]] = scores.max() + 1  # a three-way tie in every row
    history = _history()
    ours = next_tokens(scores, history, SamplingConfig(), None)
    theirs = reference.next_tokens(
        torch.from_numpy(scores), torch.from_numpy(history), reference.SamplingConfig(), None
    )
    assert ours.tolist() == theirs.tolist() == [4, 4, 4]


@pytest.mark.parametrize("penalty", [1.0, 1.3, 0.7])
def test_repetition_penalty_matches_torch_exactly(penalty: float) -> None:
    scores, history = _scores(), _history()  # repeated ids in the history, positive and negative scores
    ours = apply_repetition_penalty(scores, history, penalty)
    theirs = reference.apply_repetition_penalty(torch.from_numpy(scores), torch.from_numpy(history), penalty)
    np.testing.assert_array_equal(ours, theirs.numpy())
    greedy = next_tokens(scores, history, SamplingConfig(repetition_penalty=penalty), None)
    expected = reference.next_tokens(
        torch.from_numpy(scores),
        torch.from_numpy(history),
        reference.SamplingConfig(repetition_penalty=penalty),
        None,
    )
    assert greedy.tolist() == expected.tolist()


@pytest.mark.parametrize("top_k", [1, 5, 63, 64, 500])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_top_k_matches_torch(top_k: int, temperature: float) -> None:
    scores = _scores(seed=top_k)
    ours = warp_for_sampling(scores, SamplingConfig(do_sample=True, top_k=top_k, temperature=temperature))
    np.testing.assert_array_equal(ours, _torch_warp(scores, top_k=top_k, temperature=temperature))
    assert (np.isfinite(ours).sum(axis=-1) == min(top_k, scores.shape[-1])).all()


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.8, 0.95, 0.999, 1.0])
def test_top_p_matches_torch_and_keeps_the_most_likely_token(top_p: float) -> None:
    for seed in range(5):
        scores = _scores(seed=seed)
        ours = warp_for_sampling(scores, SamplingConfig(do_sample=True, top_p=top_p))
        theirs = _torch_warp(scores, top_p=top_p)
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
        np.testing.assert_array_equal(ours, theirs)
        assert np.isfinite(ours[np.arange(3), scores.argmax(-1)]).all()


def test_temperature_top_k_and_top_p_together_match_torch() -> None:
    scores = _scores(seed=11, batch=4, vocab=200)
    options = {"temperature": 0.6, "top_k": 40, "top_p": 0.7}
    ours = warp_for_sampling(scores, SamplingConfig(do_sample=True, **options))
    np.testing.assert_array_equal(ours, _torch_warp(scores, **options))
    np.testing.assert_allclose(softmax(ours), torch.from_numpy(ours).softmax(-1).numpy(), rtol=1e-6, atol=1e-7)


def test_seeded_sampling_is_reproducible_stays_in_the_mask_and_top_k_1_is_greedy() -> None:
    scores, history = _scores(seed=3), _history()
    cfg = SamplingConfig(do_sample=True, temperature=1.5, top_k=5, seed=7)
    first = [next_tokens(scores, history, cfg, rng).tolist() for rng in [cfg.generator()] for _ in range(50)]
    second = [next_tokens(scores, history, cfg, rng).tolist() for rng in [cfg.generator()] for _ in range(50)]
    assert first == second
    allowed = np.argsort(-scores, axis=-1)[:, :5]
    assert all(token in allowed[row] for draw in first for row, token in enumerate(draw))
    top1 = SamplingConfig(do_sample=True, top_k=1, seed=0)
    greedy = next_tokens(scores, history, SamplingConfig(), None)
    np.testing.assert_array_equal(next_tokens(scores, history, top1, top1.generator()), greedy)


def test_sampling_frequencies_follow_the_distribution() -> None:
    probs = np.array([[0.5, 0.0, 0.3, 0.2, 0.0]], dtype=np.float32)
    cfg = SamplingConfig(do_sample=True, seed=1)
    rng = cfg.generator()
    scores = np.log(np.where(probs > 0, probs, 1e-30)).astype(np.float32)
    scores[probs == 0] = -np.inf
    draws = np.array([next_tokens(scores, scores[:, :0].astype(np.int64), cfg, rng)[0] for _ in range(20000)])
    counts = np.bincount(draws, minlength=5) / draws.size
    np.testing.assert_allclose(counts, probs[0], atol=0.015)
    assert counts[1] == counts[4] == 0


@pytest.mark.parametrize(
    "options",
    [{"temperature": 0.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"repetition_penalty": 0.0}],
)
def test_bad_options_give_the_same_usage_errors_as_torch(options: dict) -> None:
    with pytest.raises(UsageError) as ours:
        SamplingConfig(**options)
    with pytest.raises(UsageError) as theirs:
        reference.SamplingConfig(**options)
    assert str(ours.value) == str(theirs.value)
    assert ours.value.fix


# ---- incremental text ------------------------------------------------------------------------------

_PIECES = {1: b"Ca", 2: b"f", 3: b"\xc3", 4: b"\xa9", 5: b" ok", 6: b" \xe2\x82", 7: b"\xac", 8: b"!"}
_STOP = 99


def _decode(ids) -> str:
    return b"".join(_PIECES[i] for i in ids).decode("utf-8", errors="replace").strip()


def test_stream_text_holds_back_split_characters_and_stops_at_the_end_token() -> None:
    pieces = list(stream_text(_decode, [1, 2, 3, 4, 5, 6, 7, 8, _STOP, 1], {_STOP}))
    assert pieces == ["Ca", "f", "é", " ok", " €", "!"]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == _decode([1, 2, 3, 4, 5, 6, 7, 8])


def test_stream_text_flushes_a_character_cut_by_the_token_limit() -> None:
    pieces = list(stream_text(_decode, [1, 3], set()))
    assert "".join(pieces) == _decode([1, 3]) == "Ca\ufffd"
    assert list(stream_text(_decode, [_STOP], {_STOP})) == []
