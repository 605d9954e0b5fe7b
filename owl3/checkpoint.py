"""Write checkpoints in the official Hugging Face layout, for tests and the default demo model.

A checkpoint directory holds ``config.json`` (``Owl3Config.to_hf_dict()``), the weights as
``model.safetensors`` or as shards ``model-0000i-of-0000N.safetensors`` with
``model.safetensors.index.json``, and optionally ``generation_config.json``. It is written into a
staging directory beside the output and renamed into place, so no half-written checkpoint ever sits at
the final path. ``owl3.model.weights.load_model`` reads it back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from owl3.config import Owl3Config
from owl3.errors import UsageError
from owl3.model.safetensors_files import INDEX_FILE, SINGLE_FILE
from owl3.model.weights import (
    LM_HEAD_NAME,
    TableEntry,
    check_against_table,
    table_entries,
)

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
}


def random_state_dict(config: Owl3Config, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Seeded random float32 tensors for every required name of the table (the model's state_dict).

    Linear and embedding weights and all biases are N(0, std); RMSNorm/LayerNorm weights are 1 + N(0, std).
    """
    return _random_tensors(table_entries(config, "required"), seed, std)


def _random_tensors(entries: list[TableEntry], seed: int, std: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape, kind in entries:
        tensor = torch.randn(shape, generator=generator, dtype=torch.float32) * std
        out[name] = tensor + 1.0 if kind == "norm" else tensor
    return out


def save_checkpoint(
    state_dict_or_model: Mapping[str, torch.Tensor] | nn.Module,
    config: Owl3Config,
    out_dir: str | Path,
    *,
    max_shard_bytes: int | None = None,
    include_unused: bool = True,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    generation_eos: int | list[int] | None = None,
    strict: bool = True,
) -> Path:
    """Write ``state_dict_or_model`` and ``config`` as a Hugging Face checkpoint directory; return its path.

    ``max_shard_bytes`` splits the weights into shards with an index; ``include_unused`` adds seeded
    random tensors for the vision head, post_layernorm and last encoder layer, as the real checkpoint may
    hold; ``dtype`` casts floating tensors; ``generation_eos`` writes generation_config.json. ``strict``
    (default) checks the names and shapes against the table first; tests pass ``strict=False`` to write
    deliberately broken checkpoints. Refuses an existing non-empty ``out_dir``.
    """
    out = Path(out_dir)
    _refuse_overwrite(out)
    source = state_dict_or_model.state_dict() if isinstance(state_dict_or_model, nn.Module) else state_dict_or_model
    tensors = dict(source)
    if strict:
        shapes = {n: (tuple(t.shape), _SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype))) for n, t in tensors.items()}
        check_against_table(config, shapes, where="state dict passed to save_checkpoint")
    if include_unused:
        extras = [e for e in table_entries(config, "unused") if e.name != LM_HEAD_NAME and e.name not in tensors]
        tensors.update(_random_tensors(extras, seed + 1, 0.02))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        _write_json(staging / "config.json", config.to_hf_dict())
        if generation_eos is not None:
            _write_json(staging / "generation_config.json", {"eos_token_id": generation_eos})
        _write_weights(staging, tensors, dtype, max_shard_bytes)
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a directory on every platform
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _refuse_overwrite(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(
            f"refusing to overwrite existing {'directory' if out.is_dir() else 'file'}",
            where=str(out),
            fix="choose a new output directory or remove the old one",
        )


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_weights(
    directory: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None, max_shard_bytes: int | None
) -> None:
    """One ``model.safetensors``, or shards of at most ``max_shard_bytes`` (one bigger tensor per shard)."""

    def prepared(tensor: torch.Tensor) -> torch.Tensor:
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        return tensor.detach().to(device="cpu", dtype=target).contiguous().clone()  # clone: no shared storage

    metadata = {"format": "pt"}
    if max_shard_bytes is None:
        save_file({n: prepared(t) for n, t in tensors.items()}, str(directory / SINGLE_FILE), metadata)
        return
    groups = _plan_shards(tensors, dtype, max_shard_bytes)
    weight_map, total = {}, 0
    for number, names in enumerate(groups, start=1):
        shard = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        part = {n: prepared(tensors[n]) for n in names}
        save_file(part, str(directory / shard), metadata)
        weight_map.update(dict.fromkeys(names, shard))
        total += sum(t.numel() * t.element_size() for t in part.values())
        del part
    _write_json(directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _plan_shards(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None, max_bytes: int) -> list[list[str]]:
    """Greedy split in state-dict order, as Hugging Face does."""
    if max_bytes <= 0:
        raise UsageError(
            f"max_shard_bytes must be positive, found {max_bytes}",
            where="save_checkpoint",
            fix="pass a positive size or None for a single file",
        )
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        itemsize = dtype.itemsize if dtype is not None and tensor.is_floating_point() else tensor.element_size()
        nbytes = tensor.numel() * itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups
