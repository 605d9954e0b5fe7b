"""Hyper attention semantics (spec §4-§6) on a tiny seeded checkpoint loaded through the loader."""

from __future__ import annotations

import pytest
import torch

from owl3.errors import PromptError
from owl3.placement import NO_IMAGES, parse_media_offset
from owl3.placement import media_offset_from_ids as _offsets_np
from tests.conftest import IMAGE_TOKEN, prompt_with_images, random_pixels
from tests.official_reference import official_logits


def media_offset_from_ids(ids: torch.Tensor, image_token: int) -> torch.Tensor:
    return torch.from_numpy(_offsets_np(ids.numpy(), image_token))


EXACT = 1e-6  # same math, different batching of the same fp32 ops


def _run(model, ids, pixels=None, media_offset=None):
    with torch.inference_mode():
        return model(ids, pixels, media_offset)


def test_matches_literal_official_procedure(tiny_model) -> None:
    ids = prompt_with_images(20, [3, 4, 9])
    pixels = random_pixels(3)
    offsets = media_offset_from_ids(ids, IMAGE_TOKEN)
    with torch.inference_mode():
        expected = official_logits(tiny_model, ids, pixels, offsets)
    actual = _run(tiny_model, ids, pixels, offsets).logits
    assert (actual - expected).abs().max().item() <= EXACT


def test_batch_with_global_image_offsets_matches_official(tiny_model) -> None:
    ids = torch.cat([prompt_with_images(16, [2, 7], seed=1), prompt_with_images(16, [5], seed=2)])
    ids = torch.cat([ids, prompt_with_images(16, [], seed=3)])  # a third sample with no image
    pixels = random_pixels(3)
    offsets = media_offset_from_ids(ids, IMAGE_TOKEN)
    assert offsets[1, -1].tolist() == [2, 3] and offsets[2, 0, 1].item() == NO_IMAGES
    with torch.inference_mode():
        expected = official_logits(tiny_model, ids, pixels, offsets)
    actual = _run(tiny_model, ids, pixels, offsets).logits
    assert (actual - expected).abs().max().item() <= EXACT


def test_tokens_up_to_first_placeholder_equal_no_image_run(tiny_model) -> None:
    ids = prompt_with_images(18, [5, 11])
    with_images = _run(tiny_model, ids, random_pixels(2)).logits
    without = _run(tiny_model, ids).logits
    assert torch.equal(with_images[:, :6], without[:, :6])  # through the first placeholder, index 5
    assert (with_images[:, 6:] - without[:, 6:]).abs().max() > 1e-4  # images matter after it


def test_changing_an_image_changes_only_tokens_after_its_placeholder(tiny_model) -> None:
    ids = prompt_with_images(18, [2, 9])
    pixels = random_pixels(2)
    changed = pixels.clone()
    changed[1] = random_pixels(1, seed=42)[0]
    base = _run(tiny_model, ids, pixels).logits
    other = _run(tiny_model, ids, changed).logits
    assert torch.equal(base[:, :10], other[:, :10])  # up to and including the second placeholder
    assert (base[:, 10:] - other[:, 10:]).abs().amax(dim=-1).min() > 1e-6  # every later token moves


def test_batch_rows_are_independent(tiny_model) -> None:
    first, second = prompt_with_images(14, [3], seed=5), prompt_with_images(14, [1, 6], seed=6)
    pix_first, pix_second = random_pixels(1, seed=7), random_pixels(2, seed=8)
    alone_first = _run(tiny_model, first, pix_first).logits
    alone_second = _run(tiny_model, second, pix_second).logits
    batched = _run(tiny_model, torch.cat([first, second]), torch.cat([pix_first, pix_second])).logits
    assert (batched[0] - alone_first[0]).abs().max() <= EXACT
    assert (batched[1] - alone_second[0]).abs().max() <= EXACT


def test_prefill_then_decode_equals_one_full_forward(tiny_model) -> None:
    ids = prompt_with_images(15, [2, 3, 8])
    pixels = random_pixels(3)
    continuation = torch.randint(0, 500, (1, 6), generator=torch.Generator().manual_seed(9))
    full = _run(tiny_model, torch.cat([ids, continuation], dim=1), pixels).logits
    with torch.inference_mode():
        out = tiny_model(ids, pixels)
        steps = [out.logits]
        for t in range(continuation.shape[1]):
            out = tiny_model(
                continuation[:, t : t + 1], past_key_values=out.past_key_values, visual_memory=out.visual_memory
            )
            steps.append(out.logits)
    stepped = torch.cat(steps, dim=1)
    assert (stepped - full).abs().max().item() <= 1e-5


