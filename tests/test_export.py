"""ONNX export: graph structure, weights, validation, fp16 islands, and the artifact contract."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from owl3.artifacts import ArtifactError, read_manifest, verify_files
from owl3.checkpoint import random_state_dict, save_checkpoint
from owl3.config import Owl3Config
from owl3.errors import GateFailure, ResourceError, TokenizerError, UsageError
from owl3.export import onnx_export
from owl3.export.fused import COS_CACHE, SIN_CACHE, register_contrib_schemas
from owl3.export.packing import member_modules
from owl3.export.pipeline import export_model
from owl3.export.specs import GRAPH_NAMES, SCHEMA, graph_specs
from owl3.model.safetensors_files import discover_checkpoint
from owl3.tokenizer import build_demo_tokenizer, write_tokenizer


def _manifest(directory: Path) -> dict:
    return read_manifest(directory, schema=SCHEMA)


def test_fp32_export_is_complete_checked_and_validated(demo_export_fp32: Path, demo_model_dir: Path) -> None:
    manifest = _manifest(demo_export_fp32)
    verify_files(demo_export_fp32, manifest)
    assert manifest["status"] == "ok" and manifest["precision"] == "fp32" and manifest["opset"] >= 18
    assert manifest["validation"]["passed"], manifest["validation"]["failures"]
    logits = [t for c in manifest["validation"]["cases"].values() for t in c["tensors"] if "logits" in t["name"]]
    assert len(logits) == 6 and max(t["max_abs"] for t in logits) <= 1e-4
    assert set(manifest["validation"]["cases"]) == {"text", "one_image", "three_images"}
    source = manifest["source"]["files"]["model.safetensors"]
    assert source == json.loads(json.dumps(source)) and len(source["sha256"]) == 64
    register_contrib_schemas()  # ONNX Runtime's fused operators (the default ort flavour)
    for name in GRAPH_NAMES:
        assert (demo_export_fp32 / f"{name}.onnx.data").stat().st_size > 0
        onnx.checker.check_model(str(demo_export_fp32 / f"{name}.onnx"), full_check=True)


def test_graph_signatures_follow_the_specs(demo_export_fp32: Path) -> None:
    manifest = _manifest(demo_export_fp32)
    config = Owl3Config.from_hf_json(manifest["config"])
    for name, spec in graph_specs(config, "fp32", manifest["fused"]).items():
        session = ort.InferenceSession(str(demo_export_fp32 / spec.file), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == [t.name for t in spec.inputs]
        assert [o.name for o in session.get_outputs()] == [t.name for t in spec.outputs]
        assert manifest["graphs"][name]["inputs"] == [t.to_json() for t in spec.inputs]


def test_node_and_initializer_names_trace_back_to_the_model(
    demo_export_fp32: Path, demo_export_fp32_standard: Path, demo_model_dir: Path
) -> None:
    keys = set(discover_checkpoint(demo_model_dir).tensors)
    graph = onnx.load(str(demo_export_fp32_standard / "decoder.onnx"), load_external_data=False).graph
    assert {i.name for i in graph.initializer} <= keys
    assert any(n.name.startswith("language_model.model.layers.0.self_attn/") for n in graph.node)
    assert any(n.name.startswith("language_model.model.layers.0.input_layernorm/Pow") for n in graph.node)
    fused = onnx.load(str(demo_export_fp32 / "decoder.onnx"), load_external_data=False).graph
    names = {i.name for i in fused.initializer}
    packed = {tuple(name.rsplit(".", 1)) for name in names if "{" in name}  # q/k/v, gate/up (owl3.export.packing)
    assert names - {".".join(p) for p in packed} <= keys | {COS_CACHE, SIN_CACHE}  # + the shared rotary caches
    assert packed and all(tensor == "split" or {f"{m}.{tensor}" for m in member_modules(module)} <= keys
                          for module, tensor in packed)  # fmt: skip
    assert any(n.name.startswith("language_model.model.layers.0.self_attn/ScatterND") for n in fused.node)
    vision = onnx.load(str(demo_export_fp32 / "vision.onnx"), load_external_data=False).graph
    assert all(i.name.startswith(("vision_model.", "vision2text_model.")) for i in vision.initializer)


def test_zero_past_and_zero_visual_length_run_without_nan(demo_export_fp32_standard: Path) -> None:
    config = Owl3Config.from_hf_json(_manifest(demo_export_fp32_standard)["config"])
    spec = graph_specs(config, "fp32")["decoder"]
    path = demo_export_fp32_standard / "decoder.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    nkv, hd = config.text.num_key_value_heads, config.text.head_dim
    for batch, seq, visible in ((1, 5, 0), (2, 3, 0), (1, 1, 0)):
        feeds = {"input_ids": np.ones((batch, seq), np.int64), "position_ids": np.tile(np.arange(seq), (batch, 1))}
        feeds["visible_images"] = np.full((batch, seq), visible, np.int64)
        feeds["logit_positions"] = np.tile(np.arange(seq), (batch, 1))
        for t in spec.inputs[4:]:
            feeds[t.name] = np.zeros((batch, nkv, 0, hd), np.float32)
        logits = session.run(["logits"], feeds)[0]
        assert logits.shape == (batch, seq, config.text.vocab_size) and np.isfinite(logits).all()


def test_fp16_export_passes_its_gates_with_sensitive_math_in_fp32(
    demo_export_fp16: Path, demo_export_fp16_trt: Path
) -> None:
    for directory in (demo_export_fp16, demo_export_fp16_trt):  # fused (ONNX Runtime) and standard (TensorRT)
        manifest = _manifest(directory)
        assert manifest["status"] == "ok" and manifest["validation"]["passed"], manifest["validation"]["failures"]
        cosines = [t["cosine"] for c in manifest["validation"]["cases"].values() for t in c["tensors"]]
        assert min(cosines) >= 0.9999
    model = onnx.shape_inference.infer_shapes(onnx.load(str(demo_export_fp16_trt / "decoder.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    fp32 = onnx.TensorProto.FLOAT
    islands = [
        n
        for n in model.graph.node
        if n.op_type in ("Softmax", "Pow", "ReduceMean", "Cos", "Sin")
        or (n.op_type == "Sigmoid" and "self_attn" in n.name)
    ]
    assert {n.op_type for n in islands} == {"Softmax", "Pow", "ReduceMean", "Cos", "Sin", "Sigmoid"}
    for node in islands:  # RMSNorm (Pow, ReduceMean), softmax, rotary (Cos, Sin) and the hyper gate
        assert types.get(node.input[0]) == fp32, f"{node.name} ({node.op_type}) is not computed in fp32"
    assert types["language_model.model.layers.0.self_attn.q_proj.weight"] == onnx.TensorProto.FLOAT16


@pytest.fixture(scope="module")
def loud_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose hidden states reach the thousands: x^2 and q.k overflow fp16 without fp32 islands."""
    config = Owl3Config.tiny()
    state = random_state_dict(config, seed=4, std=0.05)
    state["language_model.model.embed_tokens.weight"] *= 2000.0
    directory = save_checkpoint(state, config, tmp_path_factory.mktemp("loud") / "ckpt")
    write_tokenizer(build_demo_tokenizer(512), directory)
    return directory


