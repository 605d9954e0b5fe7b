"""Checkpoint name table, safetensors validation and strict loading (owl3.model.weights, owl3.checkpoint)."""

from __future__ import annotations

import json
import pickle
import struct
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from owl3.checkpoint import random_state_dict, save_checkpoint
from owl3.config import Owl3Config
from owl3.errors import CheckpointError, ConfigError, ResourceError, UsageError
from owl3.model import weights
from owl3.model.owl3 import Owl3Model
from owl3.model.safetensors_files import read_safetensors_header
from owl3.model.weights import count_parameters, load_model, tensor_table, unused_tensor_table

TINY = Owl3Config.tiny()
EMBED = "language_model.model.embed_tokens.weight"
Q0 = "language_model.model.layers.0.self_attn.q_proj.weight"


def _save(tmp_path: Path, state: dict[str, torch.Tensor] | None = None, name: str = "ckpt", **kw) -> Path:
    state = random_state_dict(TINY, seed=0) if state is None else state
    return save_checkpoint(state, kw.pop("config", TINY), tmp_path / name, **kw)


def _sharded(tmp_path: Path, **kw) -> Path:
    directory = _save(tmp_path, max_shard_bytes=300_000, **kw)
    assert len(list(directory.glob("model-*-of-*.safetensors"))) >= 3
    return directory


def _shards(directory: Path) -> list[Path]:
    return sorted(directory.glob("model-*-of-*.safetensors"))


def _index(directory: Path) -> dict:
    return json.loads((directory / "model.safetensors.index.json").read_text())


# ---- the table -------------------------------------------------------------------------------------
def test_table_equals_tiny_model_state_dict() -> None:
    state = Owl3Model(TINY).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == tensor_table(TINY)
    assert count_parameters(TINY) == sum(v.numel() for v in state.values())
    assert not set(unused_tensor_table(TINY)) & set(tensor_table(TINY))
    assert "vision_model.encoder.layers.2.mlp.fc1.weight" in unused_tensor_table(TINY)  # last layer (of 3)


def test_table_equals_7b_model_on_meta() -> None:
    config = Owl3Config.owl3_7b_240728()
    with torch.device("meta"):
        model = Owl3Model(config)
    state = model.state_dict()
    assert all(t.is_meta for t in state.values())  # nothing was allocated
    assert {k: tuple(v.shape) for k, v in state.items()} == tensor_table(config)
    count = count_parameters(config)
    print(f"mPLUG-Owl3-7B-240728 parameters: {count:,}")
    assert count == sum(v.numel() for v in state.values())
    assert 7.5e9 < count < 8.5e9


def test_tied_embeddings_drop_lm_head() -> None:
    tied = replace(TINY, text=replace(TINY.text, tie_word_embeddings=True))
    assert "language_model.lm_head.weight" not in tensor_table(tied)
    assert "language_model.lm_head.weight" in unused_tensor_table(tied)
    assert {k: tuple(v.shape) for k, v in Owl3Model(tied).state_dict().items()} == tensor_table(tied)


# ---- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip(tmp_path: Path, sharded: bool, dtype: torch.dtype) -> None:
    source = random_state_dict(TINY, seed=3)
    directory = _sharded(tmp_path, state=source) if sharded else _save(tmp_path, source)
    model = load_model(directory, dtype=dtype)
    loaded = model.state_dict()
    assert set(loaded) == set(source)
    for name, tensor in source.items():
        assert loaded[name].dtype == dtype
        assert torch.equal(loaded[name], tensor.to(dtype)), name
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_unused_tensors_present_or_absent_both_load(tmp_path: Path) -> None:
    with_unused = _save(tmp_path, name="with", include_unused=True)
    without = _save(tmp_path, name="without", include_unused=False)
    assert set(unused_tensor_table(TINY)) - {"language_model.lm_head.weight"} <= set(
        read_safetensors_header(with_unused / "model.safetensors")
    )
    assert "vision_model.head.probe" not in read_safetensors_header(without / "model.safetensors")
    a, b = load_model(with_unused).state_dict(), load_model(without).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unused_tensor_of_wrong_shape_is_refused(tmp_path: Path) -> None:
    state = random_state_dict(TINY)
    state["vision_model.head.probe"] = torch.zeros(1, 2, 48)
    directory = _save(tmp_path, state, include_unused=False, strict=False)
    with pytest.raises(CheckpointError, match=r"mis-shaped: vision_model\.head\.probe expected \[1, 1, 48\]"):
        load_model(directory)


