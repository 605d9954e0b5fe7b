"""The GPTQ checkpoint format: ``quantization_config`` as GPTQModel writes it, read back strictly, and the tensor
table of a quantized Owl3 checkpoint (shared docs, quantization.md §2).

Which layers are quantized is stated both ways the readers expect:
- GPTQModel: ``dynamic`` holds ``+:regex`` overrides (a layer whose group size adapts to K, an 8-bit lm_head)
  and ``-:regex`` entries for every Linear kept in float (first match wins, ``re.match`` semantics);
- transformers / optimum: ``block_name_to_quantize`` and ``modules_in_block_to_quantize`` (the true-sequential
  groups of a decoder block); they convert only Linear layers inside those blocks.

W8A8 is this layout plus per-module ``input_scale`` (static per-tensor INT8) and, where SmoothQuant could not
fold into a norm, ``pre_quant_scale`` tensors; ``activation_scheme: "static"`` says so.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owl3.errors import CheckpointError, ConfigError
from owl3.quantize.qlinear import GPTQ_V1, GPTQ_V2
from owl3.quantize.qmath import pack_factor

QUANTIZE_CONFIG_FILE = "quantize_config.json"
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
W8A8_SUFFIXES = ("input_scale", "pre_quant_scale")
BLOCK_NAME = "language_model.model.layers"
LM_HEAD = "language_model.lm_head"  # module name
SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.v_kv_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class QuantizationConfig:
    """What a quantized checkpoint declares (the ``quantization_config`` of its config.json)."""

    bits: int
    group_size: int  # -1: per output channel
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = GPTQ_V1
    dynamic: dict[str, dict[str, Any]] = field(default_factory=dict)
    activation_scheme: str | None = None  # "static": W8A8
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    def scheme_for(self, module: str) -> tuple[int, int] | None:
        """(bits, group size or -1) that ``dynamic`` gives ``module``; None when a ``-:`` rule keeps it float."""
        for key, overrides in self.dynamic.items():
            negative = key.startswith("-:")
            pattern = key[2:] if key.startswith(("-:", "+:")) else key
            if re.match(pattern, module):
                if negative:
                    return None
                return int(overrides.get("bits", self.bits)), int(overrides.get("group_size", self.group_size))
        return self.bits, self.group_size


def config_dict(
    *,
    bits: int,
    group_size: int,
    overrides: Mapping[str, tuple[int, int]],
    float_patterns: list[str],
    lm_head: bool,
    activations: bool,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """``quantization_config`` / quantize_config.json: GPTQModel's keys, our per-layer choices in ``dynamic``.

    ``overrides``: module name -> (bits, group size) where it differs from the global one; ``float_patterns``:
    regexes of the Linear layers kept in float.
    """
    dynamic: dict[str, dict[str, Any]] = {f"-:{pattern}": {} for pattern in float_patterns}
    for module, (layer_bits, layer_group) in overrides.items():
        entry = {**({"bits": layer_bits} if layer_bits != bits else {}), "group_size": layer_group}
        dynamic[f"+:^{re.escape(module)}$"] = entry
    out: dict[str, Any] = {
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": True,
        "lm_head": lm_head,
        "quant_method": "gptq",
        "method": "gptq",
        "checkpoint_format": GPTQ_V1,
        "format": GPTQ_V1,
        "pack_dtype": "int32",
        "dynamic": dynamic,
        "block_name_to_quantize": BLOCK_NAME,
        "modules_in_block_to_quantize": [list(group) for group in SEQUENTIAL_GROUPS],
        "meta": meta,
    }
    if activations:
        out.update({"activation_scheme": "static", "activation_bits": 8})
    return out


def read_quantization_config(directory: Path, raw_config: Mapping[str, Any]) -> QuantizationConfig | None:
    """The checkpoint's quantization, from config.json (or quantize_config.json); None for a float checkpoint."""
    where = str(Path(directory) / "config.json")
    declared = raw_config.get("quantization_config")
    side = Path(directory) / QUANTIZE_CONFIG_FILE
    side_raw = _read_side(side) if side.is_file() else None
    if declared is None and side_raw is None:
        return None
    if declared is not None and side_raw is not None and _core(declared) != _core(side_raw):
        raise ConfigError(
            "config.json quantization_config and quantize_config.json disagree: "
            f"{_core(declared)} vs {_core(side_raw)}",
            where=str(directory),
            fix="keep the pair written together by the quantizer",
        )
    raw = declared if declared is not None else side_raw
    if declared is None:
        where = str(side)
    return _parse(raw, where)


