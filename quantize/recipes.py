"""Quantization recipes: small frozen dataclasses, validated on construction, and what each one quantizes.

``recipe("int4")`` (or int8, w8a8, rtn4, with keyword overrides) is the one entry point; an invalid recipe or
combination is refused in ``__post_init__`` with a message that says how to fix it (exit 2).

What is quantized is data: ``include`` / ``exclude`` are regular expressions matched in full against module
names (``language_model.model.layers.3.mlp.down_proj``). The defaults quantize every Linear of the language
model's decoder layers, the hyper layers' ``v_kv_proj`` included. ``FLOAT_BY_DEFAULT`` lists what stays in
float and why; two of those have user overrides (``lm_head="int8"``, ``vision="int8"``), whose effect the
drift report then measures. Per-layer group sizes adapt to K (``owl3.quantize.qmath.group_size_for``).

Defaults measured on the trained demo model (``bench/quantize.py``, 128 built-in calibration samples; PyTorch
quantized vs PyTorch fp32; figures in README.md):
- int8 weights use GPTQ, not round-to-nearest (``INT8_METHOD``): next-token KL 1.5e-4 / 5.0e-5 (text / image
  probes) and top-1 100% against RTN's 3.1e-4 / 2.9e-4 and 97.6% / 96.3%, at the same cost.
- GPTQ uses the group-aware act order (``act_order=True``, GPTQModel's default): the layers' own objective
  (relative output error) is 11% lower at int4 (1.65e-3 vs 1.86e-3 on average) and the visual K/V error 2.7x
  lower; next-token KL on 64 held-out image prompts is within noise of plain order (1.56e-2 vs 1.45e-2).
- W8A8 smooths the hyper layers' ``v_kv_proj`` together with q/k/v (``V_KV_SMOOTHING = "shared"``): on 64
  held-out image prompts its own vector ("separate", an extra explicit scale on the visual input) gives the
  same result within noise (KL 3.95e-3 vs 3.77e-3, top-1 96.9% vs 97.0%; visual K/V 1 - cos 1.6e-5 vs
  2.0e-5), so the simpler graph wins. The visual memory's statistics differ from text, but at alpha 0.5 the
  shared vector's text-driven factors do not hurt it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from owl3.errors import UsageError

DECODER_LINEARS = (
    r"language_model\.model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj|v_kv_proj)",
    r"language_model\.model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)",
)
LM_HEAD_PATTERN = r"language_model\.lm_head"
VISION_LINEARS = r"vision_model\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"

# Kept in float unless a recipe override says otherwise: pattern -> the written decision.
FLOAT_BY_DEFAULT: dict[str, str] = {
    r"vision_model\..*": (
        "the SigLIP tower is frozen in training and the most sensitive part (the paper's own limitation); it runs "
        "once per image, not per token; override: vision='int8' (weight-only, per channel)"
    ),
    r"vision2text_model": (
        "the projector runs once per image and its error reaches every hyper layer through the visual memory"
    ),
    LM_HEAD_PATTERN: (
        "lm_head errors move the argmax directly and small models are the most sensitive to it; "
        "override: lm_head='int8' (per channel) or 'int4' (groups of 32, as the peers' int4 builds)"
    ),
    r"language_model\.model\.embed_tokens": (
        "an embedding is a row lookup, not a matmul: quantizing it saves memory only, and neither MatMulNBits "
        "nor TensorRT's DequantizeLinear -> MatMul path has a quantized gather"
    ),
    r"language_model\.model\.layers\.\d+\.self_attn\.gate_proj\.0": (
        "the hyper gate (hd x hd, shared by all heads) sets the text/vision mix of every channel through a "
        "sigmoid: negligible in size, and its error scales the whole visual contribution"
    ),
}

INT8_METHOD = "gptq"
V_KV_SMOOTHING = "shared"
METHODS = ("gptq", "rtn")
GROUP_SIZES = (128, 64, 32, 16)
OVERRIDES = {"lm_head": (None, "int8", "int4"), "vision": (None, "int8")}
LM_HEAD_INT4_GROUP = 32  # what llama.cpp's Q4_0 and ONNX Runtime GenAI's int4 use for the output projection


class RecipeError(UsageError):
    """An invalid recipe or combination of options (exit 2)."""


@dataclass(frozen=True)
class Recipe:
    """How a checkpoint is quantized. ``group_size`` -1 means per output channel."""

    name: str
    bits: int
    group_size: int
    method: str = "gptq"
    damp: float = 0.05  # GPTQ damping, raised step by step when Cholesky fails
    act_order: bool = True  # group-aware order, g_idx stays trivial (owl3.quantize.gptq); GPTQModel's default
    true_sequential: bool = True  # q/k/v/v_kv, then o, then gate/up, then down, each on quantized inputs
    activations: str | None = None  # "int8": static per-tensor activation scales (W8A8)
    smoothquant_alpha: float | None = None
    v_kv_smoothing: str | None = None  # W8A8: "separate" (own vector) or "shared" (with q/k/v)
    include: tuple[str, ...] = DECODER_LINEARS
    exclude: tuple[str, ...] = ()
    lm_head: str | None = None  # None (float), "int8" (per channel) or "int4" (groups of 32)
    vision: str | None = None  # None (float) or "int8"

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        self._check_weights()
        self._check_activations()
        self._check_overrides()
        for pattern in (*self.include, *self.exclude):
            _compile(pattern)

    def _check_weights(self) -> None:
        if self.bits not in (4, 8):
            _refuse(f"bits {self.bits} is not supported", "use 4 (int4) or 8 (int8, w8a8)")
        if self.bits == 8 and self.group_size != -1:
            _refuse(
                f"8-bit weights need group_size -1 (per output channel), found {self.group_size}",
                "TensorRT has blocked dequantization for INT4 only: use group_size=-1 for 8 bits",
            )
        if self.bits == 4 and self.group_size not in GROUP_SIZES:
            _refuse(f"4-bit weights need a group size of {GROUP_SIZES}, found {self.group_size}", "use 128")
        if self.method not in METHODS:
            _refuse(f"unknown method {self.method!r}", f"use one of {METHODS}")
        if not 0 < self.damp < 1:
            _refuse(f"damp {self.damp} is outside (0, 1)", "use 0.01 to 0.05 (GPTQ's usual range)")
        if self.act_order and self.method != "gptq":
            _refuse("act_order only changes GPTQ's column order", "drop act_order or use method='gptq'")

    def _check_activations(self) -> None:
        if self.activations not in (None, "int8"):
            _refuse(f"activations {self.activations!r} is not supported", "use None or 'int8'")
        if self.activations is None:
            if self.smoothquant_alpha is not None or self.v_kv_smoothing is not None:
                _refuse("SmoothQuant settings need int8 activations", "use the w8a8 recipe, or drop them")
            return
        if self.bits != 8:
            _refuse("int8 activations need 8-bit weights", "use the w8a8 recipe (bits 8, group_size -1)")
        if self.smoothquant_alpha is None or not 0 <= self.smoothquant_alpha <= 1:
            _refuse(f"smoothquant_alpha must be in [0, 1], found {self.smoothquant_alpha}", "use 0.5")
        if self.v_kv_smoothing not in ("separate", "shared"):
            _refuse(f"v_kv_smoothing {self.v_kv_smoothing!r} is not supported", "use 'separate' or 'shared'")

    def _check_overrides(self) -> None:
        for option, allowed in OVERRIDES.items():
            if getattr(self, option) not in allowed:
                shown = " or ".join(repr(a) for a in allowed)
                _refuse(f"{option}={getattr(self, option)!r} is not supported", f"use {option}={shown}")
        if not self.include:
            _refuse("include matches nothing: the recipe would quantize no layer", "keep the default include")

    # ---- what is quantized ------------------------------------------------------------------------------
    def scheme_for(self, module: str) -> tuple[int, int] | None:
        """(bits, preferred group size) for a Linear module name, or None when it stays in float."""
        if re.fullmatch(LM_HEAD_PATTERN, module):
            return {"int8": (8, -1), "int4": (4, LM_HEAD_INT4_GROUP), None: None}[self.lm_head]
        if re.fullmatch(VISION_LINEARS, module):
            return (8, -1) if self.vision == "int8" else None
        if any(re.fullmatch(p, module) for p in self.exclude):
            return None
        if not any(re.fullmatch(p, module) for p in self.include):
            return None
        reason = float_decision(module)
        if reason is not None:
            raise RecipeError(
                f"include pattern matches {module}, which stays in float by design: {reason}",
                where="recipe include",
                fix="narrow the include patterns (overrides: lm_head='int8', vision='int8')",
            )
        return self.bits, self.group_size

    @property
    def weight_only(self) -> bool:
        return self.activations is None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def float_decision(module: str) -> str | None:
    """Why ``module`` stays in float by default (None when it is quantized by default)."""
    return next((reason for pattern, reason in FLOAT_BY_DEFAULT.items() if re.fullmatch(pattern, module)), None)


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise RecipeError(
            f"pattern {pattern!r} is not a regular expression ({exc})",
            where="recipe include/exclude",
            fix=r"escape dots: language_model\.model\.layers\.0\.mlp\.down_proj",
        ) from exc


def _refuse(problem: str, fix: str) -> None:
    raise RecipeError(problem, where="quantization recipe", fix=fix)


RECIPES: dict[str, Recipe] = {
    "int4": Recipe("int4", bits=4, group_size=128),
    "rtn4": Recipe("rtn4", bits=4, group_size=128, method="rtn", act_order=False),
    "int8": Recipe("int8", bits=8, group_size=-1, method=INT8_METHOD),
    "w8a8": Recipe(
        "w8a8",
        bits=8,
        group_size=-1,
        method=INT8_METHOD,
        activations="int8",
        smoothquant_alpha=0.5,
        v_kv_smoothing=V_KV_SMOOTHING,
    ),
}


def recipe(name: str, **overrides: Any) -> Recipe:
    """The named recipe with ``overrides`` applied (validated again)."""
    if name not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}", where="--precision", fix=f"use one of {sorted(RECIPES)}")
    unknown = sorted(set(overrides) - {f for f in Recipe.__dataclass_fields__ if f != "name"})
    if unknown:
        raise RecipeError(f"unknown recipe options {unknown}", where="recipe", fix="see owl3.quantize.Recipe")
    return replace(RECIPES[name], **overrides)
