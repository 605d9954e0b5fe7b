"""Export a checkpoint to three ONNX graphs (vision, visual memory, decoder) with bounded memory.

Each graph is traced with ``torch.onnx.export(dynamo=True)`` on a model built on the *meta* device, so
no weight is ever materialised for tracing. The initializers (named by checkpoint key) are then bound to
lazy tensors that read one tensor at a time from the checkpoint's safetensors and convert it to the
export dtype, and ``onnx_ir.save`` streams them into external data next to the graph (relative
location: the directory can be moved). Exporting a 7B checkpoint therefore needs about one tensor of
RAM beyond the exporter itself. Every graph is checked (``onnx.checker`` full check, strict shape
inference) before the directory is finished.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
from safetensors import safe_open

from owl3.config import Owl3Config
from owl3.errors import CheckpointError, Owl3Error
from owl3.export.graphs import WRAPPER_PREFIX, checkpoint_key, graph_module, trace_inputs
from owl3.export.specs import OPSET, GraphSpec, graph_specs
from owl3.model.attention import fp32_islands
from owl3.model.owl3 import Owl3Model
from owl3.model.safetensors_files import CheckpointFiles

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
IR_TO_TORCH = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16}
_IN_FLIGHT_BYTES = 256 << 20  # bounds what onnx_ir.save holds in memory while streaming weights
_ALIGNMENT = 1 << 16


class ExportError(Owl3Error):
    """The exporter produced a graph that fails its checks (a bug: exit 1)."""


def trace_graph(
    name: str, config: Owl3Config, precision: str, fused: bool = False, attention: str = "grouped"
) -> ir.Model:
    """Trace graph ``name`` on the meta device in ``precision`` (fp32 | fp16); initializers carry no data yet.
    ``fused``: the decoder on ONNX Runtime's fused operators with the in-place cache (``owl3.export.fused``),
    its self-attention ``attention`` (``owl3.export.fused.FusedKernels``)."""
    spec = graph_specs(config, precision, fused)[name]
    translations = {}
    if fused:
        from owl3.export.fused import TRANSLATIONS, register_contrib_schemas

        register_contrib_schemas()
        translations = TRANSLATIONS
    with torch.device("meta"):
        model = Owl3Model(config).to(TORCH_DTYPES[precision]).eval()
    args, dynamic = trace_inputs(spec, "meta")
    islands = fp32_islands() if precision != "fp32" else contextlib.nullcontext()
    quiet = io.StringIO()
    with islands, warnings.catch_warnings(), contextlib.redirect_stdout(quiet), _quiet_exporter_logs():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph_module(name, model, fused, attention),
            args,
            dynamo=True,
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            optimize=False,  # folding would read the (meta) weights; ONNX Runtime optimises at load
            custom_translation_table=translations,
        )
    return program.model


@contextlib.contextmanager
def _quiet_exporter_logs():
    """The exporter logs a warning per missing optional package (torchvision) on every export."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class CheckpointReader:
    """Reads checkpoint tensors by key, converted to a numpy dtype, one at a time; checks they are finite."""

    def __init__(self, files: CheckpointFiles) -> None:
        self.files = files

    def read(self, key: str, dtype: torch.dtype) -> np.ndarray:
        info = self.files.tensors.get(key)
        if info is None:
            raise ExportError(
                f"graph initializer {key!r} is not a checkpoint tensor", where="export", fix="report this bug"
            )
        with safe_open(str(info.file), framework="pt", device="cpu") as handle:
            tensor = handle.get_tensor(key).to(dtype)
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"tensor {key} holds NaN/Inf in {dtype}",
                where=str(info.file),
                fix="the weights are damaged or overflow this precision (export fp32)",
            )
        return tensor.numpy()


