"""Sibling projections packed into one product (owl3.export.packing): same numbers, fewer nodes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from owl3.export.packing import member_modules, pack_projections

K, BLOCK = 64, 32


def _graph() -> onnx.ModelProto:
    """x [2, 3, K]: three MatMulNBits siblings with biases (q, k, v), two float ``MatMul(x, Transpose(W))``
    siblings without (gate, up), and a MatMulNBits on another input (alone: left as it is)."""
    rng = np.random.default_rng(0)
    nodes, inits, outputs = [], [], []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array, name))
        return name

    nodes.append(helper.make_node("Relu", ["x"], ["other"], name="other/Relu"))
    for module, n, source, bias in (("attn.q_proj", 32, "x", True), ("attn.k_proj", 16, "x", True),
                                    ("attn.v_proj", 16, "x", True), ("lone.proj", 8, "other", False)):  # fmt: skip
        blob = rng.integers(0, 256, (n, K // BLOCK, BLOCK // 2), dtype=np.uint8)
        scales = rng.uniform(0.01, 0.1, (n, K // BLOCK)).astype(np.float32)
        out = f"{module}.out"
        nodes.append(helper.make_node("MatMulNBits", [source, const(f"{module}.B", blob), const(f"{module}.s", scales)],
                                      [out], domain="com.microsoft", name=f"{module}/MatMulNBits_0", K=K, N=n, bits=4,
                                      block_size=BLOCK, accuracy_level=0))  # fmt: skip
        if bias:
            b = const(f"{module}.bias", rng.standard_normal(n).astype(np.float32))
            nodes.append(helper.make_node("Add", [out, b], [f"{module}.sum"], name=f"{module}/Add_0"))
            out = f"{module}.sum"
        outputs.append(out)
    for module, n in (("mlp.gate_proj", 48), ("mlp.up_proj", 48)):
        w = const(f"{module}.weight", rng.standard_normal((n, K)).astype(np.float32))
        nodes.append(helper.make_node("Transpose", [w], [f"{module}.wt"], perm=[1, 0], name=f"{module}/Transpose_0"))
        nodes.append(helper.make_node("MatMul", ["x", f"{module}.wt"], [f"{module}.out"], name=f"{module}/MatMul_0"))
        outputs.append(f"{module}.out")
    graph = helper.make_graph(
        nodes, "siblings", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, K])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _run(proto: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x}), strict=True))


def test_packed_siblings_compute_the_same_outputs_with_one_product_per_group() -> None:
    proto = _graph()
    model = ir.from_proto(proto)
    assert pack_projections(model) == {"groups": 2, "linears": 5}
    packed = ir.to_proto(model)
    ops = [n.op_type for n in packed.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("MatMul") == 1 and ops.count("Split") == 2
    assert ops.count("Add") == 1 and ops.count("Transpose") == 1  # the biases and the weights packed too
    nbits = next(n for n in packed.graph.node if n.op_type == "MatMulNBits" and n.input[0] == "x")
    assert {a.name: a.i for a in nbits.attribute}["N"] == 64
    assert nbits.name == "attn.{q_proj,k_proj,v_proj}/MatMulNBits_0"
    assert member_modules("attn.{q_proj,k_proj,v_proj}") == ["attn.q_proj", "attn.k_proj", "attn.v_proj"]
    assert member_modules("lone.proj") == ["lone.proj"]
    lone = next(n for n in packed.graph.node if n.op_type == "MatMulNBits" and n.input[0] == "other")
    assert lone.name == "lone.proj/MatMulNBits_0"
    names = {i.name for i in packed.graph.initializer}
    parts = {f"attn.{m}.{p}" for m in ("q_proj", "k_proj", "v_proj") for p in ("B", "s", "bias")}
    assert not (parts | {"mlp.gate_proj.weight", "mlp.up_proj.weight"}) & names  # not saved twice
    assert {"attn.{q_proj,k_proj,v_proj}.nbits_B", "mlp.{gate_proj,up_proj}.weight"} <= names
    x = np.random.default_rng(1).standard_normal((2, 3, K)).astype(np.float32)
    before, after = _run(proto, x), _run(packed, x)
    assert list(after) == list(before)  # the graph's outputs keep their names and order
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
