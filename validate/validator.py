"""The validator: one reference backend, any number of candidates, every level, one drift report each.

L0 comes from the candidate's export manifest (its checks ran at export), L1/L2 from the fixed probes,
L3 from benchmark subsets (greedy, official prompts and scoring, paired statistics clustered by image or
video), plus distractor curves when a benchmark carries ``meta["distractors"]``.

Gates (``owl3.validate.gates``) reject a candidate on any L1/L2 failure. At L3 a candidate is rejected
when the one-sided lower bound of its paired delta is below -margin *and* the subset is large enough to
certify that margin; on a smaller subset it is rejected only when the whole confidence interval lies
below -margin (significantly worse), and the report says the subset cannot certify the margin.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from owl3.processor import Owl3Processor
from owl3.validate.backends import Backend
from owl3.validate.benchmarks import id_list_hash
from owl3.validate.gates import GATES_VERSION, Gate, select_gate
from owl3.validate.items import Item, Task
from owl3.validate.levels import ProbeRun, run_items, unit_scores
from owl3.validate.probes import validation_cases
from owl3.validate.stats import certify_statement, paired_delta, required_units

REPORT_MARGIN = 0.01  # the margin shown for candidates without a task gate (1 point)


@dataclass(frozen=True)
class BenchmarkRun:
    name: str
    items: Sequence[Item]
    task: Task
    max_new_tokens: int = 100
    metric: str = "accuracy"


@dataclass
class TaskOutcome:
    predictions: dict[str, dict[str, str]]  # arm -> item id -> text
    excluded: dict[str, str]  # item id -> reason


def validate(
    reference: Backend,
    candidates: Sequence[Backend],
    processor: Owl3Processor,
    benchmarks: Sequence[BenchmarkRun],
    work_dir: Path,
    *,
    model_name: str,
    tool_versions: dict[str, Any],
    progress: Callable[[str], None] | None = None,
    calibration: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every level for every candidate; returns {candidate name: drift report (owl3.drift-report/1)}.

    ``calibration``: per quantized arm, its calibration summary and overlap (``calibration_check``), shown in
    the reports that arm takes part in."""
    say = progress or (lambda _message: None)
    say(f"probing {reference.name} (tensors and next-token distributions)")
    probes = ProbeRun(reference, validation_cases(processor))
    arms = {reference.name: reference, **{c.name: c for c in candidates}}
    outcomes = {}
    for bench in benchmarks:
        say(f"{bench.name}: {len(bench.items)} items x {len(arms)} arms")
        predictions, excluded = run_items(
            arms, bench.items, processor, work_dir / "predictions" / bench.name,
            max_new_tokens=bench.max_new_tokens, progress=lambda m, b=bench.name: say(f"{b}: {m}"),
        )  # fmt: skip
        outcomes[bench.name] = TaskOutcome(predictions, excluded)
    distractors = _distractor_curves(benchmarks, outcomes, list(arms))
    reports = {}
    for candidate in candidates:
        say(f"comparing {candidate.name} with {reference.name}")
        gate_key, gate = select_gate(candidate, reference)
        levels = _probe_levels(probes.compare(candidate), gate)
        levels["tasks"] = {b.name: _task_level(b, outcomes[b.name], reference, candidate, gate) for b in benchmarks}
        if distractors:
            levels["distractors"] = distractors
        graph = _graph_level(candidate)
        if graph:
            levels["graph"] = graph
        failures = _failures(levels)
        header = {
            "model": model_name,
            "arms": {"reference": _arm(reference), "candidate": _arm(candidate)},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tool_versions": tool_versions,
            "gate": {"key": gate_key, **_gate_json(gate, candidate)},
            "subsets": {b.name: f"sha256:{id_list_hash(b.items)}" for b in benchmarks},
            "verdict": "rejected" if failures else "accepted",
            "failures": failures,
        }
        arms_calibration = [(calibration or {}).get(arm.name) for arm in (reference, candidate)]
        if any(arms_calibration):
            header["calibration"] = [info for info in arms_calibration if info]
        reports[candidate.name] = {"header": header, "levels": levels}
    return reports


_RUNTIMES = {"pytorch": "PyTorch (owl3 native model)", "onnx": "ONNX Runtime (owl3.runtime)",
             "engine": "TensorRT engines (owl3.runtime, UNVERIFIED)"}  # fmt: skip


def _arm(backend: Backend) -> dict[str, str]:
    """The arm as reports show it; ``backend`` names the providers that really computed (not those asked for)."""
    providers = ", ".join(getattr(backend, "providers", ()))
    runtime = _RUNTIMES[backend.kind] + (f" on {providers}" if providers else "")
    return {"name": backend.name, "precision": backend.precision, "backend": runtime}


def _gate_json(gate: Gate | None, candidate: Backend) -> dict[str, Any]:
    if gate is None:
        return {"name": f"no gate for {candidate.name}: reported only", "version": GATES_VERSION}
    return gate.to_json()


