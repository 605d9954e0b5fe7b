"""Strict loading of GPTQ-format Owl3 checkpoints (ours, or made elsewhere in GPTQ v1 or v2).

``QuantizedLayout.check`` reads only names, shapes and dtypes: which Linear layers are packed (those with a
``qweight``), what bits and group size ``quantization_config`` gives each (``dynamic`` included), and the exact
tensors that implies. Every missing, unexpected, mis-shaped or mistyped tensor, a packed layer the config keeps
in float, or a decoder layer the config quantizes but the files hold in float, is listed in one error naming the
tensors, before anything is allocated. ``build_empty_model`` then puts a ``QuantizedLinear`` at each packed
layer, so ``owl3.load_model`` fills parameters and buffers alike, tensor by tensor.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from owl3.config import Owl3Config
from owl3.errors import CheckpointError
from owl3.model.owl3 import Owl3Model
from owl3.model.safetensors_files import FLOAT_DTYPES, short_list
from owl3.model.weights import compare_tensors, detect_variant, tensor_table, unused_tensor_table
from owl3.quantize.gptq_format import LM_HEAD, SEQUENTIAL_GROUPS, QuantizationConfig, packing_problem, quantized_tensors
from owl3.quantize.qlinear import QuantizedLinear, replace_module

FIX = "use the files and config.json written together by the quantizer (owl3-export quantize)"
_DECODER_LINEAR = re.compile(
    r"language_model\.model\.layers\.\d+\.(" + "|".join(re.escape(m) for g in SEQUENTIAL_GROUPS for m in g) + ")"
)


@dataclass(frozen=True)
class PackedModule:
    in_features: int
    out_features: int
    bits: int
    group_size: int
    bias: bool
    activations: bool
    smoothed: bool


@dataclass(frozen=True)
class QuantizedLayout:
    quantization: QuantizationConfig
    modules: dict[str, PackedModule]
    required: dict[str, tuple[tuple[int, ...], frozenset[str]]]

    @classmethod
    def check(
        cls,
        config: Owl3Config,
        quantization: QuantizationConfig,
        found: dict[str, tuple[tuple[int, ...], str]],
        where: str,
    ) -> QuantizedLayout:
        """The layout the config and tensor names imply; CheckpointError listing every disagreement."""
        detect_variant(found, where, quantized=True)
        table = tensor_table(_float_config(config, found))
        required = {name: (shape, FLOAT_DTYPES) for name, shape in table.items()}
        modules, problems = {}, []
        for module in sorted(n.removesuffix(".qweight") for n in found if n.endswith(".qweight")):
            spec, problem = _packed_module(module, table, quantization, found)
            if problem:
                problems.append(problem)
                continue
            modules[module] = spec
            required.pop(f"{module}.weight")
            required.update(_tensors(module, spec))
        problems += [
            f"{name} is float but quantization_config quantizes it"
            for name in table
            if name.endswith(".weight")
            and _DECODER_LINEAR.fullmatch(name.removesuffix(".weight"))
            and name.removesuffix(".weight") not in modules
            and quantization.scheme_for(name.removesuffix(".weight")) is not None
        ]
        if problems:
            raise CheckpointError(
                f"quantized checkpoint disagrees with its quantization_config: {short_list(problems)}",
                where=where,
                fix=FIX,
            )
        compare_tensors(required, unused_tensor_table(config), found, where, fix=FIX)
        return cls(quantization, modules, required)

    def model_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of the loaded model: float parameters in ``dtype``, the packed layers' buffers as stored."""
        packed = {
            n
            for m, spec in self.modules.items()
            for n in quantized_tensors(m, spec.in_features, spec.out_features, spec.bits, spec.group_size)
        }
        floats = sum(math.prod(shape) for name, (shape, _) in self.required.items() if name not in packed)
        return floats * dtype.itemsize + sum(4 * math.prod(self.required[n][0]) for n in packed)

    def build_empty_model(self, config: Owl3Config, dtype: torch.dtype, device: torch.device) -> Owl3Model:
        """The model with a ``QuantizedLinear`` at every packed layer, uninitialised, in ``dtype`` on ``device``."""
        untied = LM_HEAD in self.modules and config.text.tie_word_embeddings
        built = replace(config, text=replace(config.text, tie_word_embeddings=False)) if untied else config
        with torch.device("meta"):
            model = Owl3Model(built).to(dtype)
            for name, spec in self.modules.items():
                replace_module(model, name, _empty(spec, self.quantization))
        model.to_empty(device=device)
        names = {n for n, _ in [*model.named_parameters(), *model.named_buffers()]}
        if names != set(self.required):
            raise CheckpointError(
                f"internal error: the quantized model's tensors differ from its table: "
                f"{short_list(sorted(names ^ set(self.required)))}",
                where="owl3.quantize.loading",
                fix="report this bug",
            )
        model.quantization = self.quantization
        return model


