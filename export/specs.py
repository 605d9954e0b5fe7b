"""Declarative specs of the three exported graphs (torch-free: the runtime reads the same names).

vision         in:  pixel_values [num_images, 3, S, S]
               out: image_embeds [num_images, P, H]
visual_memory  in:  image_embeds [batch, max_images, P, H], image_positions [batch, max_images] (int64)
               out: visual_key_j, visual_value_j [batch, nkv, max_images*P, hd] per hyper layer j
decoder        in:  input_ids, position_ids, visible_images [batch, seq] (int64),
                    logit_positions [batch, logit_count] (int64): the positions projected to logits,
                    past_key_i, past_value_i [batch, nkv, past, hd] per layer i,
                    visual_key_j, visual_value_j [batch, nkv, visual, hd] per hyper layer j
               out: logits [batch, logit_count, V] (float32), present_key_i, present_value_i [batch, nkv, past+seq, hd]

The fused decoder (the ONNX Runtime flavour, ``fused=True``; ``owl3.export.fused``) keeps the cache in place:
               in:  as above, plus seqlens_k [batch] (int32, total - 1) and total_sequence_length [] (int32)
                    after logit_positions; past_key_i, past_value_i [batch, nkv, capacity, hd] are buffers
                    (capacity >= total; float32 in every precision) whose first total - seq rows are the past
               out: logits, present_key_i, present_value_i [batch, nkv, capacity, hd]: the same buffers with the
                    seq new rows written (in place when bound to the same memory)

``visible_images[b, t]`` is how many of sample b's images token t sees: ``seen(t)`` for prompt tokens,
the sample's image count for generated tokens, 0 for no cross-attention. ``past`` and ``visual`` may be 0.
String dims are dynamic; ``sample`` gives the sizes the exporter traces with (all >= 2, so torch.export
never specialises a dynamic dim to 0 or 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from owl3.config import Owl3Config

ATTENTION_KERNELS = ("grouped", "gqa")  # the fused decoder's self-attention (owl3.export.fused)
OPSET = 18  # >= 18: the ONNX Runtime 4-bit quantizer produces invalid models from opset-17 graphs
PRECISIONS = ("fp32", "fp16")  # float exports; quantized ones compute in one of these
EXPORT_PRECISIONS = (*PRECISIONS, "int8", "int4", "w8a8")
FLAVOURS = ("ort", "tensorrt")  # quantized exports: ONNX Runtime (MatMulNBits) or TensorRT (standard Q/DQ)
ACCURACY_LEVELS = (0, 4)  # MatMulNBits: 0 exact fp32 math, 4 int8 activations per block
ACCURACY_LEVEL = 4  # the default, by measurement (README "Quantized export")
GRAPH_NAMES = ("vision", "visual_memory", "decoder")
SCHEMA = "owl3-export/onnx"  # manifest kind of an export directory
SCHEMA_VERSION = 1


def past_key(i: int) -> str:
    return f"past_key_{i}"


def past_value(i: int) -> str:
    return f"past_value_{i}"


def present_key(i: int) -> str:
    return f"present_key_{i}"


def present_value(i: int) -> str:
    return f"present_value_{i}"


def visual_key(j: int) -> str:
    return f"visual_key_{j}"


def visual_value(j: int) -> str:
    return f"visual_value_{j}"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float32" | "float16" | "int64" | "int32"
    shape: tuple[int | str, ...]

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sample: dict[str, int]  # trace sizes of the dynamic dims

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def signature(self) -> dict[str, object]:
        return {
            "file": self.file,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }


def float_dtype(precision: str) -> str:
    return {"fp32": "float32", "fp16": "float16"}[precision]


def graph_specs(config: Owl3Config, precision: str, fused: bool = False) -> dict[str, GraphSpec]:
    """The three graph specs of ``config`` at ``precision`` (fp32 | fp16); ``fused``: the in-place decoder."""
    f = float_dtype(precision)
    text, size = config.text, config.vision.image_size
    p, h, nkv, hd = config.image_tokens, text.hidden_size, text.num_key_value_heads, text.head_dim
    layers, hyper = range(text.num_hidden_layers), range(len(config.hyper_layers))
    vision = GraphSpec(
        "vision",
        inputs=(TensorSpec("pixel_values", f, ("num_images", 3, size, size)),),
        outputs=(TensorSpec("image_embeds", f, ("num_images", p, h)),),
        sample={"num_images": 2},
    )
    memory = GraphSpec(
        "visual_memory",
        inputs=(
            TensorSpec("image_embeds", f, ("batch", "max_images", p, h)),
            TensorSpec("image_positions", "int64", ("batch", "max_images")),
        ),
        outputs=tuple(
            TensorSpec(name(j), f, ("batch", nkv, "visual", hd)) for j in hyper for name in (visual_key, visual_value)
        ),
        sample={"batch": 2, "max_images": 2},
    )
    past, present = ("capacity", "capacity") if fused else ("past", "past+seq")
    cache = "float32" if fused else f  # the fused decoder's cache and attention are fp32 (owl3.export.fused)
    cache_inputs = (
        (TensorSpec("seqlens_k", "int32", ("batch",)), TensorSpec("total_sequence_length", "int32", ()))
        if fused
        else ()
    )
    decoder = GraphSpec(
        "decoder",
        inputs=(
            TensorSpec("input_ids", "int64", ("batch", "seq")),
            TensorSpec("position_ids", "int64", ("batch", "seq")),
            TensorSpec("visible_images", "int64", ("batch", "seq")),
            TensorSpec("logit_positions", "int64", ("batch", "logit_count")),
            *cache_inputs,
            *(TensorSpec(name(i), cache, ("batch", nkv, past, hd)) for i in layers for name in (past_key, past_value)),
            *(
                TensorSpec(name(j), f, ("batch", nkv, "visual", hd))
                for j in hyper
                for name in (visual_key, visual_value)
            ),
        ),
        outputs=(
            TensorSpec("logits", "float32", ("batch", "logit_count", text.vocab_size)),
            *(
                TensorSpec(name(i), cache, ("batch", nkv, present, hd))
                for i in layers
                for name in (present_key, present_value)
            ),
        ),
        sample={"batch": 2, "seq": 3, "logit_count": 2, past: 8 if fused else 4, "visual": 2 * p},
    )
    return {spec.name: spec for spec in (vision, memory, decoder)}