def test_cached_visual_memory_equals_recomputed_each_step(tiny_model) -> None:
    """The official code rebuilds the visual K/V at every step; caching them must not change anything."""
    ids = prompt_with_images(12, [1, 4])
    pixels = random_pixels(2)
    offsets = media_offset_from_ids(ids, IMAGE_TOKEN)
    with torch.inference_mode():
        embeds = tiny_model.encode_images(pixels)
        cached, _ = tiny_model.memory_from_media(embeds, offsets)
        out = tiny_model(ids, pixels, offsets)
        past = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(4):
            recomputed, _ = tiny_model.memory_from_media(tiny_model.encode_images(pixels), offsets)
            for (k1, v1), (k2, v2) in zip(cached.kv, recomputed.kv, strict=True):
                assert torch.equal(k1, k2) and torch.equal(v1, v2)
            a = tiny_model(token, past_key_values=past, visual_memory=cached)
            b = tiny_model(token, past_key_values=past, visual_memory=recomputed)
            assert torch.equal(a.logits, b.logits)
            past, token = a.past_key_values, a.logits[:, -1].argmax(-1, keepdim=True)


def test_no_images_never_produces_nan(tiny_model) -> None:
    ids = prompt_with_images(10, [])
    assert torch.isfinite(_run(tiny_model, ids).logits).all()
    # A sample without images batched with one that has images: finite, and exactly its text-only logits.
    batch = torch.cat([ids, prompt_with_images(10, [2], seed=4)])
    mixed = _run(tiny_model, batch, random_pixels(1)).logits
    assert torch.isfinite(mixed).all()
    assert (mixed[0] - _run(tiny_model, ids).logits[0]).abs().max() <= EXACT
    # media_offset that references no image at all: pure Qwen2, no vision run needed.
    offsets = torch.tensor([[0, NO_IMAGES]]).expand(1, 10, 2)
    assert torch.equal(_run(tiny_model, ids, random_pixels(1), offsets).logits, _run(tiny_model, ids).logits)


def test_large_activations_stay_finite_in_bfloat16(tiny_checkpoint) -> None:
    from owl3.model.weights import load_model

    model = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    with torch.no_grad():
        model.language_model.model.embed_tokens.weight.mul_(300.0)  # hidden states in the thousands
    model.image_token_id = IMAGE_TOKEN
    logits = _run(model, prompt_with_images(12, [2, 5]), random_pixels(2) * 50).logits
    assert torch.isfinite(logits).all()


def test_media_offset_is_derived_from_image_tokens(tiny_model) -> None:
    ids = prompt_with_images(12, [3, 7])
    offsets = media_offset_from_ids(ids, IMAGE_TOKEN)
    expected = [0] * 4 + [1] * 4 + [2] * 4
    assert offsets[0, :, 1].tolist() == expected and offsets[0, :, 0].tolist() == [0] * 12
    pixels = random_pixels(2)
    assert torch.equal(_run(tiny_model, ids, pixels).logits, _run(tiny_model, ids, pixels, offsets).logits)
    placement = parse_media_offset(offsets.numpy(), 2)
    assert placement.counts.tolist() == [2] and placement.positions.tolist() == [[4, 8]]
    assert (placement.seen == offsets[:, :, 1].numpy()).all()


def test_placeholder_and_image_count_mismatch_is_rejected(tiny_model) -> None:
    ids = prompt_with_images(12, [3, 7])
    with pytest.raises(PromptError, match=r"2 <\|image\|> placeholders .* 3 images"):
        _run(tiny_model, ids, random_pixels(3))
    offsets = media_offset_from_ids(ids, IMAGE_TOKEN)
    with pytest.raises(PromptError, match="up to index 2 but 1 images"):
        _run(tiny_model, ids, random_pixels(1), offsets)


def test_malformed_media_offset_is_rejected(tiny_model) -> None:
    ids = prompt_with_images(6, [1])
    partial = media_offset_from_ids(ids, IMAGE_TOKEN).clone()
    partial[0, 0, 1] = NO_IMAGES
    with pytest.raises(PromptError, match="mix negative and non-negative"):
        _run(tiny_model, ids, random_pixels(1), partial)
    decreasing = media_offset_from_ids(ids, IMAGE_TOKEN).clone()
    decreasing[0, -1, 1] = 0
    with pytest.raises(PromptError, match="never decrease"):
        _run(tiny_model, ids, random_pixels(1), decreasing)
    with pytest.raises(PromptError, match=r"pixel_values must be \[N, 3, 30, 30\]"):
        _run(tiny_model, ids, torch.zeros(1, 3, 20, 20))
