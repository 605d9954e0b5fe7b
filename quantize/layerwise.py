"""Quantizing one block (a decoder layer, a vision layer, lm_head): capture, smooth, quantize, in groups.

A block's Linear layers are quantized in ``Group``s, in order (true-sequential): forward hooks capture each
group's inputs over every calibration sample (the Hessian for GPTQ, per-channel max |x| for SmoothQuant and
activation scales) while the block runs with the earlier groups already quantized; then the group is smoothed
(W8A8), quantized, and its modules replaced by ``QuantizedLinear``. The caller replays the finished block to
produce the next block's inputs. Without true-sequential order one capture pass serves every group.

Modules in a group that read the same tensor (q/k/v, gate/up) share one Hessian. The hyper layers'
``v_kv_proj`` reads the visual memory (the normed image embeddings), not the text, so it has its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from owl3.errors import InvalidInputError
from owl3.quantize.gptq import GPTQError, Hessian, gptq_quantize, output_error
from owl3.quantize.qlinear import QuantizedLinear, replace_module
from owl3.quantize.qmath import activation_scale, rtn_quantize
from owl3.quantize.recipes import Recipe
from owl3.quantize.smoothquant import (
    column_absmax,
    scale_columns,
    smoothed_absmax,
    smoothed_hessian,
    smoothing_vector,
)

VISUAL_INPUT = "self_attn.v_kv_proj"


class QuantizationError(InvalidInputError):
    """A layer could not be quantized from this calibration data (no input where one is required, a Hessian
    that no damping factorises): exit 3."""


@dataclass(frozen=True)
class ModulePlan:
    bits: int
    group_size: int  # rows per group; K for per-channel
    activations: bool = False  # W8A8: static INT8 input scale


@dataclass(frozen=True)
class Group:
    """Linear layers quantized together; ``norm`` is the RMSNorm their shared input comes from (None: none)."""

    members: tuple[str, ...]
    norm: str | None = None


DECODER_GROUPS = (
    Group(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", VISUAL_INPUT), "input_layernorm"),
    Group(("self_attn.o_proj",)),
    Group(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
    Group(("mlp.down_proj",)),
)
VISION_GROUPS = (
    Group(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Group(("self_attn.out_proj",)),
    Group(("mlp.fc1",)),
    Group(("mlp.fc2",)),
)
LM_HEAD_GROUPS = (Group(("lm_head",)),)


@dataclass
class InputStats:
    hessian: Hessian
    absmax: Tensor  # [K] max |x| per input channel


def input_owner(group: Group, name: str) -> str:
    """The member whose captured input ``name`` shares (the first non-visual member, or itself)."""
    if name == VISUAL_INPUT:
        return name
    return next(m for m in group.members if m != VISUAL_INPUT)


@contextmanager
def capture(block: nn.Module, names: list[str], device: torch.device) -> Iterator[dict[str, InputStats]]:
    """Forward hooks on ``names`` accumulating input Hessians and per-channel max |x| while the block runs."""
    stats: dict[str, InputStats] = {}
    handles = []
    for name in names:
        module = block.get_submodule(name)
        k = module.in_features
        stats[name] = InputStats(Hessian(k, device), torch.zeros(k, dtype=torch.float32, device=device))

        def hook(_module: nn.Module, args: tuple[Any, ...], _output: Any, entry: InputStats = stats[name]) -> None:
            x = args[0].detach()
            entry.hessian.add(x)
            flat = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).to(torch.float32)
            torch.maximum(entry.absmax, flat, out=entry.absmax)

        handles.append(module.register_forward_hook(hook))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


class BlockQuantizer:
    """Quantizes blocks with one recipe and plan; collects one record per module for the manifest."""

    def __init__(self, recipe: Recipe, plan: dict[str, ModulePlan], device: torch.device) -> None:
        self.recipe, self.plan, self.device = recipe, plan, device
        self.records: list[dict[str, Any]] = []

    def quantize(self, block: nn.Module, prefix: str, groups: tuple[Group, ...], forward: Callable[[], None]) -> None:
        """Quantize every planned Linear of ``block`` (its names are ``prefix`` + member names)."""
        groups = tuple(g for g in groups if self._planned(prefix, block, g))
        passes = [[g] for g in groups] if self.recipe.true_sequential else [list(groups)]
        for pass_groups in passes:
            owners = sorted({input_owner(g, m) for g in pass_groups for m in self._planned(prefix, block, g)})
            with capture(block, owners, self.device) as stats, torch.no_grad():
                forward()
            for group in pass_groups:
                self._quantize_group(block, prefix, group, stats)

    def _present(self, block: nn.Module, member: str) -> bool:
        try:
            block.get_submodule(member)
        except AttributeError:
            return False  # v_kv_proj exists in hyper layers only
        return True

    def _planned(self, prefix: str, block: nn.Module, group: Group) -> list[str]:
        return [m for m in group.members if self._present(block, m) and prefix + m in self.plan]

    def _quantize_group(self, block: nn.Module, prefix: str, group: Group, stats: dict[str, InputStats]) -> None:
        members = [m for m in group.members if self._present(block, m)]
        planned = self._planned(prefix, block, group)
        smooth: dict[str, tuple[Tensor, Tensor | None]] = {}  # member -> (s, pre_quant_scale)
        if any(self.plan[prefix + m].activations for m in planned):
            smooth = self._smooth(block, group, members, planned, stats)
        hessians: dict[str, Tensor] = {}  # one finished (and smoothed) Hessian per shared input
        for member in planned:
            owner = input_owner(group, member)
            s, pre = smooth.get(member, (None, None))
            entry = stats[owner]
            if owner not in hessians and entry.hessian.tokens:
                finished = entry.hessian.finish()
                hessians[owner] = finished if s is None else smoothed_hessian(finished, s)
            linear = block.get_submodule(member)
            quantized = self._quantize_module(prefix + member, linear, entry, hessians.get(owner), s, pre)
            replace_module(block, member, quantized)

    # ---- SmoothQuant ------------------------------------------------------------------------------------
    def _smooth(
        self, block: nn.Module, group: Group, members: list[str], planned: list[str], stats: dict[str, InputStats]
    ) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Smoothing vectors of a group, applied to the weights (and folded into the norm): member -> (s, pre)."""
        alpha = float(self.recipe.smoothquant_alpha)
        shared = self.recipe.v_kv_smoothing == "shared"
        text = [m for m in members if m != VISUAL_INPUT or shared]
        weights = [block.get_submodule(m).weight for m in text if m in planned]
        if not weights:
            return {}
        act = torch.stack([stats[input_owner(group, m)].absmax for m in text if m in planned]).amax(dim=0)
        norm = block.get_submodule(group.norm) if group.norm else None
        s = smoothing_vector(act, column_absmax(weights), alpha, None if norm is None else norm.weight)
        out: dict[str, tuple[Tensor, Tensor | None]] = {}
        with torch.no_grad():
            if norm is not None:  # every reader of the norm absorbs s, quantized or not
                norm.weight.div_(s).copy_(norm.weight.to(torch.float16).to(norm.weight.dtype))
                for m in members:
                    scale_columns(block.get_submodule(m).weight, s)
                out = {m: (s, None) for m in text if m in planned}
            else:
                for m in planned:
                    scale_columns(block.get_submodule(m).weight, s)
                    out[m] = (s, 1.0 / s)
            if VISUAL_INPUT in planned and not shared:  # its own vector on top of the text one
                visual = block.get_submodule(VISUAL_INPUT).weight
                s_v = smoothing_vector(stats[VISUAL_INPUT].absmax, column_absmax([visual / s[None, :]]), alpha)
                scale_columns(visual, s_v / s)
                out[VISUAL_INPUT] = (s_v, s / s_v)
        return out

    # ---- one module -------------------------------------------------------------------------------------
    def _quantize_module(
        self, name: str, linear: nn.Linear, stats: InputStats, hessian: Tensor | None, s: Tensor | None,
        pre: Tensor | None,
    ) -> QuantizedLinear:  # fmt: skip
        """Quantize one Linear and record it; ``s`` / ``pre`` come from SmoothQuant."""
        plan = self.plan[name]
        weight = linear.weight.detach().to(torch.float32)
        record: dict[str, Any] = {"module": name, "bits": plan.bits, "group_size": plan.group_size}
        record["tokens"] = stats.hessian.tokens
        if hessian is None:
            if plan.activations:
                raise QuantizationError(
                    f"{name} saw no calibration input, so its static activation scale cannot be measured",
                    where="calibration",
                    fix="calibrate with images (text-only calibration gives the hyper layers' v_kv_proj no input)",
                )
            quantized, record["method"] = rtn_quantize(weight, plan.bits, plan.group_size), "rtn (no calibration input)"
        elif self.recipe.method == "rtn":
            quantized, record["method"] = rtn_quantize(weight, plan.bits, plan.group_size), "rtn"
            record["relative_error"] = output_error(weight, quantized.dequantize(), hessian)
        else:
            try:
                result = gptq_quantize(
                    weight, hessian, plan.bits, plan.group_size, damp=self.recipe.damp,
                    act_order=self.recipe.act_order, tokens=stats.hessian.tokens,
                )  # fmt: skip
            except GPTQError as exc:
                raise QuantizationError(
                    f"{name}: {exc}", where="GPTQ", fix="use more varied calibration samples, or --exclude this layer"
                ) from exc
            quantized, record["method"] = result.weight, "gptq"
            record.update({"damp": result.damp, "loss": result.loss, "relative_error": result.relative_error})
        input_scale = None
        if plan.activations:
            value_range = float(stats.absmax.max()) if s is None else smoothed_absmax(stats.absmax, s)
            input_scale = record["input_scale"] = activation_scale(value_range)
        if s is not None:
            record["smoothing"] = {"min": float(s.min()), "max": float(s.max()), "explicit": pre is not None}
        bias = linear.bias.detach() if linear.bias is not None else None
        self.records.append(record)
        module = QuantizedLinear.from_weight(quantized, bias, input_scale=input_scale, pre_quant_scale=pre)
        module.cache_weight = True  # the replay dequantizes once per layer, not once per call
        return module
