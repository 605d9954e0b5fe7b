"""Paired statistics for task-level validation (level L3): is the candidate's accuracy non-inferior?

Both arms answer the same scoring units (spec: items.py), so every statistic here is *paired*: it works on
the per-unit difference ``candidate - reference``. Accuracies and deltas are fractions in [0, 1] internally;
reports format them as percentage points.

- Binary scores (multiple choice, POPE): McNemar's exact test on the discordant pairs, plus a bootstrap CI.
- Soft scores (VQA accuracy in {0, .3, .6, .9, 1}): paired bootstrap only.
- Units that share an image or a video form a cluster; the bootstrap resamples clusters, not units.
- The gate is non-inferiority: pass when the one-sided lower bound of delta is above ``-margin``.

numpy only; every function is pure and deterministic for its ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

# Below this ratio of distinct cluster kinds to clusters, resampling draws multinomial counts per kind
# (cost ~ resamples x kinds) instead of gathering resampled clusters (cost ~ resamples x clusters).
_KINDS_PER_CLUSTER = 1 / 32
_CHUNK = 256  # resamples gathered at once on the gather path: 256 x clusters int32 indices


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (binomial test, p = 0.5).

    b: units the reference got right and the candidate wrong; c: the reverse. p = min(1, 2 P[X <= min(b, c)])
    for X ~ Binomial(b + c, 1/2), computed in log space so it stays exact to ~1e-12 for any count.
    """
    if isinstance(b, bool) or isinstance(c, bool) or int(b) != b or int(c) != c or b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative integers, found b={b!r}, c={c!r}")
    n, k = int(b) + int(c), min(int(b), int(c))
    if n == 0 or 2 * k >= n:  # no discordant pair, or b == c: no evidence either way
        return 1.0
    j = np.arange(1, k + 1, dtype=np.float64)
    log_comb = np.concatenate([[0.0], np.cumsum(np.log(n - j + 1) - np.log(j))])  # log C(n, 0..k)
    peak = log_comb.max()
    log_tail = peak + math.log(np.exp(log_comb - peak).sum()) - n * math.log(2.0)
    return float(min(1.0, 2.0 * math.exp(log_tail)))


@dataclass(frozen=True)
class PairedDelta:
    """Paired accuracy comparison of a candidate with the reference on the same units (fractions, not points)."""

    reference_accuracy: float
    candidate_accuracy: float
    delta: float  # candidate - reference
    ci_low: float  # two-sided CI at ``confidence``
    ci_high: float
    lower_bound: float  # one-sided lower bound at ``confidence``: the non-inferiority statistic
    confidence: float
    lost: int  # reference right -> candidate wrong (soft scores: units whose score dropped)
    gained: int  # reference wrong -> candidate right (soft scores: units whose score rose)
    n_units: int
    n_clusters: int
    binary: bool
    mcnemar_p: float | None  # binary scores only
    method: str
    resamples: int
    seed: int

    @property
    def discordant_rate(self) -> float:
        """Share of units whose score differs between the arms."""
        return (self.lost + self.gained) / self.n_units

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PairedDelta:
        return cls(**data)