def bind_weights(model: ir.Model, reader: CheckpointReader) -> int:
    """Point every traced initializer at a lazy read of its checkpoint tensor, in the initializer's dtype
    (initializers a rewrite added, such as quantized weights, hold their values already); returns the bytes."""
    total = 0
    for name, value in list(model.graph.initializers.items()):
        total += math.ceil(value.dtype.itemsize * math.prod(value.shape.numpy()))
        if not name.startswith(WRAPPER_PREFIX):  # added by a rewrite, already holding its value
            continue
        key = checkpoint_key(name)
        dtype = IR_TO_TORCH[value.dtype]

        def load(key: str = key, dtype: torch.dtype = dtype) -> ir.TensorProtocol:
            return ir.tensor(reader.read(key, dtype), name=key)

        value.const_value = ir.LazyTensor(load, dtype=value.dtype, shape=value.shape, name=key)
        value.name = key  # initializer names are checkpoint keys in the saved graph
    return total


def name_nodes_by_module(model: ir.Model) -> None:
    """Rename nodes ``<module path>/<OpType>_<k>`` from the exporter's name-scope metadata."""
    counts: Counter[str] = Counter()
    for node in model.graph:
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        modules = ast.literal_eval(scopes)[:-1] if scopes else []
        scope = next((m for m in reversed(modules) if m), "graph")
        scope = checkpoint_key(scope) if scope != "model" else "graph"
        key = f"{scope}/{node.op_type}"
        node.name = f"{key}_{counts[key]}"
        counts[key] += 1


def _reshape(data: np.ndarray, shape: np.ndarray, allowzero: int = 0) -> np.ndarray:
    dims = [int(d) if d != 0 or allowzero else data.shape[i] for i, d in enumerate(shape)]
    return data.reshape(dims)


def _unsqueeze(data: np.ndarray, axes: np.ndarray) -> np.ndarray:
    rank = data.ndim + len(axes)
    for axis in sorted(int(a) % rank for a in axes):
        data = np.expand_dims(data, axis)
    return data


_FOLD = {
    "Reshape": lambda inputs, a: _reshape(inputs[0], inputs[1], a.get("allowzero", 0)),
    "Concat": lambda inputs, a: np.concatenate(inputs, axis=a["axis"]),
    "Unsqueeze": lambda inputs, a: _unsqueeze(inputs[0], inputs[1]),
    "Squeeze": lambda inputs, a: np.squeeze(inputs[0], axis=tuple(int(x) for x in inputs[1]) if inputs[1:] else None),
    "Cast": lambda inputs, a: inputs[0].astype(ir.DataType(a["to"]).numpy()),
    "Identity": lambda inputs, a: inputs[0],
}
_FOLD_MAX_ELEMENTS = 1024  # index arithmetic only: weights are never folded (nor read)


def _constant_value(node: ir.Node | None) -> np.ndarray | None:
    """The value of a Constant node (``value`` or the ``value_int(s)`` / ``value_float(s)`` forms), else None."""
    if node is None or node.op_type != "Constant" or len(node.attributes) != 1:
        return None
    name, attribute = next(iter(node.attributes.items()))
    if name == "value":
        return attribute.value.numpy()
    kinds = {"value_int": np.int64, "value_ints": np.int64, "value_float": np.float32, "value_floats": np.float32}
    return np.asarray(attribute.value, dtype=kinds[name]) if name in kinds else None


def fold_constant_subgraphs(model: ir.Model) -> int:
    """Replace small computations on Constant nodes (a Reshape of two Constants giving ReduceMean's axes, ...)
    by one Constant, as TensorRT needs such inputs constant; returns how many nodes were folded."""
    folded = 0
    for node in list(model.graph):
        if node.op_type not in _FOLD or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
            continue
        producers = [value.producer() if value is not None else None for value in node.inputs]
        inputs = [_constant_value(p) for p in producers]
        if any(x is None for x in inputs):
            continue
        if any(x.size > _FOLD_MAX_ELEMENTS for x in inputs) or node.outputs[0].is_graph_output():
            continue
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        result = np.asarray(_FOLD[node.op_type](inputs, attributes))
        constant = ir.node("Constant", [], {"value": ir.tensor(result)}, name=f"{node.name}/folded")
        constant.outputs[0].name = f"{node.outputs[0].name}_folded"
        model.graph.insert_before(node, constant)
        ir.convenience.replace_all_uses_with(node.outputs[0], constant.outputs[0])
        model.graph.remove(node, safe=True)
        for producer in producers:
            if not any(output.uses() for output in producer.outputs):
                model.graph.remove(producer, safe=True)
        folded += 1
    return folded