def _read_side(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"not valid JSON: {exc}", where=str(path), fix="restore the file") from exc
    if not isinstance(value, dict):
        raise ConfigError("not a JSON object", where=str(path), fix="restore the file")
    return value


def _core(raw: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("bits", "group_size", "sym", "desc_act", "dynamic")
    return {k: raw.get(k) for k in keys} | {"format": _format_of(raw)}


def _format_of(raw: Mapping[str, Any]) -> Any:
    return raw.get("checkpoint_format", raw.get("format", GPTQ_V1))


def _parse(raw: Any, where: str) -> QuantizationConfig:
    def bad(problem: str, fix: str) -> ConfigError:
        return ConfigError(problem, where=f"{where} quantization_config", fix=fix)

    if not isinstance(raw, dict):
        raise bad("quantization_config is not a JSON object", "restore config.json")
    method = raw.get("quant_method", raw.get("method"))
    if method != "gptq":
        raise bad(f"quant_method {method!r} is not supported", "owl3-export reads GPTQ checkpoints only")
    bits, group = raw.get("bits"), raw.get("group_size", -1)
    if bits not in (4, 8):
        raise bad(f"bits {bits!r} is not supported", "owl3-export reads 4- and 8-bit GPTQ checkpoints")
    if type(group) is not int or (group != -1 and (group < 16 or group & (group - 1))):
        raise bad(f"group_size {group!r} is not -1 or a power of two >= 16", "re-quantize with group_size 128")
    if raw.get("sym", True) is not True:
        raise bad("asymmetric (sym: false) weights are not supported", "re-quantize with sym=True (TensorRT needs it)")
    fmt = _format_of(raw)
    if fmt not in (GPTQ_V1, GPTQ_V2):
        raise bad(f"checkpoint_format {fmt!r} is not supported", f"use {GPTQ_V1!r} or {GPTQ_V2!r}")
    if raw.get("pack_dtype", "int32") != "int32":
        raise bad(f"pack_dtype {raw.get('pack_dtype')!r} is not supported", "re-quantize with pack_dtype int32")
    dynamic = raw.get("dynamic") or {}
    if not isinstance(dynamic, dict) or not all(isinstance(v, dict) for v in dynamic.values()):
        raise bad("dynamic must map patterns to override objects", "restore config.json")
    for key in dynamic:
        try:
            re.compile(key[2:] if key.startswith(("-:", "+:")) else key)
        except re.error as exc:
            raise bad(f"dynamic pattern {key!r} is not a regular expression ({exc})", "restore config.json") from exc
    scheme = raw.get("activation_scheme")
    if scheme not in (None, "static"):
        raise bad(f"activation_scheme {scheme!r} is not supported", "use 'static' (W8A8) or none")
    return QuantizationConfig(
        bits=bits, group_size=group, sym=True, desc_act=bool(raw.get("desc_act", False)), checkpoint_format=fmt,
        dynamic=dict(dynamic), activation_scheme=scheme, raw=dict(raw),
    )  # fmt: skip


# ---- the tensor table of a quantized module ------------------------------------------------------------------


def quantized_tensors(module: str, in_features: int, out_features: int, bits: int, group_size: int) -> dict:
    """{name: (shape, safetensors dtype)} of one GPTQ-packed Linear (bias and W8A8 scales not included)."""
    pf = pack_factor(bits)
    groups = in_features // group_size
    return {
        f"{module}.qweight": ((in_features // pf, out_features), "I32"),
        f"{module}.qzeros": ((groups, out_features // pf), "I32"),
        f"{module}.scales": ((groups, out_features), "F16"),
        f"{module}.g_idx": ((in_features,), "I32"),
    }


def packing_problem(module: str, in_features: int, out_features: int, bits: int, group_size: int) -> str | None:
    """Why ``module`` cannot be GPTQ-packed with these settings (None when it can)."""
    pf = pack_factor(bits)
    if in_features % group_size:
        return f"{module}: in_features {in_features} is not a multiple of group_size {group_size}"
    if in_features % pf or out_features % pf:
        return f"{module}: {in_features} x {out_features} cannot be packed {pf} values per int32 word"
    return None


def modules_of(tensor_names: list[str]) -> list[str]:
    """Module names that carry a ``qweight``."""
    return sorted(name.removesuffix(".qweight") for name in tensor_names if name.endswith(".qweight"))


def refuse(problem: str, where: str) -> CheckpointError:
    return CheckpointError(problem, where=where, fix="re-quantize with owl3-export quantize, or restore the files")
