"""TensorRT engines, everything that does not need TensorRT: profiles, plan headers, compatibility, commands,
the EP options, and the refusals of build-engine. Tests that build a real engine run only where TensorRT and a
GPU are present."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from owl3.config import Owl3Config
from owl3.errors import EnvironmentProblem, InvalidInputError, UsageError
from owl3.export.engine import EngineBuildError, build_engines, tool_commands
from owl3.runtime.backend import TENSORRT, _provider_entries
from owl3.runtime.engine_check import (
    PLAN_TAG,
    Device,
    check_engines,
    compatibility_problems,
    read_l4t_release,
    read_plan_header,
)
from owl3.runtime.profiles import ProfileLimits, graph_profiles, ort_tensorrt_options

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None and shutil.which("nvidia-smi") is not None


@pytest.fixture(scope="module")
def config() -> Owl3Config:
    return Owl3Config.preset("7b-240728")


def test_profiles_cover_the_runtime_limits_with_empty_caches_allowed(config) -> None:
    limits = ProfileLimits.for_config(config, max_batch=2, max_images=4, max_context=4096)
    profiles = graph_profiles(config, "fp16", limits)
    p = config.image_tokens
    assert profiles["vision"]["pixel_values"] == [(1, 3, 384, 384), (1, 3, 384, 384), (4, 3, 384, 384)]
    decoder = profiles["decoder"]
    assert decoder["past_key_0"][0] == (1, 4, 0, 128)  # a past length of 0 is the minimum
    assert decoder["past_key_0"][2] == (2, 4, 4095, 128)
    assert decoder["visual_key_0"][0][2] == 0 and decoder["visual_key_0"][2][2] == 4 * p
    assert decoder["input_ids"] == [(1, 1), (1, 1), (2, 4096)]
    assert decoder["logit_positions"][2] == (2, 512)  # not 4,096 rows of 152k logits: the engine would not fit
    from owl3.export.specs import graph_specs

    for name, spec in graph_specs(config, "fp16").items():  # every dynamic input, and only those
        assert set(profiles[name]) == {t.name for t in spec.inputs if any(isinstance(d, str) for d in t.shape)}
    assert len(decoder) == 4 + 2 * config.text.num_hidden_layers + 2 * len(config.hyper_layers)
    assert "image_positions" in profiles["visual_memory"]


def test_profile_limits_refuse_nonsense(config) -> None:
    with pytest.raises(UsageError, match="max_images must be a positive integer"):
        ProfileLimits.for_config(config, max_images=0)


def test_ort_tensorrt_options_list_every_input_in_the_eps_format() -> None:
    options = ort_tensorrt_options({"a": [(1, 0), (1, 4), (2, 8)], "b": [(1,), (1,), (3,)]})
    assert options == {
        "trt_profile_min_shapes": "a:1x0,b:1",
        "trt_profile_opt_shapes": "a:1x4,b:1",
        "trt_profile_max_shapes": "a:2x8,b:3",
    }


def test_the_tensorrt_provider_gets_caches_and_the_graphs_profile(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OWL3_HOME", str(tmp_path))
    manifest = {"precision": "int4", "compute": "fp16", "files": {"decoder.onnx": {"sha256": "ab" * 32}},
                "graphs": {"decoder": {"file": "decoder.onnx"}}}  # fmt: skip
    entries = _provider_entries([TENSORRT, "CPUExecutionProvider"], manifest, {"input_ids": [(1, 1), (1, 1), (8, 9)]})
    name, options = entries[0]
    assert name == TENSORRT and entries[1] == "CPUExecutionProvider"
    assert options["trt_engine_cache_enable"] and options["trt_timing_cache_enable"]
    assert options["trt_profile_max_shapes"] == "input_ids:8x9"
    assert options["trt_fp16_enable"] is False  # a quantized graph carries its own types


def _plan(path: Path, version: tuple[int, int, int, int]) -> Path:
    path.write_bytes(PLAN_TAG.to_bytes(4, "little") + bytes(20) + bytes(version) + bytes(64))
    return path


def test_plan_headers_are_read_without_tensorrt(tmp_path: Path) -> None:
    version = read_plan_header(_plan(tmp_path / "a.plan", (10, 3, 0, 26)))
    assert (str(version), version.release) == ("10.3.0.26", "10.3.0")
    (tmp_path / "b.plan").write_bytes(b"not a plan at all, but long enough to have a header")
    with pytest.raises(InvalidInputError, match="not a TensorRT plan"):
        read_plan_header(tmp_path / "b.plan")
    (tmp_path / "c.plan").write_bytes(PLAN_TAG.to_bytes(4, "little"))
    with pytest.raises(InvalidInputError, match="truncated"):
        read_plan_header(tmp_path / "c.plan")


def test_l4t_release_is_parsed(tmp_path: Path) -> None:
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n")
    assert read_l4t_release(release) == "36.4.3"
    assert read_l4t_release(tmp_path / "absent") is None


def _engine_dir(tmp_path: Path, version=(10, 3, 0, 26)) -> tuple[dict, Path]:
    _plan(tmp_path / "decoder.plan", version)
    manifest = {
        "device": {"tensorrt": "10.3.0.26", "gpu": "Orin (nvgpu)", "compute_capability": "8.7", "l4t": "36.4.3"},
        "engines": {"decoder": {"file": "decoder.plan"}},
        "source": {"path": "/exports/owl3-7b-int4-trt"},
    }
    return manifest, tmp_path


def test_compatible_engines_pass_and_each_mismatch_is_named(tmp_path: Path) -> None:
    manifest, directory = _engine_dir(tmp_path)
    here = Device("10.3.0", "Orin (nvgpu)", "8.7", "36.4.3")
    assert compatibility_problems(manifest, directory, here) == []
    check_engines(manifest, directory, here)
    problems = compatibility_problems(manifest, directory, Device("10.7.0", "RTX 4090", "8.9", None))
    assert any("built with TensorRT 10.3.0.26, this device has 10.7.0" in p for p in problems)
    assert any("compute capability 8.7" in p and "8.9" in p for p in problems)
    assert compatibility_problems(manifest, directory, Device("10.3.0", "Orin", "8.7", "35.4.1")) == [
        "built on L4T 36.4.3 (JetPack), this device runs L4T 35.4.1"
    ]
    with pytest.raises(EnvironmentProblem, match="TensorRT is not installed here") as info:
        check_engines(manifest, directory, Device(None, None, None, None))
    assert info.value.exit_code == 4
    assert "owl3-export build-engine /exports/owl3-7b-int4-trt" in info.value.fix


def test_a_plan_whose_header_disagrees_with_its_manifest_is_refused(tmp_path: Path) -> None:
    manifest, directory = _engine_dir(tmp_path, version=(10, 7, 0, 1))
    problems = compatibility_problems(manifest, directory, Device("10.3.0", "Orin", "8.7", "36.4.3"))
    assert any("header says TensorRT 10.7.0.1, its manifest 10.3.0.26" in p for p in problems)


def test_tool_commands_build_the_same_engine_and_compare_with_onnx_runtime() -> None:
    profile = {"input_ids": [(1, 1), (1, 1), (1, 64)], "past_key_0": [(1, 2, 0, 8), (1, 2, 32, 8), (1, 2, 63, 8)]}
    script = tool_commands(Path("/e/decoder.onnx"), profile, 2048, "decoder.plan")
    trtexec, polygraphy = (line for line in script.splitlines() if not line.startswith("#"))
    assert trtexec.startswith("trtexec --onnx=/e/decoder.onnx --stronglyTyped")
    assert "--minShapes=input_ids:1x1,past_key_0:1x2x0x8" in trtexec
    assert "--maxShapes=input_ids:1x64,past_key_0:1x2x63x8" in trtexec
    assert "--memPoolSize=workspace:2048M" in trtexec and "--saveEngine=decoder.plan" in trtexec
    assert polygraphy.startswith("polygraphy run /e/decoder.onnx --trt --onnxrt")
    assert "--trt-opt-shapes input_ids:1x1 past_key_0:1x2x32x8" in polygraphy


def test_build_engine_refuses_the_ort_flavour_before_needing_tensorrt(tmp_path: Path, demo_int4: Path) -> None:
    from owl3.export.pipeline import export_model

    export = export_model(demo_int4, tmp_path / "ort", target="ort", validate=False)
    with pytest.raises(EngineBuildError, match="MatMulNBits") as info:
        build_engines(export, tmp_path / "engines")
    assert "TensorRT-flavour export" in info.value.fix
    assert not (tmp_path / "engines").exists()


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the real build runs instead")
def test_build_engine_without_tensorrt_says_where_to_build(demo_export_fp16_trt: Path, tmp_path: Path, capsys) -> None:
    from owl3.cli import main

    assert main(["build-engine", str(demo_export_fp16_trt), "--output", str(tmp_path / "e")]) == 4
    err = capsys.readouterr().err
    assert "TensorRT is not installed here" in err and "JetPack" in err
    assert not (tmp_path / "e").exists()


@pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT and an NVIDIA GPU (not on the development machines)")
def test_engines_build_and_pass_their_own_compatibility_check(demo_export_fp16_trt: Path, tmp_path: Path) -> None:
    output = build_engines(demo_export_fp16_trt, tmp_path / "engines", limits=ProfileLimits(1, 2, 2 * 4, 64))
    manifest = json.loads((output / "manifest.json").read_text())
    assert set(manifest["engines"]) == {"vision", "visual_memory", "decoder"}
    check_engines(manifest, output)


def test_load_backend_gives_the_tensorrt_provider_each_graphs_profile(demo_export_fp16_trt: Path, monkeypatch) -> None:
    """ONNX Runtime with TensorRT is not installable here: the session class is replaced by one that records the
    provider entries each graph was given, which is all load_backend decides."""
    from owl3.runtime import backend
    from owl3.runtime.manifest import read_export

    given: dict[str, list] = {}
    cpu_session = backend.ort.InferenceSession

    class Recording:  # a CPU session that records the entries it was given and reports TensorRT active
        def __init__(self, path: str, options, providers) -> None:
            given[Path(path).stem] = providers
            self.real = cpu_session(path, options, providers=["CPUExecutionProvider"])

        def __getattr__(self, name: str):
            return getattr(self.real, name)

        def get_providers(self) -> list[str]:
            return [TENSORRT, "CPUExecutionProvider"]

    monkeypatch.setattr(backend, "resolve_providers", lambda provider: [TENSORRT, "CPUExecutionProvider"])
    monkeypatch.setattr(backend.ort, "InferenceSession", Recording)
    manifest = read_export(demo_export_fp16_trt, "size")
    config = Owl3Config.from_hf_json(manifest["config"])
    limits = ProfileLimits(2, 3, 3 * config.image_tokens, 64)
    backend.load_backend(demo_export_fp16_trt, manifest, "tensorrt", profile_limits=limits)
    assert set(given) == {"vision", "visual_memory", "decoder"}
    decoder = dict(given["decoder"][0][1])
    assert "input_ids:2x64" in decoder["trt_profile_max_shapes"].split(",")
    text, size = config.text, config.vision.image_size
    assert f"past_key_0:1x{text.num_key_value_heads}x0x{text.head_dim}" in decoder["trt_profile_min_shapes"].split(",")
    assert dict(given["vision"][0][1])["trt_profile_max_shapes"] == f"pixel_values:3x3x{size}x{size}"
