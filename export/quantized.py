"""Quantized graphs: the float trace of a GPTQ checkpoint with every packed Linear rewritten to integer weights.

One checkpoint, two flavours of the same integers (``../shared/docs/quantization.md`` §4-§5):

``ort``       computes in fp32 on ONNX Runtime's CPU kernels. INT4 / INT8 weight-only Linears become
              ``com.microsoft.MatMulNBits`` (block = the checkpoint's group; per-channel INT8 as blocks that
              repeat the channel's scale; no ``g_idx``; zero points only when asymmetric). The embeddings and
              ``lm_head`` keep fp16 storage (a Cast after the Gather; ``lm_head`` runs in fp16 between Casts).
``tensorrt``  computes in fp16 with standard Q/DQ only (opset 21): INT4 weights through
              ``DequantizeLinear(axis=0, block_size)`` with a [K/B, N] scale, INT8 through per-channel
              ``DequantizeLinear(axis=1)``, no zero points.

W8A8 quantizes each Linear's input exactly as the checkpoint defines (``Mul(pre_quant_scale)`` where it has
one, then ``QuantizeLinear -> DequantizeLinear`` with its static per-tensor scale), in both flavours. Its INT8
per-channel weights are ``MatMulNBits`` in the ort flavour and ``DequantizeLinear(axis=1)`` in the tensorrt
one. (ONNX Runtime would fuse a full Q/DQ MatMul into ``MatMulIntegerToFloat``, but that kernel saturates on
AVX2 CPUs without VNNI: 18% error measured on full-range INT8 weights, so the ort flavour does not use it.)

Every new initializer is a lazy tensor computed from the checkpoint's packed tensors when the graph is saved,
one Linear at a time, so memory stays at one layer's weights as in the float export.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch
from safetensors import safe_open

from owl3.errors import CheckpointError, UsageError
from owl3.export.graphs import WRAPPER_PREFIX
from owl3.export.specs import ACCURACY_LEVELS, FLAVOURS
from owl3.model.safetensors_files import CheckpointFiles
from owl3.quantize.gptq_format import GPTQ_V1, LM_HEAD
from owl3.quantize.loading import PackedModule, QuantizedLayout
from owl3.quantize.qmath import contiguous_g_idx, symmetric_zero, unpack_cols, unpack_rows

COMPUTE = {"ort": "fp32", "tensorrt": "fp16"}  # the float dtype each flavour's graphs compute in
INT4_OPSET = 21  # INT4 tensors and blocked DequantizeLinear; other graphs keep the exporter's opset
QDQ_OPSET = 19  # Q/DQ with fp16 scales (opset 13's take float32 only)
MS_DOMAIN = "com.microsoft"
# Float weights the ORT flavour stores in fp16 although it computes in fp32 (the decoder's largest tensors).
FP16_STORED = ("language_model.model.embed_tokens.weight", f"{LM_HEAD}.weight")
_FLOAT = {"fp32": ir.DataType.FLOAT, "fp16": ir.DataType.FLOAT16}
_NUMPY = {"fp32": np.float32, "fp16": np.float16}


@dataclass(frozen=True)
class Flavour:
    """How a quantized checkpoint becomes graphs: ``name`` (ort | tensorrt) and, for ort, MatMulNBits'
    ``accuracy_level`` (0: fp32 math on the dequantized weights; 4: activations quantized to int8 per block)."""

    name: str
    accuracy_level: int = 4

    def __post_init__(self) -> None:
        if self.name not in FLAVOURS:
            raise UsageError(f"unknown export flavour {self.name!r}", where="--target", fix=f"use one of {FLAVOURS}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise UsageError(
                f"accuracy_level {self.accuracy_level} is not supported",
                where="--accuracy-level",
                fix=f"use one of {ACCURACY_LEVELS} (0: exact fp32 math, 4: int8 activations per block, fastest)",
            )

    @property
    def compute(self) -> str:
        return COMPUTE[self.name]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"flavour": self.name, "compute": self.compute}
        if self.name == "ort":
            out["accuracy_level"] = self.accuracy_level
        return out


# ---- reading one packed Linear ---------------------------------------------------------------------------


@dataclass(frozen=True)
class IntegerWeight:
    """One Linear's integers as the graphs need them: ``codes`` [K, N] unsigned (0 .. 2^bits - 1), ``scales``
    [G, N] float32 (exactly the checkpoint's fp16 values), true ``zeros`` [G, N], ``group`` rows per group."""

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    bits: int
    group: int

    @property
    def symmetric(self) -> bool:
        return bool((self.zeros == symmetric_zero(self.bits)).all())


class PackedReader:
    """Reads a packed Linear's GPTQ tensors from the checkpoint and checks what the graphs rely on."""

    def __init__(self, files: CheckpointFiles, layout: QuantizedLayout) -> None:
        self.files, self.layout = files, layout

    def _tensor(self, key: str) -> torch.Tensor:
        info = self.files.tensors[key]
        with safe_open(str(info.file), framework="pt", device="cpu") as handle:
            return handle.get_tensor(key)

    def float_tensor(self, key: str) -> torch.Tensor | None:
        return self._tensor(key) if key in self.files.tensors else None

    def zeros(self, module: str) -> np.ndarray:
        """True zero points [G, N] (small: read before the weights to choose the graph form)."""
        zeros = unpack_cols(self._tensor(f"{module}.qzeros"), self.layout.modules[module].bits)
        return (zeros + 1 if self.layout.quantization.checkpoint_format == GPTQ_V1 else zeros).numpy()

    def symmetric(self, module: str) -> bool:
        return bool((self.zeros(module) == symmetric_zero(self.layout.modules[module].bits)).all())

    def weight(self, module: str) -> IntegerWeight:
        spec = self.layout.modules[module]
        codes = unpack_rows(self._tensor(f"{module}.qweight"), spec.bits)
        g_idx = self._tensor(f"{module}.g_idx")
        if not torch.equal(g_idx.long(), contiguous_g_idx(spec.in_features, spec.group_size).long()):
            raise CheckpointError(
                f"{module}.g_idx is not the contiguous k // {spec.group_size} (classic desc_act ordering)",
                where=str(self.files.tensors[f"{module}.g_idx"].file),
                fix="re-quantize with contiguous groups (owl3-export quantize keeps g_idx trivial, act order "
                "included); MatMulNBits' fast kernels and TensorRT need it",
            )
        scales = self._tensor(f"{module}.scales").float()
        if not bool(torch.isfinite(scales).all()):
            raise CheckpointError(
                f"{module}.scales holds NaN/Inf", where=str(self.files.tensors[f"{module}.scales"].file),
                fix="the checkpoint is damaged: quantize again",
            )  # fmt: skip
        return IntegerWeight(codes.numpy(), scales.numpy(), self.zeros(module), spec.bits, spec.group_size)


# ---- integer tensors of each form ------------------------------------------------------------------------


def nbits_block(in_features: int, group: int) -> int:
    """MatMulNBits' block: the group, or for a per-channel layer the largest power of two <= 128 dividing K
    (128 with a padded last block when K has none >= 16)."""
    if group < in_features:
        return group
    return next((b for b in (128, 64, 32, 16) if in_features % b == 0), 128)


def matmulnbits_tensors(weight: IntegerWeight, compute: str) -> dict[str, np.ndarray]:
    """B [N, K/B, B*bits/8] uint8 (low nibble first), scales [N, K/B], zero_points when asymmetric."""
    k, n = weight.codes.shape
    block = nbits_block(k, weight.group)
    blocks = math.ceil(k / block)
    per_channel = weight.group >= k
    codes = weight.codes.T.astype(np.uint8)  # [N, K]
    if blocks * block != k:  # padded rows dequantize to zero (code = zero point)
        pad = np.repeat(weight.zeros[0][:, None].astype(np.uint8), blocks * block - k, axis=1)
        codes = np.concatenate([codes, pad], axis=1)
    codes = codes.reshape(n, blocks, block)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4) if weight.bits == 4 else codes
    scales = np.repeat(weight.scales.T, blocks, axis=1) if per_channel else weight.scales.T
    out = {"B": np.ascontiguousarray(packed, dtype=np.uint8), "scales": np.ascontiguousarray(scales, _NUMPY[compute])}
    if not weight.symmetric:
        zeros = np.repeat(weight.zeros.T, blocks, axis=1) if per_channel else weight.zeros.T
        zeros = zeros.astype(np.uint8)
        if weight.bits == 4:
            if zeros.shape[1] % 2:
                zeros = np.concatenate([zeros, np.zeros((n, 1), np.uint8)], axis=1)
            zeros = zeros[:, 0::2] | (zeros[:, 1::2] << 4)
        out["zero_points"] = np.ascontiguousarray(zeros)
    return out


