"""The ONNX Runtime flavour's fused decoder: kernels, graph structure, the in-place KV cache, equivalence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from owl3.errors import UsageError
from owl3.export.fused import FusedKernels, rotary_caches
from owl3.export.pipeline import export_model
from owl3.model.attention import attention_kernels
from owl3.placement import media_offset_from_ids
from owl3.runtime.session import Owl3Session
from tests.conftest import IMAGE_TOKEN, prompt_with_images, random_pixels


def _fused_step(model, ids, positions, visible, memory, buffers, filled: int):
    """One language-model run on the reference kernels (what ONNX Runtime's operators compute)."""
    cos, sin = (torch.from_numpy(a) for a in rotary_caches(model.config))
    total = filled + ids.shape[1]
    seqlens = torch.full((ids.shape[0],), total - 1, dtype=torch.int32)
    with attention_kernels(FusedKernels(positions, seqlens, torch.tensor(total, dtype=torch.int32), cos, sin)):
        return model.language_model(ids, positions, buffers, memory, visible)


def test_fused_kernels_compute_what_the_model_computes(tiny_model) -> None:
    """Prefill with two images, then a decode step, on capacity-sized buffers: the reference kernels give the
    model's logits, and the buffers hold the model's cache with the step's row written after the past."""
    ids = prompt_with_images(14, [2, 6])
    embeds = tiny_model.encode_images(random_pixels(2))
    memory, visible = tiny_model.memory_from_media(
        embeds, torch.from_numpy(media_offset_from_ids(ids.numpy(), IMAGE_TOKEN))
    )
    text = tiny_model.config.text
    capacity = ids.shape[1] + 4
    empty = torch.zeros(1, text.num_key_value_heads, capacity, text.head_dim)
    buffers = [(empty.clone(), empty.clone()) for _ in range(text.num_hidden_layers)]
    positions = torch.arange(ids.shape[1])[None]
    with torch.inference_mode():
        expected, present = tiny_model.language_model(ids, positions, None, memory, visible)
        logits, filled = _fused_step(tiny_model, ids, positions, visible, memory, buffers, 0)
        assert (logits - expected).abs().max() <= 1e-5
        length = ids.shape[1]
        for (k, v), (bk, bv) in zip(present, filled, strict=True):
            assert torch.allclose(bk[:, :, :length], k, atol=1e-6) and torch.allclose(bv[:, :, :length], v, atol=1e-6)
        token, position = expected[:, -1:].argmax(-1), torch.tensor([[length]])
        step_visible = memory.image_counts[:, None]
        expected_step, present_step = tiny_model.language_model(token, position, present, memory, step_visible)
        step, filled_step = _fused_step(tiny_model, token, position, step_visible, memory, filled, length)
    assert (step - expected_step).abs().max() <= 1e-5
    assert torch.allclose(filled_step[0][0][:, :, : length + 1], present_step[0][0], atol=1e-6)


def test_the_fused_decoder_reads_the_cache_only_through_group_query_attention(demo_export_fp32: Path) -> None:
    graph = onnx.load(str(demo_export_fp32 / "decoder.onnx"), load_external_data=False).graph
    session = Owl3Session(demo_export_fp32, "cpu", verify="size")
    manifest, hyper = session.manifest, session.config.hyper_layers
    layers = session.config.text.num_hidden_layers
    ops = manifest["graphs"]["decoder"]["op_counts"]
    assert manifest["fused"] and manifest["flavour"] == "ort"
    assert ops["GroupQueryAttention"] == layers and ops["RotaryEmbedding"] == 2 * layers
    assert ops["MultiHeadAttention"] == len(hyper)  # the cross-attention of every hyper layer
    assert ops["SimplifiedLayerNormalization"] + ops["SkipSimplifiedLayerNormalization"] == 2 * layers + 1
    assert "Softmax" not in ops and "Pow" not in ops  # no unfused attention or RMSNorm is left
    for past in (i.name for i in graph.input if i.name.startswith("past_")):
        consumers = [n.op_type for n in graph.node if past in n.input and n.op_type != "Shape"]  # Shape: metadata
        assert consumers == ["GroupQueryAttention"], (past, consumers)


def test_fused_and_standard_decoders_agree_and_generate_the_same_tokens(
    demo_export_fp32: Path, demo_export_fp32_standard: Path
) -> None:
    fused, standard = Owl3Session(demo_export_fp32, "cpu"), Owl3Session(demo_export_fp32_standard, "cpu")
    assert fused.fused and not standard.fused
    ids = np.concatenate([prompt_with_images(24, [3, 9], seed=5).numpy()] * 2)  # a batch of two
    pixels = random_pixels(4, fused.config).numpy()
    a, b = fused.trace(ids, pixels), standard.trace(ids, pixels)
    assert np.abs(a["logits"] - b["logits"]).max() <= 1e-4
    for name in ("present_key_0", "present_value_0", f"present_key_{fused.config.text.num_hidden_layers - 1}"):
        assert a[name].shape == b[name].shape and np.abs(a[name] - b[name]).max() <= 1e-4, name
    tokens = fused.generate_ids(ids, pixels, max_new_tokens=24)
    assert np.array_equal(tokens, standard.generate_ids(ids, pixels, max_new_tokens=24))


def test_a_decode_step_writes_one_row_of_the_same_buffers(demo_export_fp32: Path) -> None:
    session = Owl3Session(demo_export_fp32, "cpu")
    ids = np.arange(10, 16, dtype=np.int64)[None]
    cache = session._new_cache(1, 12)
    sentinel = {name: np.full(buffer.shape(), 7.0, np.float32) for name, (_, buffer) in cache.buffers.items()}
    for name, (_, buffer) in cache.buffers.items():
        buffer.update_inplace(sentinel[name])
    addresses = {name: buffer.data_ptr() for name, (_, buffer) in cache.buffers.items()}
    none = {n: np.zeros((1, session.config.text.num_key_value_heads, 0, session.config.text.head_dim), np.float32)
            for n in session._visual_names}  # fmt: skip
    visible = np.zeros_like(ids)
    out = session._decode(ids, np.arange(6)[None], visible, None, none, cache)
    prefill = {name: buffer.numpy().copy() for name, (_, buffer) in cache.buffers.items()}
    token = out["logits"][:, -1].argmax(-1)[:, None]
    session._decode(token, np.array([[6]]), visible[:, :1], None, none, cache)
    assert cache.length == 7
    for name, (_, buffer) in cache.buffers.items():
        after = buffer.numpy()
        assert buffer.data_ptr() == addresses[name]  # the graph wrote into the request's own buffer
        assert np.array_equal(after[:, :, :6], prefill[name][:, :, :6])  # the past is untouched
        assert not np.array_equal(after[:, :, 6], sentinel[name][:, :, 6])  # one new row...
        assert np.array_equal(after[:, :, 7:], sentinel[name][:, :, 7:])  # ...and nothing beyond it
    reference = session.trace(np.concatenate([ids, token], axis=1))
    assert np.abs(reference["present_key_0"] - cache.arrays()["present_key_0"]).max() <= 1e-5


def test_fused_operators_are_refused_for_tensorrt(demo_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="fused operators exist only in the ort flavour"):
        export_model(demo_model_dir, tmp_path / "never", "fp32", target="tensorrt", fused=True, validate=False)
    assert not (tmp_path / "never").exists()