def save_graph(model: ir.Model, spec: GraphSpec, directory: Path) -> Path:
    """Write ``<name>.onnx`` and its external data ``<name>.onnx.data`` into ``directory``."""
    model.producer_name = "owl3-export"
    path = directory / spec.file
    ir.save(
        model,
        path,
        external_data=f"{spec.file}.data",
        size_threshold_bytes=1024,
        max_in_flight_bytes=_IN_FLIGHT_BYTES,
        alignment=_ALIGNMENT,
    )
    return path


def check_graph(path: Path, *, contrib: bool = False) -> None:
    """Full ``onnx.checker`` check and strict shape inference. ONNX has no schema for ONNX Runtime's contrib
    operators (``contrib``): such graphs get the structural check, and are run by validation."""
    try:
        onnx.checker.check_model(str(path), full_check=not contrib)
        if not contrib:
            inferred = path.with_name(f".{path.name}.inferred")
            onnx.shape_inference.infer_shapes_path(str(path), str(inferred), check_type=True, strict_mode=True)
            inferred.unlink(missing_ok=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"exported graph fails ONNX checks: {exc}", where=str(path), fix="report this bug") from exc


def export_graph(
    name: str,
    config: Owl3Config,
    precision: str,
    reader: CheckpointReader,
    directory: Path,
    rewrite=None,
    *,
    fused: bool = False,
    attention: str = "grouped",
) -> dict:
    """Trace, name, (fuse,) (quantize,) bind, save and check one graph; returns its manifest entry.

    ``precision`` is the float dtype the graph computes in; ``fused``: ONNX Runtime's fused operators (the
    ort flavour: RMSNorm fusions in every graph, the fused in-place decoder, its self-attention as
    ``attention``); ``rewrite``
    (``owl3.export.quantized``) turns the packed Linears of a quantized checkpoint into integer weights before
    the float weights are bound."""
    spec = graph_specs(config, precision, fused)[name]
    model = trace_graph(name, config, precision, fused, attention)
    name_nodes_by_module(model)
    fold_constant_subgraphs(model)
    fusions = None
    if fused:
        from owl3.export.fused import finish_fused_graph  # trace_graph registered the contrib schemas

        fusions = finish_fused_graph(model, config, precision)
        if name == "decoder":
            fusions["self_attention"] = attention
    quantized = rewrite(model) if rewrite is not None else None
    weight_bytes = bind_weights(model, reader)
    merged = 0  # Linears that share a packed node with a sibling
    if fused and name == "decoder":
        from owl3.export.packing import pack_projections

        packed = fusions["packed_projections"] = pack_projections(model)
        merged = packed["linears"] - packed["groups"]
        if attention == "gqa":
            from owl3.export.packing import rotary_into_attention

            fusions["rotary_in_attention"] = rotary_into_attention(model)
    path = save_graph(model, spec, directory)
    check_graph(path, contrib=fused or any(domain not in ("", "ai.onnx") for domain in model.opset_imports))
    ops = Counter(node.op_type for node in model.graph)
    entry = {**spec.signature(), "ir_version": model.ir_version, "opset": model.opset_imports[""],
             "weight_bytes": weight_bytes, "op_counts": dict(ops)}  # fmt: skip
    if fusions is not None:
        entry["fusions"] = fusions
    if quantized is not None:
        from owl3.export.quantized import check_quantized_graph, count_quantized_nodes

        entry["quantized"] = {**quantized, "l0": count_quantized_nodes(path)}
        check_quantized_graph(entry["quantized"], rewrite.flavour, str(path), merged)
    return entry
