"""The ONNX Runtime flavour's fused decoder: kernels, graph structure, the in-place KV cache, equivalence."""

from __future__ import annotations

import json
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
from owl3.validate.backends import OnnxBackend
from tests.conftest import IMAGE_TOKEN, prompt_with_images, random_pixels


def _fused_step(model, ids, positions, visible, memory, buffers, filled: int, attention: str):
    """One language-model run on the reference kernels (what ONNX Runtime's operators compute)."""
    cos, sin = (torch.from_numpy(a) for a in rotary_caches(model.config))
    total = filled + ids.shape[1]
    seqlens = torch.full((ids.shape[0],), total - 1, dtype=torch.int32)
    kernels = FusedKernels(positions, seqlens, torch.tensor(total, dtype=torch.int32), cos, sin, attention)
    with attention_kernels(kernels):
        return model.language_model(ids, positions, buffers, memory, visible)


@pytest.mark.parametrize("attention", ["grouped", "gqa"])
def test_fused_kernels_compute_what_the_model_computes(tiny_model, attention: str) -> None:
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
        logits, filled = _fused_step(tiny_model, ids, positions, visible, memory, buffers, 0, attention)
        assert (logits - expected).abs().max() <= 1e-5
        length = ids.shape[1]
        for (k, v), (bk, bv) in zip(present, filled, strict=True):
            assert torch.allclose(bk[:, :, :length], k, atol=1e-6) and torch.allclose(bv[:, :, :length], v, atol=1e-6)
        token, position = expected[:, -1:].argmax(-1), torch.tensor([[length]])
        step_visible = memory.image_counts[:, None]
        expected_step, present_step = tiny_model.language_model(token, position, present, memory, step_visible)
        step, filled_step = _fused_step(tiny_model, token, position, step_visible, memory, filled, length, attention)
    assert (step - expected_step).abs().max() <= 1e-5
    assert torch.allclose(filled_step[0][0][:, :, : length + 1], present_step[0][0], atol=1e-6)


def test_the_fused_decoder_writes_the_cache_in_place_and_reads_it_once_per_kv_head(demo_export_fp32: Path) -> None:
    """The default self-attention ("grouped"): each past buffer is only written by one ScatterND (in place),
    which is the graph's present output, and read by exactly one MatMul (scores for K, values for V)."""
    graph = onnx.load(str(demo_export_fp32 / "decoder.onnx"), load_external_data=False).graph
    session = Owl3Session(demo_export_fp32, "cpu", verify="size")
    manifest, hyper = session.manifest, session.config.hyper_layers
    layers = session.config.text.num_hidden_layers
    decoder = manifest["graphs"]["decoder"]
    ops = decoder["op_counts"]
    assert manifest["fused"] and manifest["flavour"] == "ort" and decoder["fusions"]["self_attention"] == "grouped"
    assert "GroupQueryAttention" not in ops and ops["RotaryEmbedding"] == 2 * layers
    assert ops["ScatterND"] == 2 * layers and ops["Softmax"] == layers
    assert ops["MultiHeadAttention"] == len(hyper)  # the cross-attention of every hyper layer
    assert ops["SimplifiedLayerNormalization"] + ops["SkipSimplifiedLayerNormalization"] == 2 * layers + 1
    assert "Pow" not in ops  # no unfused RMSNorm is left
    assert decoder["fusions"]["packed_projections"] == {"groups": 2 * layers, "linears": 5 * layers}  # qkv, gate/up
    assert ops["Split"] == 2 * layers
    outputs = {o.name for o in graph.output}
    for past in (i.name for i in graph.input if i.name.startswith("past_")):
        writers = [n for n in graph.node if past in n.input and n.op_type != "Shape"]  # Shape: metadata
        assert [n.op_type for n in writers] == ["ScatterND"] and list(writers[0].input).index(past) == 0, past
        present = writers[0].output[0]
        assert present == past.replace("past_", "present_") and present in outputs
        readers = [n.op_type for n in graph.node if present in n.input and n.op_type != "Shape"]
        assert readers == ["MatMul"], (present, readers)


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
    cache = session._new_cache(1, 12, 12)
    assert all(not buffer.numpy().any() for _, buffer in cache.buffers.values())  # zero-filled: finite beyond
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


