"""``QuantizedLinear``: a Linear that computes with exactly the integer weights and scales of a GPTQ checkpoint.

It holds the checkpoint's tensors as buffers, under the checkpoint's names (``qweight``, ``qzeros``, ``scales``,
``g_idx``, ``bias``, and for W8A8 ``input_scale`` / ``pre_quant_scale``), and dequantizes on every call:
``W^T[k, n] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])`` in float32, cast to the input's dtype. W8A8
inputs are first multiplied by ``pre_quant_scale`` (SmoothQuant vectors that cannot be folded into a norm) and
then quantized and dequantized per tensor with the static ``input_scale``, as the exported graphs do.

The same class serves the quantizer's replay (each layer runs quantized before its outputs feed the next) and
``owl3.load_model`` on a quantized checkpoint, so the two compute the same thing by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from owl3.quantize.qmath import (
    QuantizedWeight,
    dequantize,
    fake_quantize_int8,
    pack_cols,
    pack_factor,
    pack_rows,
    unpack_cols,
    unpack_rows,
)

GPTQ_V1, GPTQ_V2 = "gptq", "gptq_v2"  # v1 stores zero - 1 in qzeros; v2 the true zero


class QuantizedLinear(nn.Module):
    """A GPTQ-packed Linear (``in_features`` K, ``out_features`` N, ``bits``, ``group_size`` rows per group)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        *,
        bias: bool,
        activations: bool = False,
        smoothed: bool = False,
        checkpoint_format: str = GPTQ_V1,
    ) -> None:
        super().__init__()
        pf = pack_factor(bits)
        groups = in_features // group_size
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.checkpoint_format = bits, group_size, checkpoint_format
        self.register_buffer("qweight", torch.zeros(in_features // pf, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // pf, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)
        self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32) if activations else None)
        self.register_buffer("pre_quant_scale", torch.ones(in_features, dtype=torch.float32) if smoothed else None)
        self.cache_weight = False  # keep the dequantized weight between calls (the quantizer's replay)
        self._cached: Tensor | None = None

    @classmethod
    def from_weight(
        cls,
        weight: QuantizedWeight,
        bias: Tensor | None,
        *,
        input_scale: float | None = None,
        pre_quant_scale: Tensor | None = None,
    ) -> QuantizedLinear:
        """Pack ``weight`` (GPTQ v1) with an optional bias and W8A8 scales."""
        module = cls(
            weight.in_features, weight.out_features, weight.bits, weight.group_size, bias=bias is not None,
            activations=input_scale is not None, smoothed=pre_quant_scale is not None,
        )  # fmt: skip
        device = weight.codes.device
        module.to(device)
        module.qweight.copy_(pack_rows(weight.codes, weight.bits))
        module.qzeros.copy_(pack_cols(weight.zeros - 1, weight.bits))  # v1: zero - 1
        module.scales.copy_(weight.scales)
        module.g_idx.copy_(weight.g_idx)
        if bias is not None:
            module.bias.copy_(bias.to(torch.float16))
        if input_scale is not None:
            module.input_scale.fill_(input_scale)
        if pre_quant_scale is not None:
            module.pre_quant_scale.copy_(pre_quant_scale)
        return module

    def zeros(self) -> Tensor:
        """True zero points [G, N] int32, whatever the checkpoint format."""
        stored = unpack_cols(self.qzeros, self.bits)
        return stored + 1 if self.checkpoint_format == GPTQ_V1 else stored

    def codes(self) -> Tensor:
        return unpack_rows(self.qweight, self.bits)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes(), self.scales, self.zeros(), self.g_idx, self.bits, self.group_size)

    def dequantized_weight(self) -> Tensor:
        """[N, K] float32 (the same every call; kept between calls when ``cache_weight`` is set)."""
        if self._cached is not None:
            return self._cached
        weight = dequantize(self.codes(), self.scales, self.zeros(), self.g_idx).t()
        if self.cache_weight:
            self._cached = weight
        return weight

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale.to(x.dtype)
        if self.input_scale is not None:
            x = fake_quantize_int8(x, self.input_scale)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        extra = ", int8 activations" if self.input_scale is not None else ""
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}{extra}"


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted path ``name`` inside ``root`` (module surgery, the only place it happens)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
