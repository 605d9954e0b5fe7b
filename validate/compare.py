"""One comparison of two backends' tensors, used for every pair (PyTorch vs ONNX, fp32 vs fp16, later
quantized and TensorRT): tensor error metrics (level L1) and next-token distribution metrics (level L2).
numpy only, so it runs wherever the runtime runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class TensorComparison:
    """How far ``candidate`` is from ``reference``: one output of one graph on one input."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    sqnr_db: float
    nan: int
    inf: int

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def compare_tensors(name: str, reference: np.ndarray, candidate: np.ndarray) -> TensorComparison:
    """Max/mean abs error, max relative error, cosine similarity, SQNR (dB) and NaN/Inf counts of candidate."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"{name}: shapes differ, reference {ref.shape} vs candidate {cand.shape}")
    nan, inf = int(np.isnan(cand).sum()), int(np.isinf(cand).sum())
    finite = np.isfinite(cand)
    diff = np.where(finite, np.abs(ref - cand), np.inf)
    noise = float(np.sum(np.where(finite, (ref - cand) ** 2, np.inf)))
    signal = float(np.sum(ref**2))
    norms = float(np.linalg.norm(ref) * np.linalg.norm(np.where(finite, cand, 0.0)))
    cosine = float(np.sum(ref * np.where(finite, cand, 0.0)) / norms) if norms > 0 else float(ref.size == 0)
    return TensorComparison(
        name=name,
        shape=tuple(ref.shape),
        max_abs=float(diff.max()) if diff.size else 0.0,
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        max_rel=float((diff / np.maximum(np.abs(ref), 1e-6)).max()) if diff.size else 0.0,
        cosine=cosine,
        sqnr_db=float(10 * np.log10(signal / noise)) if noise > 0 else float("inf"),
        nan=nan,
        inf=inf,
    )


@dataclass(frozen=True)
class DistributionComparison:
    """Next-token distributions of two backends over the same positions (teacher-forced)."""

    positions: int
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    perplexity_ratio: float | None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare_distributions(
    reference_logits: np.ndarray, candidate_logits: np.ndarray, targets: np.ndarray | None = None
) -> DistributionComparison:
    """KL(ref || cand) per position, top-1 agreement, and the perplexity ratio cand/ref on ``targets``.

    logits [..., V] (flattened over all leading dims); targets [...] the token that follows each position.
    """
    vocab = reference_logits.shape[-1]
    ref = _log_softmax(np.asarray(reference_logits, dtype=np.float64).reshape(-1, vocab))
    cand = _log_softmax(np.asarray(candidate_logits, dtype=np.float64).reshape(-1, vocab))
    kl = np.sum(np.exp(ref) * (ref - cand), axis=-1)
    ratio = None
    if targets is not None:
        flat = np.asarray(targets).reshape(-1)
        rows = np.arange(flat.size)
        ratio = float(np.exp(np.mean(ref[rows, flat]) - np.mean(cand[rows, flat])))
    return DistributionComparison(
        positions=int(kl.size),
        kl_mean=float(kl.mean()),
        kl_p99=float(np.percentile(kl, 99)),
        kl_max=float(kl.max()),
        top1_agreement=float(np.mean(ref.argmax(-1) == cand.argmax(-1))),
        perplexity_ratio=ratio,
    )