def qdq_tensors(weight: IntegerWeight, compute: str, module: str) -> dict[str, np.ndarray]:
    """Signed weights [K, N] (INT4 as ml_dtypes.int4, INT8 as int8) and their scale ([K/B, N] or [N])."""
    if not weight.symmetric:
        raise CheckpointError(
            f"{module} has asymmetric zero points; TensorRT's Q/DQ accepts only symmetric weights",
            where=module, fix="re-quantize symmetric (the default of owl3-export quantize) or export --target ort",
        )  # fmt: skip
    signed = weight.codes.astype(np.int16) - symmetric_zero(weight.bits)
    if weight.bits == 4:
        return {
            "weight": np.ascontiguousarray(signed.astype(ml_dtypes.int4)),
            "scale": np.ascontiguousarray(weight.scales, _NUMPY[compute]),
        }
    if weight.scales.shape[0] != 1:
        raise CheckpointError(
            f"{module} is INT8 in groups of {weight.group}; TensorRT dequantizes INT8 per channel only",
            where=module, fix="re-quantize INT8 per output channel (the int8 and w8a8 recipes), or export --target ort",
        )  # fmt: skip
    return {
        "weight": np.ascontiguousarray(signed.astype(np.int8)),
        "scale": np.ascontiguousarray(weight.scales[0], _NUMPY[compute]),
    }