def test_fp16_export_survives_high_magnitude_activations(loud_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from owl3.export.verify import verify_export

    table = load_file(str(loud_checkpoint / "model.safetensors"))["language_model.model.embed_tokens.weight"]
    assert float(table.abs().max()) ** 2 > 65504  # x^2 in RMSNorm would overflow fp16
    out = export_model(loud_checkpoint, tmp_path / "loud-fp16", "fp16", validate=False)
    result = verify_export(out, loud_checkpoint, "fp16")
    for case in result["cases"].values():
        assert all(t["nan"] == 0 and t["inf"] == 0 for t in case["tensors"]), case
        assert all(t["cosine"] >= 0.999 for t in case["tensors"] if "logits" in t["name"]), case


def test_moved_export_still_loads(demo_export_fp32: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "export"
    shutil.copytree(demo_export_fp32, moved)
    verify_files(moved, _manifest(moved))
    for name in GRAPH_NAMES:
        ort.InferenceSession(str(moved / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    onnx_model = onnx.load(str(moved / "decoder.onnx"), load_external_data=False)
    locations = {e.value for i in onnx_model.graph.initializer for e in i.external_data if e.key == "location"}
    assert locations == {"decoder.onnx.data"}


def test_existing_outputs_are_protected(demo_model_dir: Path, demo_export_fp32: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="pass --force"):
        export_model(demo_model_dir, demo_export_fp32, "fp32", validate=False)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(UsageError, match="not an owl3-export artifact"):
        export_model(demo_model_dir, foreign, "fp32", force=True, validate=False)
    assert (foreign / "holiday.jpg").read_bytes() == b"precious"


def test_interrupted_export_leaves_nothing_and_keeps_the_old_artifact(
    demo_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = export_model(demo_model_dir, tmp_path / "out", "fp16", validate=False)
    before = _manifest(out)["files"]
    real = onnx_export.save_graph

    def disk_full(model, spec, directory):
        if spec.name == "visual_memory":  # after vision.onnx was written to the staging directory
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(model, spec, directory)

    monkeypatch.setattr(onnx_export, "save_graph", disk_full)
    with pytest.raises(ResourceError, match="disk filled up") as info:
        export_model(demo_model_dir, out, "fp16", force=True, validate=False)
    assert info.value.exit_code == 5
    assert _manifest(out)["files"] == before  # the previous artifact is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging directory left behind
    monkeypatch.setattr(onnx_export, "save_graph", real)
    export_model(demo_model_dir, out, "fp16", force=True, validate=False)  # a rerun completes
    verify_files(out, _manifest(out))


def test_failed_gate_keeps_the_artifact_marked_rejected(
    demo_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from owl3.validate import gates

    strict = gates.Gate("impossible", max_abs=0.0)
    monkeypatch.setitem(gates.GATES, "onnx-fp32", strict)
    with pytest.raises(GateFailure, match="accuracy checks failed") as info:
        export_model(demo_model_dir, tmp_path / "rejected", "fp32")
    assert info.value.exit_code == 6
    manifest = _manifest(tmp_path / "rejected")
    assert manifest["status"] == "rejected" and manifest["validation"]["failures"]


def test_tampered_artifact_fails_verification(demo_export_fp32: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(demo_export_fp32, copy)
    data = copy / "decoder.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[100] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match=r"decoder\.onnx\.data does not match its sha256"):
        verify_files(copy, _manifest(copy))


def test_export_refuses_a_bad_checkpoint_before_heavy_work(tmp_path: Path, demo_model_dir: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(demo_model_dir, broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        export_model(broken, tmp_path / "never", "fp32")
    assert not (tmp_path / "never").exists()
    with pytest.raises(UsageError, match="needs a quantized checkpoint"):
        export_model(demo_model_dir, tmp_path / "never", "int4")


def test_source_hashes_identify_the_checkpoint(demo_export_fp32: Path, demo_model_dir: Path) -> None:
    from owl3.artifacts import sha256_file

    files = _manifest(demo_export_fp32)["source"]["files"]
    assert files["model.safetensors"]["sha256"] == sha256_file(demo_model_dir / "model.safetensors")
    from owl3.artifacts import tool_versions

    assert tool_versions()["onnx"] == onnx.__version__
