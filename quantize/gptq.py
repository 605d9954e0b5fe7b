"""GPTQ (Frantar et al. 2022) as pure functions, with GPTQModel's defaults (shared docs, quantization.md §3).

``Hessian`` accumulates ``H = 2/n * sum(X^T X)`` in fp32 over calibration tokens; ``gptq_quantize`` quantizes
one weight ``[N, K]`` against it column by column, propagating each column's rounding error onto the columns
not yet quantized through the inverse Hessian (its upper Cholesky factor), in lazy blocks of 128 columns.

- Dead inputs (``H[d, d] == 0``: never active in calibration) get ``H[d, d] = 1`` and their weights are zeroed.
- Damping: ``diag(H) += damp * mean(diag(H))``; when Cholesky fails the damping is raised step by step.
- Groups are contiguous (``g_idx[k] = k // group_size``). A group's scale is chosen when its first column is
  reached, from the group's current (error-updated) weights.
- ``act_order`` is the group-aware reordering (GPTQModel ``act_group_aware``): groups are processed in
  descending order of their largest ``H[d, d]`` and columns within a group likewise, but a group's members stay
  the same contiguous input rows, so ``g_idx`` stays trivial and ONNX Runtime and TensorRT run it as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from owl3.quantize.qmath import (
    QuantizedWeight,
    contiguous_g_idx,
    dequantize,
    quantize_codes,
    symmetric_scale,
    symmetric_zero,
)

BLOCK = 128  # columns per lazy batch update
DAMP_STEP = 0.01  # added to damp each time Cholesky fails
DAMP_LIMIT = 1.0


class GPTQError(ValueError):
    """The Hessian could not be factorised even with the largest damping."""


class Hessian:
    """Running ``2/n * sum(X^T X)`` of a Linear's inputs (``K x K`` fp32) and the token count ``n``."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        """Add inputs ``[..., K]`` (every leading position is one calibration token)."""
        flat = x.reshape(-1, x.shape[-1]).to(device=self.sum.device, dtype=torch.float32)
        self.sum.addmm_(flat.t(), flat)
        self.tokens += flat.shape[0]

    def finish(self) -> Tensor:
        """The Hessian, scaled in place (the accumulator is spent: a K x K copy is never made)."""
        if self.tokens == 0:
            raise GPTQError("no calibration tokens reached this layer")
        return self.sum.mul_(2.0 / self.tokens)


@dataclass(frozen=True)
class GPTQResult:
    weight: QuantizedWeight
    loss: float  # GPTQ's objective: sum over columns of err^2 / Hinv[d, d]^2 / 2, divided by tokens
    relative_error: float  # ||X (W - Wq)^T||^2 / ||X W^T||^2 over the calibration tokens
    damp: float  # the damping that factorised


def output_error(weight: Tensor, quantized: Tensor, hessian: Tensor) -> float:
    """Relative squared output error ``tr(dW H dW^T) / tr(W H W^T)``: exact over the calibration tokens
    (H from ``Hessian.finish``; columns of inputs that were never active contribute nothing)."""
    weight, quantized = weight.to(torch.float32), quantized.to(torch.float32)
    live = hessian.diagonal() > 0
    if not bool(live.all()):
        weight, quantized, hessian = weight[:, live], quantized[:, live], hessian[live][:, live]
    delta = weight - quantized
    num = float(torch.sum((delta @ hessian).mul_(delta), dtype=torch.float64))
    den = float(torch.sum((weight @ hessian).mul_(weight), dtype=torch.float64))
    return num / den if den > 0 else 0.0


def inverse_factor(hessian: Tensor, damp: float, order: Tensor | None = None) -> tuple[Tensor, float]:
    """Upper Cholesky factor U of ``(H' + damp * mean(diag H') * I)^-1`` (``U^T U`` is that inverse), where H'
    is ``hessian`` with dead inputs' diagonal set to 1, permuted by ``order`` when given; raises damp until it
    factorises. ``hessian`` is left unchanged; the work happens in one K x K buffer (LAPACK in place on its
    column-major view), so a 7B down_proj (K = 18944) needs 1.4 GB beside its Hessian, not three times that."""
    buffer = torch.empty_like(hessian)
    factor = buffer.mT  # column-major: cholesky, cholesky_inverse and cholesky run in place on it
    info = torch.zeros((), dtype=torch.int32, device=hessian.device)
    mean = None
    while damp < DAMP_LIMIT:
        _copy_permuted(buffer, hessian, order)
        diagonal = buffer.diagonal()
        diagonal[diagonal == 0] = 1.0  # dead inputs (their weights are zeroed by the caller)
        mean = float(diagonal.mean()) if mean is None else mean
        diagonal.add_(damp * mean)
        torch.linalg.cholesky_ex(factor, out=(factor, info))
        if int(info) == 0:
            torch.cholesky_inverse(factor, out=factor)
            torch.linalg.cholesky_ex(factor, upper=True, out=(factor, info))
            if int(info) == 0 and _all_finite(factor):
                return factor, damp
        damp = round(damp + DAMP_STEP, 6)
    raise GPTQError(f"the Hessian is not positive definite even with damping {DAMP_LIMIT}")


