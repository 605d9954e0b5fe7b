"""The native model against transformers' stock Qwen2 and SigLIP on the same checkpoint weights (fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import random_pixels

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5  # fp32, as the foundation issue states


def _checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_text_only_logits_equal_transformers_qwen2(tiny_checkpoint: Path, tiny_model) -> None:
    cfg = tiny_model.config.text
    hf_config = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attn_implementation="sdpa",
    )
    reference = transformers.Qwen2ForCausalLM(hf_config).eval()
    tensors = _checkpoint_tensors(tiny_checkpoint)
    prefix = "language_model."
    lm = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    hyper_only = [k for k in lm if ".self_attn.v_kv_proj." in k or ".self_attn.gate_proj." in k]
    assert hyper_only, "the tiny checkpoint must contain hyper layers"
    result = reference.load_state_dict({k: v for k, v in lm.items() if k not in hyper_only}, strict=False)
    assert not result.unexpected_keys
    assert all("rotary" in k for k in result.missing_keys), result.missing_keys

    ids = torch.randint(0, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = reference(input_ids=ids).logits.float()
        actual = tiny_model(ids).logits
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= TOLERANCE


def test_vision_tower_equals_siglip_hidden_states_minus_2(tiny_checkpoint: Path, tiny_model) -> None:
    vcfg = tiny_model.config.vision
    hf_config = transformers.SiglipVisionConfig(
        hidden_size=vcfg.hidden_size,
        intermediate_size=vcfg.intermediate_size,
        num_hidden_layers=vcfg.num_hidden_layers,
        num_attention_heads=vcfg.num_attention_heads,
        image_size=vcfg.image_size,
        patch_size=vcfg.patch_size,
        attn_implementation="eager",
    )
    reference = transformers.SiglipVisionModel(hf_config).eval()
    tensors = _checkpoint_tensors(tiny_checkpoint)
    prefix = "vision_model."
    vision = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    # The checkpoint carries the unused head, post-layernorm and last layer too: the full SigLIP loads.
    # transformers 4.x nests the tower under .vision_model; 5.x flattens it into SiglipVisionModel.
    tower = getattr(reference, "vision_model", reference)
    result = tower.load_state_dict(vision, strict=False)
    assert not result.unexpected_keys
    assert all("position_ids" in k for k in result.missing_keys), result.missing_keys

    pixels = random_pixels(3, tiny_model.config)
    with torch.inference_mode():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        actual = tiny_model.vision_model(pixels)
    assert (actual - expected).abs().max().item() <= TOLERANCE
    # encode_images is the tower followed by the single Linear projector, no activation.
    with torch.inference_mode():
        embeds = tiny_model.encode_images(pixels)
    projected = expected @ tensors["vision2text_model.weight"].T + tensors["vision2text_model.bias"]
    assert embeds.shape == (3, tiny_model.config.image_tokens, tiny_model.config.text.hidden_size)
    assert (embeds - projected).abs().max().item() <= TOLERANCE
