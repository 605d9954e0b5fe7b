"""``quantize_model``: a float checkpoint -> a verified GPTQ-format checkpoint directory (a stage artifact).

Steps: strict checks of the source (config, tensor table, tokenizer), the plan of what is quantized and how
(refused before any work when a layer cannot be packed), preflight of disk and memory, the calibration set,
then the block-by-block pass (``owl3.quantize.model_pass``) into a staging directory, ``config.json`` with its
``quantization_config``, ``quantize_config.json``, the tokenizer, a verification that the written checkpoint
loads strictly and reproduces the quantizer's own logits, and ``manifest.json`` last with an atomic rename.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from owl3.artifacts import check_free_disk, source_record, staged_output, tool_versions, write_manifest
from owl3.config import Owl3Config
from owl3.errors import EnvironmentProblem, ResourceError, UsageError
from owl3.model.safetensors_files import CheckpointFiles, discover_checkpoint
from owl3.model.weights import available_ram_bytes, check_against_table, read_quantization, tensor_table
from owl3.processor import Owl3Processor
from owl3.quantize.calibration import CalibrationConfig, CalibrationSet, load_calibration
from owl3.quantize.checkpoint_io import DEFAULT_SHARD_BYTES, ShardWriter, WeightSource
from owl3.quantize.gptq_format import LM_HEAD, QUANTIZE_CONFIG_FILE, config_dict, packing_problem
from owl3.quantize.layerwise import BlockQuantizer, ModulePlan
from owl3.quantize.model_pass import quantize_pass
from owl3.quantize.qmath import group_size_for
from owl3.quantize.recipes import FLOAT_BY_DEFAULT, RECIPES, Recipe, RecipeError, recipe
from owl3.quantize.verify import verify_checkpoint

SCHEMA = "owl3-export/gptq"  # manifest kind of a quantized checkpoint directory
SCHEMA_VERSION = 1
EMBEDDINGS = ("embed_tokens.weight", "position_embedding.weight")  # 2-D weights that are lookups, not Linears
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
VERIFY_MIN_COSINE = 1 - 1e-6  # the reloaded checkpoint against the quantizer's replay, fp32 both
Progress = Callable[[str], None]


def quantize_model(
    model_dir: str | Path,
    output: str | Path,
    recipe_or_name: Recipe | str = "int4",
    calibration: CalibrationConfig | None = None,
    *,
    device: str = "auto",
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Progress | None = None,
) -> Path:
    """Quantize the float checkpoint ``model_dir`` with a recipe into ``output``; returns ``output``."""
    say = progress or (lambda _message: None)
    chosen = recipe(recipe_or_name) if isinstance(recipe_or_name, str) else recipe_or_name
    calibration = calibration or CalibrationConfig()
    model_dir, output = Path(model_dir), Path(output)
    config, files = _checked_source(model_dir)
    plan = plan_modules(config, chosen)
    if chosen.activations and calibration.text_only and config.hyper_layers:
        raise RecipeError(
            "W8A8 needs static activation scales for the hyper layers' v_kv_proj, which text-only calibration "
            "never reaches",
            where="--text-only",
            fix="calibrate w8a8 with images",
        )
    target = resolve_device(device)
    check_free_disk(output, estimated_bytes(config, plan) + (64 << 20))
    calib = load_calibration(
        calibration, Owl3Processor.from_pretrained(model_dir), image_size=config.vision.image_size, warn=say
    )
    _check_memory(config, plan, calib, target)
    say(f"calibration: {len(calib.samples)} samples, {calib.tokens} tokens, {calib.images} images" + _skipped(calib))
    started = time.perf_counter()
    with staged_output(output, force=force) as staging:
        writer = ShardWriter(staging, max_shard_bytes)
        quantizer = BlockQuantizer(chosen, plan, target)
        result = quantize_pass(config, quantizer, WeightSource(files, target), calib.samples, writer, say)
        shards = writer.finish()
        quantization = _quantization_config(config, chosen, plan)
        _write_config(staging, model_dir, config, quantization, plan)
        seconds = time.perf_counter() - started
        say(f"quantized {len(plan)} layers in {seconds:.1f} s; verifying the written checkpoint")
        verification = verify_checkpoint(staging, writer.digests, result.reference, calib.samples)
        manifest = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "status": "ok",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "variant": variant_name(chosen, calibration),
            "precision": precision_of(chosen),
            "recipe": chosen.to_json(),
            "quantization_config": quantization,
            "float_by_default": FLOAT_BY_DEFAULT,
            "calibration": calib.record(),
            "layers": result.records,
            "summary": _summary(result.records, plan, config),
            "verification": verification,
            "shards": shards,
            "device": str(target),
            "seconds": {"total": round(seconds, 2), **{k: round(v, 2) for k, v in result.seconds.items()}},
            "source": source_record(model_dir),
            "tools": tool_versions(),
        }
        write_manifest(staging, manifest)
    say(f"wrote {output}")
    return output


# ---- planning -----------------------------------------------------------------------------------------------
def linear_shapes(config: Owl3Config) -> dict[str, tuple[int, int]]:
    """Every Linear of the model: module name -> (out_features, in_features). lm_head is listed even when tied."""
    shapes = {
        name.removesuffix(".weight"): shape
        for name, shape in tensor_table(config).items()
        if name.endswith(".weight") and len(shape) == 2 and not name.endswith(EMBEDDINGS)
    }
    shapes.setdefault(LM_HEAD, (config.text.vocab_size, config.text.hidden_size))
    return shapes


def plan_modules(config: Owl3Config, chosen: Recipe) -> dict[str, ModulePlan]:
    """Which Linear layers the recipe quantizes, with their bits and group size; refuses what cannot be packed."""
    plan, problems = {}, []
    for module, (out_features, in_features) in linear_shapes(config).items():
        scheme = chosen.scheme_for(module)
        if scheme is None:
            continue
        bits, preferred = scheme
        group = group_size_for(in_features, preferred)
        problem = (
            f"{module}: in_features {in_features} has no group size of 128, 64, 32 or 16"
            if group is None
            else packing_problem(module, in_features, out_features, bits, group)
        )
        if problem:
            problems.append(problem)
            continue
        activations = chosen.activations == "int8" and module != LM_HEAD and not module.startswith("vision_model.")
        plan[module] = ModulePlan(bits, group, activations)
    if problems:
        raise RecipeError(
            f"{len(problems)} layers cannot be quantized as asked: " + "; ".join(problems[:6]),
            where="quantization plan",
            fix="keep them in float with --exclude PATTERN",
        )
    if not plan:
        raise RecipeError("the recipe selects no layer of this model", where="quantization plan", fix="check --exclude")
    return plan


def precision_of(chosen: Recipe) -> str:
    """The precision class the gates know: int4, int8 or w8a8."""
    return "w8a8" if chosen.activations else f"int{chosen.bits}"


def variant_name(chosen: Recipe, calibration: CalibrationConfig) -> str:
    """A short unique name for this quantization: the recipe, then every setting that differs from it."""
    base = RECIPES.get(chosen.name)
    parts = [chosen.name]
    parts += ["text-only"] if calibration.text_only else []
    parts += [f"lm_head-{chosen.lm_head}"] if chosen.lm_head else []
    parts += ["vision-int8"] if chosen.vision else []
    for key, value in chosen.to_json().items():
        if base is not None and key not in ("name", "lm_head", "vision") and value != getattr(base, key):
            shown = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
            parts.append(f"{key}-{shown}" if not isinstance(value, tuple) else f"{key}-{len(value)}")
    return "+".join(parts)


# ---- source, device, preflight ------------------------------------------------------------------------------
def _checked_source(model_dir: Path) -> tuple[Owl3Config, CheckpointFiles]:
    config = Owl3Config.from_hf_json(model_dir)
    if read_quantization(model_dir) is not None:
        raise UsageError(
            "the model is already quantized", where=str(model_dir), fix="quantize the float (bf16/fp16/fp32) checkpoint"
        )
    files = discover_checkpoint(model_dir)
    check_against_table(config, {n: (i.shape, i.dtype) for n, i in files.tensors.items()}, str(model_dir))
    return config, files


def _skipped(calib: CalibrationSet) -> str:
    return f", {sum(calib.skipped.values())} skipped ({calib.skipped})" if calib.skipped else ""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"unknown device {name!r}", where="--device", fix="use auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EnvironmentProblem(
            "CUDA was asked for but torch sees no GPU", where="--device", fix="use --device cpu (or auto)"
        )
    return torch.device(name)


def estimated_bytes(config: Owl3Config, plan: dict[str, ModulePlan]) -> int:
    """Output size: packed weights at their bits, fp16 scales, every float tensor at 2 bytes."""
    total = 0
    for name, shape in tensor_table(config).items():
        module = name.removesuffix(".weight")
        count = int(np.prod(shape))
        total += count * plan[module].bits // 8 + count // plan[module].group_size * 2 if module in plan else 2 * count
    return total


def _check_memory(config: Owl3Config, plan: dict[str, ModulePlan], calib: CalibrationSet, device: torch.device) -> None:
    """Refuse a run that cannot fit: one block in fp32, its largest Hessian three times, the activations."""
    shapes = linear_shapes(config)
    text = config.text
    layer = sum(int(np.prod(shape)) for name, shape in tensor_table(config).items() if ".layers.0." in name) * 4
    widest = max((shapes[m][1] for m in plan), default=0)
    hessians = 3 * widest * widest * 4
    activations = calib.tokens * text.hidden_size * 4 * 3 + calib.images * config.image_tokens * text.hidden_size * 4
    needed = layer + hessians + activations + (256 << 20)
    available = available_ram_bytes() if device.type == "cpu" else None
    if available is not None and needed > available:
        raise ResourceError(
            f"quantizing needs about {needed / 2**30:.1f} GiB of RAM, {available / 2**30:.1f} GiB available",
            where="quantize preflight",
            fix="free memory, use fewer calibration samples (--samples), or a machine with more RAM",
        )


# ---- writing ------------------------------------------------------------------------------------------------
def _quantization_config(config: Owl3Config, chosen: Recipe, plan: dict[str, ModulePlan]) -> dict[str, Any]:
    """GPTQModel's quantization_config; per-layer bits or group sizes that differ go into ``dynamic``."""
    shapes = linear_shapes(config)
    overrides = {}
    for module, p in plan.items():
        k = shapes[module][1]
        default_group = k if chosen.group_size == -1 else chosen.group_size
        if (p.bits, p.group_size) != (chosen.bits, default_group):
            overrides[module] = (p.bits, -1 if p.group_size == k else p.group_size)
    modules = [m for m in shapes if m != LM_HEAD or not config.text.tie_word_embeddings or m in plan]
    meta = {
        "quantizer": ["owl3-export:0.1.0"],
        "damp_percent": chosen.damp,
        "damp_auto_increment": 0.01,
        "true_sequential": chosen.true_sequential,
        "act_group_aware": chosen.act_order,
        "static_groups": False,
        "mse": 0.0,
        "method": chosen.method,
    }
    if chosen.activations:
        meta.update({"smoothquant_alpha": chosen.smoothquant_alpha, "v_kv_smoothing": chosen.v_kv_smoothing})
    return config_dict(
        bits=chosen.bits, group_size=chosen.group_size, overrides=overrides,
        float_patterns=float_patterns(modules, set(plan)), lm_head=LM_HEAD in plan,
        activations=chosen.activations is not None, meta=meta,
    )  # fmt: skip


