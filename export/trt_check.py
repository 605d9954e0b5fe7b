"""TensorRT readiness: what the TensorRT ONNX parser would reject in an export's graphs, found without TensorRT.

Rules (``../shared/docs/tensorrt.md``), each finding naming the graph, the node and the rule:

``operator``      the op is not in the version's support table (``export/data/trt-<version>.csv``, the
                  project's own data derived from onnx-tensorrt ``docs/operators.md``), or is a Sequence* /
                  Optional* op, or a contrib-domain op (``com.microsoft.MatMulNBits``: the ort flavour).
``dtype``         the data input's (for Constant / ConstantOfShape the output's) type is outside the op's types.
``initializer``   an input the parser needs as an initializer or Constant is computed: Reduce* / Squeeze / Pad
                  ``axes``, CumSum ``axis``, Unsqueeze ``axes``.
``scatter``       ScatterND with a ``reduction`` attribute (any value; rejected before 10.9).
``range``         Range inputs not of one dtype among int32, int64, fp32.
``qdq``           Q/DQ zero points not all zero, scales not initializers, INT4 outside blocked DQ of a 2-D
                  constant weight, blocked (``block_size``) Q/DQ on anything but INT4 weights.
``opset``         default-domain opset outside 9-20 (21 only where INT4 needs it: a warning on 10.3).
``external-data`` external data locations that are absolute or leave the directory; a graph over 2 GiB
                  without external data.

Works on the graph protos only (``load_external_data=False``); the few small tensors a rule must read (zero
points) are inline, or read alone from their external file.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from owl3.errors import InvalidInputError

VERSIONS = ("10.3", "11.1")
_TYPE_NAMES = {
    onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.BOOL: "BOOL", onnx.TensorProto.INT4: "INT4",
    onnx.TensorProto.FLOAT8E4M3FN: "FP8", onnx.TensorProto.DOUBLE: "FP64", onnx.TensorProto.UINT4: "UINT4",
}  # fmt: skip
_AXES_INPUT = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
               "ReduceProd", "ReduceSum", "ReduceSumSquare", "Squeeze", "Unsqueeze", "CumSum"}  # fmt: skip
_TWO_GIB = 2 << 30


@dataclass(frozen=True)
class Finding:
    graph: str
    node: str
    op: str
    rule: str
    message: str
    severity: str = "error"  # "error": the parser rejects it; "warning": it parses, with a caveat


@dataclass(frozen=True)
class SupportTable:
    version: str
    ops: dict[str, tuple[bool, frozenset[str]]]  # op: (supported, types)

    @classmethod
    def load(cls, version: str) -> SupportTable:
        if version not in VERSIONS:
            raise InvalidInputError(
                f"no TensorRT support table for {version!r}", where="--trt-version", fix=f"use one of {VERSIONS}"
            )
        text = resources.files("owl3.export").joinpath(f"data/trt-{version}.csv").read_text(encoding="utf-8")
        rows = csv.DictReader(io.StringIO("\n".join(line for line in text.splitlines() if not line.startswith("#"))))
        ops = {
            r["op"]: (r["supported"] == "Y", frozenset(t.strip() for t in r["types"].split(",") if t.strip()))
            for r in rows
        }
        return cls(version, ops)


def check_graph(path: Path, table: SupportTable) -> list[Finding]:
    """Every finding for one graph file."""
    model = onnx.load(str(path), load_external_data=False)
    graph_name = path.stem
    findings = _check_opset(model, graph_name, table.version)
    findings += _check_external_data(model, path, graph_name)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    types = _value_types(inferred)
    initializers = {t.name: t for t in model.graph.initializer}
    constants = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output} | set(initializers)
    for node in model.graph.node:
        findings += _check_node(node, graph_name, table, types, constants, initializers, path.parent)
    return findings


def check_export(directory: Path, versions: tuple[str, ...] = ("10.3",)) -> dict[str, Any]:
    """The readiness report of an export directory: {version: {"ready", "errors", "warnings", "findings"}}."""
    directory = Path(directory)
    graphs = sorted(directory.glob("*.onnx"))
    if not graphs:
        raise InvalidInputError("no .onnx graphs found", where=str(directory), fix="pass an export directory")
    report = {}
    for version in versions:
        table = SupportTable.load(version)
        findings = [f for path in graphs for f in check_graph(path, table)]
        errors = [f for f in findings if f.severity == "error"]
        report[version] = {
            "ready": not errors,
            "errors": len(errors),
            "warnings": len(findings) - len(errors),
            "findings": [asdict(f) for f in findings],
        }
    return report


def format_report(report: dict[str, Any], limit: int = 40) -> str:
    lines = []
    for version, result in report.items():
        verdict = "ready" if result["ready"] else "NOT ready"
        lines.append(f"TensorRT {version}: {verdict} ({result['errors']} errors, {result['warnings']} warnings)")
        for f in result["findings"][:limit]:
            lines.append(f"  {f['severity']:7} {f['graph']}: {f['node']} ({f['op']}) [{f['rule']}] {f['message']}")
        if len(result["findings"]) > limit:
            lines.append(f"  ... {len(result['findings']) - limit} more (--json for all)")
    return "\n".join(lines)


# ---- rules -----------------------------------------------------------------------------------------------


def _check_opset(model: onnx.ModelProto, graph: str, version: str) -> list[Finding]:
    findings = []
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            if opset.version < 9 or opset.version > 21:
                findings.append(Finding(graph, "(model)", "-", "opset", f"opset {opset.version} is outside 9-21"))
            elif opset.version == 21 and version == "10.3":
                findings.append(Finding(graph, "(model)", "-", "opset", "opset 21 is above the 10.3 table's 9-20: "
                                        "the parser warns; INT4 weights need it", severity="warning"))  # fmt: skip
    return findings


def _check_external_data(model: onnx.ModelProto, path: Path, graph: str) -> list[Finding]:
    findings, inline = [], 0
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            inline += len(tensor.raw_data)
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if Path(location).is_absolute() or ".." in Path(location).parts:
            findings.append(
                Finding(
                    graph,
                    tensor.name,
                    "initializer",
                    "external-data",
                    f"external data location {location!r} must be relative, inside the directory",
                )
            )
    if inline > _TWO_GIB:
        findings.append(
            Finding(
                graph,
                "(model)",
                "-",
                "external-data",
                f"{inline / 2**30:.1f} GiB of inline weights: over the 2 GiB protobuf limit",
            )
        )
    return findings  # fmt: skip


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    types = {}
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    for tensor in model.graph.initializer:
        types[tensor.name] = tensor.data_type
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    types[node.output[0]] = attribute.t.data_type
    return types


def _check_node(node, graph, table, types, constants, initializers, directory) -> list[Finding]:
    where = (graph, node.name or node.output[0], node.op_type)
    if node.domain not in ("", "ai.onnx"):
        return [Finding(*where, "operator", f"{node.domain} operator: not an ONNX standard op TensorRT parses")]
    if node.op_type.startswith(("Sequence", "Optional")) or node.op_type not in table.ops:
        return [Finding(*where, "operator", f"{node.op_type} is not in the TensorRT {table.version} table")]
    supported, allowed = table.ops[node.op_type]
    if not supported:
        return [Finding(*where, "operator", f"{node.op_type} is unsupported by TensorRT {table.version}")]
    findings = []
    data = node.output[0] if node.op_type in ("Constant", "ConstantOfShape") else _data_input(node)
    dtype = types.get(data) if data else None
    if dtype is not None and allowed and _TYPE_NAMES.get(dtype, str(dtype)) not in allowed:
        findings.append(Finding(*where, "dtype", f"{_TYPE_NAMES.get(dtype, dtype)} is not among {sorted(allowed)}"))
    if node.op_type in _AXES_INPUT or node.op_type == "Pad":
        index = 3 if node.op_type == "Pad" else 1
        if len(node.input) > index and node.input[index] and node.input[index] not in constants:
            findings.append(Finding(*where, "initializer", f"input {index} ({node.input[index]}) must be an "
                                    "initializer or Constant, not computed"))  # fmt: skip
    if node.op_type == "ScatterND" and table.version == "10.3" and any(a.name == "reduction" for a in node.attribute):
        findings.append(Finding(*where, "scatter", "ScatterND with a reduction attribute is rejected before 10.9"))
    if node.op_type == "Range":
        kinds = {types.get(i) for i in node.input}
        if len(kinds) != 1 or not kinds <= {onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.FLOAT}:
            names = sorted(_TYPE_NAMES.get(k, str(k)) for k in kinds if k is not None)
            findings.append(Finding(*where, "range", f"Range inputs must share one of int32/int64/fp32, found {names}"))
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        findings += _check_qdq(node, where, types, initializers, directory)
    return findings


def _data_input(node) -> str | None:
    if node.op_type == "Where":
        return node.input[1]
    return node.input[0] if node.input else None


def _check_qdq(node, where, types, initializers, directory) -> list[Finding]:
    findings = []
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if len(node.input) < 2 or node.input[1] not in initializers:
        findings.append(Finding(*where, "qdq", "the scale must be an initializer (static shape)"))
    if len(node.input) > 2 and node.input[2]:
        zero = initializers.get(node.input[2])
        if zero is None:
            findings.append(Finding(*where, "qdq", "the zero point must be an initializer"))
        elif np.any(_read(zero, directory) != 0):
            findings.append(Finding(*where, "qdq", "zero points must all be zero (TensorRT is symmetric only)"))
    data = node.input[0]
    int4 = types.get(data) == onnx.TensorProto.INT4 or types.get(node.output[0]) == onnx.TensorProto.INT4
    if attributes.get("block_size", 0) and not (node.op_type == "DequantizeLinear" and int4):
        findings.append(Finding(*where, "qdq", "blocked Q/DQ (block_size) is accepted for INT4 weights only"))
    if int4:
        weight = initializers.get(data)
        if node.op_type != "DequantizeLinear" or weight is None or len(weight.dims) != 2:
            findings.append(Finding(*where, "qdq", "INT4 only as DequantizeLinear of a 2-D constant weight"))
    return findings


def _read(tensor: onnx.TensorProto, directory: Path) -> np.ndarray:
    """A small initializer's values (inline, or alone from its external file)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        onnx.external_data_helper.load_external_data_for_tensor(copy, str(directory))
        return numpy_helper.to_array(copy)
    return numpy_helper.to_array(tensor)


def write_report(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2), encoding="utf-8")
