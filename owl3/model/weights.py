"""Strict loading of mPLUG-Owl3 240728 checkpoints (spec §1): name table, safetensors checks, loader.

Reading order: the declarative name table (what a checkpoint must hold), the strict comparison with what
the files hold (one error listing every missing, unexpected and mis-shaped tensor; headers are read by
``owl3.model.safetensors_files`` without touching tensor data), and ``load_model``. Nothing here unpickles
anything or imports code from a checkpoint directory.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from owl3.config import SUPPORTED, Owl3Config
from owl3.errors import CheckpointError, ConfigError, Owl3Error, ResourceError
from owl3.model.owl3 import Owl3Model
from owl3.model.safetensors_files import (
    FLOAT_DTYPES,
    CheckpointFiles,
    discover_checkpoint,
    natural_order,
    short_list,
)

# ---- name table --------------------------------------------------------------------------------
# (name suffix, shape in the symbols of _dims, kind). ``kind`` says how owl3.checkpoint initialises it.
_Spec = tuple[str, tuple[str, ...], str]


def _linear(name: str, out: str, inp: str, bias: bool = True) -> tuple[_Spec, ...]:
    weight: _Spec = (f"{name}.weight", (out, inp), "weight")
    return (weight, (f"{name}.bias", (out,), "bias")) if bias else (weight,)


def _layer_norm(name: str, dim: str, bias: bool = True) -> tuple[_Spec, ...]:
    weight: _Spec = (f"{name}.weight", (dim,), "norm")
    return (weight, (f"{name}.bias", (dim,), "bias")) if bias else (weight,)


TEXT_ATTENTION = (
    *_linear("self_attn.q_proj", "Q", "H"),
    *_linear("self_attn.k_proj", "KV", "H"),
    *_linear("self_attn.v_proj", "KV", "H"),
    *_linear("self_attn.o_proj", "H", "Q", bias=False),
)
HYPER_EXTRA = (*_linear("self_attn.v_kv_proj", "KV2", "H"), *_linear("self_attn.gate_proj.0", "hd", "hd"))
TEXT_FFN = (
    *_linear("mlp.gate_proj", "I", "H", bias=False),
    *_linear("mlp.up_proj", "I", "H", bias=False),
    *_linear("mlp.down_proj", "H", "I", bias=False),
    *_layer_norm("input_layernorm", "H", bias=False),
    *_layer_norm("post_attention_layernorm", "H", bias=False),
)
VISION_LAYER = (
    *(spec for proj in ("q", "k", "v", "out") for spec in _linear(f"self_attn.{proj}_proj", "Dv", "Dv")),
    *_layer_norm("layer_norm1", "Dv"),
    *_linear("mlp.fc1", "Iv", "Dv"),
    *_linear("mlp.fc2", "Dv", "Iv"),
    *_layer_norm("layer_norm2", "Dv"),
)
VISION_EMBEDDINGS = (
    ("embeddings.patch_embedding.weight", ("Dv", "C", "p", "p"), "weight"),
    ("embeddings.patch_embedding.bias", ("Dv",), "bias"),
    ("embeddings.position_embedding.weight", ("P", "Dv"), "weight"),
)
PROJECTOR = _linear("vision2text_model", "H", "Dv")
LM_HEAD = _linear("language_model.lm_head", "V", "H", bias=False)
# Present in SigLIP checkpoints, never used by the 240728 forward (spec §1.2, §3).
VISION_UNUSED = (
    *_layer_norm("post_layernorm", "Dv"),
    ("head.probe", ("1", "1", "Dv"), "weight"),
    ("head.attention.in_proj_weight", ("Dv3", "Dv"), "weight"),
    ("head.attention.in_proj_bias", ("Dv3",), "bias"),
    *_linear("head.attention.out_proj", "Dv", "Dv"),
    *_layer_norm("head.layernorm", "Dv"),
    *_linear("head.mlp.fc1", "Iv", "Dv"),
    *_linear("head.mlp.fc2", "Dv", "Iv"),
)
LM_HEAD_NAME = LM_HEAD[0][0]


class TableEntry(NamedTuple):
    name: str
    shape: tuple[int, ...]
    kind: str  # "weight", "bias" or "norm"


def _dims(config: Owl3Config) -> dict[str, int]:
    t, v = config.text, config.vision
    kv = t.num_key_value_heads * t.head_dim
    return {
        "H": t.hidden_size,
        "Q": t.num_attention_heads * t.head_dim,
        "KV": kv,
        "KV2": 2 * kv,
        "I": t.intermediate_size,
        "hd": t.head_dim,
        "V": t.vocab_size,
        "Dv": v.hidden_size,
        "Dv3": 3 * v.hidden_size,
        "Iv": v.intermediate_size,
        "C": v.num_channels,
        "p": v.patch_size,
        "P": v.num_patches,
        "1": 1,
    }


def _expand(prefix: str, specs: Iterable[_Spec], dims: Mapping[str, int]) -> list[TableEntry]:
    return [TableEntry(prefix + name, tuple(dims[s] for s in shape), kind) for name, shape, kind in specs]


def table_entries(config: Owl3Config, which: str = "required") -> list[TableEntry]:
    """The name table: ``which="required"`` (the model's parameters) or ``"unused"`` (optional, skipped)."""
    dims, vision_layers = _dims(config), config.vision.num_hidden_layers
    if which == "unused":
        last = f"vision_model.encoder.layers.{vision_layers - 1}."
        out = _expand("vision_model.", VISION_UNUSED, dims) + _expand(last, VISION_LAYER, dims)
        return out + (_expand("", LM_HEAD, dims) if config.text.tie_word_embeddings else [])
    if which != "required":
        raise ValueError(f"which must be 'required' or 'unused', not {which!r}")
    out = _expand("language_model.model.embed_tokens.", (("weight", ("V", "H"), "weight"),), dims)
    for i in range(config.text.num_hidden_layers):
        extra = HYPER_EXTRA if config.is_hyper(i) else ()
        out += _expand(f"language_model.model.layers.{i}.", (*TEXT_ATTENTION, *extra, *TEXT_FFN), dims)
    out += _expand("language_model.model.", _layer_norm("norm", "H", bias=False), dims)
    out += [] if config.text.tie_word_embeddings else _expand("", LM_HEAD, dims)
    out += _expand("vision_model.", VISION_EMBEDDINGS, dims)
    for j in range(vision_layers - 1):  # the last encoder layer's output is never used (spec §3)
        out += _expand(f"vision_model.encoder.layers.{j}.", VISION_LAYER, dims)
    return out + _expand("", PROJECTOR, dims)


def tensor_table(config: Owl3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint must hold for ``config``, with its shape (= the model's state_dict)."""
    return {e.name: e.shape for e in table_entries(config, "required")}


def unused_tensor_table(config: Owl3Config) -> dict[str, tuple[int, ...]]:
    """Tensors accepted whether present or not (shape-checked if present, never loaded)."""
    return {e.name: e.shape for e in table_entries(config, "unused")}


def count_parameters(config: Owl3Config) -> int:
    """Number of parameters of the model (required tensors only), computed without allocating."""
    return sum(math.prod(shape) for shape in tensor_table(config).values())


# ---- strict comparison with the table ---------------------------------------------------------
_HYPER_KEY = re.compile(r"language_model\.model\.layers\.(\d+)\.self_attn\.v_kv_proj\.weight")
# Tensor-name prefixes and suffixes of layouts that are not mPLUG-Owl3 240728, with what they suggest.
FOREIGN_PREFIXES = {
    "multi_modal_projector.": "LLaVA-style", "vision_tower.": "LLaVA-style", "visual.": "Qwen2-VL-style",
    "model.": "a plain decoder (Qwen2/LLaMA-style)", "transformer.": "GPT/Qwen1-style",
    "vpm.": "MiniCPM-V-style", "resampler.": "MiniCPM-V-style",
}  # fmt: skip
QUANTIZED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


def detect_variant(names: Iterable[str], where: str, *, quantized: bool = False) -> None:
    """Refuse layouts of other revisions or architectures before the name-by-name comparison.

    ``quantized``: config.json declares a quantization_config, so GPTQ tensors are expected."""
    names = set(names)
    fused = any(_HYPER_KEY.fullmatch(n) for n in names) and not any(".self_attn.gate_proj." in n for n in names)
    if {"vision2text_model.0.weight", "vision2text_model.2.weight"} & names or fused:
        found = "2-layer projector vision2text_model.0/.2" if not fused else "v_kv_proj without gate_proj"
        raise CheckpointError(
            f"detected the mPLUG-Owl3 7B-241101 variant ({found}: fused hyper attention, MLP projector)",
            where=where,
            fix=f"owl3-export supports only {SUPPORTED}",
        )
    packed = sorted(n for n in names if n.endswith(QUANTIZED_SUFFIXES))
    if packed and not quantized:
        raise CheckpointError(
            f"found GPTQ/AWQ-style tensors ({short_list(packed, 3)}) but config.json has no quantization_config",
            where=where,
            fix="use the config.json written with these weights (owl3-export quantize writes both), "
            f"or the original bf16/fp16 weights ({SUPPORTED})",
        )
    foreign = sorted({label for n in names for p, label in FOREIGN_PREFIXES.items() if n.startswith(p)})
    if foreign:
        raise CheckpointError(
            f"tensor names suggest another architecture ({', '.join(foreign)})",
            where=where,
            fix=f"owl3-export supports only {SUPPORTED}",
        )


def check_against_table(config: Owl3Config, found: Mapping[str, tuple[tuple[int, ...], str]], where: str) -> None:
    """Compare ``{name: (shape, dtype)}`` with the table; raise ONE error listing every mismatch."""
    detect_variant(found, where)
    required = {name: (shape, FLOAT_DTYPES) for name, shape in tensor_table(config).items()}
    compare_tensors(required, unused_tensor_table(config), found, where, fix=_mismatch_hint(config, found))


def compare_tensors(
    required: Mapping[str, tuple[tuple[int, ...], frozenset[str]]],
    optional: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[tuple[int, ...], str]],
    where: str,
    *,
    fix: str,
) -> None:
    """``required`` {name: (shape, allowed dtypes)} and ``optional`` {name: shape} against ``found``: one
    CheckpointError listing every missing, unexpected, mis-shaped and mistyped tensor."""
    missing = [n for n in required if n not in found]
    unexpected = sorted((n for n in found if n not in required and n not in optional), key=natural_order)
    shapes = {**{n: shape for n, (shape, _) in required.items()}, **optional}
    misshaped = [
        f"{n} expected {list(shape)} found {list(found[n][0])}"
        for n, shape in shapes.items()
        if n in found and tuple(found[n][0]) != shape
    ]
    dtypes = [
        f"{n} is {found[n][1]}, expected {'/'.join(sorted(allowed))}"
        for n, (_, allowed) in required.items()
        if n in found and found[n][1] not in allowed
    ]
    parts = [
        f"{len(items)} {label}: {short_list(items)}"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
            ("of the wrong dtype", dtypes),
        )
        if items
    ]
    if parts:
        raise CheckpointError(
            "checkpoint does not match the 240728 layout of its config.json: " + "; ".join(parts),
            where=where,
            fix=fix,
        )


def _mismatch_hint(config: Owl3Config, found: Iterable[str]) -> str:
    in_file = sorted(int(m.group(1)) for n in found if (m := _HYPER_KEY.fullmatch(n)))
    if in_file and tuple(in_file) != config.hyper_layers:
        return (
            f"the tensors have hyper layers at 0-based {in_file}, config.json's hyper_layers (1-based) "
            f"say {[i + 1 for i in config.hyper_layers]}: use the config.json that came with these weights"
        )
    return "use the config.json and weights of the same mPLUG-Owl3 240728 checkpoint"


# ---- loading -----------------------------------------------------------------------------------
_SCAN_CHUNK = 1 << 24  # elements per isfinite() call: bounds the temporary bool tensor to 16 MiB


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    progress: bool | None = None,
) -> Owl3Model:
    """Load a checkpoint directory into an ``Owl3Model`` in ``dtype`` on ``device``, strictly.

    Every header and name is checked before anything is allocated. Tensors are read one at a time and
    copied straight into the target dtype, so the checkpoint never exists twice in memory. ``progress``:
    None shows a one-line progress for multi-shard loads when stderr is a terminal; True/False force it.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(
            f"expected a checkpoint directory, found {'a file' if directory.exists() else 'nothing'}",
            where=str(directory),
            fix="pass the model directory (config.json + safetensors)",
        )
    config = Owl3Config.from_hf_json(directory)
    files = discover_checkpoint(directory)
    found = {n: (i.shape, i.dtype) for n, i in files.tensors.items()}
    quantization = read_quantization(directory)
    if quantization is None:
        check_against_table(config, found, str(directory))
        build, model_bytes = _build_empty_model, count_parameters(config) * dtype.itemsize
    else:
        from owl3.quantize.loading import QuantizedLayout

        layout = QuantizedLayout.check(config, quantization, found, str(directory))
        build, model_bytes = layout.build_empty_model, layout.model_bytes(dtype)
    device = torch.device(device)
    largest = max((i.end - i.begin for i in files.tensors.values()), default=0)
    check_memory(model_bytes, largest, device)
    model = build(config, dtype, device)
    show = progress if progress is not None else len(files.shards) > 1 and sys.stderr.isatty()
    non_finite = _copy_weights(model, files, show)
    if non_finite:
        raise CheckpointError(
            f"{len(non_finite)} tensors hold NaN or Inf: {short_list(non_finite)}",
            where=str(directory),
            fix="the weights are damaged (download again) or overflow this dtype (load bfloat16 or float32)",
        )
    if quantization is not None:
        from owl3.quantize.loading import check_loaded

        check_loaded(model)
    model.eos_token_ids = read_eos_token_ids(directory, config)
    model.image_token_id = read_image_token_id(directory)
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def read_quantization(directory: Path):
    """The checkpoint's ``quantization_config`` (owl3.quantize.gptq_format), or None for float weights."""
    from owl3.config import read_config_json

    raw = read_config_json(Path(directory) / "config.json")
    if "quantization_config" not in raw and not (Path(directory) / "quantize_config.json").is_file():
        return None
    from owl3.quantize.gptq_format import read_quantization_config

    return read_quantization_config(directory, raw)