def float_patterns(modules: list[str], quantized: set[str]) -> list[str]:
    """``re.match`` patterns covering exactly the float modules: one per layer-indexed family (layer number
    replaced by ``\\d+``) when every member of the family is float, else one per module."""
    patterns: list[str] = []
    for module in modules:
        if module in quantized:
            continue
        family = "^" + re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(module)) + "$"
        exact = f"^{re.escape(module)}$"
        members = [m for m in modules if re.match(family, m)]
        pattern = family if not any(m in quantized for m in members) else exact
        if pattern not in patterns:
            patterns.append(pattern)
    return patterns


def _write_config(
    staging: Path, model_dir: Path, config: Owl3Config, quantization: dict[str, Any], plan: dict[str, ModulePlan]
) -> None:
    raw = config.to_hf_dict()
    raw["torch_dtype"] = "float16"
    raw["tie_word_embeddings"] = config.text.tie_word_embeddings and LM_HEAD not in plan
    raw["quantization_config"] = quantization
    (staging / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    (staging / QUANTIZE_CONFIG_FILE).write_text(json.dumps(quantization, indent=2) + "\n", encoding="utf-8")
    for side in SIDE_FILES:
        if (model_dir / side).is_file():
            shutil.copyfile(model_dir / side, staging / side)


def _summary(records: list[dict[str, Any]], plan: dict[str, ModulePlan], config: Owl3Config) -> dict[str, Any]:
    errors = [r["relative_error"] for r in records if "relative_error" in r]
    shapes = linear_shapes(config)
    quantized = sum(int(np.prod(shapes[m])) for m in plan)
    return {
        "quantized_layers": len(plan),
        "quantized_parameters": quantized,
        "group_sizes": sorted({p.group_size for p in plan.values()}),
        "mean_relative_error": float(np.mean(errors)) if errors else None,
        "max_relative_error": float(np.max(errors)) if errors else None,
        "methods": sorted({r["method"] for r in records}),
    }
