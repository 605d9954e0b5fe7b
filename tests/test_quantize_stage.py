"""The quantize stage end to end on the demo model: the GPTQ layout, the manifest, loading, and every refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from owl3.errors import EnvironmentProblem, UsageError
from owl3.model.weights import load_model
from owl3.quantize import CalibrationConfig, QuantizedLinear, quantize_model, recipe
from owl3.quantize.qmath import dequantize, unpack_cols, unpack_rows
from owl3.quantize.recipes import RecipeError
from owl3.quantize.stage import plan_modules
from tests.conftest import quantize_demo

LAYER0 = "language_model.model.layers.0."


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_int4_checkpoint_is_in_the_gptq_layout(demo_int4: Path, demo_model_dir: Path) -> None:
    config = json.loads((demo_int4 / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization == json.loads((demo_int4 / "quantize_config.json").read_text())
    expected = {"bits": 4, "group_size": 128, "sym": True, "desc_act": False, "checkpoint_format": "gptq"}
    assert {k: quantization[k] for k in expected} == expected and quantization["pack_dtype"] == "int32"
    assert quantization["quant_method"] == "gptq" and quantization["meta"]["act_group_aware"] is True
    assert quantization["dynamic"][r"+:^language_model\.model\.layers\.0\.mlp\.down_proj$"] == {"group_size": 32}
    assert r"-:^language_model\.lm_head$" in quantization["dynamic"]
    assert quantization["block_name_to_quantize"] == "language_model.model.layers"
    tensors = tensors_of(demo_int4)
    k, n = 352, 128  # down_proj: K = intermediate (groups of 32), N = hidden
    down = LAYER0 + "mlp.down_proj"
    assert tensors[f"{down}.qweight"].shape == (k // 8, n) and tensors[f"{down}.qweight"].dtype == torch.int32
    assert tensors[f"{down}.qzeros"].shape == (k // 32, n // 8)
    assert tensors[f"{down}.scales"].shape == (k // 32, n) and tensors[f"{down}.scales"].dtype == torch.float16
    assert torch.equal(tensors[f"{down}.g_idx"], torch.arange(k, dtype=torch.int32) // 32)
    assert f"{down}.weight" not in tensors
    packed_zeros = [v for name, v in tensors.items() if name.endswith(".qzeros")]
    assert all(bool((z == 0x77777777).all()) for z in packed_zeros)  # v1: symmetric zero 8 stored as 7
    assert tensors[LAYER0 + "self_attn.q_proj.bias"].dtype == torch.float16
    assert all(t.dtype in (torch.float16, torch.int32) for t in tensors.values())


def test_manifest_records_recipe_calibration_layers_and_verification(demo_int4: Path) -> None:
    manifest = json.loads((demo_int4 / "manifest.json").read_text())
    assert manifest["schema"] == "owl3-export/gptq" and manifest["status"] == "ok"
    assert (manifest["variant"], manifest["precision"]) == ("int4", "int4")
    assert manifest["recipe"]["bits"] == 4 and manifest["calibration"]["samples"] == 24
    assert len(manifest["calibration"]["id_hashes"]) == 24 and manifest["calibration"]["images"] > 24
    layers = {r["module"]: r for r in manifest["layers"]}
    assert len(layers) == manifest["summary"]["quantized_layers"] == 4 * 7 + 2  # 7 Linears a layer, 2 v_kv_proj
    assert all(0 < r["relative_error"] < 0.05 and r["method"] == "gptq" for r in layers.values())
    assert all(c["cosine"] >= manifest["verification"]["min_cosine"] for c in manifest["verification"]["logits"])
    assert len(manifest["verification"]["logits"]) == 2  # a sample with images and one without
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "tokenizer.json", "quantize_config.json"}


def test_hyper_v_kv_proj_is_calibrated_on_the_visual_memory(demo_int4: Path) -> None:
    manifest = json.loads((demo_int4 / "manifest.json").read_text())
    layers = {r["module"]: r for r in manifest["layers"]}
    image_tokens = manifest["calibration"]["images"] * 16  # 16 visual tokens per demo image
    assert layers[LAYER0 + "self_attn.v_kv_proj"]["tokens"] == image_tokens
    assert layers[LAYER0 + "self_attn.q_proj"]["tokens"] == manifest["calibration"]["tokens"]


def test_loaded_model_computes_with_the_checkpoints_integers(demo_int4: Path) -> None:
    model = load_model(demo_int4)
    plan = plan_modules(model.config, recipe("int4"))
    modules = dict(model.named_modules())
    assert all(isinstance(modules[name], QuantizedLinear) for name in plan)
    assert not isinstance(modules[LAYER0 + "self_attn.gate_proj.0"], QuantizedLinear)
    name = LAYER0 + "self_attn.v_kv_proj"
    with safe_open(str(demo_int4 / "model.safetensors"), "pt") as f:
        codes = unpack_rows(f.get_tensor(f"{name}.qweight"), 4)
        zeros = unpack_cols(f.get_tensor(f"{name}.qzeros"), 4) + 1  # v1 stores zero - 1
        weight = dequantize(codes, f.get_tensor(f"{name}.scales"), zeros, f.get_tensor(f"{name}.g_idx")).t()
        bias = f.get_tensor(f"{name}.bias").float()
    assert torch.equal(modules[name].dequantized_weight(), weight)
    x = torch.randn(3, 128)
    torch.testing.assert_close(modules[name](x), F.linear(x, weight, bias), rtol=0, atol=0)


def test_float_modules_keep_the_source_values(demo_int4: Path, demo_model_dir: Path) -> None:
    source, output = tensors_of(demo_model_dir), tensors_of(demo_int4)
    floats = (
        "language_model.lm_head",
        LAYER0 + "self_attn.gate_proj.0",
        "vision2text_model",
        "vision_model.encoder.layers.0.mlp.fc1",
    )
    for name in [f"{m}.weight" for m in floats] + ["language_model.model.embed_tokens.weight"]:
        assert torch.equal(output[name], source[name].to(torch.float16)), name
    assert "vision_model.head.probe" not in output  # unused by the forward: not carried over


def test_w8a8_carries_activation_scales_and_smoothing(demo_w8a8: Path, demo_model_dir: Path) -> None:
    config = json.loads((demo_w8a8 / "config.json").read_text())["quantization_config"]
    assert (config["activation_scheme"], config["bits"], config["group_size"]) == ("static", 8, -1)
    assert config["meta"]["smoothquant_alpha"] == 0.5
    tensors = tensors_of(demo_w8a8)
    plan = plan_modules(load_model(demo_w8a8).config, recipe("w8a8"))
    for module in plan:
        assert tensors[f"{module}.input_scale"].shape == (1,) and float(tensors[f"{module}.input_scale"]) > 0
    explicit = {n.removesuffix(".pre_quant_scale") for n in tensors if n.endswith(".pre_quant_scale")}
    expected = {m for m in plan if m.endswith(("o_proj", "down_proj"))}
    expected |= (
        {m for m in plan if m.endswith("v_kv_proj")} if config["meta"]["v_kv_smoothing"] == "separate" else set()
    )
    assert explicit == expected
    source = tensors_of(demo_model_dir)
    norm = LAYER0 + "input_layernorm.weight"
    assert not torch.equal(tensors[norm], source[norm].to(torch.float16))  # smoothing folded into the norm
    manifest = json.loads((demo_w8a8 / "manifest.json").read_text())
    assert manifest["precision"] == "w8a8" and all("input_scale" in r for r in manifest["layers"])


def test_text_only_calibration_leaves_v_kv_proj_to_round_to_nearest(
    tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path
) -> None:
    output = quantize_demo(tmp_path_factory, demo_model_dir, "int4", text_only=True)
    manifest = json.loads((output / "manifest.json").read_text())
    layers = {r["module"]: r for r in manifest["layers"]}
    assert layers[LAYER0 + "self_attn.v_kv_proj"]["method"] == "rtn (no calibration input)"
    assert layers[LAYER0 + "self_attn.q_proj"]["method"] == "gptq"
    assert manifest["variant"] == "int4+text-only" and manifest["calibration"]["images"] == 0


def test_overrides_on_a_tied_model_write_an_untied_int8_lm_head(tmp_path: Path) -> None:
    from dataclasses import replace

    from owl3.checkpoint import random_state_dict, save_checkpoint
    from owl3.demo import demo_config
    from owl3.tokenizer import build_demo_tokenizer, write_tokenizer

    base = demo_config()
    config = replace(base, text=replace(base.text, tie_word_embeddings=True))
    save_checkpoint(random_state_dict(config, seed=3), config, tmp_path / "tied")
    write_tokenizer(build_demo_tokenizer(512), tmp_path / "tied")
    chosen = recipe("int4", lm_head="int8", vision="int8")
    output = quantize_model(tmp_path / "tied", tmp_path / "q", chosen, CalibrationConfig(samples=8))
    written = json.loads((output / "config.json").read_text())
    assert written["tie_word_embeddings"] is False and written["quantization_config"]["lm_head"] is True
    assert written["quantization_config"]["dynamic"][r"+:^language_model\.lm_head$"] == {"bits": 8, "group_size": -1}
    tensors = tensors_of(output)
    assert tensors["language_model.lm_head.qweight"].shape == (128 // 4, 512)
    assert "vision_model.encoder.layers.0.mlp.fc1.qweight" in tensors
    model = load_model(output)
    assert isinstance(model.language_model.lm_head, QuantizedLinear)
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["variant"] == "int4+lm_head-int8+vision-int8"


def test_an_interrupted_run_leaves_nothing(
    tmp_path: Path, demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import owl3.quantize.stage as stage

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "quantize_pass", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(demo_model_dir, tmp_path / "out", "int4", CalibrationConfig(samples=2))
    assert list(tmp_path.iterdir()) == []


def test_refusals_before_any_work(tmp_path: Path, demo_model_dir: Path, demo_int4: Path) -> None:
    small = CalibrationConfig(samples=2)
    with pytest.raises(UsageError, match="already holds an artifact"):
        quantize_model(demo_model_dir, demo_int4, "int4", small)
    with pytest.raises(UsageError, match="already quantized"):
        quantize_model(demo_int4, tmp_path / "again", "int4", small)
    with pytest.raises(RecipeError, match="text-only calibration never reaches"):
        quantize_model(demo_model_dir, tmp_path / "w", "w8a8", CalibrationConfig(samples=2, text_only=True))
    if not torch.cuda.is_available():
        with pytest.raises(EnvironmentProblem, match="no GPU") as error:
            quantize_model(demo_model_dir, tmp_path / "c", "int4", small, device="cuda")
        assert error.value.exit_code == 4
    assert not any(tmp_path.iterdir())


def test_cli_quantize_and_its_errors(tmp_path: Path, demo_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from owl3.cli import main

    args = ["quantize", "--precision", "int8", "--model", str(demo_model_dir), "--samples", "4"]
    assert main([*args, "--output", str(tmp_path / "int8")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "int8")
    assert load_model(tmp_path / "int8").quantization.bits == 8
    assert main([*args, "--calibration", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 3
    assert "expected 'builtin', a folder of images" in capsys.readouterr().err
    assert main(["quantize", "--precision", "int3"]) == 2
    assert main([*args, "--exclude", "layers.[", "--output", str(tmp_path / "y")]) == 2


def test_verification_rereads_every_tensor_and_bounds_its_memory(
    demo_int4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import owl3.quantize.verify as verify
    from owl3.quantize.checkpoint_io import tensor_digest

    copy = tmp_path / "copy"
    shutil.copytree(demo_int4, copy)
    tensors = tensors_of(copy)
    digests = {name: tensor_digest(value) for name, value in tensors.items()}
    monkeypatch.setattr(verify, "LOGITS_MAX_BYTES", 0)  # a model too large to load whole: no logits check
    record = verify.verify_checkpoint(copy, digests, [], [])
    assert record["structure"] == "checked" and record["tensors_rehashed"] == len(tensors)
    assert record["logits"] == [] and "over this check's budget" in record["logits_skipped"]
    digests[LAYER0 + "mlp.up_proj.qweight"] = "0" * 64  # what the writer was handed differs from the file
    with pytest.raises(verify.VerificationError, match=r"mlp\.up_proj\.qweight reads back different"):
        verify.verify_checkpoint(copy, digests, [], [])
