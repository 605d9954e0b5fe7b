"""Quantization (owl3.quantize): recipes, image+text calibration, GPTQ layer by layer, one GPTQ-format checkpoint.

    from owl3.quantize import CalibrationConfig, quantize_model, recipe

    quantize_model("mPLUG-Owl3-7B-240728", "owl3-7b-int4-gptq", recipe("int4"), CalibrationConfig("vqav2:/data/vqav2"))
    model = owl3.load_model("owl3-7b-int4-gptq")   # QuantizedLinear layers compute with the checkpoint's integers

Modules, in data-flow order: ``recipes`` (what is quantized and how), ``calibration`` (+ ``builtin_calibration``),
``qmath`` and ``gptq`` and ``smoothquant`` (pure tensor math), ``layerwise`` (capture, smooth, quantize one block),
``model_pass`` (every block in model order), ``checkpoint_io`` (streaming reads and shard writes), ``gptq_format``
(quantization_config and the tensor table), ``qlinear`` (the quantized Linear), ``loading`` (strict loading),
``stage`` (the stage: preflight, staging directory, verification, manifest) and ``cli``.

Names are loaded lazily so that ``owl3.cli`` can list the command without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "CalibrationConfig": "owl3.quantize.calibration",
    "QuantizedLinear": "owl3.quantize.qlinear",
    "RECIPES": "owl3.quantize.recipes",
    "Recipe": "owl3.quantize.recipes",
    "quantize_model": "owl3.quantize.stage",
    "recipe": "owl3.quantize.recipes",
}

if TYPE_CHECKING:
    from owl3.quantize.calibration import CalibrationConfig
    from owl3.quantize.qlinear import QuantizedLinear
    from owl3.quantize.recipes import RECIPES, Recipe, recipe
    from owl3.quantize.stage import quantize_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'owl3.quantize' has no attribute {name!r}")


__all__ = ["RECIPES", "CalibrationConfig", "QuantizedLinear", "Recipe", "quantize_model", "recipe"]