def test_tied_checkpoint_accepts_lm_head(tmp_path: Path) -> None:
    tied = replace(TINY, text=replace(TINY.text, tie_word_embeddings=True))
    state = random_state_dict(tied)
    state["language_model.lm_head.weight"] = state[EMBED].clone()
    model = load_model(save_checkpoint(state, tied, tmp_path / "tied", strict=False))
    assert torch.equal(model.language_model.output_weight(), state[EMBED])


def test_eos_token_ids(tmp_path: Path) -> None:
    assert load_model(_save(tmp_path, name="a", generation_eos=[7, 9])).eos_token_ids == (7, 9)
    assert load_model(_save(tmp_path, name="b", generation_eos=5)).eos_token_ids == (5,)
    qwen_ids = replace(TINY, text=replace(TINY.text, eos_token_id=500, bos_token_id=501))
    assert load_model(_save(tmp_path, name="c", config=qwen_ids)).eos_token_ids == (500, 501)


def test_progress_line_for_sharded_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_model(_sharded(tmp_path), progress=True)
    assert "loading weights: shard" in capsys.readouterr().err
    load_model(tmp_path / "ckpt", progress=False)
    assert capsys.readouterr().err == ""


def test_save_refuses_to_overwrite(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    with pytest.raises(UsageError, match="refusing to overwrite"):
        _save(tmp_path)
    assert (directory / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging left behind


# ---- damaged files ---------------------------------------------------------------------------------
def test_truncated_shard_is_detected_before_any_compute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _sharded(tmp_path)
    shard = _shards(directory)[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])  # inside the data section
    monkeypatch.setattr(weights, "_build_empty_model", lambda *a: pytest.fail("model built before checks"))
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_model(directory)
    assert shard.name in str(info.value)
    assert info.value.exit_code == 3


def test_absurd_header_length_and_trailing_bytes(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data + b"\0" * 8)
    with pytest.raises(CheckpointError, match="trailing bytes"):
        read_safetensors_header(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    with pytest.raises(CheckpointError, match=r"header length .* is absurd"):
        load_model(directory)


def test_overlapping_offsets_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 12)
    with pytest.raises(CheckpointError, match="b at offset 4 overlaps"):
        read_safetensors_header(path)


def test_missing_shard(tmp_path: Path) -> None:
    directory = _sharded(tmp_path)
    lost = _shards(directory)[-1]
    lost.unlink()
    with pytest.raises(CheckpointError, match="missing") as info:
        load_model(directory)
    assert lost.name in str(info.value)


def test_index_names_wrong_shard(tmp_path: Path) -> None:
    directory = _sharded(tmp_path)
    index = _index(directory)
    first, last = _shards(directory)[0].name, _shards(directory)[-1].name
    assert index["weight_map"][Q0] == first
    index["weight_map"][Q0] = last
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{Q0}: index says {last}, found in {first}"):
        load_model(directory)


def test_duplicate_tensor_across_shards(tmp_path: Path) -> None:
    directory = _sharded(tmp_path)
    first, last = _shards(directory)[0], _shards(directory)[-1]
    tensors = load_file(last)
    tensors[EMBED] = load_file(first)[EMBED]
    save_file(tensors, str(last))
    with pytest.raises(CheckpointError, match="more than one shard") as info:
        load_model(directory)
    assert EMBED in str(info.value)
    assert first.name in str(info.value) and last.name in str(info.value)


def test_tensor_missing_from_index(tmp_path: Path) -> None:
    directory = _sharded(tmp_path)
    index = _index(directory)
    del index["weight_map"][Q0]
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{Q0}: in .*, not in the index"):
        load_model(directory)


def test_nan_and_inf_tensors_are_listed(tmp_path: Path) -> None:
    state = random_state_dict(TINY)
    state[Q0][0, 0] = float("nan")
    state["vision2text_model.bias"][3] = float("inf")
    directory = _save(tmp_path, state)
    with pytest.raises(CheckpointError, match="2 tensors hold NaN or Inf") as info:
        load_model(directory)
    assert Q0 in str(info.value) and "vision2text_model.bias" in str(info.value)
    assert "model.safetensors" in str(info.value)


def test_fp16_overflow_is_reported(tmp_path: Path) -> None:
    state = random_state_dict(TINY)
    state[Q0][1, 1] = 1e6
    with pytest.raises(CheckpointError, match=rf"{Q0} \(model.safetensors, overflows torch.float16\)"):
        load_model(_save(tmp_path, state), dtype=torch.float16)


# ---- names and shapes ------------------------------------------------------------------------------
def test_misshaped_tensor(tmp_path: Path) -> None:
    state = random_state_dict(TINY)
    state[Q0] = torch.zeros(64, 63)
    with pytest.raises(CheckpointError, match=rf"1 mis-shaped: {Q0} expected \[64, 64\] found \[64, 63\]"):
        load_model(_save(tmp_path, state, strict=False))


def test_hyper_layers_disagreeing_with_tensors(tmp_path: Path) -> None:
    directory = _save(tmp_path)  # tensors: hyper layers 0 and 2 (0-based)
    raw = json.loads((directory / "config.json").read_text())
    raw["hyper_layers"] = [2, 3]  # 1-based: layers 1 and 2
    (directory / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as info:
        load_model(directory)
    message = str(info.value)
    missing, unexpected = message.split("4 missing: ")[1].split("; 4 unexpected: ")
    for suffix in ("v_kv_proj.weight", "v_kv_proj.bias", "gate_proj.0.weight", "gate_proj.0.bias"):
        assert f"language_model.model.layers.1.self_attn.{suffix}" in missing
        assert f"language_model.model.layers.0.self_attn.{suffix}" in unexpected
    assert "hyper layers at 0-based [0, 2]" in message


def test_long_lists_are_truncated(tmp_path: Path) -> None:
    state = {k: v for k, v in random_state_dict(TINY).items() if not k.startswith("vision_model.")}
    with pytest.raises(CheckpointError, match=r"\.\.\. and \d+ more") as info:
        load_model(_save(tmp_path, state, include_unused=False, strict=False))
    assert len(str(info.value)) < 3000


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl"])
def test_config_of_another_architecture(tmp_path: Path, model_type: str) -> None:
    directory = _save(tmp_path)
    raw = json.loads((directory / "config.json").read_text())
    raw.update(model_type=model_type, architectures=["LlavaForConditionalGeneration"])
    (directory / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=f"model_type '{model_type}'.*supports mPLUG-Owl3 revision 240728"):
        load_model(directory)


def test_241101_variant_is_named(tmp_path: Path) -> None:
    state = {k: v for k, v in random_state_dict(TINY).items() if ".self_attn.gate_proj." not in k}
    del state["vision2text_model.weight"], state["vision2text_model.bias"]
    state["vision2text_model.0.weight"] = torch.zeros(64, 48)
    state["vision2text_model.2.weight"] = torch.zeros(64, 64)
    with pytest.raises(CheckpointError, match=r"7B-241101 variant.*supports only mPLUG-Owl3 revision 240728"):
        load_model(_save(tmp_path, state, name="a", strict=False))
    fused_only = {k: v for k, v in random_state_dict(TINY).items() if ".self_attn.gate_proj." not in k}
    with pytest.raises(CheckpointError, match=r"241101 variant \(v_kv_proj without gate_proj"):
        load_model(_save(tmp_path, fused_only, name="b", strict=False))


def test_foreign_tensor_names(tmp_path: Path) -> None:
    state = random_state_dict(TINY)
    state["multi_modal_projector.linear_1.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError, match=r"another architecture \(LLaVA-style"):
        load_model(_save(tmp_path, state, strict=False))


# ---- trust boundaries and other inputs ------------------------------------------------------------
class _Exploit:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled')",))


def test_pickle_only_checkpoint_is_refused(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*never unpickles") as info:
        load_model(directory)
    assert "save_file" in str(info.value)  # says how to convert


def test_invalid_config_json(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    (directory / "config.json").write_text('{"model_type": "mplugowl3",')
    with pytest.raises(ConfigError, match="not valid JSON") as info:
        load_model(directory)
    assert "config.json" in str(info.value)


def test_checkpoint_python_files_are_never_executed(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    marker = tmp_path / "executed"
    code = f"open({str(marker)!r}, 'w').close()\nraise SystemExit('remote code ran')\n"
    for name in ("modeling_mplugowl3.py", "configuration_mplugowl3.py", "__init__.py"):
        (directory / name).write_text(code)
    model = load_model(directory)
    assert isinstance(model, Owl3Model)
    assert not marker.exists()
    assert "modeling_mplugowl3" not in sys.modules


def test_not_enough_ram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _save(tmp_path)
    monkeypatch.setattr(weights, "available_ram_bytes", lambda: 1000)
    with pytest.raises(ResourceError, match=r"needs about .* GiB of RAM, 0.0 GiB available") as info:
        load_model(directory)
    assert info.value.exit_code == 5


def test_meminfo_parsing(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemAvailable:    2048 kB\n")
    assert weights.available_ram_bytes(meminfo) == 2048 * 1024
    assert weights.available_ram_bytes(tmp_path / "absent") is None