def _build_empty_model(config: Owl3Config, dtype: torch.dtype, device: torch.device) -> Owl3Model:
    """The model with uninitialised storage in ``dtype`` on ``device``; no float32 copy is ever made."""
    with torch.device("meta"):
        model = Owl3Model(config).to(dtype)
    if list(model.buffers()):  # to_empty would leave them as garbage
        raise Owl3Error(
            "internal error: Owl3Model has buffers; the loader assumes it has none",
            where="owl3.model.weights",
            fix="report this bug",
        )
    model.to_empty(device=device)
    names, table = {n for n, _ in model.named_parameters()}, set(tensor_table(config))
    if names != table:
        raise Owl3Error(
            f"internal error: Owl3Model parameters differ from the name table: {short_list(sorted(names ^ table))}",
            where="owl3.model.weights",
            fix="report this bug",
        )
    return model


@torch.no_grad()
def _copy_weights(model: torch.nn.Module, files: CheckpointFiles, show: bool) -> list[str]:
    """Copy every required tensor shard by shard; return the tensors holding NaN/Inf (with their file)."""
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}  # quantized layers: buffers
    total = sum(i.end - i.begin for n, i in files.tensors.items() if n in params) >> 20
    done, bad = 0, []
    for number, shard in enumerate(files.shards, start=1):
        infos = sorted(
            (i for i in files.tensors.values() if i.file == shard and i.name in params), key=lambda i: i.begin
        )
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for info in infos:  # in file order: sequential reads, one source tensor alive at a time
                    source = f.get_tensor(info.name)
                    target = params[info.name]
                    target.copy_(source)
                    if not all_finite(target):
                        cause = "in the file" if not all_finite(source) else f"overflows {target.dtype}"
                        bad.append(f"{info.name} ({shard.name}, {cause})")
                    del source
                    done += info.end - info.begin
                    if show:
                        line = f"loading weights: shard {number}/{len(files.shards)} {shard.name}"
                        print(f"\r{line} {done >> 20}/{total} MiB", end="", file=sys.stderr, flush=True)
        except (OSError, SafetensorError) as exc:  # the file changed after it was checked
            raise CheckpointError(f"reading failed: {exc}", where=str(shard), fix="check the file") from exc
    if show:
        print(file=sys.stderr, flush=True)
    return bad


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf, checked in chunks of 16M elements (isfinite on a whole tensor allocates several copies)."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + _SCAN_CHUNK]).all()) for i in range(0, flat.numel(), _SCAN_CHUNK))


