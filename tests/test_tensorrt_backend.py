"""The TensorRT engine backend, everything that does not need TensorRT: the checks before anything is deserialized
(engine manifest vs the export's sha256, plan headers and the device, missing TensorRT), the context pool, the
signature and profile checks, the buffers (kept outputs fed back without a copy, empty tensors), the session, the
``run --engines`` flag and the validator's engine arm and gate.

TensorRT and CUDA are replaced by the stand-ins of ``tests/trt_fakes.py`` (host memory, ONNX Runtime computing each
graph): these tests check our bookkeeping around the documented API, never TensorRT. The one test that needs a real
engine runs only where ``tensorrt`` and ``cuda-python`` import and an NVIDIA GPU is present.
"""

from __future__ import annotations

import gc
import importlib.util
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from owl3.artifacts import ArtifactError
from owl3.errors import EnvironmentProblem, PromptError, ResourceError, UsageError
from owl3.runtime import engine_check, tensorrt_backend
from owl3.runtime.cuda_memory import Cuda, DeviceTensor
from owl3.runtime.engine_check import Device, source_mismatches
from owl3.runtime.profiles import ProfileLimits
from owl3.runtime.tensorrt_backend import (
    ContextPool,
    TrtGraph,
    io_mismatches,
    load_engine_backend,
    outside_profile,
)
from tests.trt_fakes import FakeCudart, OrtEngine, fake_plan, fake_tensorrt

pytest.importorskip("onnxruntime", reason="the stand-in engines compute with onnxruntime")

HERE = Device("10.3.0.26", "Fake GPU", "8.7", None)  # the device the stand-in engines are "built" on
HAS_TENSORRT_GPU = all(importlib.util.find_spec(m) is not None for m in ("tensorrt", "cuda")) and bool(
    shutil.which("nvidia-smi")
)


# ---- the context pool ------------------------------------------------------------------------------------


def test_the_pool_creates_contexts_on_demand_and_reuses_them() -> None:
    made = []
    pool = ContextPool(lambda: made.append(object()) or made[-1], limit=3)
    with pool.lease() as first:
        pass
    with pool.lease() as second:
        assert second is first  # returned after the call, lent again
    with pool.lease() as a, pool.lease() as b:
        assert a is not b and pool.created == 2  # a second concurrent call gets a second context
    assert len(made) == 2


def test_the_pool_waits_at_its_limit_and_a_failed_creation_frees_its_place() -> None:
    pool = ContextPool(object, limit=1)
    released = threading.Event()
    order = []

    def second_call() -> None:
        with pool.lease():
            order.append("second")

    with pool.lease():
        thread = threading.Thread(target=second_call)
        thread.start()
        time.sleep(0.2)
        assert order == [] and thread.is_alive()  # waits for the only context
        order.append("first")
        released.set()
    thread.join(5)
    assert order == ["first", "second"] and pool.created == 1

    def fail() -> object:
        raise ResourceError("no memory for a context")

    failing = ContextPool(fail, limit=1)
    for _ in range(2):  # the failed creation does not hold the only place
        with pytest.raises(ResourceError), failing.lease():
            pass
    assert failing.created == 0
    with pytest.raises(UsageError, match="max_contexts must be >= 1"):
        ContextPool(object, limit=0)


# ---- checks that need no engine ---------------------------------------------------------------------------


def _graph_entry() -> dict:
    return {
        "file": "decoder.onnx",
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                   {"name": "past_key_0", "dtype": "float16", "shape": ["batch", 2, "past", 8]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 1, 10]},
                    {"name": "present_key_0", "dtype": "float16", "shape": ["batch", 2, "past+seq", 8]}],
    }  # fmt: skip


def test_engine_tensors_are_checked_against_the_exports_graph() -> None:
    good = {"input_ids": (True, "int64"), "past_key_0": (True, "float16"), "logits": (False, "float32"),
            "present_key_0": (False, "float16")}  # fmt: skip
    assert io_mismatches(good, _graph_entry()) == []
    assert io_mismatches({**good, "past_key_0": (True, "float32")}, _graph_entry()) == [
        "past_key_0 is float32 in the engine, float16 in the graph"
    ]
    assert io_mismatches({**good, "logits": (True, "float32")}, _graph_entry()) == [
        "logits is an input of the engine, not of the graph"
    ]
    missing = {k: v for k, v in good.items() if k != "present_key_0"} | {"extra": (False, "float16")}
    assert io_mismatches(missing, _graph_entry()) == ["tensors missing from the engine ['present_key_0'], "
                                                      "unexpected ['extra']"]  # fmt: skip