def test_a_kept_binding_runs_again_and_writes_logits_straight_into_an_array(demo_export_fp32: Path) -> None:
    """The decoder's IO binding is kept across runs; logits written into a numpy array of the given shape are
    the logits read back from the binding."""
    session = Owl3Session(demo_export_fp32, "cpu")
    text = session.config.text
    cache = session._new_cache(1, 8, 8)
    binding = session.backend.graphs["decoder"].bind(cache.buffers)
    empty = np.zeros((1, text.num_key_value_heads, 0, text.head_dim), np.float32)
    feeds = {"input_ids": np.arange(10, 16)[None], "position_ids": np.arange(6)[None],
             "visible_images": np.zeros((1, 6), np.int64), "logit_positions": np.array([[2, 5]]),
             "seqlens_k": np.array([5], np.int32), "total_sequence_length": np.array(6, np.int32),
             **{name: empty for name in session._visual_names}}  # fmt: skip
    read = binding.run(feeds)["logits"]
    direct = binding.run(feeds, shapes={"logits": (1, 2, text.vocab_size)})  # the same rows written again
    assert list(direct) == ["logits"] and read.shape == (1, 2, text.vocab_size)
    assert np.array_equal(direct["logits"], read)


def test_group_query_attention_kernel_is_the_same_decoder(
    demo_model_dir: Path, demo_export_fp32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--attention gqa``: ONNX Runtime's GroupQueryAttention reads the cache, as the only consumer of each
    past buffer, and in every layer but the hyper layers (whose cross-attention reads the rotated q) takes the
    packed q/k/v and rotates them itself, as GenAI's layer does; same logits and greedy tokens as the default
    grouped kernel, prefilled at once or 7 tokens at a time (rotary positions then come from ``seqlens_k``)."""
    import owl3.runtime.session as session_module

    export = export_model(demo_model_dir, tmp_path / "gqa", "fp32", attention="gqa", validate=False)
    graph = onnx.load(str(export / "decoder.onnx"), load_external_data=False).graph
    gqa, grouped = Owl3Session(export, "cpu"), Owl3Session(demo_export_fp32, "cpu")
    layers, hyper = gqa.config.text.num_hidden_layers, len(gqa.config.hyper_layers)
    decoder = gqa.manifest["graphs"]["decoder"]
    assert decoder["fusions"]["self_attention"] == "gqa" and decoder["op_counts"]["GroupQueryAttention"] == layers
    assert decoder["fusions"]["rotary_in_attention"] == layers - hyper
    assert decoder["op_counts"]["RotaryEmbedding"] == 2 * hyper
    rotating = [n for n in graph.node if n.op_type == "GroupQueryAttention" and n.input[1] == ""]
    assert len(rotating) == layers - hyper
    for node in rotating:
        assert {a.name: a.i for a in node.attribute if a.name == "do_rotary"} == {"do_rotary": 1}
        assert list(node.input[7:]) == ["rotary.cos_cache", "rotary.sin_cache"]
        assert "{q_proj,k_proj,v_proj}" in next(n.name for n in graph.node if node.input[0] in n.output)
    for past in (i.name for i in graph.input if i.name.startswith("past_")):
        consumers = [n.op_type for n in graph.node if past in n.input and n.op_type != "Shape"]
        assert consumers == ["GroupQueryAttention"], (past, consumers)
    ids = np.concatenate([prompt_with_images(20, [4], seed=3).numpy()] * 2)
    pixels = random_pixels(2, gqa.config).numpy()
    expected = grouped.trace(ids, pixels)["logits"]
    assert np.abs(gqa.trace(ids, pixels)["logits"] - expected).max() <= 1e-4
    tokens = grouped.generate_ids(ids, pixels, max_new_tokens=16)
    assert np.array_equal(gqa.generate_ids(ids, pixels, max_new_tokens=16), tokens)
    monkeypatch.setattr(session_module, "PREFILL_CHUNK", 7)  # one sample: in chunks; two: in one run
    assert np.abs(gqa.trace(ids[:1], pixels[:1])["logits"] - expected[:1]).max() <= 1e-4
    assert np.array_equal(gqa.generate_ids(ids[:1], pixels[:1], max_new_tokens=16), tokens[:1])
    assert np.abs(gqa.trace(ids, pixels)["logits"] - expected).max() <= 1e-4
    assert np.array_equal(gqa.generate_ids(ids, pixels, max_new_tokens=16), tokens)
    assert OnnxBackend(export).name == "onnx-fp32-gqa" and OnnxBackend(demo_export_fp32).name == "onnx-fp32"


def test_group_query_attention_kernel_in_fp16_keeps_its_rotary_and_passes_the_fp16_gate(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    """An fp16 graph casts q/k/v to its fp32 islands before rotating them, so the fold into GroupQueryAttention
    does not match and every layer keeps its two RotaryEmbedding nodes; the export still passes the fp16 gate
    against PyTorch."""
    export = export_model(demo_model_dir, tmp_path / "gqa16", "fp16", attention="gqa", validate=True)
    manifest = json.loads((export / "manifest.json").read_text())
    decoder = manifest["graphs"]["decoder"]
    layers = manifest["config"]["num_hidden_layers"]
    assert decoder["fusions"]["rotary_in_attention"] == 0
    assert decoder["op_counts"]["RotaryEmbedding"] == 2 * layers
    assert manifest["validation"]["passed"] and not manifest["validation"]["failures"]


def test_a_prompt_prefilled_in_chunks_is_the_prompt_prefilled_at_once(
    demo_export_fp32: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of 7 tokens (images inside chunks and across their edges) give the one-run logits at every
    position, the same cache and the same greedy tokens."""
    import owl3.runtime.session as session_module

    session = Owl3Session(demo_export_fp32, "cpu")
    ids = np.concatenate([prompt_with_images(30, [2, 11], seed=8).numpy()] * 2)
    pixels = random_pixels(4, session.config).numpy()
    whole, tokens = session.trace(ids, pixels), session.generate_ids(ids, pixels, max_new_tokens=12)
    monkeypatch.setattr(session_module, "PREFILL_CHUNK", 7)
    chunked = session.trace(ids, pixels)
    assert chunked["logits"].shape == whole["logits"].shape
    assert np.abs(chunked["logits"] - whole["logits"]).max() <= 1e-4
    assert np.abs(chunked["present_value_1"] - whole["present_value_1"]).max() <= 1e-5
    assert np.array_equal(session.generate_ids(ids, pixels, max_new_tokens=12), tokens)


def test_the_in_place_cache_grows_with_the_context_and_gives_the_same_tokens(
    demo_export_fp32: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 2 rows of headroom the buffers start at the prompt + 2 rows (made for the whole prompt at once, though
    it is prefilled 7 tokens at a time) and double (at most the request's limit) while generating, the filled rows
    carried over: the same greedy tokens as buffers made once."""
    import owl3.runtime.session as session_module

    session = Owl3Session(demo_export_fp32, "cpu")
    ids = np.concatenate([prompt_with_images(30, [2, 11], seed=8).numpy()] * 2)
    pixels = random_pixels(4, session.config).numpy()
    once = session.generate_ids(ids, pixels, max_new_tokens=40)  # the limit is within the default headroom
    capacities = []
    reserve = session_module.InPlaceCache.reserve

    def watched(cache, rows: int) -> None:
        reserve(cache, rows)
        assert cache.capacity >= rows and cache.capacity <= cache.limit
        capacities.append(cache.capacity)

    monkeypatch.setattr(session_module.InPlaceCache, "reserve", watched)
    monkeypatch.setattr(session_module, "CACHE_HEADROOM", 2)
    monkeypatch.setattr(session_module, "PREFILL_CHUNK", 7)
    grown = session.generate_ids(ids, pixels, max_new_tokens=40)
    length = ids.shape[1]
    assert sorted(set(capacities)) == [length + 2, 2 * (length + 2), length + 40]
    assert np.array_equal(grown, once)


def test_attention_kernel_is_refused_outside_the_fused_flavour(demo_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="needs the fused ort flavour"):
        export_model(demo_model_dir, tmp_path / "never", "fp32", fused=False, attention="gqa", validate=False)
    with pytest.raises(UsageError, match="is unknown"):
        export_model(demo_model_dir, tmp_path / "never", "fp32", attention="flash", validate=False)
    assert not (tmp_path / "never").exists()


def test_fused_operators_are_refused_for_tensorrt(demo_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="fused operators exist only in the ort flavour"):
        export_model(demo_model_dir, tmp_path / "never", "fp32", target="tensorrt", fused=True, validate=False)
    assert not (tmp_path / "never").exists()