def _copy_permuted(out: Tensor, hessian: Tensor, order: Tensor | None, rows: int = 1024) -> None:
    """``out = hessian[order][:, order]`` (or a plain copy), ``rows`` rows at a time: no second K x K temporary."""
    if order is None:
        out.copy_(hessian)
        return
    for start in range(0, len(order), rows):
        out[start : start + rows] = hessian[order[start : start + rows]][:, order]


def _all_finite(matrix: Tensor, rows: int = 1024) -> bool:
    """isfinite in row chunks: on a whole K x K matrix it would allocate several K x K temporaries."""
    return all(bool(torch.isfinite(part).all()) for part in matrix.split(rows))


def group_aware_order(diag: Tensor, group_size: int) -> Tensor:
    """Processing order [K]: groups by descending max diag, columns within a group by descending diag."""
    k = diag.numel()
    values = diag.reshape(k // group_size, group_size)
    local = torch.sort(values, dim=1, descending=True, stable=True)
    order = torch.argsort(local.values[:, 0], descending=True, stable=True)  # [G]
    base = torch.arange(k // group_size, device=diag.device)[:, None] * group_size
    return (local.indices + base)[order].reshape(-1)


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    bits: int,
    group_size: int,
    *,
    damp: float = 0.05,
    act_order: bool = False,
    tokens: int = 1,
) -> GPTQResult:
    """Quantize ``weight [N, K]`` against ``hessian [K, K]`` (from ``Hessian.finish``); ``tokens`` scales the
    loss. Returns contiguous-group symmetric codes; ``act_order`` changes only the processing order.

    Memory: the weight twice, one K x K factor beside the Hessian, and N x K bytes of codes.
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    work = weight.detach().to(device=hessian.device, dtype=torch.float32).clone()
    work[:, hessian.diagonal() == 0] = 0.0  # inputs never active: their weights carry no information
    order = group_aware_order(hessian.diagonal(), group_size) if act_order else None
    if order is not None:
        work = work[:, order]
    upper, used_damp = inverse_factor(hessian, damp, order)
    groups = k // group_size
    scales = torch.zeros(groups, n, dtype=torch.float32, device=work.device)
    codes = torch.zeros(n, k, dtype=torch.uint8, device=work.device)
    losses = torch.zeros(n, dtype=torch.float64, device=work.device)
    zero = symmetric_zero(bits)
    group_of = ((order if order is not None else torch.arange(k)) // group_size).tolist()
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        block = work[:, i1:i2].clone()
        errors = torch.zeros_like(block)
        inverse = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column, group = i1 + i, group_of[i1 + i]
            if column % group_size == 0:  # a group's first column in processing order: choose its scale
                fits = i + group_size <= i2 - i1  # groups of <= 128 always fit; per-channel starts at column 0
                span = block[:, i : i + group_size] if fits else work[:, column : column + group_size]
                scales[group] = symmetric_scale(span.abs().amax(dim=1), bits)
            scale = scales[group]
            w = block[:, i]
            q = quantize_codes(w, scale, zero, bits)
            codes[:, column] = q.to(torch.uint8)
            error = (w - scale * (q - zero)) / inverse[i, i]
            losses += error.double() ** 2 / 2
            block[:, i:] -= error[:, None] * inverse[i, i:][None, :]
            errors[:, i] = error
        work[:, i2:] -= errors @ upper[i1:i2, i2:]
    del upper, work
    if order is not None:
        codes = codes[:, torch.argsort(order)]
    result = QuantizedWeight(
        codes=codes.t().to(torch.int32).contiguous(),  # [K, N]
        scales=scales.to(torch.float16),
        zeros=torch.full((groups, n), zero, dtype=torch.int32, device=codes.device),
        g_idx=contiguous_g_idx(k, group_size, codes.device),
        bits=bits,
        group_size=group_size,
    )
    dequantized = dequantize(result.codes, result.scales, result.zeros, result.g_idx).t()
    relative = output_error(weight.to(hessian.device), dequantized, hessian)
    return GPTQResult(result, float(losses.sum()) / max(tokens, 1), relative, used_damp)
