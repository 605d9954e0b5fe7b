"""bench/peers.py's pure helpers: the owl3 -> Qwen2 weight mapping (checked against transformers), the plan,
the comparison with the peers and the safetensors reader that feeds the GGUF writer."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from owl3.config import Owl3Config
from owl3.model.weights import HYPER_EXTRA, load_model, table_entries
from tests.conftest import write_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import peers  # bench/ is a folder of scripts, not a package

TOLERANCE = 1e-5  # fp32, as tests/test_model_vs_transformers.py


def test_hf_names_keep_the_language_model_and_drop_hyper_extras() -> None:
    config = Owl3Config.tiny()
    extra = tuple(suffix for suffix, _shape, _kind in HYPER_EXTRA)
    mapped = {e.name: peers.hf_name(e.name, e.name.endswith(extra)) for e in table_entries(config, "required")}
    assert mapped["language_model.model.embed_tokens.weight"] == "model.embed_tokens.weight"
    assert mapped["language_model.model.layers.0.self_attn.q_proj.bias"] == "model.layers.0.self_attn.q_proj.bias"
    assert mapped["language_model.lm_head.weight"] == "lm_head.weight"
    assert mapped["language_model.model.layers.0.self_attn.v_kv_proj.weight"] is None
    assert mapped["language_model.model.layers.2.self_attn.gate_proj.0.bias"] is None
    assert all(v is None for k, v in mapped.items() if not k.startswith("language_model."))


@pytest.mark.parametrize("tied", [False, True], ids=["separate-lm_head", "tied"])
def test_hf_folder_is_a_qwen2_with_our_text_only_logits(tmp_path: Path, tied: bool) -> None:
    transformers = pytest.importorskip("transformers")
    tiny = Owl3Config.tiny()
    config = replace(tiny, text=replace(tiny.text, tie_word_embeddings=tied))
    checkpoint = write_tiny_checkpoint(tmp_path / "owl3", config)
    hf_dir = peers.write_hf_folder(checkpoint, tmp_path / "hf")
    reference = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    assert not reference.config.tie_word_embeddings
    ours = load_model(checkpoint, dtype=torch.float32)
    ids = torch.randint(0, config.text.vocab_size, (2, 19), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        expected = reference(input_ids=ids).logits.float()
        actual = ours(ids).logits
    assert (actual - expected).abs().max().item() <= TOLERANCE
    assert peers.write_hf_folder(checkpoint, tmp_path / "hf") == hf_dir  # reused: its marker exists


def test_plan_pairs_each_of_our_formats_with_the_peers() -> None:
    variants = peers.plan(["int4", "fp32"], ["ours", "genai"])
    assert [v.format for v in variants[:2]] == ["fp32", "fp32"]  # precision order, not argument order
    int4 = [(v.engine, v.lm_head) for v in variants if v.format == "int4"]
    assert int4 == [
        ("ours", "float"), ("ours", "int8"), ("ours", "int4"), ("genai", "float"), ("genai", "int8"), ("genai", "int4")
    ]  # fmt: skip
    assert {v.engine for v in peers.plan(list(peers.PRECISIONS), ["ours", "genai", "llama"])} == {
        "ours", "genai", "llama"}  # fmt: skip
    ours = [(v.format, v.lm_head) for v in peers.plan(list(peers.PRECISIONS), ["ours"], ["float"])]
    assert ours == [("fp32", "float"), ("int8", "float"), ("int4", "float")]
    kernels = peers.plan(["int4"], ["ours", "genai"], ["int4"], ["grouped", "gqa"])
    assert [(v.engine, v.lm_head, v.attention) for v in kernels] == [
        ("ours", "int4", "grouped"), ("ours", "int4", "gqa"),
        ("genai", "float", "grouped"), ("genai", "int8", "grouped"), ("genai", "int4", "grouped"),
    ]  # fmt: skip
    assert kernels[1].name == "ours-int4-lm_head-int4-gqa" and kernels[0].name == "ours-int4-lm_head-int4"
    assert peers.label(kernels[1], "int4") == "owl3.runtime int4 (lm_head int4, gqa)"


def _row(engine: str, lm_head: str, tokens_per_s: float, bits: int = 4) -> dict:
    quantized = lm_head not in peers.FLOAT_TYPES
    label = f"{engine} lm_head {lm_head}"
    return {"engine": engine, "bits": bits, "lm_head": lm_head, "lm_head_quantized": quantized,
            "label": label, "decode_tokens_per_s": tokens_per_s}  # fmt: skip


def test_compare_is_like_for_like_on_lm_head_and_says_when_no_peer_ran() -> None:
    rows = [
        _row("ours", "fp16", 30.0), _row("ours", "int8", 40.0), _row("ours", "fp32", 9.0, bits=32),
        _row("genai", "int4", 50.0), _row("genai", "int8", 45.0), _row("llama", "Q8_0", 20.0),
        _row("genai", "fp32", 25.0),  # an int4 body with lm_head in float
    ]  # fmt: skip
    by_ours = {c["lm_head"]: c for c in peers.compare(rows)}
    assert by_ours["fp16"]["like_for_like"] == {"peer": "genai lm_head fp32", "ratio": 30.0 / 25.0, "paired": None}
    assert by_ours["fp16"]["any_lm_head"]["peer"] == "genai lm_head int4"
    assert by_ours["int8"]["like_for_like"] == {"peer": "genai lm_head int4", "ratio": 40.0 / 50.0, "paired": None}
    assert by_ours["fp32"]["like_for_like"] is None and by_ours["fp32"]["any_lm_head"] is None


def test_paired_ratio_compares_turn_by_turn() -> None:
    ours = {"decode_s_per_token_turns": [0.010, 0.020, 0.016]}
    peer = {"decode_s_per_token_turns": [0.011, 0.018, 0.016]}
    paired = peers.paired_ratio(ours, peer)
    assert paired == {"median": pytest.approx(1.0), "low": pytest.approx(0.9), "high": pytest.approx(1.1),
                      "faster_turns": 1, "turns": 3}  # fmt: skip
    assert peers.paired_ratio(ours, {"decode_s_per_token_turns": [0.01]}) is None


def test_turns_combine_into_medians_and_refuse_changed_tokens() -> None:
    turns = [{"tokens": [1, 2], "ttft_s": t, "decode_s_per_token": d, "peak_rss_gib": r, "engine_version": "x"}
             for t, d, r in ((0.3, 0.020, 1.0), (0.1, 0.030, 1.5), (0.2, 0.010, 1.2))]  # fmt: skip
    combined = peers.combine_turns(turns)
    assert (combined["ttft_s"], combined["decode_s_per_token"], combined["peak_rss_gib"]) == (0.2, 0.020, 1.5)
    assert combined["decode_s_per_token_turns"] == [0.020, 0.030, 0.010] and combined["turns"] == 3
    assert combined["tokens"] == [1, 2] and combined["engine_version"] == "x"
    with pytest.raises(peers.StepFailed, match="greedy tokens changed between turns"):
        peers.combine_turns([*turns, {**turns[0], "tokens": [1, 3]}])


def test_common_prefix() -> None:
    assert peers.common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert peers.common_prefix([1, 2], [1, 2, 3]) == 2
    assert peers.common_prefix([], [1]) == 0


def test_read_safetensors_widens_bf16_exactly(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(4), "c": torch.randn(2, 2).half()}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    read = dict(peers.read_safetensors(tmp_path / "w.safetensors"))
    assert sorted(read) == ["a", "b", "c"]
    for name, tensor in tensors.items():
        assert read[name].dtype.name == "float32"
        assert torch.equal(torch.from_numpy(read[name].copy()), tensor.float())
