"""Verification of a freshly written quantized checkpoint, before its manifest makes it a result.

Three checks, the last only where it fits in memory:

1. structure: the checkpoint's names, shapes and dtypes agree with its own ``quantization_config`` exactly as
   ``owl3.load_model`` will demand (``QuantizedLayout.check``), without reading tensor data;
2. bytes: every tensor, read back from the shards one at a time, hashes to what the quantizer handed the writer
   (a transposed or truncated write cannot pass);
3. logits: the checkpoint loaded by ``owl3.load_model`` reproduces the quantizer's own final logits on a few
   calibration samples (fp32 both): cosine >= 1 - 1e-6 for weight-only checkpoints; >= 1 - 1e-4 with INT8
   activations, where a last-bit difference in a matmul can move an activation across a rounding boundary and
   change it by a whole quantization step (a wrong scale or layout gives cosines far below either). Skipped,
   and said so, when loading the whole model would take more than ``LOGITS_MEMORY_SHARE`` of the free RAM or
   more than ``LOGITS_MAX_BYTES``: the stage's own memory bound (one block at a time) must not be broken by
   its check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from owl3.config import Owl3Config
from owl3.errors import Owl3Error
from owl3.model.safetensors_files import discover_checkpoint
from owl3.model.weights import available_ram_bytes, load_model, read_quantization
from owl3.quantize.checkpoint_io import tensor_digest
from owl3.quantize.loading import QuantizedLayout
from owl3.validate.compare import compare_tensors

MIN_COSINE = 1 - 1e-6
MIN_COSINE_ACTIVATIONS = 1 - 1e-4
LOGITS_MEMORY_SHARE = 0.5
LOGITS_MAX_BYTES = 4 << 30


class VerificationError(Owl3Error):
    """The written checkpoint does not hold what the quantizer produced: a bug (exit 1); nothing is kept."""


def verify_checkpoint(
    directory: Path, digests: dict[str, str], reference: list[tuple[int, torch.Tensor]], samples: list[dict[str, Any]]
) -> dict[str, Any]:
    """Run the checks of the module docstring on ``directory``; returns their record for the manifest."""
    config = Owl3Config.from_hf_json(directory)
    files = discover_checkpoint(directory)
    found = {n: (i.shape, i.dtype) for n, i in files.tensors.items()}
    quantization = read_quantization(directory)
    layout = QuantizedLayout.check(config, quantization, found, str(directory))
    _check_bytes(files, digests, directory)
    min_cosine = MIN_COSINE_ACTIVATIONS if quantization.activation_scheme else MIN_COSINE
    record: dict[str, Any] = {"structure": "checked", "tensors_rehashed": len(digests), "min_cosine": min_cosine}
    needed, available = layout.model_bytes(torch.float32), available_ram_bytes()
    budget = min(LOGITS_MAX_BYTES, int(available * LOGITS_MEMORY_SHARE)) if available else LOGITS_MAX_BYTES
    if needed > budget:
        record["logits"] = []
        record["logits_skipped"] = (
            f"loading the whole model takes about {needed / 2**30:.1f} GiB, over this check's budget of "
            f"{budget / 2**30:.1f} GiB; structure and bytes were checked"
        )
        return record
    record["logits"] = _check_logits(directory, reference, samples, min_cosine)
    return record


def _check_bytes(files: Any, digests: dict[str, str], directory: Path) -> None:
    if set(files.tensors) != set(digests):
        raise VerificationError(
            f"internal error: the shards hold {sorted(set(files.tensors) ^ set(digests))[:5]} unexpectedly",
            where=str(directory),
            fix="report this bug; nothing was kept",
        )
    for shard in files.shards:
        with safe_open(str(shard), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if tensor_digest(handle.get_tensor(name)) != digests[name]:
                    raise VerificationError(
                        f"internal error: {name} reads back different from what was written",
                        where=str(shard),
                        fix="report this bug (and check the disk); nothing was kept",
                    )


def _check_logits(
    directory: Path, reference: list[tuple[int, torch.Tensor]], samples: list[dict[str, Any]], min_cosine: float
) -> list[dict[str, Any]]:
    model = load_model(directory, dtype=torch.float32, device="cpu")
    checks = []
    with torch.inference_mode():
        for index, expected in reference:
            sample = samples[index]
            pixels = sample["pixel_values"]
            logits = model(
                torch.from_numpy(sample["input_ids"]),
                None if pixels is None else torch.from_numpy(pixels),
                torch.from_numpy(sample["media_offset"]),
            ).logits
            comparison = compare_tensors(f"sample {index} logits", expected.numpy(), logits.numpy())
            checks.append(comparison.to_json())
            if comparison.cosine < min_cosine or comparison.nan or comparison.inf:
                raise VerificationError(
                    f"internal error: the written checkpoint does not reproduce the quantizer's logits "
                    f"(cosine {comparison.cosine:.8f}, max abs {comparison.max_abs:.3g})",
                    where=f"{directory.name}, calibration sample {index}",
                    fix="report this bug; nothing was kept",
                )
    return checks