def paired_delta(
    reference: Any,
    candidate: Any,
    clusters: Any | None = None,
    *,
    binary: bool,
    resamples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedDelta:
    """Paired delta (candidate - reference) of per-unit scores, with a cluster-bootstrap CI.

    reference, candidate: [n] unit scores in [0, 1] (0/1 when ``binary``), in the same unit order.
    clusters: [n] cluster id of each unit (the image or video it shares), or None for independent units.
    The CI is the percentile interval of ``resamples`` cluster-bootstrap deltas; ``lower_bound`` is the
    ``1 - confidence`` quantile (one-sided). Binary scores also get McNemar's exact p-value.
    """
    ref, cand = _scores(reference, "reference", binary), _scores(candidate, "candidate", binary)
    if ref.shape != cand.shape:
        raise ValueError(f"the arms must score the same units: reference has {ref.size}, candidate {cand.size}")
    if ref.size == 0:
        raise ValueError("no units to compare: both arms are empty; check the benchmark subset and exclusions")
    if resamples < 1000:
        raise ValueError(f"resamples must be at least 1000 (10000 recommended), found {resamples}")
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must be in (0.5, 1), found {confidence}")
    codes = _cluster_codes(clusters, ref.size)
    n_clusters = int(codes.max()) + 1
    sums = np.bincount(codes, weights=cand - ref, minlength=n_clusters)  # [G] summed differences per cluster
    sizes = np.bincount(codes, minlength=n_clusters).astype(np.float64)  # [G] units per cluster
    deltas = _bootstrap_deltas(sums, sizes, resamples, np.random.default_rng(seed))
    alpha = 1.0 - confidence
    low, high, bound = np.quantile(deltas, [alpha / 2, 1 - alpha / 2, alpha])
    lost, gained = int(np.sum(cand < ref)), int(np.sum(cand > ref))
    unit = "clusters" if n_clusters < ref.size else "units"
    method = f"paired bootstrap over {unit} (percentile, {resamples} resamples)"
    return PairedDelta(
        reference_accuracy=float(ref.mean()),
        candidate_accuracy=float(cand.mean()),
        delta=float(cand.mean() - ref.mean()),
        ci_low=float(low),
        ci_high=float(high),
        lower_bound=float(bound),
        confidence=confidence,
        lost=lost,
        gained=gained,
        n_units=int(ref.size),
        n_clusters=n_clusters,
        binary=binary,
        mcnemar_p=mcnemar_exact(lost, gained) if binary else None,
        method=method + ("; McNemar exact" if binary else ""),
        resamples=resamples,
        seed=seed,
    )


def _scores(values: Any, arm: str, binary: bool) -> np.ndarray:
    scores = np.asarray(values, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"{arm} scores must be one score per unit [n], found shape {scores.shape}")
    if not np.all(np.isfinite(scores)) or np.any((scores < 0) | (scores > 1)):
        raise ValueError(f"{arm} scores must be finite and in [0, 1]; fix the task's scoring")
    if binary and np.any((scores != 0) & (scores != 1)):
        raise ValueError(f"{arm} scores are not all 0 or 1 but binary=True; pass binary=False for soft scores")
    return scores


def _cluster_codes(clusters: Any | None, n: int) -> np.ndarray:
    """[n] integer cluster index of each unit, 0..G-1 (each unit its own cluster when ``clusters`` is None)."""
    if clusters is None:
        return np.arange(n)
    ids = np.asarray(clusters)
    if ids.shape != (n,):
        raise ValueError(f"clusters must give one id per unit ({n}), found shape {ids.shape}")
    return np.unique(ids, return_inverse=True)[1].reshape(n)


def _bootstrap_deltas(
    sums: np.ndarray, sizes: np.ndarray, resamples: int, rng: np.random.Generator, *, by_kind: bool | None = None
) -> np.ndarray:
    """[resamples] bootstrap deltas: draw G clusters with replacement, delta = sum of diffs / units drawn.

    Clusters with the same (sum, size) are interchangeable, so when there are few such kinds the draw is
    done exactly as multinomial counts per kind (binary scores without clustering have at most 3 kinds).
    ``by_kind`` forces one path (tests); None picks the cheaper one.
    """
    kinds, counts = np.unique(np.stack([sums, sizes], axis=1), axis=0, return_counts=True)
    if by_kind is None:
        by_kind = len(kinds) <= max(8, _KINDS_PER_CLUSTER * len(sums))
    if by_kind:
        draws = rng.multinomial(len(sums), counts / len(sums), size=resamples)  # [R, K] clusters of each kind
        return (draws @ kinds[:, 0]) / (draws @ kinds[:, 1])
    equal_sizes = bool(np.all(sizes == sizes[0]))  # then every resample has the same number of units
    out = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        rows = min(_CHUNK, resamples - start)
        picks = rng.integers(0, len(sums), size=(rows, len(sums)), dtype=np.int32)  # [rows, G]
        units = sizes.sum() if equal_sizes else sizes[picks].sum(axis=1)
        out[start : start + rows] = sums[picks].sum(axis=1) / units
    return out


def non_inferior(delta: PairedDelta, margin: float) -> bool:
    """The non-inferiority gate: the one-sided lower bound of delta is above ``-margin`` (a fraction)."""
    if not 0 <= margin < 1:
        raise ValueError(f"margin is a fraction in [0, 1) (0.005 = 0.5 points), found {margin}")
    return delta.lower_bound > -margin


def _z_sum(alpha: float, power: float) -> float:
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"alpha and power must be in (0, 1), found alpha={alpha}, power={power}")
    normal = NormalDist()
    return normal.inv_cdf(1 - alpha) + normal.inv_cdf(power)


