"""The torch-free runtime: providers, version checks, verification, limits, and the ONNX export end to end.

The integration tests build the demo model and export it once per module (about 30 s), then compare the
runtime with the PyTorch reference: fp32 greedy tokens must be identical.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from owl3.artifacts import ArtifactError, file_record
from owl3.demo import demo_config, demo_image
from owl3.errors import EnvironmentProblem, PromptError, UsageError
from owl3.export.specs import graph_specs

ort = pytest.importorskip("onnxruntime", reason="the runtime needs onnxruntime (pip install onnxruntime)")

from owl3.runtime import Owl3Session  # noqa: E402
from owl3.runtime import backend as runtime_backend  # noqa: E402
from owl3.runtime.backend import check_model_versions, resolve_providers  # noqa: E402
from owl3.runtime.cli import add_run_parser, cmd_run  # noqa: E402
from owl3.runtime.request import RequestChecker, RequestLimits  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]


# ---- no export needed ------------------------------------------------------------------------------


def test_runtime_imports_without_torch() -> None:
    code = (
        "import sys, owl3.runtime.cli; assert 'onnxruntime' not in sys.modules, 'the CLI module imported ORT'; "
        "import owl3.runtime; from owl3.runtime import Owl3Session, GenerationResult, SamplingConfig; "
        "import owl3.runtime.backend, owl3.runtime.request, owl3.runtime.sampling, owl3.runtime.session; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_the_cli_offers_the_backend_providers() -> None:
    from owl3.runtime import cli

    assert cli.PROVIDER_CHOICES == runtime_backend.PROVIDER_CHOICES


def test_asking_for_an_absent_gpu_provider_names_the_fix() -> None:
    with pytest.raises(EnvironmentProblem) as info:
        resolve_providers("cuda", available=["CPUExecutionProvider"])
    assert info.value.exit_code == 4
    assert "CPUExecutionProvider" in info.value.problem and "pip install" in info.value.fix
    with pytest.raises(EnvironmentProblem):
        resolve_providers("tensorrt", available=["CPUExecutionProvider"])
    if "CUDAExecutionProvider" not in ort.get_available_providers():  # this machine, without a GPU build
        with pytest.raises(EnvironmentProblem, match="CUDAExecutionProvider"):
            resolve_providers("cuda")


def test_provider_chains() -> None:
    everything = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("auto", available=everything) == everything
    assert resolve_providers("auto", available=["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert resolve_providers("cuda", available=everything) == everything[1:]
    assert resolve_providers("cpu", available=everything) == ["CPUExecutionProvider"]
    with pytest.raises(UsageError):
        resolve_providers("rocm")


def test_model_versions_are_checked_against_the_onnxruntime_table() -> None:
    check_model_versions(10, 18, ort_version=(1, 20))
    check_model_versions(99, 99, ort_version=(1, 99))  # a release newer than the table: ORT decides
    with pytest.raises(EnvironmentProblem) as ir:
        check_model_versions(99, 18, ort_version=(1, 20))
    assert "IR version 99" in ir.value.problem and "upgrade onnxruntime" in ir.value.fix
    with pytest.raises(EnvironmentProblem) as opset:
        check_model_versions(8, 19, ort_version=(1, 14))
    assert "opset 19" in opset.value.problem
    assert ">= 1.15" in opset.value.fix and "re-export with opset <= 18" in opset.value.fix


def test_onnxruntime_load_errors_about_versions_become_environment_problems() -> None:
    message = "Load model failed: Unsupported model IR version: 12, max supported IR version: 10"
    error = runtime_backend.translate_load_error(RuntimeError(message), Path("decoder.onnx"))
    assert isinstance(error, EnvironmentProblem) and "IR version 12" in error.problem
    message = "ONNX Runtime only *guarantees* ... Current official support for domain ai.onnx is till opset 21."
    error = runtime_backend.translate_load_error(RuntimeError(message), Path("decoder.onnx"))
    assert isinstance(error, EnvironmentProblem) and "opset <= 21" in error.fix


def _checker(**limits: int) -> RequestChecker:
    config = demo_config()
    return RequestChecker(
        config=config,
        limits=RequestLimits.for_config(config, **limits),
        image_token_id=7,
        eos_token_ids=(1, 2),
        pad_token_id=0,
        float_dtype=np.dtype(np.float32),
    )


def _pixels(count: int) -> np.ndarray:
    size = demo_config().vision.image_size
    return np.zeros((count, 3, size, size), np.float32)


def test_request_limits_images_visual_tokens_and_context() -> None:
    ids = np.array([[5, 7, 9, 7, 7, 11]])
    assert _checker().prepare(ids, _pixels(3), None).placement.counts.tolist() == [3]
    with pytest.raises(PromptError, match=r"3 images \(crops/frames\), more than max_images=2") as images:
        _checker(max_images=2).prepare(ids, _pixels(3), None)
    assert "cut_enable=False" in images.value.fix
    tokens = demo_config().image_tokens
    with pytest.raises(PromptError, match=f"needs {3 * tokens} visual tokens"):
        _checker(max_visual_tokens=2 * tokens).prepare(ids, _pixels(3), None)
    with pytest.raises(PromptError, match="prompt of 6 tokens plus 5 new tokens exceeds max_context of 10"):
        _checker(max_context=10).prepare(ids, _pixels(3), None, max_new_tokens=5)
    context = demo_config().text.max_position_embeddings
    with pytest.raises(PromptError, match=f"exceeds the model's context of {context}"):
        _checker().prepare(ids, _pixels(3), None, max_new_tokens=context)
    with pytest.raises(UsageError, match="max_position_embeddings"):
        _checker(max_context=context + 1)
    with pytest.raises(UsageError, match="max_images must be a positive integer"):
        _checker(max_images=0)


def test_requests_with_mismatched_media_are_refused_with_both_counts() -> None:
    ids = np.array([[5, 7, 9, 7, 11]])
    with pytest.raises(PromptError, match="2 <\\|image\\|> placeholders in input_ids but 3 images"):
        _checker().prepare(ids, _pixels(3), None)
    with pytest.raises(PromptError, match="2 <\\|image\\|> placeholders in input_ids but 0 images"):
        _checker().prepare(ids, None, None)
    with pytest.raises(PromptError, match="media_offset is"):
        _checker().prepare(ids, _pixels(2), np.zeros((1, 4, 2), np.int64))
    with pytest.raises(PromptError, match="outside the vocabulary"):
        _checker().prepare(np.array([[5, 10**6]]), None, None)
    with pytest.raises(PromptError, match="pixel_values must be float"):
        _checker().prepare(ids, np.zeros((2, 3, 8, 8), np.float32), None)
    with pytest.raises(UsageError, match="max_new_tokens must be >= 1"):
        _checker().prepare(ids, _pixels(2), None, max_new_tokens=0)


def test_a_directory_without_a_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"manifest\.json"):
        Owl3Session(tmp_path)
    with pytest.raises(UsageError):
        Owl3Session(tmp_path, verify="none")


# ---- the export ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(demo_model_dir: Path, demo_export_fp32: Path) -> tuple[Path, Path]:
    """(the demo checkpoint, its fp32 export): shared with the export tests (tests/conftest.py)."""
    return demo_model_dir, demo_export_fp32


@pytest.fixture(scope="module")
def session(exported) -> Owl3Session:
    return Owl3Session(exported[1], provider="cpu")


@pytest.fixture(scope="module")
def reference(exported):
    from owl3.model.weights import load_model

    return load_model(exported[0], dtype=torch.float32)


def _torch(array: np.ndarray | None) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(array)


def _media_cases() -> dict[str, dict]:
    frames = [Image.new("RGB", (64, 48), (i * 60, 100, 255 - i * 60)) for i in range(4)]
    images = [demo_image(), Image.new("RGB", (300, 500), (10, 200, 30)), demo_image(90, 90)]
    return {
        "text": {"messages": _messages("Tell me a story.")},
        "one image (cut)": {"messages": _messages("<|image|>\nDescribe this image."), "images": [demo_image()]},
        "three images (no cut)": {
            "messages": _messages("<|image|><|image|><|image|>\nCompare them."),
            "images": images,
            "cut_enable": False,
        },
        "video (4 frames)": {"messages": _messages("<|video|>\nWhat changes?"), "videos": [frames]},
    }


@pytest.mark.parametrize("case", list(_media_cases()))
def test_fp32_greedy_tokens_equal_the_pytorch_reference(session, reference, case: str) -> None:
    request = _media_cases()[case]
    inputs = session.processor(**request, return_tensors="np")
    ours = session.generate_ids(inputs["input_ids"], inputs["pixel_values"], inputs["media_offset"], max_new_tokens=12)
    theirs = reference.generate(
        _torch(inputs["input_ids"]),
        pixel_values=_torch(inputs["pixel_values"]),
        media_offset=_torch(inputs["media_offset"]),
        max_new_tokens=12,
    )
    assert ours.tolist() == theirs.tolist()
    result = session.generate(**request, max_new_tokens=12)
    assert list(result.token_ids) == ours[0].tolist()
    assert result.prompt_tokens == inputs["input_ids"].shape[1]
    assert result.providers == ("CPUExecutionProvider",)  # what computed the answer is recorded


def test_a_ragged_batch_with_derived_placement_equals_the_reference(session, reference) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(100, 500, (2, 14)).astype(np.int64)
    ids[0, [2, 6]] = session.image_token_id  # two images in sample 0, one in sample 1
    ids[1, [9]] = session.image_token_id
    size = session.config.vision.image_size
    pixels = rng.uniform(-1, 1, (3, 3, size, size)).astype(np.float32)
    free = session.generate_ids(ids, pixels, max_new_tokens=8, eos_token_ids=[], repetition_penalty=1.2)
    expected = reference.generate(
        torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels), max_new_tokens=8, eos_token_id=[],
        repetition_penalty=1.2,
    )  # fmt: skip
    assert free.tolist() == expected.tolist()
    stop = int(free[0, 2])  # sample 0 ends by step 2; the batch goes on while sample 1 has not ended
    options = {"max_new_tokens": 8, "repetition_penalty": 1.2}
    stopped = session.generate_ids(ids, pixels, eos_token_ids=[stop], pad_token_id=0, **options)
    expected = reference.generate(
        torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels), eos_token_id=[stop], **options
    )
    assert stopped.tolist() == expected.tolist()
    row = stopped[0].tolist()
    assert row[: row.index(stop) + 1] == free[0, : row.index(stop) + 1].tolist()
    assert set(row[row.index(stop) + 1 :]) <= {0}  # finished rows are padded


def test_cached_visual_memory_equals_recomputing_it_and_the_uncached_reference(session, reference) -> None:
    inputs = session.processor(_messages("<|image|>\nDescribe this image."), images=[demo_image()], return_tensors="np")
    ids, pixels, offsets = inputs["input_ids"], inputs["pixel_values"], inputs["media_offset"]
    embeds = session.encode_images(pixels)
    with torch.inference_mode():
        np.testing.assert_allclose(embeds, reference.encode_images(torch.from_numpy(pixels)).numpy(), atol=1e-4)
    cached, placement = session.visual_memory(embeds, offsets)
    names = [t.name for t in graph_specs(session.config, "fp32")["visual_memory"].outputs]
    visual = dict(zip(names, cached, strict=True))
    length = ids.shape[1]
    cache = session._new_cache(1, length + 1)  # the fused decoder's in-place cache (None: concatenated)
    prefill = session._decode(ids, np.arange(length)[None], placement.seen, None, visual, cache)
    token = prefill["logits"][:, -1].argmax(-1)[:, None]
    step = (token, np.array([[length]]), placement.counts[:, None], prefill)
    with_cache = session._decode(*step, visual, cache)["logits"]
    again, _ = session.visual_memory(session.encode_images(pixels), offsets)
    recomputed = dict(zip(names, again, strict=True))
    if cache is not None:
        cache.length = length  # the same step again, on the same cache
    np.testing.assert_array_equal(with_cache, session._decode(*step, recomputed, cache)["logits"])
    with torch.inference_mode():  # the reference with no cache at all: the whole sequence again
        full = reference(torch.from_numpy(np.concatenate([ids, token], 1)), torch.from_numpy(pixels)).logits
    np.testing.assert_allclose(with_cache[:, -1], full[:, -1].numpy(), atol=2e-4, rtol=0)


def test_eight_concurrent_generate_calls_equal_sequential_ones(session) -> None:
    cases = list(_media_cases().values())
    requests = [
        {
            **cases[i % len(cases)],
            "max_new_tokens": 10,
            **({"do_sample": True, "top_k": 20, "seed": i} if i % 2 else {}),
        }
        for i in range(8)
    ]
    sequential = [session.generate(**request) for request in requests]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(lambda request: session.generate(**request), requests))
    assert [r.token_ids for r in concurrent] == [r.token_ids for r in sequential]
    assert [r.text for r in concurrent] == [r.text for r in sequential]


def test_streamed_text_equals_the_generated_text(session) -> None:
    for request in _media_cases().values():
        for limit in (3, 20):
            result = session.generate(**request, max_new_tokens=limit)
            timings: dict[str, float] = {}
            assert "".join(session.stream(**request, max_new_tokens=limit, timings=timings)) == result.text
            assert timings["new_tokens"] == len(result.token_ids)
            assert 0 < timings["time_to_first_token_s"] <= timings["total_s"]


def test_limits_are_checked_before_the_vision_graph_runs(exported, session, monkeypatch) -> None:
    request = _media_cases()["three images (no cut)"]
    inputs = session.processor(**request, return_tensors="np")
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    small = Owl3Session(exported[1], verify="size", max_images=2)
    monkeypatch.setattr(small, "_encode", lambda _pixels: pytest.fail("the vision graph ran"))
    with pytest.raises(PromptError, match=r"3 images .* max_images=2"):
        small.generate_ids(ids, pixels)
    with pytest.raises(PromptError, match="more than max_images=2"):  # the processor's own bound
        small.generate(**request)
    tight = Owl3Session(exported[1], verify="size", max_visual_tokens=2 * session.config.image_tokens)
    monkeypatch.setattr(tight, "_encode", lambda _pixels: pytest.fail("the vision graph ran"))
    with pytest.raises(PromptError, match="48 visual tokens") as visual:
        tight.generate_ids(ids, pixels)
    assert "max_visual_tokens" in visual.value.fix
    short = Owl3Session(exported[1], verify="size", max_context=ids.shape[1] + 4)
    monkeypatch.setattr(short, "_encode", lambda _pixels: pytest.fail("the vision graph ran"))
    with pytest.raises(PromptError, match=f"prompt of {ids.shape[1]} tokens plus 5 new tokens exceeds"):
        short.generate_ids(ids, pixels, max_new_tokens=5)
    with pytest.raises(PromptError, match="3 <\\|image\\|> placeholders in input_ids but 2 images"):
        session.generate_ids(ids, pixels[:2])
    with pytest.raises(UsageError, match="max_context"):
        Owl3Session(exported[1], verify="size", max_context=10**9)
    with pytest.raises(UsageError, match="temperature"):
        session.generate_ids(ids, pixels, do_sample=True, temperature=0.0)


def _copy(export: Path, target: Path) -> Path:
    shutil.copytree(export, target)
    return target


def test_a_modified_weights_file_is_refused_before_any_session_is_created(exported, tmp_path, monkeypatch) -> None:
    copy = _copy(exported[1], tmp_path / "export")
    data = copy / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, different content
    data.write_bytes(bytes(raw))
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: pytest.fail("a session was created"))
    with pytest.raises(ArtifactError, match=r"decoder\.onnx\.data does not match its sha256"):
        Owl3Session(copy)
    with open(data, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ArtifactError, match=r"decoder\.onnx\.data has"):
        Owl3Session(copy, verify="size")


def test_a_manifest_claiming_a_newer_ir_version_names_the_fix(exported, tmp_path, monkeypatch) -> None:
    copy = _copy(exported[1], tmp_path / "export")
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "ir_version": 99}))
    monkeypatch.setattr(runtime_backend, "installed_ort_version", lambda: (1, 20))  # a release in the table
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: pytest.fail("a session was created"))
    with pytest.raises(EnvironmentProblem) as info:
        Owl3Session(copy)
    assert "IR version 99" in info.value.problem and "upgrade onnxruntime" in info.value.fix


def test_a_graph_onnxruntime_cannot_load_gives_the_version_fix(exported, tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    copy = _copy(exported[1], tmp_path / "export")
    model = onnx.load(str(copy / "vision.onnx"), load_external_data=False)
    model.ir_version = 99
    (copy / "vision.onnx").write_bytes(model.SerializeToString())
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["vision.onnx"] = file_record(copy / "vision.onnx")  # a consistent but too new export
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EnvironmentProblem, match="IR version 99") as info:
        Owl3Session(copy)
    assert "upgrade onnxruntime" in info.value.fix


def test_the_export_still_loads_after_the_directory_is_moved(exported, session, tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    original = exported[1]
    for graph in ("vision", "visual_memory", "decoder"):
        model = onnx.load(str(original / f"{graph}.onnx"), load_external_data=False)
        for tensor in model.graph.initializer:
            location = {e.key: e.value for e in tensor.external_data}.get("location")
            assert location is None or not Path(location).is_absolute()
    moved = tmp_path / "elsewhere" / "export"
    moved.parent.mkdir()
    request = _media_cases()["one image (cut)"]
    expected = session.generate(**request, max_new_tokens=6).token_ids
    original.rename(moved)  # nothing is left at the old path while the moved copy loads
    try:
        assert Owl3Session(moved, verify="size").generate(**request, max_new_tokens=6).token_ids == expected
    finally:
        moved.rename(original)


def test_the_export_directory_is_left_unmodified(exported, session) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in exported[1].iterdir()}
    session.generate(**_media_cases()["one image (cut)"], max_new_tokens=3)
    Owl3Session(exported[1], verify="full")
    assert {p.name: p.stat().st_mtime_ns for p in exported[1].iterdir()} == before


def test_an_fp16_export_runs_on_the_cpu(demo_export_fp16: Path) -> None:
    fp16 = Owl3Session(demo_export_fp16, provider="cpu")
    assert fp16.precision == "fp16"
    request = _media_cases()["one image (cut)"]
    inputs = fp16.processor(**request, return_tensors="np")
    cached, _ = fp16.visual_memory(fp16.encode_images(inputs["pixel_values"]), inputs["media_offset"])
    assert all(t.dtype == np.float16 and np.isfinite(t).all() for t in cached)
    result = fp16.generate(**request, max_new_tokens=8)
    assert 1 <= len(result.token_ids) <= 8


def test_cuda_on_a_cpu_only_onnxruntime_is_an_environment_problem(exported) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(EnvironmentProblem) as info:
        Owl3Session(exported[1], provider="cuda", verify="size")
    assert "owl3-export[gpu]" in info.value.fix


def test_run_command_streams_the_answer_and_prints_timings(exported, session, tmp_path, capsys) -> None:
    image = tmp_path / "picture.png"
    demo_image().save(image)
    parser = argparse.ArgumentParser()
    add_run_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["run", "--export", str(exported[1]), "--provider", "cpu", "--image", str(image),
         "--prompt", "Describe this image.", "--max-new-tokens", "6"]
    )  # fmt: skip
    assert cmd_run(args) == 0
    out, err = capsys.readouterr()
    expected = session.generate(_messages("<|image|>\nDescribe this image."), images=[demo_image()], max_new_tokens=6)
    assert out == expected.text + "\n"
    assert "time to first token" in err and "tokens/s" in err


def test_the_runtime_generates_in_a_process_where_torch_cannot_be_imported(exported) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, NoTorch())
        from owl3.demo import demo_image
        from owl3.runtime import Owl3Session
        session = Owl3Session({str(exported[1])!r}, verify="size")
        messages = [{{"role": "user", "content": "<|image|>Hi"}}, {{"role": "assistant", "content": ""}}]
        result = session.generate(messages, images=[demo_image()], max_new_tokens=4)
        assert len(result.token_ids) >= 1 and "torch" not in sys.modules
        import argparse
        from owl3.runtime.cli import add_run_parser, cmd_run
        parser = argparse.ArgumentParser()
        add_run_parser(parser.add_subparsers())
        # no --image and no --prompt: the command asks about the built-in demo picture (owl3.demo)
        assert cmd_run(parser.parse_args(["run", "--export", {str(exported[1])!r}, "--max-new-tokens", "3"])) == 0
        assert "torch" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_a_runtime_only_install_runs_and_stage_commands_say_what_to_install(exported) -> None:
    """Every stage package blocked (what `pip install owl3-export[cpu]` lacks): `owl3-export run` answers, and
    each command that needs the other stages exits 4 with the install line instead of a traceback."""
    code = textwrap.dedent(
        f"""
        import sys
        from owl3.cli import STAGE_PACKAGES
        class RuntimeOnly:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in STAGE_PACKAGES:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, RuntimeOnly())
        from owl3.cli import main
        assert main(["run", "--export", {str(exported[1])!r}, "--max-new-tokens", "3"]) == 0
        for argv in (["info"], ["generate"], ["quantize", "--precision", "int4"], ["--precision", "fp16"],
                     ["export", "--output", "never"], ["validate", "--candidate", "onnx:never"]):
            assert main(argv) == 4, argv
        assert not STAGE_PACKAGES & set(m.split(".")[0] for m in sys.modules)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 6
    assert all("runtime-only install" in e and "pip install 'owl3-export[export,cpu]'" in e for e in errors)
    assert "Traceback" not in done.stderr