def read_image_token_id(directory: Path) -> int | None:
    """The ``<|image|>`` id from the checkpoint's tokenizer.json (None when the directory has no tokenizer)."""
    if not (Path(directory) / "tokenizer.json").is_file():
        return None
    from owl3.tokenizer import load_tokenizer, token_id

    return token_id(load_tokenizer(directory), "<|image|>")


def read_eos_token_ids(directory: Path, config: Owl3Config) -> tuple[int, ...]:
    """Stop tokens: generation_config.json ``eos_token_id``, else config eos plus bos.

    The fallback mirrors the official generate, which stops on <|im_end|> (Qwen2 eos) and <|endoftext|>
    (which Qwen2 configs name as bos_token_id).
    """
    path = Path(directory) / "generation_config.json"
    if path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"generation_config.json is not valid JSON: {exc}",
                where=str(path),
                fix="restore the file or remove it",
            ) from exc
        eos = raw.get("eos_token_id") if isinstance(raw, dict) else None
        if eos is not None:
            return _token_ids(eos, str(path))
    ids = (
        _token_ids(config.text.eos_token_id, "config.json eos_token_id") if config.text.eos_token_id is not None else ()
    )
    bos = config.text.bos_token_id
    return ids + ((bos,) if bos is not None and bos not in ids else ())


def _token_ids(value: object, where: str) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(type(v) is int and v >= 0 for v in values):
        raise ConfigError(
            f"eos_token_id must be a token id or a list of them, found {value!r}",
            where=where,
            fix="fix the file",
        )
    return tuple(dict.fromkeys(values))


def available_ram_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable from /proc/meminfo, or None where it cannot be read (not Linux)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(model_bytes: int, staging_bytes: int, device: torch.device) -> None:
    """Refuse a load that cannot fit: RAM (model if on CPU, plus one tensor being read) and GPU memory."""
    need_ram = staging_bytes + (model_bytes if device.type == "cpu" else 0)
    available = available_ram_bytes()
    if available is not None and need_ram > available:
        raise ResourceError(
            f"loading needs about {need_ram / 2**30:.1f} GiB of RAM, {available / 2**30:.1f} GiB available",
            where="MemAvailable in /proc/meminfo",
            fix="free memory, load in bfloat16/float16 (half of float32), or use a machine with more RAM",
        )
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        if model_bytes > free:
            raise ResourceError(
                f"the model needs {model_bytes / 2**30:.1f} GiB of GPU memory, {free / 2**30:.1f} GiB free",
                where=str(device),
                fix="free GPU memory or load in a smaller dtype",
            )
