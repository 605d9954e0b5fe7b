"""Backends the validator compares, behind one small interface.

A backend answers two questions on preprocessed inputs (numpy, from the model's own processor, identical
for every arm): ``trace`` (a teacher-forced prefill returning every graph output by name: ``logits`` at
every position, ``present_key_i``/``present_value_i`` per layer, ``visual_key_j``/``visual_value_j``,
``image_embeds``) and ``generate`` (greedy new tokens). The PyTorch reference, ONNX exports at any
precision, and later quantized exports and TensorRT engines are the same code path for the validator.

Backends are named by a spec string: ``pytorch:DIR[:fp32|fp16|bf16]`` or ``onnx:DIR[:cpu|cuda|tensorrt]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from owl3.errors import UsageError

Inputs = dict[str, Any]  # input_ids [1, L], media_offset [1, L, 2], pixel_values [N, 3, S, S] or None


class Backend(Protocol):
    name: str
    kind: str  # "pytorch" | "onnx"
    precision: str

    def trace(self, inputs: Inputs) -> dict[str, np.ndarray]: ...

    def generate(self, inputs: Inputs, max_new_tokens: int) -> list[int]: ...


class PyTorchBackend:
    """The native PyTorch model, float or quantized (a GPTQ-format checkpoint, e.g. from ``owl3-export quantize``).

    ``compute`` is the activation dtype; fp16/bf16 run with fp32 islands, as the fp16 export computes. A quantized
    checkpoint's ``precision`` is its class (int4, int8, w8a8) and its name carries the quantization variant, so
    two quantizations of one model are two arms; ``calibration`` is its calibration record (ids hashed).
    """

    kind = "pytorch"

    def __init__(self, model_dir: Path, compute: str = "fp32") -> None:
        import torch

        from owl3.model.weights import load_model

        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        if compute not in dtypes:
            raise UsageError(f"unknown PyTorch precision {compute!r}", where="backend spec", fix=f"use {list(dtypes)}")
        self.model_dir = Path(model_dir)
        self.model = load_model(model_dir, dtype=dtypes[compute])
        self.compute = compute
        self.precision, variant, self.calibration = compute, compute, None
        quantization = getattr(self.model, "quantization", None)
        if quantization is not None:
            from owl3.quantize.loading import checkpoint_identity

            self.precision, variant, self.calibration = checkpoint_identity(self.model_dir, quantization)
            variant += "" if compute == "fp32" else f"-{compute}"
        self.name = f"pytorch-{variant}"

    def _context(self):
        import contextlib

        import torch

        from owl3.model.attention import fp32_islands

        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.compute != "fp32":
            stack.enter_context(fp32_islands())
        return stack

    def trace(self, inputs: Inputs) -> dict[str, np.ndarray]:
        import torch

        model = self.model
        ids = torch.from_numpy(inputs["input_ids"])
        with self._context():
            out: dict[str, np.ndarray] = {}
            memory, visible = None, torch.zeros_like(ids)
            if inputs.get("pixel_values") is not None:
                embeds = model.encode_images(torch.from_numpy(inputs["pixel_values"]))
                memory, visible = model.memory_from_media(embeds, torch.from_numpy(inputs["media_offset"]))
                out["image_embeds"] = embeds.float().numpy()
                for j, (k, v) in enumerate(memory.kv):
                    out[f"visual_key_{j}"], out[f"visual_value_{j}"] = k.float().numpy(), v.float().numpy()
            positions = torch.arange(ids.shape[1])[None].expand_as(ids)
            logits, present = model.language_model(ids, positions, None, memory, visible)
            out["logits"] = logits.numpy()
            for i, (k, v) in enumerate(present):
                out[f"present_key_{i}"], out[f"present_value_{i}"] = k.float().numpy(), v.float().numpy()
        return out

    def generate(self, inputs: Inputs, max_new_tokens: int) -> list[int]:
        import torch

        pixels = inputs.get("pixel_values")
        with self._context():
            tokens = self.model.generate(
                torch.from_numpy(inputs["input_ids"]),
                pixel_values=None if pixels is None else torch.from_numpy(pixels),
                media_offset=torch.from_numpy(inputs["media_offset"]),
                max_new_tokens=max_new_tokens,
            )
        return [int(t) for t in tokens[0]]


class OnnxBackend:
    """An ONNX export on the torch-free runtime."""

    kind = "onnx"

    def __init__(self, export_dir: Path, provider: str = "cpu") -> None:
        from owl3.runtime import Owl3Session

        self.session = Owl3Session(export_dir, provider, allow_rejected=True)
        self.precision = self.session.precision
        self.manifest = self.session.manifest
        quantized = self.manifest.get("quantization") or {}
        self.calibration = quantized.get("calibration")  # the quantized checkpoint's, for the overlap check
        suffix = "-trt" if self.session.flavour == "tensorrt" else ""
        self.name = f"onnx-{quantized.get('variant', self.precision)}{suffix}"

    def trace(self, inputs: Inputs) -> dict[str, np.ndarray]:
        out = self.session.trace(inputs["input_ids"], inputs.get("pixel_values"), inputs["media_offset"])
        return {name: np.asarray(value, dtype=np.float32) for name, value in out.items()}

    def generate(self, inputs: Inputs, max_new_tokens: int) -> list[int]:
        tokens = self.session.generate_ids(
            inputs["input_ids"], inputs.get("pixel_values"), inputs["media_offset"], max_new_tokens=max_new_tokens
        )
        return [int(t) for t in tokens[0]]


def open_backend(spec: str) -> Backend:
    """``pytorch:DIR[:precision]`` or ``onnx:DIR[:provider]``."""
    kind, _, rest = spec.partition(":")
    path, _, option = rest.rpartition(":") if rest.count(":") and not Path(rest).exists() else (rest, "", "")
    if kind == "pytorch":
        return PyTorchBackend(Path(path), option or "fp32")
    if kind == "onnx":
        return OnnxBackend(Path(path), option or "cpu")
    raise UsageError(
        f"unknown backend {spec!r}",
        where="--reference / --candidate",
        fix="use pytorch:DIR[:fp32|fp16|bf16] or onnx:EXPORT_DIR[:cpu|cuda|tensorrt]",
    )