def _check_rate(discordant_rate: float) -> None:
    if not 0 < discordant_rate <= 1:
        raise ValueError(f"discordant_rate must be in (0, 1], found {discordant_rate}")


def detectable_drop(n_units: int, discordant_rate: float = 0.05, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest drop (fraction) a paired one-sided test on ``n_units`` certifies with ``power``.

    Normal approximation of McNemar's test: drop = (z_{1-alpha} + z_{power}) * sqrt(discordant_rate / n).
    With 5% of answers differing, 3,100 units give ~0.01 (1 point). Clustered units count for less.
    """
    if n_units < 1:
        raise ValueError(f"n_units must be positive, found {n_units}")
    _check_rate(discordant_rate)
    return _z_sum(alpha, power) * math.sqrt(discordant_rate / n_units)


def required_units(margin: float, discordant_rate: float = 0.05, alpha: float = 0.05, power: float = 0.8) -> int:
    """Units a paired one-sided test needs to certify a drop of ``margin`` (fraction): the inverse of
    :func:`detectable_drop`."""
    if not 0 < margin < 1:
        raise ValueError(f"margin is a fraction in (0, 1), found {margin}")
    _check_rate(discordant_rate)
    return math.ceil(_z_sum(alpha, power) ** 2 * discordant_rate / margin**2)


def ci_half_width(n_units: int, discordant_rate: float = 0.05, confidence: float = 0.95) -> float:
    """Approximate half-width (fraction) of the two-sided paired CI of delta: 500 units at 5% give ~0.02."""
    if n_units < 1:
        raise ValueError(f"n_units must be positive, found {n_units}")
    _check_rate(discordant_rate)
    return NormalDist().inv_cdf(0.5 + confidence / 2) * math.sqrt(discordant_rate / n_units)


def certify_statement(n: int, margin: float, discordant_rate: float = 0.05) -> str:
    """One sentence for the report: can ``n`` paired units certify a drop of ``margin`` (fraction)?"""
    drop, needed = detectable_drop(n, discordant_rate), required_units(margin, discordant_rate)
    half = ci_half_width(n, discordant_rate)
    context = (
        f"with {discordant_rate * 100:.0f}% of answers differing, a one-sided paired test at 95% confidence "
        f"and 80% power detects drops of {_points(drop)} or more (95% CI about ±{_points(half)})"
    )
    if drop <= margin:
        return f"{n:,} units are enough to certify a drop of {_points(margin)}: {context}."
    return (
        f"{n:,} units are too few to certify a drop of {_points(margin)}: {context}; "
        f"{_points(margin)} needs about {_round_up(needed):,} units. This subset is a smoke gate, not a certificate."
    )


def _points(fraction: float) -> str:
    value = fraction * 100
    return f"{value:.1f} point" + ("" if f"{value:.1f}" == "1.0" else "s")


def _round_up(n: int) -> int:
    """n rounded up to two significant figures (3,091 -> 3,100), for statements made 'about'."""
    step = 10 ** max(0, len(str(n)) - 2)
    return -(-n // step) * step
