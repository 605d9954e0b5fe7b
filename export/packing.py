"""Sibling projections packed into one product: the ONNX Runtime flavour's q/k/v (as GenAI's builder packs them)
and gate/up.

A decoder layer multiplies one normed hidden state by q_proj, k_proj and v_proj, and another by gate_proj and
up_proj. Each product is a ``MatMulNBits`` (integer weights) or a ``MatMul`` with ``Transpose(W)`` (float), each
with its own call into ONNX Runtime's thread pool; k and v have 128 output columns on the 1B-class model, so
their fixed cost is a large part of their time. ``pack_projections`` concatenates the weights of the nodes that
read the same input (and their biases, when every member adds one) along the output columns and splits the
packed product: the same numbers (each output column is computed from its own weight column, as before), one
node instead of three or two. Weights stay lazy: a packed tensor reads its parts when the graph is saved.

``rotary_into_attention`` then gives ``--attention gqa`` ONNX Runtime GenAI's exact layer: a
``GroupQueryAttention`` that takes the packed q/k/v and rotates q and k itself (``do_rotary``) replaces the
``Split`` and the two ``RotaryEmbedding`` nodes in front of it (three nodes fewer per layer).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from owl3.export.fused import MS_DOMAIN


def pack_projections(model: ir.Model) -> dict[str, int]:
    """Pack every group of sibling projections of ``model``'s graph in place; returns {"groups": packed groups,
    "linears": projections in them}."""
    graph = model.graph
    groups: dict[tuple, list[ir.Node]] = defaultdict(list)
    for node in graph:
        key = _sibling_key(node)
        if key is not None:
            groups[key].append(node)
    packed = [members for members in groups.values() if len(members) > 1]
    for members in packed:
        _pack(graph, members)
    return {"groups": len(packed), "linears": sum(len(members) for members in packed)}


def _constant(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer() and value.const_value is not None


def _float_weight(node: ir.Node) -> ir.Value | None:
    """W of ``MatMul(A, Transpose(W))`` with W an initializer [N, K], else None."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return None
    transpose = node.inputs[1].producer() if node.inputs[1] is not None else None
    if transpose is None or transpose.op_type != "Transpose" or len(node.inputs[1].uses()) != 1:
        return None
    perm = transpose.attributes.get("perm")
    weight = transpose.inputs[0]
    if perm is None or list(perm.as_ints()) != [1, 0] or not _constant(weight):
        return None
    return weight


def _sibling_key(node: ir.Node) -> tuple | None:
    """What packable siblings share: the input A, the kind of product and its attributes; None: not packable."""
    a = node.inputs[0] if node.inputs else None
    if a is None:
        return None
    if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
        weights = node.inputs[1:]
        if len(weights) not in (2, 3) or not all(_constant(w) for w in weights):
            return None  # no g_idx or bias inputs: the rewrite never emits them
        attributes = tuple(sorted((k, v.value) for k, v in node.attributes.items() if k != "N"))
        return ("nbits", id(a), attributes, len(weights), weights[1].dtype)
    weight = _float_weight(node)
    if weight is None:
        return None
    return ("float", id(a), weight.dtype, weight.shape[1])


def _bias_add(node: ir.Node, columns: int) -> tuple[ir.Node, ir.Value] | None:
    """The ``Add(out, bias)`` that is the product's only use, with a constant bias [columns]; else None."""
    uses = node.outputs[0].uses()
    if len(uses) != 1 or uses[0].node.op_type != "Add" or node.outputs[0].is_graph_output():
        return None
    add = uses[0].node
    bias = add.inputs[1 - uses[0].idx]
    if not _constant(bias) or bias.shape is None or list(bias.shape) != [columns]:
        return None
    return add, bias


def _concatenated(parts: Sequence[ir.Value], name: str) -> ir.Value:
    """A lazy initializer holding ``parts`` concatenated along axis 0 (read when the graph is saved)."""
    tensors = [part.const_value for part in parts]
    shape = [sum(int(t.shape[0]) for t in tensors), *(int(d) for d in tensors[0].shape[1:])]
    dtype = tensors[0].dtype

    def load() -> ir.TensorProtocol:
        return ir.Tensor(np.concatenate([t.numpy() for t in tensors], axis=0), dtype=dtype, name=name)

    lazy = ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(shape), name=name)
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape), const_value=lazy)


