"""Strict loading of GPTQ-format checkpoints: v1 and v2, and every disagreement named before anything loads."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from owl3.errors import CheckpointError, ConfigError
from owl3.model.weights import load_model
from owl3.quantize import QuantizedLinear
from owl3.quantize.qmath import pack_cols, unpack_cols

DOWN = "language_model.model.layers.1.mlp.down_proj"
Q_PROJ = "language_model.model.layers.0.self_attn.q_proj"


def variant(
    source: Path,
    target: Path,
    tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
    quantization: Callable[[dict], None] | None = None,
) -> Path:
    """A copy of the quantized checkpoint ``source`` with its tensors and/or quantization_config edited."""
    shutil.copytree(source, target)
    (target / "manifest.json").unlink()  # a hand-edited checkpoint is no longer the quantizer's artifact
    if tensors is not None:
        loaded = load_file(str(target / "model.safetensors"))
        tensors(loaded)
        save_file({k: v.contiguous() for k, v in loaded.items()}, str(target / "model.safetensors"))
    if quantization is not None:
        config = json.loads((target / "config.json").read_text())
        quantization(config["quantization_config"])
        (target / "config.json").write_text(json.dumps(config))
        (target / "quantize_config.json").write_text(json.dumps(config["quantization_config"]))
    return target


def test_v2_zero_points_load_to_the_same_weights(demo_int4: Path, tmp_path: Path) -> None:
    def true_zeros(t: dict[str, torch.Tensor]) -> None:
        for name in [n for n in t if n.endswith(".qzeros")]:
            t[name] = pack_cols(unpack_cols(t[name], 4) + 1, 4)

    def v2(q: dict) -> None:
        q["checkpoint_format"] = q["format"] = "gptq_v2"

    v1_model, v2_model = load_model(demo_int4), load_model(variant(demo_int4, tmp_path / "v2", true_zeros, v2))
    for name, module in v1_model.named_modules():
        if isinstance(module, QuantizedLinear):
            other = v2_model.get_submodule(name)
            assert other.checkpoint_format == "gptq_v2"
            assert torch.equal(module.dequantized_weight(), other.dequantized_weight())


def test_a_mis_shaped_packed_tensor_is_named(demo_int4: Path, tmp_path: Path) -> None:
    def shrink(t: dict[str, torch.Tensor]) -> None:
        t[f"{DOWN}.scales"] = t[f"{DOWN}.scales"][:-1]

    with pytest.raises(CheckpointError, match=rf"{DOWN}\.scales expected \[11, 128\] found \[10, 128\]") as error:
        load_model(variant(demo_int4, tmp_path / "bad", shrink))
    assert error.value.exit_code == 3


def test_config_bits_disagreeing_with_the_packing_is_refused(demo_int4: Path, tmp_path: Path) -> None:
    def eight_bits(q: dict) -> None:
        q["bits"] = 8

    with pytest.raises(CheckpointError, match=r"qweight expected \[.*\] found") as error:
        load_model(variant(demo_int4, tmp_path / "bits", quantization=eight_bits))
    assert "mis-shaped" in str(error.value)


def test_a_packed_layer_that_the_config_keeps_float_is_refused(demo_int4: Path, tmp_path: Path) -> None:
    def keep_q_proj_float(q: dict) -> None:
        q["dynamic"] = {rf"-:^{Q_PROJ.replace('.', chr(92) + '.')}$": {}, **q["dynamic"]}

    with pytest.raises(CheckpointError, match=f"dynamic keeps {Q_PROJ} in float"):
        load_model(variant(demo_int4, tmp_path / "dyn", quantization=keep_q_proj_float))


def test_a_float_decoder_layer_the_config_quantizes_is_refused(demo_int4: Path, tmp_path: Path) -> None:
    def unpack_q_proj(t: dict[str, torch.Tensor]) -> None:
        for suffix in ("qweight", "qzeros", "scales", "g_idx"):
            del t[f"{Q_PROJ}.{suffix}"]
        t[f"{Q_PROJ}.weight"] = torch.zeros(128, 128, dtype=torch.float16)

    with pytest.raises(CheckpointError, match=f"{Q_PROJ}.weight is float but quantization_config quantizes it"):
        load_model(variant(demo_int4, tmp_path / "float", unpack_q_proj))


def test_group_indices_are_checked_and_act_order_g_idx_is_read(demo_int4: Path, tmp_path: Path) -> None:
    def out_of_range(t: dict[str, torch.Tensor]) -> None:
        t[f"{DOWN}.g_idx"][0] = 99

    with pytest.raises(CheckpointError, match=rf"{DOWN}\.g_idx \(values outside 0\.\.10\)"):
        load_model(variant(demo_int4, tmp_path / "range", out_of_range))

    def permuted(t: dict[str, torch.Tensor]) -> None:  # a desc_act checkpoint: any valid group per input row
        t[f"{DOWN}.g_idx"] = t[f"{DOWN}.g_idx"].flip(0).contiguous()

    model = load_model(variant(demo_int4, tmp_path / "desc", permuted))
    assert not model.get_submodule(DOWN).quantized_weight().has_trivial_g_idx()


def test_quantize_config_json_must_agree_with_config_json(demo_int4: Path, tmp_path: Path) -> None:
    target = variant(demo_int4, tmp_path / "pair")
    side = json.loads((target / "quantize_config.json").read_text())
    side["group_size"] = 64
    (target / "quantize_config.json").write_text(json.dumps(side))
    with pytest.raises(ConfigError, match=r"quantize_config\.json disagree"):
        load_model(target)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"quant_method": "awq"}, "quant_method 'awq' is not supported"),
        ({"bits": 3}, "bits 3 is not supported"),
        ({"sym": False}, "asymmetric"),
        ({"group_size": 100}, "group_size 100 is not -1 or a power of two"),
        ({"checkpoint_format": "marlin", "format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
        ({"activation_scheme": "dynamic"}, "activation_scheme 'dynamic' is not supported"),
    ],
)
def test_unsupported_quantization_configs_are_refused(
    demo_int4: Path, tmp_path: Path, edit: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_model(variant(demo_int4, tmp_path / "cfg", quantization=lambda q: q.update(edit)))


def test_packed_tensors_without_a_quantization_config_are_refused(demo_int4: Path, tmp_path: Path) -> None:
    target = variant(demo_int4, tmp_path / "noconfig", quantization=lambda q: None)
    config = json.loads((target / "config.json").read_text())
    del config["quantization_config"]
    (target / "config.json").write_text(json.dumps(config))
    (target / "quantize_config.json").unlink()
    with pytest.raises(CheckpointError, match="has no quantization_config"):
        load_model(target)


def test_w8a8_input_scales_must_match_the_activation_scheme(demo_w8a8: Path, tmp_path: Path) -> None:
    def drop_scale(t: dict[str, torch.Tensor]) -> None:
        del t[f"{Q_PROJ}.input_scale"]

    with pytest.raises(CheckpointError, match=f"{Q_PROJ}.input_scale is missing"):
        load_model(variant(demo_w8a8, tmp_path / "scale", drop_scale))
    model = load_model(demo_w8a8)
    assert float(model.get_submodule(Q_PROJ).input_scale) > 0
