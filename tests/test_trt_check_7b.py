"""TensorRT readiness of the mPLUG-Owl3-7B-240728 layout, without its weights (slow: about 4 minutes on 2 cores).

Each graph is traced on the meta device as ``export_graph`` does it (``trace_graph``, node names, constant
folding, TensorRT flavour: fp16 compute, standard operators), then rewritten by ``QuantizedRewrite`` in the
TensorRT flavour for the int4, int8 and W8A8 recipes' layer plans. No weight exists: a stand-in reader says
every layer is symmetric (what the TensorRT flavour requires), W8A8 scales are ones, and every initializer is
saved as a reference into an external file that is never written, which is all the readiness check reads
(graph protos, initializer names, dims and dtypes). W8A8 gets a ``pre_quant_scale`` Mul on every layer (a
superset of what SmoothQuant leaves unfolded), so every graph form the quantizer can produce is checked.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
ir = pytest.importorskip("onnx_ir")

from owl3.config import Owl3Config  # noqa: E402
from owl3.export.onnx_export import fold_constant_subgraphs, name_nodes_by_module, trace_graph  # noqa: E402
from owl3.export.quantized import Flavour, QuantizedRewrite  # noqa: E402
from owl3.export.specs import GRAPH_NAMES  # noqa: E402
from owl3.export.trt_check import check_export, format_report  # noqa: E402
from owl3.model.weights import tensor_table  # noqa: E402
from owl3.quantize.gptq_format import QuantizationConfig  # noqa: E402
from owl3.quantize.loading import PackedModule, QuantizedLayout  # noqa: E402
from owl3.quantize.recipes import recipe  # noqa: E402
from owl3.quantize.stage import linear_shapes, plan_modules  # noqa: E402

QUANTIZED = ("int4", "int8", "w8a8")


class MetaReader:
    """``PackedReader``'s interface without a checkpoint: symmetric layers, unit activation scales; reading a
    weight is a test failure (the rewrite must leave them lazy)."""

    def __init__(self, layout: QuantizedLayout) -> None:
        self.layout = layout

    def symmetric(self, module: str) -> bool:
        return True

    def float_tensor(self, key: str) -> torch.Tensor:
        module, part = key.rsplit(".", 1)
        return torch.ones(1 if part == "input_scale" else self.layout.modules[module].in_features)

    def weight(self, module: str):
        raise AssertionError(f"{module}'s weight was read while rewriting")


def layout_of(config: Owl3Config, precision: str) -> QuantizedLayout:
    """The layer plan ``owl3-export quantize`` makes for ``precision`` on ``config``, as a packed layout."""
    chosen = recipe(precision)
    table, shapes = tensor_table(config), linear_shapes(config)
    modules = {}
    for m, p in plan_modules(config, chosen).items():
        (out_features, in_features), bias = shapes[m], f"{m}.bias" in table
        modules[m] = PackedModule(in_features, out_features, p.bits, p.group_size, bias, p.activations, p.activations)
    scheme = "static" if chosen.activations else None
    quantization = QuantizationConfig(chosen.bits, chosen.group_size, activation_scheme=scheme)
    return QuantizedLayout(quantization, modules, required={})


def without_weights(model: ir.Model, graph: str) -> None:
    """Every initializer not held in memory (meta tensors, lazy integer weights) becomes an external reference."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if type(tensor) is ir.Tensor and tensor.size <= 1 << 16:  # numpy-backed, not a meta torch tensor
            continue  # small constants a rewrite computed (activation scales, zero points): kept as they are
        nbytes = math.ceil(value.dtype.itemsize * math.prod(value.shape.numpy()))
        value.const_value = ir.ExternalTensor(
            f"{graph}.onnx.data", 0, nbytes, value.dtype, shape=value.shape, name=value.name
        )


def save(proto: onnx.ModelProto, directory: Path, graph: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(directory / f"{graph}.onnx"))


@pytest.mark.slow
def test_the_7b_layout_is_ready_for_tensorrt_in_fp16_and_every_quantized_flavour(tmp_path: Path) -> None:
    config = Owl3Config.preset("7b-240728")
    layouts = {precision: layout_of(config, precision) for precision in QUANTIZED}
    rewritten: dict[str, dict[str, list[str]]] = {p: {} for p in QUANTIZED}
    started = time.perf_counter()
    for graph in GRAPH_NAMES:
        model = trace_graph(graph, config, "fp16")
        name_nodes_by_module(model)
        fold_constant_subgraphs(model)
        without_weights(model, graph)
        proto = ir.serde.serialize_model(model)
        save(proto, tmp_path / "fp16", graph)
        for precision in QUANTIZED:
            copy = ir.serde.deserialize_model(proto)
            record = QuantizedRewrite(MetaReader(layouts[precision]), Flavour("tensorrt"))(copy)
            rewritten[precision][graph] = record["modules"]
            without_weights(copy, graph)
            save(ir.serde.serialize_model(copy), tmp_path / precision, graph)
    for precision, layout in layouts.items():  # every planned layer was found in some graph and rewritten
        assert sorted(m for modules in rewritten[precision].values() for m in modules) == sorted(layout.modules)
    assert rewritten["int4"]["vision"] == [] and len(rewritten["int4"]["visual_memory"]) == len(config.hyper_layers)
    for flavour in ("fp16", *QUANTIZED):
        report = check_export(tmp_path / flavour, ("10.3", "11.1"))
        assert report["10.3"]["ready"] and report["11.1"]["ready"], f"{flavour}:\n{format_report(report)}"
    int4 = onnx.load(str(tmp_path / "int4" / "decoder.onnx"), load_external_data=False)
    assert int4.opset_import[0].version == 21
    assert any(t.data_type == onnx.TensorProto.INT4 for t in int4.graph.initializer)
    w8a8 = onnx.load(str(tmp_path / "w8a8" / "decoder.onnx"), load_external_data=False)
    assert sum(n.op_type == "QuantizeLinear" for n in w8a8.graph.node) == len(rewritten["w8a8"]["decoder"])
    print(f"7B-240728 readiness (fp16, int4, int8, w8a8): {time.perf_counter() - started:.0f} s")