def _pack(graph: ir.Graph, members: list[ir.Node]) -> None:
    first = members[0]
    prefix = packed_module([(node.name or node.outputs[0].name).split("/")[0] for node in members])
    nbits = first.op_type == "MatMulNBits"
    if nbits:
        columns = [node.attributes["N"].as_int() for node in members]
    else:
        columns = [int(_float_weight(node).shape[0]) for node in members]
    adds = [_bias_add(node, n) for node, n in zip(members, columns, strict=True)]
    with_bias = all(add is not None for add in adds)
    new_nodes: list[ir.Node] = []
    if nbits:
        weights = []
        for index, part in enumerate(("B", "scales", "zero_points")[: len(first.inputs) - 1]):
            value = _concatenated([node.inputs[1 + index] for node in members], f"{prefix}.nbits_{part}")
            graph.register_initializer(value)
            weights.append(value)
        attributes = {k: v.value for k, v in first.attributes.items()}
        attributes["N"] = sum(columns)
        product = ir.node("MatMulNBits", [first.inputs[0], *weights], attributes, domain=MS_DOMAIN,
                          name=f"{prefix}/MatMulNBits_0")  # fmt: skip
    else:
        weight = _concatenated([_float_weight(node) for node in members], f"{prefix}.weight")
        graph.register_initializer(weight)
        transpose = ir.node("Transpose", [weight], {"perm": [1, 0]}, name=f"{prefix}/Transpose_0")
        new_nodes.append(transpose)
        product = ir.node("MatMul", [first.inputs[0], transpose.outputs[0]], name=f"{prefix}/MatMul_0")
    new_nodes.append(product)
    out = product.outputs[0]
    out.name = f"{prefix}.matmul_output"
    _same_type(out, first.outputs[0])
    olds = [node.outputs[0] for node in members]
    if with_bias:
        bias = _concatenated([bias for _, bias in adds], f"{prefix}.bias")
        graph.register_initializer(bias)
        add = ir.node("Add", [out, bias], name=f"{prefix}/Add_0")
        new_nodes.append(add)
        out = add.outputs[0]
        out.name = f"{prefix}.output"
        _same_type(out, olds[0])
        olds = [add.outputs[0] for add, _ in adds]
    split_name = f"{prefix}.split"
    sizes = ir.Value(name=split_name, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([len(members)]),
                     const_value=ir.Tensor(np.array(columns, np.int64), name=split_name))  # fmt: skip
    graph.register_initializer(sizes)
    split = ir.node("Split", [out, sizes], {"axis": -1}, num_outputs=len(members), name=f"{prefix}/Split_0")
    new_nodes.append(split)
    graph.insert_before(members[0], new_nodes)
    for old, new in zip(olds, split.outputs, strict=True):
        _take_over(old, new, "unpacked")
    removed = [*([add for add, _ in adds] if with_bias else []), *members]
    transposes = [] if nbits else [node.inputs[1].producer() for node in members]
    unpacked = [value for node in [*removed, *transposes] for value in node.inputs if value is not None]
    graph.remove([*removed, *transposes], safe=True)
    for value in unpacked:  # the parts' initializers, now read only by the packed tensors' loaders
        if value.is_initializer() and not value.uses():
            graph.initializers.pop(value.name, None)


def _take_over(old: ir.Value, new: ir.Value, suffix: str) -> None:
    """``new`` replaces ``old`` everywhere (graph outputs too) under its name, type and shape; ``old`` is renamed
    ``name.suffix`` until its node is removed (names must stay unique)."""
    name = old.name
    _same_type(new, old)
    new.shape = old.shape
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    old.name, new.name = f"{name}.{suffix}", name


def _same_type(value: ir.Value, like: ir.Value) -> None:
    """``like``'s element type on ``value`` (traced values may carry none: then neither does ``value``)."""
    if like.dtype is not None:
        value.dtype = like.dtype


def packed_module(modules: Sequence[str]) -> str:
    """The packed node's module name: the members' shared path and their own names in braces,
    "layers.0.self_attn.{q_proj,k_proj,v_proj}" (``member_modules`` reads it back)."""
    paths = [module.split(".") for module in modules]
    shared = 0
    while all(len(p) > shared + 1 and p[shared] == paths[0][shared] for p in paths):
        shared += 1
    head = ".".join(paths[0][:shared])
    inner = ",".join(".".join(p[shared:]) for p in paths)
    return f"{head}.{{{inner}}}" if head else f"{{{inner}}}"


def member_modules(module: str) -> list[str]:
    """The modules a node's module name stands for: the members of a packed one, else itself."""
    match = re.fullmatch(r"(?:(.*)\.)?\{(.*)\}", module)
    if match is None:
        return [module]
    head, inner = match.groups()
    return [f"{head}.{member}" if head else member for member in inner.split(",")]


def rotary_into_attention(model: ir.Model, positions: str = "position_ids") -> int:
    """Fold the rotary embeddings and the q/k/v ``Split`` of each layer into its ``GroupQueryAttention``
    (``do_rotary``, packed q/k/v as the query, the same cos/sin caches); returns the layers rewritten.

    GroupQueryAttention rotates at positions it derives from ``seqlens_k``: the new rows ``seqlens_k + 1 - S
    + i``, which is where the fused decoder writes them, so it equals the ``RotaryEmbedding`` nodes only when
    ``positions`` (the graph input they read) holds those rows, as the runtime's requests always do (a token's
    position is its cache row). Layers whose rotated q is read elsewhere (hyper layers: the cross-attention
    uses it) or whose q/k/v do not come straight from one packed product (a fp16 graph casts them to its fp32
    islands first) keep their nodes."""
    graph = model.graph
    rewritten = 0
    for node in list(graph):
        parts = _packed_rotary_inputs(node, positions)
        if parts is None:
            continue
        split, rotate_q, rotate_k = parts
        attributes = {key: value.value for key, value in node.attributes.items()}
        attributes.update(do_rotary=1, rotary_interleaved=0)
        cos, sin = rotate_q.inputs[2], rotate_q.inputs[3]
        fused = ir.node("GroupQueryAttention", [split.inputs[0], None, None, *node.inputs[3:7], cos, sin],
                        attributes, domain=MS_DOMAIN, num_outputs=3, name=node.name)  # fmt: skip
        graph.insert_before(node, fused)
        for old, new in zip(node.outputs, fused.outputs, strict=True):
            _take_over(old, new, "unrotated")
        graph.remove([node, rotate_q, rotate_k, split], safe=True)
        rewritten += 1
    return rewritten


def _packed_rotary_inputs(node: ir.Node, positions: str) -> tuple[ir.Node, ir.Node, ir.Node] | None:
    """(Split, RotaryEmbedding of q, of k) when ``node`` is a GroupQueryAttention without rotary whose q and k
    are rotated outputs 0 and 1 of one three-way ``Split`` along the last axis and v is its output 2, each
    read only there, both rotations plain (not interleaved, full head) at the graph input ``positions`` with
    the same caches; else None."""
    if node.op_type != "GroupQueryAttention" or node.domain != MS_DOMAIN or len(node.inputs) != 7:
        return None
    if any(key in node.attributes for key in ("do_rotary", "rotary_interleaved")):
        return None
    q, k, v = node.inputs[:3]
    rotations = [value.producer() if value is not None else None for value in (q, k)]
    if v is None or not all(r is not None and _plain_rotary(r, positions) for r in rotations):
        return None
    rotate_q, rotate_k = rotations
    if rotate_q.inputs[2:] != rotate_k.inputs[2:] or any(len(value.uses()) != 1 for value in (q, k)):
        return None
    split = rotate_q.inputs[0].producer()
    if split is None or split.op_type != "Split" or split.domain not in ("", "ai.onnx"):
        return None
    axis = split.attributes.get("axis")
    if axis is None or axis.as_int() not in (-1, 2) or len(split.outputs) != 3:
        return None
    if list(split.outputs) != [rotate_q.inputs[0], rotate_k.inputs[0], v]:
        return None
    if any(len(value.uses()) != 1 or value.is_graph_output() for value in split.outputs):
        return None
    return split, rotate_q, rotate_k


def _plain_rotary(node: ir.Node, positions: str) -> bool:
    if node.op_type != "RotaryEmbedding" or node.domain != MS_DOMAIN or len(node.inputs) != 4:
        return False
    if node.attributes.get("interleaved") is not None and node.attributes["interleaved"].as_int() != 0:
        return False
    if any(key in node.attributes for key in ("rotary_embedding_dim", "scale", "is_packed_batching")):
        return False
    position_ids = node.inputs[1]
    return position_ids is not None and position_ids.is_graph_input() and position_ids.name == positions