def _float_config(config: Owl3Config, found: dict[str, Any]) -> Owl3Config:
    """A tied config whose checkpoint packs lm_head is read untied (the quantizer writes it so)."""
    if config.text.tie_word_embeddings and f"{LM_HEAD}.qweight" in found:
        return replace(config, text=replace(config.text, tie_word_embeddings=False))
    return config


def _packed_module(
    module: str, table: dict[str, tuple[int, ...]], quantization: QuantizationConfig, found: dict[str, Any]
) -> tuple[PackedModule | None, str | None]:
    shape = table.get(f"{module}.weight")
    if shape is None or len(shape) != 2 or module.endswith(("embed_tokens", "position_embedding")):
        return None, f"{module}.qweight packs {module}, which is not a Linear layer of this model"
    scheme = quantization.scheme_for(module)
    if scheme is None:
        return None, f"{module}.qweight is packed but quantization_config's dynamic keeps {module} in float"
    (out_features, in_features), (bits, group) = shape, scheme
    group = in_features if group == -1 else group
    problem = packing_problem(module, in_features, out_features, bits, group)
    if problem:
        return None, problem
    activations = f"{module}.input_scale" in found
    if activations != (quantization.activation_scheme == "static") and (
        activations or _DECODER_LINEAR.fullmatch(module)
    ):
        scheme_text = quantization.activation_scheme or "none"
        return (
            None,
            f"{module}.input_scale is {'present' if activations else 'missing'} (activation_scheme {scheme_text})",
        )
    spec = PackedModule(
        in_features, out_features, bits, group, bias=f"{module}.bias" in table, activations=activations,
        smoothed=f"{module}.pre_quant_scale" in found,
    )  # fmt: skip
    return spec, None


def _tensors(module: str, spec: PackedModule) -> dict[str, tuple[tuple[int, ...], frozenset[str]]]:
    """{name: (shape, allowed dtypes)} of a packed layer: integers as GPTQ packs them, scales in any float."""
    packed = quantized_tensors(module, spec.in_features, spec.out_features, spec.bits, spec.group_size)
    out = {n: (shape, FLOAT_DTYPES if dtype == "F16" else frozenset({dtype})) for n, (shape, dtype) in packed.items()}
    if spec.bias:
        out[f"{module}.bias"] = ((spec.out_features,), FLOAT_DTYPES)
    if spec.activations:
        out[f"{module}.input_scale"] = ((1,), FLOAT_DTYPES)
    if spec.smoothed:
        out[f"{module}.pre_quant_scale"] = ((spec.in_features,), FLOAT_DTYPES)
    return out


def _empty(spec: PackedModule, quantization: QuantizationConfig) -> QuantizedLinear:
    return QuantizedLinear(
        spec.in_features, spec.out_features, spec.bits, spec.group_size, bias=spec.bias,
        activations=spec.activations, smoothed=spec.smoothed, checkpoint_format=quantization.checkpoint_format,
    )  # fmt: skip


def check_loaded(model: Owl3Model) -> None:
    """Value checks after loading: every ``g_idx`` within its groups (a bad one would index out of range)."""
    bad = []
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            groups = module.scales.shape[0]
            if int(module.g_idx.min()) < 0 or int(module.g_idx.max()) >= groups:
                bad.append(f"{name}.g_idx (values outside 0..{groups - 1})")
    if bad:
        raise CheckpointError(f"invalid group indices: {short_list(bad)}", where="quantized checkpoint", fix=FIX)


def checkpoint_identity(model_dir: Path, quantization: QuantizationConfig) -> tuple[str, str, dict[str, Any] | None]:
    """(precision class, variant name, calibration record) of a quantized checkpoint: from the quantizer's
    manifest when it has one, else from its quantization_config alone (a checkpoint made elsewhere)."""
    from owl3.artifacts import ArtifactError, read_manifest

    try:
        manifest = read_manifest(model_dir, schema="owl3-export/gptq")
    except ArtifactError:
        precision = "w8a8" if quantization.activation_scheme == "static" else f"int{quantization.bits}"
        return precision, precision, None
    return manifest["precision"], manifest["variant"], manifest.get("calibration")