# ---- the rewrite -----------------------------------------------------------------------------------------


class QuantizedRewrite:
    """Rewrites one traced graph: each packed Linear's ``Transpose(weight) -> MatMul`` becomes integer weights
    in the flavour's form; W8A8 inputs get their static Q/DQ. ``counts`` records what was inserted (L0)."""

    def __init__(self, reader: PackedReader, flavour: Flavour) -> None:
        self.reader, self.flavour = reader, flavour
        self.compute = flavour.compute
        self.counts: Counter[str] = Counter()
        self.modules: list[str] = []
        self._cache: tuple[str, dict[str, np.ndarray]] | None = None

    def __call__(self, model: ir.Model) -> dict[str, Any]:
        graph = model.graph
        self.counts, self.modules = Counter(), []
        for module, spec in self.reader.layout.modules.items():
            value = graph.initializers.get(f"{WRAPPER_PREFIX}{module}.weight")
            if value is not None:
                self._rewrite_linear(graph, module, spec, value)
        if self.flavour.name == "ort":
            for key in FP16_STORED:
                value = graph.initializers.get(f"{WRAPPER_PREFIX}{key}")
                if value is not None and key.removesuffix(".weight") not in self.reader.layout.modules:
                    self._store_fp16(graph, value)
        if any(node.domain == MS_DOMAIN for node in graph):
            model.opset_imports[MS_DOMAIN] = 1
        if any(v.dtype == ir.DataType.INT4 for v in graph.initializers.values()):
            model.opset_imports[""] = INT4_OPSET
        elif any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in graph):
            model.opset_imports[""] = max(model.opset_imports[""], QDQ_OPSET)
        activations = any(self.reader.layout.modules[m].activations for m in self.modules)
        return {"modules": list(self.modules), "activations": activations, "inserted": dict(self.counts)}

    def _arrays(self, module: str) -> dict[str, np.ndarray]:
        """The module's tensors in the flavour's form, read and packed once for the lazy tensors made from them
        (saved one after another, so one module's arrays are held at a time)."""
        if self._cache is None or self._cache[0] != module:
            weight = self.reader.weight(module)
            if self.flavour.name == "ort":
                arrays = matmulnbits_tensors(weight, self.compute)
            else:
                arrays = qdq_tensors(weight, self.compute, module)
            self._cache = (module, arrays)
        return self._cache[1]

    def _lazy(self, name: str, module: str, part: str, dtype: ir.DataType, shape: tuple[int, ...]) -> ir.Value:
        def load() -> ir.TensorProtocol:
            array = self._arrays(module)[part]
            if tuple(array.shape) != shape:
                raise CheckpointError(
                    f"{name}: computed shape {array.shape} differs from the declared {shape}",
                    where=module, fix="report this bug",
                )  # fmt: skip
            return ir.Tensor(array, dtype=dtype, name=name)

        return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape), const_value=ir.LazyTensor(
            load, dtype=dtype, shape=ir.Shape(shape), name=name))  # fmt: skip

    def _rewrite_linear(self, graph: ir.Graph, module: str, spec: PackedModule, weight: ir.Value) -> None:
        transposes = [use.node for use in weight.uses()]
        if not transposes or any(n.op_type != "Transpose" for n in transposes):
            raise CheckpointError(
                f"{module}: expected the traced Linear as Transpose(weight) -> MatMul, found "
                f"{sorted({n.op_type for n in transposes})}",
                where="owl3.export.quantized", fix="report this bug (the exporter's Linear pattern changed)",
            )  # fmt: skip
        matmuls = [use.node for t in transposes for use in t.outputs[0].uses()]
        if not matmuls or any(n.op_type != "MatMul" for n in matmuls):
            raise CheckpointError(
                f"{module}: the transposed weight feeds {sorted({n.op_type for n in matmuls})}, not MatMul",
                where="owl3.export.quantized", fix="report this bug",
            )  # fmt: skip
        activations = self._activation_scales(module, spec)
        symmetric = self.reader.symmetric(module)
        use_nbits = self.flavour.name == "ort"
        if use_nbits:
            weights = self._nbits_initializers(graph, module, spec, symmetric)
        else:
            if not symmetric:
                raise CheckpointError(
                    f"{module} has asymmetric zero points; TensorRT's Q/DQ accepts only symmetric weights",
                    where=module, fix="re-quantize symmetric (owl3-export quantize's default) or export --target ort",
                )  # fmt: skip
            b_value = self._dq_weight(graph, module, spec, before=matmuls[0])
        for matmul in matmuls:
            a = matmul.inputs[0]
            if activations is not None:
                a = self._quantize_input(graph, matmul, a, module, activations)
            if use_nbits:
                self._replace_with_nbits(graph, matmul, a, weights, module, spec)
            else:
                matmul.replace_input_with(0, a)
                matmul.replace_input_with(1, b_value)
        for transpose in transposes:
            graph.remove(transpose, safe=True)
        graph.initializers.pop(weight.name)
        self.modules.append(module)

    def _nbits_initializers(self, graph: ir.Graph, module: str, spec: PackedModule, symmetric: bool) -> list[ir.Value]:
        """B, scales and (asymmetric weights only) zero points, the inputs after A of MatMulNBits."""
        k, n = spec.in_features, spec.out_features
        block = nbits_block(k, spec.group_size)
        blocks = math.ceil(k / block)
        values = [
            self._lazy(f"{module}.nbits_B", module, "B", ir.DataType.UINT8, (n, blocks, block * spec.bits // 8)),
            self._lazy(f"{module}.nbits_scales", module, "scales", _FLOAT[self.compute], (n, blocks)),
        ]
        if not symmetric:
            packed = math.ceil(blocks / 2) if spec.bits == 4 else blocks
            values.append(self._lazy(f"{module}.nbits_zero_points", module, "zero_points", ir.DataType.UINT8,
                                     (n, packed)))  # fmt: skip
        for value in values:
            graph.register_initializer(value)
        return values

    def _dq_weight(self, graph: ir.Graph, module: str, spec: PackedModule, before: ir.Node) -> ir.Value:
        k, n = spec.in_features, spec.out_features
        int4 = spec.bits == 4
        if spec.bits not in (4, 8):
            raise CheckpointError(f"{module}: {spec.bits}-bit weights have no Q/DQ form", where=module,
                                  fix="export --target ort")  # fmt: skip
        scale_shape = (k // spec.group_size, n) if int4 else (n,)
        q = self._lazy(f"{module}.qdq_weight", module, "weight", ir.DataType.INT4 if int4 else ir.DataType.INT8, (k, n))
        s = self._lazy(f"{module}.qdq_scale", module, "scale", _FLOAT[self.compute], scale_shape)
        graph.register_initializer(q)
        graph.register_initializer(s)
        attributes = {"axis": 0, "block_size": spec.group_size} if int4 else {"axis": 1}
        node = ir.node("DequantizeLinear", [q, s], attributes, name=f"{module}/DequantizeLinear_weight")
        node.outputs[0].name = f"{module}.dequantized_weight"
        node.outputs[0].dtype, node.outputs[0].shape = _FLOAT[self.compute], ir.Shape((k, n))
        graph.insert_before(before, node)
        self.counts["DequantizeLinear(weight)"] += 1
        return node.outputs[0]

    def _activation_scales(self, module: str, spec: PackedModule) -> dict[str, np.ndarray] | None:
        if not spec.activations:
            return None
        scale = self.reader.float_tensor(f"{module}.input_scale")
        out = {"scale": scale.float().numpy().reshape(()).astype(_NUMPY[self.compute])}
        if spec.smoothed:
            out["pre_quant_scale"] = (
                self.reader.float_tensor(f"{module}.pre_quant_scale").float().numpy().astype(_NUMPY[self.compute])
            )
        return out

    def _quantize_input(
        self, graph: ir.Graph, matmul: ir.Node, a: ir.Value, module: str, scales: dict[str, np.ndarray]
    ) -> ir.Value:
        dtype = _FLOAT[self.compute]
        if "pre_quant_scale" in scales:
            smooth = self._const(graph, f"{module}.pre_quant_scale", scales["pre_quant_scale"])
            mul = ir.node("Mul", [a, smooth], name=f"{module}/Mul_pre_quant_scale")
            mul.outputs[0].name, mul.outputs[0].dtype, mul.outputs[0].shape = f"{module}.smoothed_input", dtype, a.shape
            graph.insert_before(matmul, mul)
            a = mul.outputs[0]
            self.counts["Mul(pre_quant_scale)"] += 1
        scale = self._const(graph, f"{module}.input_scale", scales["scale"])
        zero = self._const(graph, f"{module}.input_zero_point", np.zeros((), np.int8))
        q = ir.node("QuantizeLinear", [a, scale, zero], name=f"{module}/QuantizeLinear_input")
        q.outputs[0].name, q.outputs[0].dtype, q.outputs[0].shape = (
            f"{module}.quantized_input",
            ir.DataType.INT8,
            a.shape,
        )
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero], name=f"{module}/DequantizeLinear_input")
        dq.outputs[0].name, dq.outputs[0].dtype, dq.outputs[0].shape = f"{module}.dequantized_input", dtype, a.shape
        graph.insert_before(matmul, [q, dq])
        self.counts["QuantizeLinear(input)"] += 1
        return dq.outputs[0]

    def _const(self, graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         shape=ir.Shape(array.shape), const_value=ir.Tensor(array, name=name))  # fmt: skip
        graph.register_initializer(value)
        return value

    def _replace_with_nbits(
        self, graph: ir.Graph, matmul: ir.Node, a: ir.Value, values: list[ir.Value], module: str, spec: PackedModule
    ) -> None:
        k, n = spec.in_features, spec.out_features
        attributes = {"K": k, "N": n, "bits": spec.bits, "block_size": nbits_block(k, spec.group_size),
                      "accuracy_level": self.flavour.accuracy_level}  # fmt: skip
        node = ir.node(
            "MatMulNBits", [a, *values], attributes,
            domain=MS_DOMAIN, name=f"{module}/MatMulNBits_0",
        )  # fmt: skip
        out = node.outputs[0]
        old = matmul.outputs[0]
        out.name, out.dtype, out.shape = f"{module}.matmul_output", _FLOAT[self.compute], old.shape
        graph.insert_before(matmul, node)
        output_name = old.name if old.is_graph_output() else None  # an fp32 lm_head gives "logits" directly
        ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
        graph.remove(matmul, safe=True)
        if output_name is not None:
            out.name = output_name
        self.counts["MatMulNBits"] += 1

    def _store_fp16(self, graph: ir.Graph, value: ir.Value) -> None:
        """Keep a large float weight in fp16 inside an fp32 graph: Gather then Cast; MatMul in fp16 between Casts."""
        value.dtype = ir.DataType.FLOAT16
        value.meta["owl3.storage"] = "fp16"
        for use in list(value.uses()):
            node = use.node
            if node.op_type == "Gather":
                self._cast_output(graph, node, ir.DataType.FLOAT)
            elif node.op_type == "Transpose":
                node.outputs[0].dtype = ir.DataType.FLOAT16
                for matmul in [u.node for u in node.outputs[0].uses()]:
                    a = matmul.inputs[0]
                    cast = ir.node("Cast", [a], {"to": ir.DataType.FLOAT16}, name=f"{matmul.name}/Cast_input")
                    cast.outputs[0].name = f"{matmul.name}.input_fp16"
                    cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.FLOAT16, a.shape
                    graph.insert_before(matmul, cast)
                    matmul.replace_input_with(0, cast.outputs[0])
                    self._cast_output(graph, matmul, ir.DataType.FLOAT)
            else:
                raise CheckpointError(
                    f"{value.name}: unexpected consumer {node.op_type}", where="owl3.export.quantized",
                    fix="report this bug",
                )  # fmt: skip
            self.counts[f"fp16 storage ({node.op_type})"] += 1

    def _cast_output(self, graph: ir.Graph, node: ir.Node, to: ir.DataType) -> None:
        old = node.outputs[0]
        cast = ir.node("Cast", [old], {"to": to}, name=f"{node.name}/Cast_output")
        new = cast.outputs[0]
        new.name, new.dtype, new.shape = f"{old.name}.{to.name.lower()}", to, old.shape
        for use in list(old.uses()):
            if use.node is not cast:
                use.node.replace_input_with(use.idx, new)
        if old.is_graph_output():  # the Cast's output takes the graph output's place and name
            index = list(graph.outputs).index(old)
            name, old.name = old.name, f"{old.name}_fp16"
            new.name = name
            graph.outputs[index] = new
        old.dtype = ir.DataType.FLOAT16
        graph.insert_after(node, cast)


def count_quantized_nodes(path: Path) -> dict[str, Any]:
    """L0 counts of a saved graph: MatMulNBits, weight and input Q/DQ nodes, and the weights that float
    MatMuls still read (``float_matmul_weights``: initializer names, directly or through a Transpose)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in proto.graph.initializer}
    produced = {o: node for node in proto.graph.node for o in node.output}
    counts: Counter[str] = Counter()
    float_weights = []
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            counts["MatMulNBits"] += 1
        elif node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            counts["DequantizeLinear(weight)"] += 1
        elif node.op_type == "QuantizeLinear":
            counts["QuantizeLinear(input)"] += 1
        elif node.op_type == "MatMul":
            b = produced.get(node.input[1])
            source = b.input[0] if b is not None and b.op_type == "Transpose" else node.input[1]
            if source in initializers:
                float_weights.append(source)
    return {**counts, "float_matmul_weights": sorted(float_weights)}


def check_quantized_graph(entry: dict[str, Any], flavour: Flavour, where: str, merged: int = 0) -> None:
    """L0: every packed Linear of the graph became integer weights, and no float MatMul reads one of them;
    ``merged``: Linears that share a node with a sibling (``owl3.export.packing``: n packed in one node count
    n - 1)."""
    from owl3.export.onnx_export import ExportError

    modules, l0 = entry["modules"], entry["l0"]
    expected_node = "MatMulNBits" if flavour.name == "ort" else "DequantizeLinear(weight)"
    left = [w for w in l0["float_matmul_weights"] if w.removesuffix(".weight") in modules]
    problems = [f"float MatMuls still read {left}"] if left else []
    if l0.get(expected_node, 0) != len(modules) - merged:
        packed = f" ({merged} merged into sibling nodes)" if merged else ""
        found = l0.get(expected_node, 0)
        problems.append(f"{found} {expected_node} nodes for {len(modules)} quantized Linears{packed}")
    if entry["activations"] and l0.get("QuantizeLinear(input)", 0) != len(modules):
        problems.append(f"{l0.get('QuantizeLinear(input)', 0)} activation QuantizeLinear for {len(modules)} Linears")
    if problems:
        raise ExportError(f"quantized graph check failed: {'; '.join(problems)}", where=where, fix="report this bug")
