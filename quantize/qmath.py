"""Quantization math as pure tensor functions: group sizes, symmetric scales, round-to-nearest, dequantization,
and the GPTQ int32 packing (shared docs, quantization.md §1-§2).

Orientation: torch keeps a Linear's weight as ``W [N, K]`` (out, in); the GPTQ layout stores its transpose.
``QuantizedWeight`` keeps the GPTQ orientation, so its tensors map one to one onto checkpoint tensors:

- ``codes``  [K, N] int32, unsigned codes in [0, 2^bits - 1]
- ``scales`` [G, N] fp16, G = K / group_size
- ``zeros``  [G, N] int32, the true zero point (2^(bits-1) for symmetric weights)
- ``g_idx``  [K] int32, group of each input row (``k // group_size`` when groups are contiguous)

Dequantize: ``W^T[k, n] = scales[g_idx[k], n] * (codes[k, n] - zeros[g_idx[k], n])``.

Symmetric scales follow GPTQModel: ``scale = 2 * max|w| / (2^bits - 1)`` with zero ``2^(bits-1)``, so codes use
[-2^(bits-1), 2^(bits-1) - 1] around the zero. Scales are rounded to fp16 *before* codes are chosen, so the
integers are optimal for the scale the checkpoint stores and dequantization reproduces exactly what the
quantizer modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PACK_BITS = 32  # int32 words
SUPPORTED_BITS = (4, 8)
GROUP_CHOICES = (128, 64, 32, 16)
_FP16_TINY = torch.finfo(torch.float16).tiny  # smallest normal fp16: the floor of a scale


@dataclass(frozen=True)
class QuantizedWeight:
    """One Linear's integer weights in the GPTQ orientation (see the module docstring for shapes)."""

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    bits: int
    group_size: int  # rows of K per group; K itself for per-channel quantization

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[1])

    def dequantize(self) -> Tensor:
        """The float weight in torch orientation, ``[N, K]`` float32."""
        return dequantize(self.codes, self.scales, self.zeros, self.g_idx).t()

    def has_trivial_g_idx(self) -> bool:
        return bool(torch.equal(self.g_idx.long(), contiguous_g_idx(self.in_features, self.group_size).long()))


# ---- groups and scales ---------------------------------------------------------------------------------


def group_size_for(in_features: int, preferred: int) -> int | None:
    """The group size used for a layer with ``in_features`` inputs.

    ``preferred`` -1 means per output channel (one group of all K). Otherwise the preferred size when it
    divides K, else the largest of 128, 64, 32, 16 that is at most ``preferred`` and divides K; None when
    none does (the caller refuses or keeps the layer in float).
    """
    if preferred == -1:
        return in_features
    for size in (preferred, *(g for g in GROUP_CHOICES if g < preferred)):
        if in_features % size == 0:
            return size
    return None