def _probe_levels(result: dict[str, Any], gate: Gate | None) -> dict[str, Any]:
    tensors = []
    for comparison in result["tensors"]:
        failures = gate.check_tensor(comparison, is_logits=comparison.name.endswith("logits")) if gate else []
        tensors.append({**comparison.to_json(), "failures": failures})
    distribution = {}
    for group, comparison in result["distribution"].items():
        failures = gate.check_distribution(f"next token ({group})", comparison) if gate else []
        distribution[group] = {**comparison.to_json(), "kl_values": result["kl_values"][group], "failures": failures}
    return {"tensors": tensors, "distribution": distribution}


def _graph_level(candidate: Backend) -> list[dict[str, Any]]:
    manifest = getattr(candidate, "manifest", None)
    if not manifest:
        return []
    checks = [
        {"name": f"{name}: onnx.checker full check + strict shape inference", "passed": True,
         "detail": f"IR {graph.get('ir_version')}, opset {manifest.get('opset')}, {sum(graph.get('op_counts', {}).values())} nodes"}  # noqa: E501
        for name, graph in manifest.get("graphs", {}).items()
    ]  # fmt: skip
    checks.append({"name": "export status", "passed": manifest.get("status") == "ok", "detail": manifest.get("status")})
    return checks


def _task_level(bench: BenchmarkRun, outcome: TaskOutcome, reference: Backend, candidate: Backend, gate) -> dict:
    ref = unit_scores(bench.task, bench.items, outcome.predictions[reference.name], outcome.excluded)
    cand = unit_scores(bench.task, bench.items, outcome.predictions[candidate.name], outcome.excluded)
    units = sorted(set(ref) & set(cand))
    cluster_of = {item.unit: item.cluster for item in bench.items}
    delta = paired_delta(
        np.array([ref[u] for u in units]), np.array([cand[u] for u in units]),
        np.array([cluster_of[u] for u in units]), binary=bench.task.binary,
    )  # fmt: skip
    margin = gate.task_margin if gate is not None and gate.task_margin else REPORT_MARGIN
    gated = gate is not None and gate.task_margin is not None
    reasons: dict[str, int] = {}
    for reason in outcome.excluded.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "metric": bench.metric,
        "margin": margin,
        "delta": delta.to_json(),
        "categories": _categories(bench.items, units, ref, cand),
        "excluded": {"count": len(outcome.excluded), "reasons": reasons},
        "certify": certify_statement(len(units), margin),
        "failures": _task_failures(bench.name, delta, margin, len(units)) if gated else [],
    }


def _task_failures(name: str, delta, margin: float, n_units: int) -> list[str]:
    can_certify = n_units >= required_units(margin)
    if delta.lower_bound < -margin and can_certify:
        return [f"{name}: delta lower bound {100 * delta.lower_bound:.1f} pt < -{100 * margin:.1f} pt"]
    if delta.ci_high < -margin:
        return [f"{name}: significantly worse, CI upper bound {100 * delta.ci_high:.1f} pt < -{100 * margin:.1f} pt"]
    return []


def _categories(items: Sequence[Item], units: list[str], ref: dict, cand: dict) -> dict[str, dict[str, Any]]:
    category_of = {item.unit: item.category or "all" for item in items}
    out: dict[str, dict[str, Any]] = {}
    for unit in units:
        entry = out.setdefault(category_of[unit], {"n_units": 0, "reference": 0.0, "candidate": 0.0})
        entry["n_units"] += 1
        entry["reference"] += ref[unit]
        entry["candidate"] += cand[unit]
    for entry in out.values():
        entry["reference"] /= entry["n_units"]
        entry["candidate"] /= entry["n_units"]
    return out


def _distractor_curves(
    benchmarks: Sequence[BenchmarkRun], outcomes: dict[str, TaskOutcome], arms: list[str]
) -> dict[str, list[list[float]]]:
    """Per arm: [N distractors, accuracy, CI low, CI high] over the items that carry meta['distractors']."""
    curves: dict[str, list[list[float]]] = {}
    for bench in benchmarks:
        counts = sorted({item.meta["distractors"] for item in bench.items if "distractors" in item.meta})
        for arm in arms if counts else []:
            scores = unit_scores(
                bench.task, bench.items, outcomes[bench.name].predictions[arm], outcomes[bench.name].excluded
            )
            for n in counts:
                values = [scores[i.unit] for i in bench.items if i.meta.get("distractors") == n and i.unit in scores]
                if values:
                    curves.setdefault(arm, []).append([n, *_accuracy_interval(values)])
    return curves


def _accuracy_interval(values: Sequence[float], z: float = 1.96) -> tuple[float, float, float]:
    """Mean and a 95% interval: Wilson for 0/1 scores, normal approximation for soft scores."""
    n, mean = len(values), float(np.mean(values))
    if all(v in (0.0, 1.0) for v in values):
        centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return mean, max(0.0, centre - half), min(1.0, centre + half)
    half = z * float(np.std(values, ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def _failures(levels: dict[str, Any]) -> list[str]:
    failures = [f for t in levels.get("tensors", []) for f in t.get("failures", [])]
    failures += [f for d in levels.get("distribution", {}).values() for f in d.get("failures", [])]
    failures += [f for t in levels.get("tasks", {}).values() for f in t.get("failures", [])]
    failures += [f"L0: {c['name']} ({c['detail']})" for c in levels.get("graph", []) if not c["passed"]]
    return failures
