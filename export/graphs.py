"""The three exported graphs as thin modules over one ``Owl3Model`` (no forked model code).

Each wrapper holds the model as ``model``, so ONNX initializer names are ``model.<checkpoint key>``: the
exporter maps them straight back to checkpoint tensors (``checkpoint_key``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim

from owl3.export.specs import GraphSpec
from owl3.model.owl3 import Owl3Model, VisualMemory

WRAPPER_PREFIX = "model."
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


def checkpoint_key(initializer_name: str) -> str:
    return initializer_name.removeprefix(WRAPPER_PREFIX)


class VisionGraph(nn.Module):
    """pixel_values [N, 3, S, S] -> image_embeds [N, P, H]: SigLIP to hidden_states[-2], then the projector."""

    def __init__(self, model: Owl3Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model.vision2text_model(self.model.vision_model(pixel_values))


class VisualMemoryGraph(nn.Module):
    """image_embeds [B, n, P, H], image_positions [B, n] -> (K, V) of every hyper layer, MI-RoPE applied once."""

    def __init__(self, model: Owl3Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_embeds: Tensor, image_positions: Tensor) -> list[Tensor]:
        outputs = []
        for index in self.model.config.hyper_layers:
            layer = self.model.language_model.model.layers[index]
            k, v = layer.self_attn.visual_kv(layer.input_layernorm(image_embeds), image_positions)
            outputs += [k, v]
        return outputs


class DecoderGraph(nn.Module):
    """One step of the decoder with KV cache and visual memory (prefill and decode alike)."""

    def __init__(self, model: Owl3Model) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        visible_images: Tensor,
        logit_positions: Tensor,
        past: list[Tensor],
        visual: list[Tensor],
    ) -> tuple[Tensor, list[Tensor]]:
        """The language model on flat past / visual lists (K, V per layer), returning flat presents."""
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        memory = VisualMemory(
            kv=[(visual[2 * j], visual[2 * j + 1]) for j in range(len(visual) // 2)], image_counts=None
        )
        logits, present = self.model.language_model(
            input_ids, position_ids, pairs, memory, visible_images, logit_positions
        )
        return logits, [t for kv in present for t in kv]


def graph_module(name: str, model: Owl3Model, fused: bool = False, attention: str = "grouped") -> nn.Module:
    """The wrapper of graph ``name``; ``fused``: the decoder on ONNX Runtime's kernels (``owl3.export.fused``),
    its self-attention ``attention``."""
    if fused and name == "decoder":
        from owl3.export.fused import FusedDecoderGraph

        return FusedDecoderGraph(model, attention)
    return {"vision": VisionGraph, "visual_memory": VisualMemoryGraph, "decoder": DecoderGraph}[name](model)


def trace_inputs(spec: GraphSpec, device: torch.device | str) -> tuple[tuple[Any, ...], Any]:
    """Example inputs at the spec's sample sizes and the matching ``dynamic_shapes`` (same pytree)."""
    dims = {name: Dim(name) for name in spec.sample}

    def example(index: int) -> Tensor:
        tensor = spec.inputs[index]
        shape = [spec.sample[d] if isinstance(d, str) else d for d in tensor.shape]
        if tensor.name == "total_sequence_length":  # a scalar the fused decoder reads
            return torch.tensor(spec.sample["seq"], dtype=torch.int32, device=device)
        return torch.zeros(shape, dtype=_DTYPES[tensor.dtype], device=device)

    def dynamic(index: int) -> dict[int, Dim]:
        return {axis: dims[d] for axis, d in enumerate(spec.inputs[index].shape) if isinstance(d, str)}

    count = len(spec.inputs)
    if spec.name != "decoder":
        return tuple(example(i) for i in range(count)), tuple(dynamic(i) for i in range(count))
    first_visual = next(i for i, t in enumerate(spec.inputs) if t.name.startswith("visual_"))
    first_past = next(i for i, t in enumerate(spec.inputs) if t.name.startswith("past_"))
    args = (
        *(example(i) for i in range(first_past)),
        [example(i) for i in range(first_past, first_visual)],
        [example(i) for i in range(first_visual, count)],
    )
    shapes = (
        *(dynamic(i) for i in range(first_past)),
        [dynamic(i) for i in range(first_past, first_visual)],
        [dynamic(i) for i in range(first_visual, count)],
    )
    return args, shapes
