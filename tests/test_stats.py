"""Paired statistics of level L3 (owl3.validate.stats): McNemar, cluster bootstrap, non-inferiority, sample size."""

from __future__ import annotations

import json
import math
import time
from fractions import Fraction

import numpy as np
import pytest

from owl3.validate.stats import (
    PairedDelta,
    _bootstrap_deltas,
    certify_statement,
    ci_half_width,
    detectable_drop,
    mcnemar_exact,
    non_inferior,
    paired_delta,
    required_units,
)


def exact_mcnemar(b: int, c: int) -> float:
    """Reference: 2 * P[X <= min(b, c)], X ~ Binomial(b + c, 1/2), in exact rational arithmetic."""
    n = b + c
    tail = Fraction(sum(math.comb(n, k) for k in range(min(b, c) + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


def paired_binary(rng: np.random.Generator, n: int, lost: float, gained: float) -> tuple[np.ndarray, np.ndarray]:
    """Reference right 75% of the time; a unit flips right->wrong w.p. ``lost``, wrong->right w.p. ``gained``
    (unconditional rates), so the true delta is ``gained - lost``."""
    u = rng.random(n)
    ref = (u < 0.75).astype(float)
    cand = ref.copy()
    cand[u < lost] = 0.0  # inside the reference-right region
    cand[(u >= 0.75) & (u < 0.75 + gained)] = 1.0  # inside the reference-wrong region
    return ref, cand


# --- McNemar -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("b", "c", "expected"),
    [(10, 2, 0.03857421875), (2, 10, 0.03857421875), (0, 5, 0.0625), (1, 9, 0.021484375), (0, 0, 1.0), (7, 7, 1.0)],
)
def test_mcnemar_known_values(b: int, c: int, expected: float) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-10)


def test_mcnemar_matches_exact_binomial_on_a_grid() -> None:
    for b in range(0, 40, 3):
        for c in range(0, 40, 4):
            assert mcnemar_exact(b, c) == pytest.approx(exact_mcnemar(b, c), rel=1e-9, abs=1e-300)


def test_mcnemar_stays_finite_and_exact_for_large_counts() -> None:
    assert mcnemar_exact(1500, 1650) == pytest.approx(exact_mcnemar(1500, 1650), rel=1e-8)
    assert mcnemar_exact(200000, 200000) == 1.0
    assert 0.0 <= mcnemar_exact(0, 5000) < 1e-300


@pytest.mark.parametrize(("b", "c"), [(-1, 3), (2.5, 1), (True, 2)])
def test_mcnemar_rejects_invalid_counts(b: object, c: object) -> None:
    with pytest.raises(ValueError, match="non-negative integers"):
        mcnemar_exact(b, c)  # type: ignore[arg-type]


# --- paired_delta ----------------------------------------------------------------------------------------------------


def test_paired_delta_counts_and_accuracies() -> None:
    ref = np.array([1, 1, 1, 1, 0, 0, 1, 0, 1, 1], dtype=float)
    cand = np.array([1, 0, 0, 1, 1, 0, 1, 0, 1, 1], dtype=float)
    result = paired_delta(ref, cand, binary=True)
    assert result.reference_accuracy == pytest.approx(0.7)
    assert result.candidate_accuracy == pytest.approx(0.6)
    assert result.delta == pytest.approx(-0.1)
    assert (result.lost, result.gained, result.n_units, result.n_clusters) == (2, 1, 10, 10)
    assert result.mcnemar_p == pytest.approx(mcnemar_exact(2, 1))
    assert result.discordant_rate == pytest.approx(0.3)
    assert result.ci_low <= result.lower_bound <= result.delta <= result.ci_high
    assert "McNemar" in result.method and "units" in result.method


def test_soft_scores_count_drops_and_rises_without_mcnemar() -> None:
    ref = [1.0, 0.6, 0.3, 0.0, 0.9]
    cand = [0.9, 0.6, 0.6, 0.0, 1.0]
    result = paired_delta(ref, cand, ["a", "a", "b", "c", "c"], binary=False)
    assert (result.lost, result.gained, result.n_clusters) == (1, 2, 3)
    assert result.mcnemar_p is None and "clusters" in result.method
    assert result.delta == pytest.approx(0.06)


def test_paired_delta_is_deterministic_for_a_seed() -> None:
    ref, cand = paired_binary(np.random.default_rng(3), 800, lost=0.05, gained=0.02)
    clusters = np.arange(800) // 4
    first = paired_delta(ref, cand, clusters, binary=True, seed=7)
    assert paired_delta(ref, cand, clusters, binary=True, seed=7) == first
    soft = np.clip(ref - np.random.default_rng(4).random(800) * 0.2, 0, 1)  # continuous: quantiles move with the seed
    assert paired_delta(ref, soft, binary=False, seed=7) == paired_delta(ref, soft, binary=False, seed=7)
    other = paired_delta(ref, soft, binary=False, seed=8)
    assert other.ci_low != paired_delta(ref, soft, binary=False, seed=7).ci_low


def test_identical_arms_give_a_zero_width_interval() -> None:
    scores = np.random.default_rng(0).integers(0, 2, 300).astype(float)
    result = paired_delta(scores, scores, binary=True)
    assert (result.delta, result.ci_low, result.ci_high, result.lower_bound) == (0.0, 0.0, 0.0, 0.0)
    assert result.mcnemar_p == 1.0 and non_inferior(result, 0.005)


def test_ten_thousand_resamples_of_five_thousand_clustered_units_are_fast() -> None:
    rng = np.random.default_rng(0)
    ref, cand = paired_binary(rng, 5000, lost=0.04, gained=0.02)
    start = time.perf_counter()
    paired_delta(ref, cand, rng.integers(0, 1500, 5000), binary=True, resamples=10000)
    soft_ref = rng.random(5000)
    paired_delta(soft_ref, np.clip(soft_ref + rng.normal(0, 0.1, 5000), 0, 1), binary=False, resamples=10000)
    assert time.perf_counter() - start < 1.5  # each well under a second, even on a loaded machine


def coverage(deltas: list[PairedDelta], truth: float) -> tuple[float, float]:
    two_sided = np.mean([d.ci_low <= truth <= d.ci_high for d in deltas])
    one_sided = np.mean([d.lower_bound <= truth for d in deltas])
    return float(two_sided), float(one_sided)


def test_bootstrap_ci_covers_the_true_delta_about_95_percent_of_the_time() -> None:
    truth = 0.02 - 0.05
    deltas = []
    for seed in range(300):
        ref, cand = paired_binary(np.random.default_rng(seed), 400, lost=0.05, gained=0.02)
        deltas.append(paired_delta(ref, cand, binary=True, resamples=2000, seed=seed))
    two_sided, one_sided = coverage(deltas, truth)
    # 300 trials: binomial sd of a 95% rate is 1.3 points; allow 3 sd.
    assert 0.91 <= two_sided <= 0.99
    assert 0.91 <= one_sided <= 0.99


def test_soft_score_ci_covers_the_true_delta() -> None:
    levels = np.array([0.0, 0.3, 0.6, 0.9, 1.0])
    deltas = []
    for seed in range(200):
        rng = np.random.default_rng(1000 + seed)
        ref = rng.choice(levels, 300)
        step = rng.choice([-1, 0, 1], 300, p=[0.08, 0.88, 0.04])  # one level down or up
        cand = levels[np.clip(np.searchsorted(levels, ref) + step, 0, 4)]
        deltas.append(paired_delta(ref, cand, binary=False, resamples=2000, seed=seed))
    # True delta of this mechanism, by a large Monte Carlo draw.
    rng = np.random.default_rng(99)
    ref = rng.choice(levels, 2_000_000)
    step = rng.choice([-1, 0, 1], ref.size, p=[0.08, 0.88, 0.04])
    truth = float(np.mean(levels[np.clip(np.searchsorted(levels, ref) + step, 0, 4)] - ref))
    two_sided, one_sided = coverage(deltas, truth)
    assert 0.90 <= two_sided <= 0.99
    assert 0.90 <= one_sided <= 0.99


def clustered_sample(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """60 images of 8 questions each; a flip hits a whole image (e.g. a broken vision path for that image)."""
    rng = np.random.default_rng(seed)
    clusters = np.repeat(np.arange(60), 8)
    ref = np.ones(clusters.size)
    broken = rng.random(60) < 0.1  # true delta = -0.1
    cand = np.where(broken[clusters], 0.0, 1.0)
    return ref, cand, clusters


def test_clustering_widens_the_interval_and_keeps_coverage() -> None:
    ref, cand, clusters = clustered_sample(0)
    naive = paired_delta(ref, cand, binary=True, resamples=4000)
    clustered = paired_delta(ref, cand, clusters, binary=True, resamples=4000)
    assert clustered.ci_high - clustered.ci_low > 2 * (naive.ci_high - naive.ci_low)
    assert clustered.n_clusters == 60 and naive.n_clusters == 480

    with_clusters, without = [], []
    for seed in range(150):
        ref, cand, clusters = clustered_sample(seed)
        with_clusters.append(paired_delta(ref, cand, clusters, binary=True, resamples=2000, seed=seed))
        without.append(paired_delta(ref, cand, binary=True, resamples=2000, seed=seed))
    assert coverage(with_clusters, -0.1)[0] >= 0.88
    assert coverage(without, -0.1)[0] < 0.6  # ignoring the clusters claims far too much precision


def test_both_resampling_paths_draw_the_same_distribution() -> None:
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 4, 400).astype(float)
    sums = np.where(rng.random(400) < 0.1, -sizes, 0.0) + (rng.random(400) < 0.05)  # [400] summed differences
    by_kind = _bootstrap_deltas(sums, sizes, 20000, np.random.default_rng(0), by_kind=True)
    gathered = _bootstrap_deltas(sums, sizes, 20000, np.random.default_rng(0), by_kind=False)
    quantiles = [0.025, 0.05, 0.5, 0.975]
    np.testing.assert_allclose(np.quantile(by_kind, quantiles), np.quantile(gathered, quantiles), atol=2e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reference": [1, 0], "candidate": [1, 0, 1]}, "same units"),
        ({"reference": [], "candidate": []}, "no units"),
        ({"reference": [1, 0.5], "candidate": [1, 0]}, "binary=False"),
        ({"reference": [1, 2], "candidate": [1, 0]}, r"in \[0, 1\]"),
        ({"reference": [1, np.nan], "candidate": [1, 0]}, "finite"),
        ({"reference": [1, 0], "candidate": [1, 0], "clusters": ["a"]}, "one id per unit"),
        ({"reference": [1, 0], "candidate": [1, 0], "resamples": 100}, "at least 1000"),
    ],
)
def test_paired_delta_rejects_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        paired_delta(binary=True, **kwargs)


