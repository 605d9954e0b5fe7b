"""TensorRT readiness check: one graph per rule, each finding naming the node and the rule; exports pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from owl3.errors import InvalidInputError
from owl3.export.onnx_export import fold_constant_subgraphs
from owl3.export.trt_check import SupportTable, check_export

F = T.FLOAT


def _save(tmp_path: Path, nodes, inputs, outputs, inits=(), opset: int = 18, name: str = "g") -> Path:
    graph = helper.make_graph(nodes, name, inputs, outputs, list(inits))
    imports = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 10
    directory = tmp_path / "export"
    directory.mkdir(exist_ok=True)
    onnx.save(model, str(directory / f"{name}.onnx"))
    return directory


def _vi(name: str, dtype: int = F, shape=(2, 4)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def _findings(directory: Path, version: str = "10.3") -> list[tuple[str, str, str]]:
    report = check_export(directory, (version,))[version]
    return [(f["node"], f["rule"], f["severity"]) for f in report["findings"]]


def _const(name: str, values, dtype=np.int64):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(values, dtype), name))


def test_the_support_tables_load_with_the_known_corrections() -> None:
    old, new = SupportTable.load("10.3"), SupportTable.load("11.1")
    assert old.ops["MatMul"][0] and "FP16" in old.ops["MatMul"][1]
    assert old.ops["Range"][1] == {"FP32", "INT32", "INT64"}  # fp16 Range fails in the 10.3 importer
    assert "INT64" in old.ops["ConstantOfShape"][1]  # the source's "INF64" typo, read as INT64
    assert not old.ops["MatMulInteger"][0] and old.ops["ReduceMean"][0] and new.ops["ReduceMean"][0]
    with pytest.raises(InvalidInputError, match=r"no TensorRT support table for '9\.0'"):
        SupportTable.load("9.0")


@pytest.mark.parametrize(
    ("nodes", "inputs", "expected"),
    [
        ([helper.make_node("Bernoulli", ["x"], ["y"], name="coin")], [_vi("x")], ("coin", "operator", "error")),
        (
            [helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], name="q4", domain="com.microsoft", K=4, N=4,
                              bits=4, block_size=16)],
            [_vi("x"), _vi("b", T.UINT8, (4, 1, 8)), _vi("s", F, (4, 1))],
            ("q4", "operator", "error"),
        ),
        ([helper.make_node("SequenceConstruct", ["x"], ["y"], name="seq")], [_vi("x")], ("seq", "operator", "error")),
        (
            [helper.make_node("Equal", ["a", "b"], ["y"], name="eq")],
            [_vi("a", T.BOOL), _vi("b", T.BOOL)],
            ("eq", "dtype", "error"),
        ),
        (
            [helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean")],
            [_vi("x"), _vi("axes", T.INT64, (1,))],
            ("mean", "initializer", "error"),
        ),
        (
            [helper.make_node("Squeeze", ["x", "axes"], ["y"], name="squeeze")],
            [_vi("x"), _vi("axes", T.INT64, (1,))],
            ("squeeze", "initializer", "error"),
        ),
        (
            [helper.make_node("ScatterND", ["x", "i", "u"], ["y"], name="scatter", reduction="none")],
            [_vi("x"), _vi("i", T.INT64, (1, 1)), _vi("u", F, (1, 4))],
            ("scatter", "scatter", "error"),
        ),
        (
            [helper.make_node("Range", ["a", "b", "c"], ["y"], name="range")],
            [_vi("a", T.FLOAT16, ()), _vi("b", T.FLOAT16, ()), _vi("c", T.FLOAT16, ())],
            ("range", "range", "error"),
        ),
    ],
)  # fmt: skip
def test_each_rule_names_the_node(tmp_path: Path, nodes, inputs, expected) -> None:
    directory = _save(tmp_path, nodes, inputs, [helper.make_tensor_value_info("y", F, None)])
    assert expected in _findings(directory)


def test_scatternd_reduction_is_accepted_by_11(tmp_path: Path) -> None:
    node = helper.make_node("ScatterND", ["x", "i", "u"], ["y"], name="scatter", reduction="none")
    directory = _save(tmp_path, [node], [_vi("x"), _vi("i", T.INT64, (1, 1)), _vi("u", F, (1, 4))], [_vi("y")])
    assert _findings(directory, "11.1") == []


def test_qdq_rules(tmp_path: Path) -> None:
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    nonzero = numpy_helper.from_array(np.array(3, np.int8), "zp")
    weight8 = numpy_helper.from_array(np.ones((4, 4), np.int8), "w8")
    scales8 = numpy_helper.from_array(np.ones((1, 4), np.float32), "s8")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], name="asym"),
        helper.make_node("QuantizeLinear", ["x", "dyn"], ["q2"], name="dynamic_scale"),
        helper.make_node("DequantizeLinear", ["w8", "s8"], ["w"], name="blocked_int8", axis=0, block_size=4),
        helper.make_node("QuantizeLinear", ["x", "scale"], ["q4"], name="int4_activation", output_dtype=T.INT4),
    ]
    inputs = [_vi("x"), _vi("dyn", F, ())]
    outputs = [_vi("q", T.INT8), _vi("q2", T.UINT8), _vi("w", F, (4, 4)), _vi("q4", T.INT4)]
    directory = _save(tmp_path, nodes, inputs, outputs, [scale, nonzero, weight8, scales8], opset=21)
    found = {(node, rule) for node, rule, _ in _findings(directory)}
    assert {("asym", "qdq"), ("dynamic_scale", "qdq"), ("blocked_int8", "qdq"), ("int4_activation", "qdq")} <= found


def test_opset_and_external_data_rules(tmp_path: Path) -> None:
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    directory = _save(tmp_path, [node], [_vi("x")], [_vi("y")], opset=21)
    assert _findings(directory) == [("(model)", "opset", "warning")]
    assert _findings(directory, "11.1") == []
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    directory = _save(tmp_path, [mm], [_vi("x", F, (2, 4))], [_vi("y")], [weight], opset=23, name="outside")
    model = onnx.load(str(directory / "outside.onnx"))
    tensor = model.graph.initializer[0]
    onnx.external_data_helper.set_external_data(tensor, location="../elsewhere.bin")
    tensor.data_location, tensor.raw_data = T.EXTERNAL, b""
    (directory / "outside.onnx").write_bytes(model.SerializeToString())  # onnx.save refuses such a location
    found = set(_findings(directory, "11.1"))
    assert ("w", "external-data", "error") in found and ("(model)", "opset", "error") in found


def test_folding_turns_a_reshape_of_constants_into_the_constant_tensorrt_needs(tmp_path: Path) -> None:
    nodes = [
        _const("a", [-1]),
        helper.make_node("Constant", [], ["shape"], value_ints=[1]),
        helper.make_node("Reshape", ["a", "shape"], ["axes"], name="reshape"),
        helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean"),
    ]
    directory = _save(tmp_path, nodes, [_vi("x")], [_vi("y", F, (2, 1))])
    assert ("mean", "initializer", "error") in _findings(directory)
    model = ir.load(str(directory / "g.onnx"))
    assert fold_constant_subgraphs(model) == 1
    ir.save(model, str(directory / "g.onnx"))
    assert _findings(directory) == []
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    import onnxruntime as ort

    y = ort.InferenceSession(str(directory / "g.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x.mean(-1, keepdims=True), rtol=1e-6)


def test_exports_pass_for_tensorrt_and_the_cli_reports(
    demo_export_fp16_trt: Path, demo_export_fp16: Path, tmp_path: Path
) -> None:
    assert check_export(demo_export_fp16_trt, ("10.3", "11.1"))["10.3"]["ready"]
    fused = check_export(demo_export_fp16, ("10.3",))["10.3"]  # the ONNX Runtime flavour is not for TensorRT
    assert not fused["ready"] and "RotaryEmbedding" in json.dumps(fused)
    done = subprocess.run(
        [sys.executable, "-m", "owl3.cli", "check-trt", str(demo_export_fp16_trt), "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0 and "TensorRT 10.3: ready (0 errors" in done.stdout
    broken = _save(tmp_path, [helper.make_node("Bernoulli", ["x"], ["y"], name="coin")], [_vi("x")], [_vi("y")])
    done = subprocess.run([sys.executable, "-m", "owl3.cli", "check-trt", str(broken)], capture_output=True, text=True)
    assert done.returncode == 3 and "coin (Bernoulli) [operator]" in done.stdout