def test_shapes_outside_the_profile_are_named() -> None:
    profile = {"input_ids": [[1, 1], [1, 1], [2, 64]], "past_key_0": [[1, 2, 0, 8], [1, 2, 32, 8], [2, 2, 63, 8]]}
    assert outside_profile({"input_ids": (1, 64), "past_key_0": (1, 2, 0, 8)}, profile) == []
    assert outside_profile({"input_ids": (3, 5), "past_key_0": (1, 2, 64, 8)}, profile) == [
        "input_ids [3, 5] (the engine takes [1, 1] to [2, 64])",
        "past_key_0 [1, 2, 64, 8] (the engine takes [1, 2, 0, 8] to [2, 2, 63, 8])",
    ]


def test_the_engine_manifest_must_name_this_exports_graphs() -> None:
    export = {"graphs": {"decoder": {"file": "decoder.onnx"}, "vision": {"file": "vision.onnx"}},
              "files": {"decoder.onnx": {"sha256": "a" * 64}, "vision.onnx": {"sha256": "b" * 64}}}  # fmt: skip
    recorded = {"decoder.onnx": {"sha256": "a" * 64}, "vision.onnx": {"sha256": "b" * 64}}
    engines = {"engines": {"decoder": {"file": "decoder.plan", "source": "decoder.onnx"},
                           "vision": {"file": "vision.plan", "source": "vision.onnx"}},
               "source": {"files": recorded}}  # fmt: skip
    assert source_mismatches(engines, export) == []
    other = {**engines, "source": {"files": {**engines["source"]["files"], "vision.onnx": {"sha256": "c" * 64}}}}
    assert source_mismatches(other, export) == [
        f"vision.onnx: engines built from sha256 {'c' * 12}..., this export's is {'b' * 12}..."
    ]
    unrecorded = {**engines, "source": {"files": {"decoder.onnx": {"sha256": "a" * 64}}}}
    assert source_mismatches(unrecorded, export) == ["the engine manifest records no sha256 for vision.onnx"]
    fewer = {**engines, "engines": {"decoder": engines["engines"]["decoder"]}}
    assert source_mismatches(fewer, export) == ["engines for ['decoder'], the export has graphs ['decoder', 'vision']"]


def test_cuda_failures_become_typed_errors() -> None:
    cuda = Cuda(FakeCudart(capacity=1024))
    with pytest.raises(ResourceError, match="could not allocate device memory") as info:
        cuda.malloc(4096)
    assert info.value.exit_code == 5
    with pytest.raises(EnvironmentProblem, match="cudaFree failed") as info:
        cuda.free(12345)
    assert info.value.exit_code == 4


def test_device_tensors_copy_out_on_demand_and_free_their_memory() -> None:
    cudart = FakeCudart()
    cuda = Cuda(cudart)
    values = np.arange(12, dtype=np.float16).reshape(3, 4)
    tensor = DeviceTensor(cuda, values.shape, values.dtype)
    cuda.to_device(tensor.pointer, values, stream=1)
    np.testing.assert_array_equal(tensor.numpy(), values)
    np.testing.assert_array_equal(np.asarray(tensor, dtype=np.float32), values.astype(np.float32))
    empty = DeviceTensor(cuda, (1, 2, 0, 8), np.float16)
    assert empty.pointer == 0 and empty.numpy().shape == (1, 2, 0, 8) and cudart.calls["cudaMalloc"] == 1
    assert cudart.allocated == values.nbytes
    del tensor
    gc.collect()
    assert cudart.allocated == 0  # freed when collected


# ---- one small engine: buffers, kept outputs, empty tensors, contexts ------------------------------------