def contiguous_g_idx(in_features: int, group_size: int, device: torch.device | None = None) -> Tensor:
    """[K] int32: ``k // group_size``."""
    return (torch.arange(in_features, device=device) // group_size).to(torch.int32)


def maxq(bits: int) -> int:
    return (1 << bits) - 1


def symmetric_zero(bits: int) -> int:
    return 1 << (bits - 1)


def symmetric_scale(absmax: Tensor, bits: int) -> Tensor:
    """Per-group scales from ``max|w|`` (any shape), fp16-representable, returned as float32.

    An all-zero group gets the scale of max|w| = 1, as GPTQModel does; a scale never falls below the
    smallest normal fp16 (such weights quantize to zero, an error below 1e-4).
    """
    absmax = absmax.to(torch.float32)
    absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    scale = (2 * absmax / maxq(bits)).clamp(min=_FP16_TINY)
    scale = scale.to(torch.float16).to(torch.float32)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("a weight group overflows the fp16 scale range (max |w| above 2.4e5)")
    return scale


def quantize_codes(w: Tensor, scale: Tensor, zero: int | Tensor, bits: int) -> Tensor:
    """Round to nearest: ``clamp(round(w / scale) + zero, 0, 2^bits - 1)``, float-valued codes."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq(bits))


def rtn_quantize(weight: Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Round-to-nearest symmetric quantization of a torch weight ``[N, K]`` in contiguous groups."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    wt = weight.detach().to(torch.float32).t()  # [K, N]
    groups = wt.reshape(k // group_size, group_size, n)  # [G, g, N]
    scales = symmetric_scale(groups.abs().amax(dim=1), bits)  # [G, N]
    zero = symmetric_zero(bits)
    codes = quantize_codes(groups, scales[:, None, :], zero, bits).reshape(k, n)
    return QuantizedWeight(
        codes=codes.to(torch.int32),
        scales=scales.to(torch.float16),
        zeros=torch.full_like(scales, zero, dtype=torch.int32),
        g_idx=contiguous_g_idx(k, group_size, weight.device),
        bits=bits,
        group_size=group_size,
    )


def dequantize(codes: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor) -> Tensor:
    """``[K, N]`` float32 from codes [K, N], scales and zeros [G, N], g_idx [K].

    Contiguous groups broadcast [G, 1, N] over [G, K / G, N] in place: one [K, N] float32 temporary."""
    k, n = codes.shape
    groups = scales.shape[0]
    weight = codes.to(torch.float32)
    if k % groups == 0 and torch.equal(g_idx.long(), contiguous_g_idx(k, k // groups, g_idx.device).long()):
        view = weight.view(groups, k // groups, n)
        view.sub_(zeros.to(torch.float32)[:, None, :]).mul_(scales.to(torch.float32)[:, None, :])
        return weight
    index = g_idx.long()
    return weight.sub_(zeros.to(torch.float32)[index]).mul_(scales.to(torch.float32)[index])


# ---- GPTQ int32 packing ----------------------------------------------------------------------------------


def pack_factor(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{bits}-bit packing is not supported (supported: {SUPPORTED_BITS})")
    return PACK_BITS // bits


def _shifts(bits: int, device: torch.device) -> Tensor:
    return torch.arange(0, PACK_BITS, bits, dtype=torch.int64, device=device)  # [pf]


def _to_int32(words: Tensor) -> Tensor:
    """uint32 values held in int64 -> int32 with the same bits (two's complement)."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """[K, N] codes -> int32 [K / pf, N]: word r holds codes[r*pf + j] at bit offset bits*j.

    Works one bit position at a time in int64 words of [K / pf, N]: no [K, N] int64 temporary."""
    pf = pack_factor(bits)
    k, n = codes.shape
    if k % pf:
        raise ValueError(f"{k} rows cannot be packed {pf} to a word")
    grouped = codes.reshape(k // pf, pf, n)
    words = torch.zeros(k // pf, n, dtype=torch.int64, device=codes.device)
    for j in range(pf):
        words |= (grouped[:, j, :].to(torch.int64) & maxq(bits)) << (bits * j)
    return _to_int32(words).contiguous()


def unpack_rows(packed: Tensor, bits: int) -> Tensor:
    """int32 [K / pf, N] -> int32 codes [K, N] (inverse of ``pack_rows``), one bit position at a time."""
    pf = pack_factor(bits)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    codes = torch.empty(packed.shape[0], pf, packed.shape[1], dtype=torch.int32, device=packed.device)
    for j in range(pf):
        codes[:, j, :] = (words >> (bits * j)) & maxq(bits)
    return codes.reshape(packed.shape[0] * pf, packed.shape[1])


def pack_cols(values: Tensor, bits: int) -> Tensor:
    """[G, N] -> int32 [G, N / pf]: word c holds values[:, c*pf + j] at bit offset bits*j."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_cols(packed: Tensor, bits: int) -> Tensor:
    """int32 [G, N / pf] -> int32 [G, N] (inverse of ``pack_cols``)."""
    return unpack_rows(packed.t(), bits).t().contiguous()


# ---- activations (W8A8) ----------------------------------------------------------------------------------


def activation_scale(absmax: float) -> float:
    """Static per-tensor INT8 scale for activations whose calibration max |x| is ``absmax``."""
    return max(float(absmax), 1e-8) / 127.0


def fake_quantize_int8(x: Tensor, scale: Tensor) -> Tensor:
    """Symmetric per-tensor INT8 quantize-dequantize of activations (QuantizeLinear -> DequantizeLinear), as
    ONNX Runtime computes it: the scale rounded to x's dtype, the division and rounding in float32."""
    scale = scale.to(x.dtype).float()
    return (torch.clamp(torch.round(x.float() / scale), -128, 127) * scale).to(x.dtype)
