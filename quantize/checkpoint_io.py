"""Streaming checkpoint I/O for the quantizer: modules read one at a time from the source safetensors, and the
output written in bounded shards.

``WeightSource.load`` materialises one module (a decoder layer, a vision layer, the projector) from its
checkpoint tensors. Weights that are about to be quantized are read at full precision; everything that stays in
float is rounded to the output's float dtype (fp16, as GPTQ checkpoints store it), so the quantizer's replay
computes exactly what the written checkpoint will. ``ShardWriter`` collects output tensors and writes a shard
whenever ``max_shard_bytes`` is reached; ``finish`` names the shards ``model-0000i-of-0000N.safetensors`` with
an index, or ``model.safetensors`` when one shard suffices.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Container
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from owl3.errors import CheckpointError
from owl3.model.safetensors_files import INDEX_FILE, SINGLE_FILE, CheckpointFiles
from owl3.model.weights import all_finite

OUTPUT_FLOAT = torch.float16
DEFAULT_SHARD_BYTES = 1 << 30  # bounds what the writer holds in memory (a larger tensor is written at once)
FP32_SUFFIXES = (".input_scale", ".pre_quant_scale")  # W8A8 scales keep fp32


class WeightSource:
    """Reads checkpoint tensors by name (one open file handle per read, nothing cached)."""

    def __init__(self, files: CheckpointFiles, device: torch.device, compute: torch.dtype = torch.float32) -> None:
        self.files, self.device, self.compute = files, device, compute

    def tensor(self, name: str, *, full_precision: bool = False, dtype: torch.dtype | None = None) -> Tensor:
        """One tensor in ``dtype`` (default: the compute dtype); rounded through fp16 unless ``full_precision``.

        Intermediate copies are released as soon as the next exists: a bf16 embedding of 1 GiB peaks at 3 GiB
        on its way to fp32, 2 GiB on its way to fp16."""
        info = self.files.tensors.get(name)
        if info is None:
            raise CheckpointError(f"tensor {name} is missing", where=str(self.files.directory), fix="check the files")
        with safe_open(str(info.file), framework="pt", device="cpu") as handle:
            value = handle.get_tensor(name)
        if not full_precision:
            value = value.to(OUTPUT_FLOAT)
        if not all_finite(value):
            cause = "in the file" if full_precision else "after rounding to fp16 (out of fp16 range)"
            raise CheckpointError(
                f"tensor {name} holds NaN or Inf {cause}",
                where=str(info.file),
                fix="the weights are damaged (download again) or exceed fp16: keep this layer in float with --exclude",
            )
        return value.to(device=self.device, dtype=dtype or self.compute)

    def load(self, module: nn.Module, prefix: str, quantized: Container[str]) -> nn.Module:
        """Materialise ``module`` (built on the meta device) from ``prefix`` + parameter names.

        ``quantized`` holds the full names of modules whose ``weight`` is read at full precision.
        """
        module.to_empty(device=self.device)
        with torch.no_grad():
            for name, param in module.named_parameters():
                owner = prefix + name.removesuffix(".weight")
                full = name.endswith(".weight") and owner in quantized
                param.copy_(self.tensor(prefix + name, full_precision=full))
                param.requires_grad_(False)
        return module.eval()


def tensor_digest(tensor: Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (C order)."""
    value = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{value.dtype}{tuple(value.shape)}".encode())
    digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


class ShardWriter:
    """Output tensors in shards of at most ``max_shard_bytes`` (a larger tensor gets a shard of its own).

    ``digests`` records the sha256 of every tensor as handed over, so the written files can be re-read and
    checked (``owl3.quantize.verify``).
    """

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.directory, self.max_bytes = Path(directory), max_shard_bytes
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0
        self.digests: dict[str, str] = {}

    def add(self, name: str, tensor: Tensor) -> None:
        """Queue ``tensor``: float tensors as fp16, except the W8A8 scales (fp32); integers as they are."""
        if name in self.digests:
            raise ValueError(f"tensor {name} written twice")
        value = tensor.detach()
        if value.is_floating_point() and not name.endswith(FP32_SUFFIXES):
            value = value.to(OUTPUT_FLOAT)
        value = value.to("cpu").contiguous()
        if value.untyped_storage().nbytes() != value.numel() * value.element_size():
            value = value.clone()  # a view of a larger storage: safetensors must not see shared memory
        self.digests[name] = tensor_digest(value)
        nbytes = value.numel() * value.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = value
        self.pending_bytes += nbytes
        self.total += nbytes
        if self.pending_bytes >= self.max_bytes:
            self.flush()

    def add_module(self, prefix: str, module: nn.Module) -> None:
        """Every parameter and buffer of ``module`` under ``prefix``; float parameters as fp16."""
        for name, value in [*module.named_parameters(), *module.named_buffers()]:
            self.add(prefix + name, value)

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.directory / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(path), {"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write what is pending and give the shards their final names; returns the file names."""
        self.flush()
        if len(self.shards) == 1:
            os.replace(self.shards[0][0], self.directory / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map, names = {}, []
        for number, (path, tensors) in enumerate(self.shards, start=1):
            name = f"model-{number:05d}-of-{len(self.shards):05d}.safetensors"
            os.replace(path, self.directory / name)
            weight_map.update(dict.fromkeys(tensors, name))
            names.append(name)
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return names
