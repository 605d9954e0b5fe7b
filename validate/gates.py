"""Accuracy gates, in one versioned place (starting values of the shared validation doc; recalibrate on
first real runs and bump GATES_VERSION with every change)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from owl3.validate.compare import DistributionComparison, TensorComparison

GATES_VERSION = 3  # 2: gates for int8, w8a8 and int4; 3: TensorRT vs ONNX Runtime CPU on the same graphs


@dataclass(frozen=True)
class Gate:
    """Limits for one comparison; None disables a check. Tensor limits apply to every output compared."""

    name: str
    max_abs: float | None = None  # on logits (L1)
    min_cosine: float | None = None  # on every output (L1)
    finite: bool = True  # no NaN / Inf in the candidate
    max_kl_mean: float | None = None  # L2
    min_top1: float | None = None  # L2
    task_margin: float | None = None  # L3 non-inferiority margin, as a fraction (0.005 = 0.5 points)

    def check_tensor(self, result: TensorComparison, *, is_logits: bool) -> list[str]:
        failures = []
        if self.finite and (result.nan or result.inf):
            failures.append(f"{result.name}: {result.nan} NaN and {result.inf} Inf values")
        if self.max_abs is not None and is_logits and result.max_abs > self.max_abs:
            failures.append(f"{result.name}: max abs error {result.max_abs:.3g} > {self.max_abs:g}")
        if self.min_cosine is not None and result.cosine < self.min_cosine:
            failures.append(f"{result.name}: cosine {result.cosine:.6f} < {self.min_cosine:g}")
        return failures

    def check_distribution(self, name: str, result: DistributionComparison) -> list[str]:
        failures = []
        if self.max_kl_mean is not None and result.kl_mean > self.max_kl_mean:
            failures.append(f"{name}: mean KL {result.kl_mean:.3g} > {self.max_kl_mean:g}")
        if self.min_top1 is not None and result.top1_agreement < self.min_top1:
            failures.append(f"{name}: top-1 agreement {result.top1_agreement:.4f} < {self.min_top1:g}")
        return failures

    def to_json(self) -> dict[str, object]:
        return {"version": GATES_VERSION, **asdict(self)}


GATES = {
    "onnx-fp32": Gate("ONNX fp32 (ONNX Runtime CPU) vs PyTorch fp32", max_abs=1e-4, min_top1=1.0),
    "onnx-fp16": Gate("fp16 export vs PyTorch", min_cosine=0.9999, max_kl_mean=1e-3, min_top1=0.99, task_margin=0.005),
}
# Quantized candidates (PyTorch on the quantized checkpoint, or its exports) against the float reference.
QUANTIZED_GATES = {
    "int8": Gate("INT8 weight-only", min_cosine=0.999, max_kl_mean=5e-3, min_top1=0.97, task_margin=0.005),
    "w8a8": Gate("INT8 weights and activations", min_cosine=0.99, max_kl_mean=2e-2, min_top1=0.93, task_margin=0.01),
    "int4": Gate("INT4 GPTQ", min_cosine=0.99, max_kl_mean=5e-2, min_top1=0.90, task_margin=0.01),
}
GATES.update(
    {
        f"{kind}-{precision}": replace(gate, name=f"{gate.name} ({label}) vs the float reference")
        for kind, label in (("pytorch", "PyTorch"), ("onnx", "ONNX Runtime"))
        for precision, gate in QUANTIZED_GATES.items()
    }
)


# A quantized export's graphs against PyTorch on the same checkpoint (export validation): the same integers,
# so only the kernels' arithmetic differs; int8 activations (MatMulNBits accuracy level 4, or W8A8 rounding
# boundaries met in another order) move more than exact dequantization does.
EXPORT_GATES = {
    "exact": Gate("quantized graphs (fp32, exact dequantization) vs PyTorch on the checkpoint", min_cosine=0.9999,
                  max_kl_mean=1e-4, min_top1=0.99),
    "int8-activations": Gate("quantized graphs (int8 activations in the kernel) vs PyTorch on the checkpoint",
                             min_cosine=0.999, max_kl_mean=1e-2, min_top1=0.90),
    "fp16": Gate("quantized graphs (fp16 compute) vs PyTorch fp16 on the checkpoint", min_cosine=0.999,
                 max_kl_mean=1e-3, min_top1=0.97),
}  # fmt: skip


def export_gate(quantized: dict) -> Gate:
    """The export-validation gate of a quantized export's record (precision, compute, accuracy_level). INT8
    activations amplify any arithmetic difference into whole quantization steps wherever a value sits near a
    rounding boundary (W8A8 in fp16: KL ~5e-3 on the demo model, exact in fp32), hence their wider gate."""
    if quantized.get("precision") == "w8a8" or quantized.get("accuracy_level") == 4:
        return EXPORT_GATES["int8-activations"]
    return EXPORT_GATES["fp16" if quantized["compute"] == "fp16" else "exact"]


def gate_for(kind: str, precision: str) -> Gate | None:
    """The gate of a candidate backend (``onnx``, ``fp16`` -> "onnx-fp16"); None: reported, not gated."""
    return GATES.get(f"{kind}-{precision}")


# Gates of a pair of runtimes on the *same graphs* (same sha256): only the kernels differ. TensorRT (engines,
# or ONNX Runtime's TensorRT EP) against ONNX Runtime CPU: issue 11's gate (0.3 points = 0.003).
PAIR_GATES = {
    ("tensorrt", "onnx-cpu"): Gate("TensorRT vs ONNX Runtime CPU on the same graphs", max_kl_mean=1e-3,
                                   task_margin=0.003),
}  # fmt: skip


def select_gate(candidate: Any, reference: Any) -> tuple[str, Gate | None]:
    """(key, gate) of a comparison: the pair's gate when both arms ran the same graphs on runtimes that
    ``PAIR_GATES`` lists (``target``: where each really ran), else the candidate's own (``gate_for``)."""
    pair = (getattr(candidate, "target", None), getattr(reference, "target", None))
    if pair in PAIR_GATES and same_graphs(getattr(candidate, "graph_sha256", None),
                                          getattr(reference, "graph_sha256", None)):  # fmt: skip
        return f"{pair[0]}-vs-{pair[1]}", PAIR_GATES[pair]
    return f"{candidate.kind}-{candidate.precision}", gate_for(candidate.kind, candidate.precision)


def same_graphs(a: Mapping[str, str] | None, b: Mapping[str, str] | None) -> bool:
    """Both arms ran graphs with the same files and sha256 (an empty or unknown record is never the same)."""
    return bool(a) and bool(b) and dict(a) == dict(b) and all(a.values())