def test_paired_delta_json_round_trip() -> None:
    ref, cand = paired_binary(np.random.default_rng(1), 200, lost=0.05, gained=0.02)
    result = paired_delta(ref, cand, binary=True)
    assert PairedDelta.from_json(json.loads(json.dumps(result.to_json()))) == result


# --- non-inferiority and sample size -------------------------------------------------------------------------------


def test_non_inferiority_compares_the_lower_bound_with_the_margin() -> None:
    ref, cand = paired_binary(np.random.default_rng(2), 1000, lost=0.03, gained=0.03)
    result = paired_delta(ref, cand, binary=True)
    assert non_inferior(result, -result.lower_bound + 1e-9)
    assert not non_inferior(result, -result.lower_bound)
    with pytest.raises(ValueError, match="fraction"):
        non_inferior(result, 1.0)  # a point count passed where a fraction is expected


def test_detectable_drop_matches_the_validation_doc() -> None:
    assert detectable_drop(3100) == pytest.approx(0.01, abs=2e-4)  # ~3,100 items for 1 point at 5%
    assert 3000 <= required_units(0.01) <= 3200
    assert ci_half_width(500) == pytest.approx(0.02, abs=1e-3)  # 500 items: about +-2 points
    assert detectable_drop(500) == pytest.approx(0.0249, abs=1e-3)
    assert detectable_drop(12400) == pytest.approx(detectable_drop(3100) / 2)
    assert detectable_drop(3100, discordant_rate=0.2) == pytest.approx(2 * detectable_drop(3100))
    assert detectable_drop(3100, power=0.9) > detectable_drop(3100)
    assert detectable_drop(required_units(0.005)) <= 0.005


def test_certify_statement_says_whether_the_subset_is_a_certificate() -> None:
    small = certify_statement(500, 0.01)
    assert "too few" in small and "smoke gate" in small and "3,100" in small and "±2.0 points" in small
    large = certify_statement(5000, 0.01)
    assert "enough" in large and "smoke gate" not in large
    assert "enough" in certify_statement(3100, 0.01)
    with pytest.raises(ValueError, match="positive"):
        detectable_drop(0)