def _cache_graph(path: Path) -> Path:
    """present = Concat(past, new) on axis 1 (fp16), total = ReduceSum(present) (fp32): a KV cache in miniature."""
    f16 = TensorProto.FLOAT16
    nodes = [
        helper.make_node("Concat", ["past", "new"], ["present"], axis=1),
        helper.make_node("Cast", ["present"], ["present32"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["present32"], ["total"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "cache",
        [helper.make_tensor_value_info("past", f16, ["batch", "past_len"]),
         helper.make_tensor_value_info("new", f16, ["batch", "seq"])],
        [helper.make_tensor_value_info("present", f16, ["batch", "total_len"]),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, [])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def cache_engine(tmp_path: Path) -> tuple[TrtGraph, FakeCudart, OrtEngine]:
    cudart = FakeCudart()
    engine = OrtEngine(_cache_graph(tmp_path / "cache.onnx"), cudart)
    profile = {"past": [[1, 0], [1, 4], [2, 16]], "new": [[1, 1], [1, 1], [2, 8]]}
    graph = TrtGraph("cache", engine, fake_tensorrt(cudart), Cuda(cudart), profile, max_contexts=2)
    return graph, cudart, engine


def test_kept_outputs_are_fed_back_without_a_copy_and_empty_tensors_own_no_memory(cache_engine) -> None:
    graph, cudart, _engine = cache_engine
    baseline = cudart.allocated  # the block of addresses for empty tensors
    step = np.ones((1, 3), np.float16)
    out = graph.run({"past": np.zeros((1, 0), np.float16), "new": step}, keep=["present"])  # an empty past
    assert isinstance(out["present"], DeviceTensor) and out["present"].shape == (1, 3)
    assert isinstance(out["total"], np.ndarray) and float(out["total"]) == 3.0
    copied = cudart.copied_to_device
    assert copied == step.nbytes  # the empty past was bound, never copied or allocated
    out = graph.run({"past": out["present"], "new": 2 * step[:, :1]}, keep=["present"])
    assert cudart.copied_to_device - copied == 2  # only the new token: the cache stayed on the device
    np.testing.assert_array_equal(out["present"].numpy(), [[1, 1, 1, 2]])
    assert float(out["total"]) == 5.0
    assert cudart.allocated == baseline + out["present"].nbytes  # the call's temporaries are gone
    del out
    gc.collect()
    assert cudart.allocated == baseline


def test_feeds_are_checked_before_any_context_is_made(cache_engine) -> None:
    graph, _cudart, engine = cache_engine
    with pytest.raises(PromptError, match=r"past \[1, 17\] \(the engine takes \[1, 0\] to \[2, 16\]\)") as info:
        graph.run({"past": np.zeros((1, 17), np.float16), "new": np.ones((1, 1), np.float16)})
    assert "build-engine --max-batch" in info.value.fix
    with pytest.raises(UsageError, match="new must be float16, found float32"):
        graph.run({"past": np.zeros((1, 0), np.float16), "new": np.ones((1, 1), np.float32)})
    with pytest.raises(UsageError, match=r"takes \['new', 'past'\], was given \['new'\]"):
        graph.run({"new": np.ones((1, 1), np.float16)})
    assert engine.contexts == 0 and graph.pool.created == 0
    graph.check_signature(["new", "past"], ["total", "present"], "cache.plan")  # TensorRT binds by name
    with pytest.raises(ArtifactError, match="engine cache has inputs"):
        graph.check_signature(["past", "new", "mask"], ["present", "total"], "cache.plan")


def test_concurrent_calls_share_a_bounded_set_of_contexts(cache_engine) -> None:
    graph, _cudart, engine = cache_engine

    def call(k: int) -> float:
        return float(graph.run({"past": np.full((1, 4), k, np.float16), "new": np.ones((1, 2), np.float16)})["total"])

    with ThreadPoolExecutor(max_workers=8) as pool:
        totals = list(pool.map(call, range(16)))
    assert totals == [4.0 * k + 2.0 for k in range(16)]
    assert 1 <= engine.contexts <= 2 and graph.pool.created == engine.contexts


# ---- an engine directory made by build-engine from the demo export ---------------------------------------


@pytest.fixture(scope="module")
def engines(demo_export_fp16_trt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``build_engines`` with TensorRT's build replaced: each "plan" is a real header and the graph's path."""
    from owl3.config import Owl3Config
    from owl3.export import engine as build
    from owl3.runtime.manifest import read_export

    config = Owl3Config.from_hf_json(read_export(demo_export_fp16_trt, "size")["config"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build, "import_tensorrt", lambda: SimpleNamespace(__version__="10.3.0.26"))
        patch.setattr(build, "_build_plan", lambda trt, graph, *rest: (fake_plan(graph), b"timing cache"))
        patch.setattr(build, "current_device", lambda: HERE)
        limits = ProfileLimits(2, 4, 4 * config.image_tokens, 96)
        return build.build_engines(demo_export_fp16_trt, tmp_path_factory.mktemp("engines") / "demo-fp16-trt-engines",
                                   limits=limits)  # fmt: skip


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch):
    cudart = FakeCudart()
    trt = fake_tensorrt(cudart)
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(tensorrt_backend, "import_cudart", lambda: cudart)
    monkeypatch.setattr(engine_check, "current_device", lambda: HERE)
    return trt, cudart


def _export_manifest(export: Path) -> dict:
    from owl3.runtime.manifest import read_export

    return read_export(export, "size")


def test_engines_built_elsewhere_are_refused_before_tensorrt_is_imported(engines, demo_export_fp16_trt, monkeypatch):
    def forbidden(*args):
        raise AssertionError("TensorRT was imported or a plan deserialized before the compatibility check")

    monkeypatch.setattr(tensorrt_backend, "import_tensorrt", forbidden)
    monkeypatch.setattr(tensorrt_backend, "deserialize", forbidden)
    manifest = _export_manifest(demo_export_fp16_trt)
    with pytest.raises(EnvironmentProblem) as info:
        elsewhere = Device("10.7.0.23", "RTX 4090", "8.9", None)
        load_engine_backend(engines, manifest, demo_export_fp16_trt, device=elsewhere)
    assert info.value.exit_code == 4
    assert "decoder.plan was built with TensorRT 10.3.0.26, this device has 10.7.0.23" in str(info.value)
    assert "compute capability 8.7 (Fake GPU), this GPU is 8.9" in str(info.value)
    assert f"owl3-export build-engine {demo_export_fp16_trt.resolve()} --output {engines}" in info.value.fix


def test_missing_tensorrt_exits_4_with_the_install_line(engines, demo_export_fp16_trt, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError, installed or not
    with pytest.raises(EnvironmentProblem, match="TensorRT cannot be imported") as info:
        load_engine_backend(engines, _export_manifest(demo_export_fp16_trt), demo_export_fp16_trt, device=HERE)
    assert info.value.exit_code == 4 and "python3-libnvinfer" in info.value.fix and "tensorrt-cu12" in info.value.fix


def test_engines_of_other_graphs_and_tampered_plans_are_refused(engines, demo_export_fp16_trt, tmp_path, fake_trt):
    manifest = _export_manifest(demo_export_fp16_trt)
    other = {**manifest, "files": {**manifest["files"], "decoder.onnx": {"sha256": "0" * 64, "size": 1}}}
    with pytest.raises(ArtifactError, match=r"not built from this export's graphs: decoder\.onnx") as info:
        load_engine_backend(engines, other, demo_export_fp16_trt)
    assert "owl3-export build-engine" in info.value.fix and info.value.exit_code == 3
    with pytest.raises(UsageError, match="engines run on TensorRT, but provider 'cpu'"):
        load_engine_backend(engines, manifest, demo_export_fp16_trt, "cpu")
    with pytest.raises(UsageError, match="fused operators"):
        load_engine_backend(engines, {**manifest, "fused": True}, demo_export_fp16_trt)
    copy = shutil.copytree(engines, tmp_path / "copy")
    with open(copy / "vision.plan", "ab") as plan:
        plan.write(b"\0")
    with pytest.raises(ArtifactError, match=r"vision\.plan has"):
        load_engine_backend(copy, manifest, demo_export_fp16_trt)
    assert fake_trt[0].deserialized == []


def test_a_session_on_the_engines_answers_as_onnx_runtime_does(engines, demo_export_fp16_trt, fake_trt) -> None:
    from owl3.demo import demo_image
    from owl3.runtime import Owl3Session

    reference = Owl3Session(demo_export_fp16_trt, "cpu", verify="size")
    session = Owl3Session(demo_export_fp16_trt, verify="size", engines=engines)
    assert session.providers == ("TensorRT 10.3.0.26",) and session.backend.device == "cuda"
    assert len(fake_trt[0].deserialized) == 3
    limits = session.limits  # narrowed to what the engines were built for
    assert (limits.max_images, limits.max_context) == (4, 96)
    fed = []
    decoder = session.backend.graphs["decoder"]
    run = decoder.run
    decoder.run = lambda feeds, keep=(): fed.append({k: type(v) for k, v in feeds.items()}) or run(feeds, keep)
    messages = [{"role": "user", "content": "<|image|>What is at the top left?"}, {"role": "assistant", "content": ""}]
    request = {"messages": messages, "images": [demo_image()], "cut_enable": False, "max_new_tokens": 6}
    assert session.generate(**request).token_ids == reference.generate(**request).token_ids
    assert fed[0]["past_key_0"] is np.ndarray and fed[0]["visual_key_0"] is DeviceTensor
    assert all(step["past_key_0"] is DeviceTensor for step in fed[1:])
    text_only = {**request, "messages": [{"role": "user", "content": "Hello"}, messages[1]], "images": None}
    assert session.generate(**text_only).token_ids == reference.generate(**text_only).token_ids  # visual len 0
    inputs = session.processor(messages, images=[demo_image()], cut_enable=False, return_tensors="np")
    args = (inputs["input_ids"], inputs["pixel_values"], inputs["media_offset"])
    ours, theirs = session.trace(*args), reference.trace(*args)
    assert set(ours) == set(theirs)
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-3, atol=1e-3, err_msg=name)
    with pytest.raises(PromptError, match="images"):
        session.generate(**{**request, "images": [demo_image()] * 5, "messages": [
            {"role": "user", "content": "<|image|>" * 5 + "Hi"}, messages[1]]})  # fmt: skip


def test_concurrent_requests_on_engines_equal_sequential_ones(engines, demo_export_fp16_trt, fake_trt) -> None:
    from owl3.demo import demo_image
    from owl3.runtime import Owl3Session

    session = Owl3Session(demo_export_fp16_trt, verify="size", engines=engines)
    requests = [
        {"messages": [{"role": "user", "content": f"<|image|>Question {k}"}, {"role": "assistant", "content": ""}],
         "images": [demo_image(64 + 32 * k)], "cut_enable": False, "max_new_tokens": 4}
        for k in range(4)
    ]  # fmt: skip
    sequential = [session.generate(**r).token_ids for r in requests]
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(lambda r: session.generate(**r).token_ids, requests)) == sequential
    assert all(g.pool.created <= 2 for g in session.backend.graphs.values())


def test_run_takes_engines_and_finds_their_export(engines, demo_export_fp16_trt, fake_trt, capsys) -> None:
    import argparse

    from owl3.cli import main
    from owl3.runtime.cli import add_run_parser, run_export_dir

    parser = argparse.ArgumentParser()
    add_run_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["run", "--engines", str(engines)])
    assert args.engines == engines and run_export_dir(args) == demo_export_fp16_trt.resolve()
    with pytest.raises(UsageError, match="run needs --export"):
        run_export_dir(parser.parse_args(["run"]))
    assert main(["run", "--engines", str(engines), "--verify", "size", "--no-cut", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "on TensorRT 10.3.0.26" in err and "tokens/s" in err
    assert main(["run", "--engines", str(engines), "--provider", "cuda", "--max-new-tokens", "1"]) == 2


# ---- the validator ---------------------------------------------------------------------------------------


def test_engine_specs_parse_and_unknown_kinds_are_refused(tmp_path: Path) -> None:
    from owl3.validate.backends import parse_backend_spec

    assert parse_backend_spec("engine:/e/engines") == ("engine", Path("/e/engines"), "")
    assert parse_backend_spec("engine:/e/engines:/x/export") == ("engine", Path("/e/engines"), "/x/export")
    assert parse_backend_spec("onnx:/x/export:tensorrt") == ("onnx", Path("/x/export"), "tensorrt")
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert parse_backend_spec(f"engine:{odd}") == ("engine", odd, "")  # an existing path keeps its colon
    with pytest.raises(UsageError, match="engine:ENGINE_DIR"):
        parse_backend_spec("trt:/e/engines")


def test_tensorrt_against_onnx_runtime_cpu_on_the_same_graphs_gets_the_pair_gate() -> None:
    from owl3.validate.gates import GATES, select_gate

    graphs = {"decoder.onnx": "a" * 64, "vision.onnx": "b" * 64}
    cpu = SimpleNamespace(kind="onnx", precision="fp16", target="onnx-cpu", graph_sha256=graphs)
    engine = SimpleNamespace(kind="engine", precision="fp16", target="tensorrt", graph_sha256=dict(graphs))
    ep = SimpleNamespace(kind="onnx", precision="fp16", target="tensorrt", graph_sha256=dict(graphs))
    for candidate in (engine, ep):
        key, gate = select_gate(candidate, cpu)
        assert key == "tensorrt-vs-onnx-cpu" and (gate.max_kl_mean, gate.task_margin) == (1e-3, 0.003)
    other = SimpleNamespace(**{**vars(engine), "graph_sha256": {**graphs, "vision.onnx": "c" * 64}})
    assert select_gate(other, cpu) == ("engine-fp16", None)  # other graphs: reported, not gated as a pair
    pytorch = SimpleNamespace(kind="pytorch", precision="fp32", target="pytorch")
    assert select_gate(ep, pytorch) == ("onnx-fp16", GATES["onnx-fp16"])  # the export's own gate
    assert select_gate(cpu, engine) == ("onnx-fp16", GATES["onnx-fp16"])  # the pair is ordered


def test_the_validator_opens_engines_as_an_arm_beside_onnx_runtime(engines, demo_export_fp16_trt, fake_trt) -> None:
    from owl3.validate.backends import open_backend
    from owl3.validate.gates import select_gate
    from owl3.validate.validator import _arm

    reference = open_backend(f"onnx:{demo_export_fp16_trt}:cpu")
    candidate = open_backend(f"engine:{engines}")  # the export from the engine manifest
    assert (candidate.name, candidate.target, reference.target) == ("engine-fp16-trt", "tensorrt", "onnx-cpu")
    assert select_gate(candidate, reference)[0] == "tensorrt-vs-onnx-cpu"
    assert _arm(candidate)["backend"] == "TensorRT engines (owl3.runtime, UNVERIFIED) on TensorRT 10.3.0.26"
    assert _arm(reference)["backend"] == "ONNX Runtime (owl3.runtime) on CPUExecutionProvider"


# ---- a real engine ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TENSORRT_GPU, reason="needs tensorrt, cuda-python and an NVIDIA GPU (absent here)")
def test_real_engines_answer_as_onnx_runtime_does(demo_export_fp16_trt: Path, tmp_path: Path) -> None:
    from owl3.demo import demo_image
    from owl3.export.engine import build_engines
    from owl3.runtime import Owl3Session

    reference = Owl3Session(demo_export_fp16_trt, "cpu", verify="size")
    limits = ProfileLimits(1, 2, 2 * reference.config.image_tokens, 96)
    output = build_engines(demo_export_fp16_trt, tmp_path / "engines", limits=limits)
    session = Owl3Session(demo_export_fp16_trt, verify="size", engines=output)
    messages = [{"role": "user", "content": "<|image|>What is at the top left?"}, {"role": "assistant", "content": ""}]
    inputs = session.processor(messages, images=[demo_image()], cut_enable=False, return_tensors="np")
    args = (inputs["input_ids"], inputs["pixel_values"], inputs["media_offset"])
    ours, theirs = session.trace(*args)["logits"], reference.trace(*args)["logits"]
    cosine = float((ours * theirs).sum() / np.linalg.norm(ours) / np.linalg.norm(theirs))
    assert cosine > 0.999 and (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.95
    request = {"messages": messages, "images": [demo_image()], "cut_enable": False, "max_new_tokens": 4}
    assert session.generate(**request).token_ids == reference.generate(**request).token_ids
