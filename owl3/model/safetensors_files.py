"""safetensors files of a checkpoint, read without trusting them (spec reliability: trust boundaries).

Headers are parsed here, not by the safetensors library, so that every inconsistency (truncation,
overlapping or out-of-range offsets, wrong byte lengths, duplicate keys) is caught before any tensor data
is read. Layout discovery finds ``model.safetensors`` or an index with shards and refuses pickle files.
"""

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from owl3.errors import CheckpointError

# ---- safetensors headers -----------------------------------------------------------------------
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1,
}  # fmt: skip
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit of the safetensors library itself


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    begin: int  # offsets into the data section (after the header)
    end: int


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _load_json(raw: bytes | str, where: Path, what: str) -> dict[str, Any]:
    """Parse a JSON object, refusing duplicate keys (a later entry must never silently win)."""
    try:
        value = json.loads(raw, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise CheckpointError(f"{what} names {exc} twice", where=str(where), fix="re-export the file") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{what} is not valid JSON: {exc}", where=str(where), fix="re-download it") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} is not a JSON object", where=str(where), fix="re-download it")
    return value


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors file's header against its size; reads no tensor data."""
    path = Path(path)
    fix = "the file is damaged or truncated (interrupted download?): download it again"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < header_len <= min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"header length {header_len} is absurd for a file of {size} bytes", where=str(path), fix=fix
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"cannot read the file: {exc}", where=str(path), fix="check the path") from exc
    header = _load_json(raw, path, "safetensors header")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise CheckpointError("__metadata__ is not a JSON object", where=str(path), fix=fix)
    tensors = {name: _parse_entry(path, name, desc) for name, desc in header.items()}
    _check_offsets(path, tensors.values(), data_len=size - 8 - header_len)
    return tensors


def _parse_entry(path: Path, name: str, desc: object) -> TensorInfo:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{what}", where=f"{path}, tensor {name}", fix="re-download or re-export the file")

    if not isinstance(desc, dict):
        raise bad("header entry is not an object")
    dtype, shape, offsets = desc.get("dtype"), desc.get("shape"), desc.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise bad(f"unknown dtype {dtype!r} (known: {', '.join(DTYPE_SIZES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise bad(f"data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if not 0 <= begin <= end or end - begin != nbytes:
        raise bad(f"data_offsets {offsets} hold {end - begin} bytes, but {dtype} {shape} needs {nbytes}")
    return TensorInfo(name, dtype, tuple(shape), path, begin, end)


def _check_offsets(path: Path, tensors: Iterable[TensorInfo], data_len: int) -> None:
    """Tensors must tile the data section exactly: no gap, no overlap, nothing after, nothing missing."""
    position = 0
    for info in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if info.begin != position:
            kind = "overlaps the previous tensor" if info.begin < position else "leaves a gap before it"
            raise CheckpointError(
                f"tensor data is not contiguous: {info.name} at offset {info.begin} {kind} (expected {position})",
                where=str(path),
                fix="re-export the file with safetensors",
            )
        position = info.end
    if data_len != position:
        found = "truncated" if data_len < position else "has trailing bytes"
        raise CheckpointError(
            f"file {found}: header needs {position} data bytes, file holds {data_len}",
            where=str(path),
            fix="the file is damaged (interrupted download?): download it again and compare its size",
        )


# ---- layout discovery --------------------------------------------------------------------------
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class CheckpointFiles:
    """A checked safetensors layout: shards in load order and every tensor they hold."""

    directory: Path
    shards: tuple[Path, ...]
    tensors: dict[str, TensorInfo]


def discover_checkpoint(directory: str | Path) -> CheckpointFiles:
    """Find and check the weights of a checkpoint directory: every header, the index, no duplicates."""
    directory = Path(directory)
    single, index = directory / SINGLE_FILE, directory / INDEX_FILE
    if single.exists() and index.exists():
        raise CheckpointError(
            f"both {SINGLE_FILE} and {INDEX_FILE} exist; which one holds the model is ambiguous",
            where=str(directory),
            fix="remove the stale one",
        )
    if single.exists():
        return CheckpointFiles(directory, (single,), read_safetensors_header(single))
    if index.exists():
        return _discover_sharded(directory, index)
    _refuse_other_weights(directory)


def _refuse_other_weights(directory: Path) -> NoReturn:
    files = sorted(p.name for p in directory.iterdir() if p.is_file())
    pickles = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise CheckpointError(
            f"found only pickle weights ({', '.join(pickles)}); owl3-export never unpickles (pickle can execute code)",
            where=str(directory),
            fix="on a trusted machine convert them: from safetensors.torch import save_file; "
            "save_file({k: v.contiguous().clone() for k, v in torch.load(p, weights_only=True).items()}, "
            "'model.safetensors')",
        )
    others = [name for name in files if name.endswith(".safetensors")]
    raise CheckpointError(
        f"expected {SINGLE_FILE} or {INDEX_FILE}, found "
        + (f"only {', '.join(others)}" if others else "no weights files"),
        where=str(directory),
        fix="point to the Hugging Face model directory of mPLUG-Owl3 (config.json + safetensors weights)",
    )


def _discover_sharded(directory: Path, index_path: Path) -> CheckpointFiles:
    weight_map = _load_json(index_path.read_bytes(), index_path, INDEX_FILE).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            "index has no weight_map of tensor -> shard file",
            where=str(index_path),
            fix="re-download the index",
        )
    shard_names = sorted(set(weight_map.values()))
    bad_names = [n for n in shard_names if Path(n).name != n or n.startswith(".")]
    missing = [n for n in shard_names if n not in bad_names and not (directory / n).is_file()]
    if bad_names or missing:
        raise CheckpointError(
            f"index names shard files that are {'missing' if missing else 'outside the directory'}: "
            + short_list(missing + bad_names),
            where=str(index_path),
            fix="download every shard listed in the index into the same directory",
        )
    shards = tuple(directory / n for n in shard_names)
    tensors: dict[str, TensorInfo] = {}
    duplicates: list[str] = []
    for shard in shards:
        for name, info in read_safetensors_header(shard).items():
            if name in tensors:
                duplicates.append(f"{name} ({tensors[name].file.name} and {shard.name})")
            tensors.setdefault(name, info)
    if duplicates:
        raise CheckpointError(
            f"tensors stored in more than one shard: {short_list(duplicates)}",
            where=str(directory),
            fix="re-export the checkpoint",
        )
    problems = [
        f"{name}: index says {shard}, "
        + (f"found in {tensors[name].file.name}" if name in tensors else "no listed shard holds it")
        for name, shard in weight_map.items()
        if name not in tensors or tensors[name].file.name != shard
    ]
    problems += [
        f"{name}: in {info.file.name}, not in the index" for name, info in tensors.items() if name not in weight_map
    ]
    if problems:
        raise CheckpointError(
            f"index and shards disagree: {short_list(problems)}",
            where=str(index_path),
            fix="re-download the index and shards of the same revision",
        )
    return CheckpointFiles(directory, shards, tensors)


def natural_order(name: str) -> list[tuple[int, int | str]]:
    """Sort key: layer numbers compare as numbers (layers.2 before layers.10)."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in name.split(".")]


def short_list(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")
