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
    kind: str  # "pytorch" | "onnx" | "engine"
    precision: str
    target: str  # "pytorch" | "onnx-cpu" | "onnx-cuda" | "tensorrt"
    providers: tuple[str, ...]  # what computed: ONNX Runtime's active providers, "TensorRT <version>", torch

    def trace(self, inputs: Inputs) -> dict[str, np.ndarray]: ...

    def generate(self, inputs: Inputs, max_new_tokens: int) -> list[int]: ...


class PyTorchBackend:
    """The native PyTorch model, float or quantized (a GPTQ-format checkpoint, e.g. from ``owl3-export quantize``).

    ``compute`` is the activation dtype; fp16/bf16 run with fp32 islands, as the fp16 export computes. A quantized
    checkpoint's ``precision`` is its class (int4, int8, w8a8) and its name carries the quantization variant, so
    two quantizations of one model are two arms; ``calibration`` is its calibration record (ids hashed).
    """

    kind = "pytorch"
    target = "pytorch"

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
        self.providers = (f"PyTorch {torch.__version__}",)

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


_TARGETS = {"CPUExecutionProvider": "onnx-cpu", "CUDAExecutionProvider": "onnx-cuda",
            "TensorrtExecutionProvider": "tensorrt"}  # fmt: skip


class OnnxBackend:
    """An ONNX export on the torch-free runtime (ONNX Runtime with ``provider``)."""

    kind = "onnx"

    def __init__(self, export_dir: Path, provider: str = "cpu") -> None:
        from owl3.runtime import Owl3Session

        self.session = Owl3Session(export_dir, provider, allow_rejected=True)
        self._describe(provider)

    def _describe(self, requested: str) -> None:
        self.precision = self.session.precision
        self.manifest = self.session.manifest
        self.providers = tuple(self.session.providers)
        self.target = _TARGETS.get(self.providers[0], f"onnx-{self.providers[0]}")
        quantized = self.manifest.get("quantization") or {}
        self.calibration = quantized.get("calibration")  # the quantized checkpoint's, for the overlap check
        suffix = "-trt" if self.session.flavour == "tensorrt" else ""
        if self.session.flavour == "ort" and not self.session.fused:
            suffix = "-unfused"  # the ort flavour without ONNX Runtime's fused operators (for comparison)
        fusions = self.manifest.get("graphs", {}).get("decoder", {}).get("fusions") or {}
        if fusions.get("self_attention", "grouped") != "grouped":  # gqa: name the non-default kernel
            suffix = f"-{fusions['self_attention']}"
        where = "" if requested == "cpu" else f"@{requested}"  # two arms on one export need two names
        self.name = f"{self.kind}-{quantized.get('variant', self.precision)}{suffix}{where}"

    @property
    def graph_sha256(self) -> dict[str, str]:
        """{graph file: sha256} of the graphs this arm ran (for "the same graphs" in the pair gates)."""
        files = self.manifest.get("files", {})
        return {g["file"]: files.get(g["file"], {}).get("sha256", "") for g in self.manifest["graphs"].values()}

    def trace(self, inputs: Inputs) -> dict[str, np.ndarray]:
        out = self.session.trace(inputs["input_ids"], inputs.get("pixel_values"), inputs["media_offset"])
        return {name: np.asarray(value, dtype=np.float32) for name, value in out.items()}

    def generate(self, inputs: Inputs, max_new_tokens: int) -> list[int]:
        tokens = self.session.generate_ids(
            inputs["input_ids"], inputs.get("pixel_values"), inputs["media_offset"], max_new_tokens=max_new_tokens
        )
        return [int(t) for t in tokens[0]]


class EngineBackend(OnnxBackend):
    """TensorRT engines of an export on the torch-free runtime (UNVERIFIED: never run with TensorRT here).
    ``export_dir`` defaults to the export the engine manifest names."""

    kind = "engine"

    def __init__(self, engine_dir: Path, export_dir: Path | None = None) -> None:
        from owl3.runtime import Owl3Session

        self.engine_dir = Path(engine_dir)
        export = export_dir or engine_export_dir(self.engine_dir)
        self.session = Owl3Session(export, "tensorrt", allow_rejected=True, engines=self.engine_dir)
        self._describe("cpu")  # the kind already says TensorRT: engine-fp16-trt, engine-int4-trt
        self.target = "tensorrt"


def engine_export_dir(engine_dir: Path) -> Path:
    """The export an engine directory was built from, as its manifest records it."""
    from owl3.artifacts import read_manifest
    from owl3.runtime.engine_check import ENGINE_SCHEMA

    source = read_manifest(engine_dir, schema=ENGINE_SCHEMA).get("source", {}).get("path")
    if not source:
        raise UsageError(
            "the engine manifest does not name the export it was built from",
            where=str(engine_dir),
            fix="name it: engine:ENGINE_DIR:EXPORT_DIR",
        )
    return Path(source)


BACKEND_SPECS = "pytorch:DIR[:fp32|fp16|bf16], onnx:EXPORT_DIR[:cpu|cuda|tensorrt] or engine:ENGINE_DIR[:EXPORT_DIR]"


def parse_backend_spec(spec: str) -> tuple[str, Path, str]:
    """``kind:PATH[:OPTION]`` -> (kind, path, option or ""); a path that exists keeps its colons."""
    kind, _, rest = spec.partition(":")
    path, _, option = rest.rpartition(":") if rest.count(":") and not Path(rest).exists() else (rest, "", "")
    if kind not in ("pytorch", "onnx", "engine") or not path:
        raise UsageError(f"unknown backend {spec!r}", where="--reference / --candidate", fix=f"use {BACKEND_SPECS}")
    return kind, Path(path), option


def open_backend(spec: str) -> Backend:
    """``pytorch:DIR[:precision]``, ``onnx:DIR[:provider]`` or ``engine:ENGINE_DIR[:EXPORT_DIR]``."""
    kind, path, option = parse_backend_spec(spec)
    if kind == "pytorch":
        return PyTorchBackend(path, option or "fp32")
    if kind == "onnx":
        return OnnxBackend(path, option or "cpu")
    return EngineBackend(path, Path(option) if option else None)
