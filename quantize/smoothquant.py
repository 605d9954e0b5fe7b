"""SmoothQuant (Xiao et al. 2023) as pure tensor functions (shared docs, quantization.md §6).

``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` moves activation outliers into the weights: the input is divided
by ``s`` and the weight's columns multiplied by it. Where the input comes from an RMSNorm the division folds
into the norm's weight; elsewhere (``o_proj``, ``down_proj``, and the hyper layers' ``v_kv_proj`` when it has
its own vector) it is an explicit ``pre_quant_scale`` multiplied into the input before quantization.

Grouping (TensorRT-LLM's Qwen2 converter): q, k, v against ``input_layernorm``; gate and up against
``post_attention_layernorm``; o_proj and down_proj alone. Owl3's ``v_kv_proj`` reads the visual memory through
the same ``input_layernorm``, so it is either smoothed with q/k/v by one shared vector ("shared") or gets its own
vector for the visual statistics on top of the text one ("separate").

Statistics are the per-channel max |x| of the calibration inputs; the Hessian and the activation range of the
smoothed input follow from them exactly (``smoothed_hessian``, ``smoothed_absmax``), with no second pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

SCALE_FLOOR = 1e-5  # the floor TensorRT-LLM applies to smoothing factors
FP16_HEADROOM = 6.0e4  # a folded norm weight w / s must stay below fp16's 65504


def column_absmax(weights: Sequence[Tensor]) -> Tensor:
    """max |W[:, j]| over every row of every weight ``[N_i, K]`` that reads input channel j: [K]."""
    return torch.stack([w.detach().abs().amax(dim=0).to(torch.float32) for w in weights]).amax(dim=0)


def smoothing_vector(
    act_absmax: Tensor, weight_absmax: Tensor, alpha: float, norm_weight: Tensor | None = None
) -> Tensor:
    """``s = max|X|^alpha / max|W|^(1-alpha)``, at least ``SCALE_FLOOR``; with ``norm_weight`` (the RMSNorm the
    division folds into) also large enough that ``norm_weight / s`` stays within fp16. Dead channels get 1."""
    act = act_absmax.to(torch.float32)
    wmax = weight_absmax.to(torch.float32).clamp(min=SCALE_FLOOR)
    s = act.pow(alpha) / wmax.pow(1 - alpha)
    s = torch.where((act > 0) & torch.isfinite(s), s, torch.ones_like(s)).clamp(min=SCALE_FLOOR)
    if norm_weight is not None:
        s = torch.maximum(s, norm_weight.detach().abs().to(torch.float32) / FP16_HEADROOM)
    return s


def scale_columns(weight: Tensor, s: Tensor) -> None:
    """In place: ``W[:, j] *= s[j]`` (the weight side of smoothing)."""
    weight.mul_(s.to(weight.dtype)[None, :])


def smoothed_hessian(hessian: Tensor, s: Tensor) -> Tensor:
    """In place: the Hessian of ``x / s`` from that of x: ``H[i, j] / (s_i s_j)``."""
    inverse = (1.0 / s.to(torch.float32)).to(hessian.device)
    return hessian.mul_(inverse[:, None]).mul_(inverse[None, :])


def smoothed_absmax(act_absmax: Tensor, s: Tensor) -> float:
    """max |x / s| over all channels: the per-tensor activation range after smoothing."""
    return float((act_absmax.to(torch.float32) / s.to(torch.float32)).max())
