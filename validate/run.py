"""``run_validation``: open the backends, load the benchmark subsets, validate, write the reports.

The result is a stage artifact (``manifest.json`` written last, schema ``owl3-export/validation``): one
drift report per candidate in ``<output>/<candidate>/`` and an ``index.md`` with every verdict.
Predictions accumulate in ``<output>.partial/`` beside it while the run is going, so an interrupted run
resumes where it stopped; it is removed once the artifact is in place. A rejected candidate keeps every
file, marks the artifact ``"status": "rejected"`` and raises GateFailure (exit 6).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from owl3.artifacts import refuse_overwrite, staged_output, tool_versions, write_manifest
from owl3.errors import GateFailure, UsageError
from owl3.processor import Owl3Processor
from owl3.validate.backends import Backend, open_backend
from owl3.validate.benchmarks import BENCHMARKS, load_benchmark, subset
from owl3.validate.calibration_check import calibration_overlaps, refuse_overlap
from owl3.validate.report import write_report
from owl3.validate.validator import BenchmarkRun, validate

SCHEMA = "owl3-export/validation"
MAX_NEW_TOKENS = {"vqav2": 10, "pope": 10, "mmbench": 10, "nextqa": 10, "mvbench": 10}  # short answers


def parse_benchmark(spec: str) -> tuple[str, Path]:
    """``NAME:ROOT`` (a benchmark of owl3.validate.benchmarks and the directory holding its files)."""
    name, _, root = spec.partition(":")
    if name not in BENCHMARKS or not root:
        raise UsageError(
            f"bad benchmark {spec!r}",
            where="--benchmark",
            fix=f"use NAME:DIR with NAME one of {sorted(BENCHMARKS)}",
        )
    return name, Path(root)


def load_runs(specs: Sequence[str], *, limit: int | None, seed: int) -> list[BenchmarkRun]:
    runs = []
    for spec in specs:
        name, root = parse_benchmark(spec)
        items, task = load_benchmark(name, root, seed=seed)
        runs.append(BenchmarkRun(name, subset(items, limit, seed), task, MAX_NEW_TOKENS.get(name, 32)))
    return runs


def processor_for(backend: Backend) -> Owl3Processor:
    """The model's own processor, from the reference's checkpoint or export directory."""
    session = getattr(backend, "session", None)
    if session is not None:
        return session.processor
    return Owl3Processor.from_pretrained(backend.model_dir)


def write_reports(directory: Path, reports: dict[str, dict[str, Any]]) -> list[str]:
    """One report directory per candidate and an index; returns the failures of every candidate."""
    lines = ["# Drift reports", "", "| candidate | reference | verdict | failures |", "|---|---|---|---|"]
    failures = []
    for name, report in reports.items():
        write_report(report, directory / name)
        header = report["header"]
        failures += [f"{name}: {f}" for f in header["failures"]]
        reference = header["arms"]["reference"]["name"]
        lines.append(
            f"| [{name}]({name}/report.html) | {reference} | {header['verdict']} | {len(header['failures'])} |"
        )
    lines += ["", *side_by_side(reports)]
    (directory / "index.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return failures


def side_by_side(reports: dict[str, dict[str, Any]]) -> list[str]:
    """Every arm against the same reference in one table: L1 worst cosine, L2 KL and top-1 per probe set,
    L3 task deltas with their 95% CIs, and distractor accuracy at the largest distractor count."""
    if not reports:
        return []
    first = next(iter(reports.values()))["levels"]
    probes = list(first.get("distribution", {}))
    tasks = list(first.get("tasks", {}))
    head = ["arm", "min cosine (L1)", *(f"KL / top-1 {p}" for p in probes), *(f"{t} delta [95% CI]" for t in tasks)]
    head.append("distractors (most)")
    lines = ["## Side by side (each arm vs the same reference)", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]  # fmt: skip
    for name, report in reports.items():
        levels = report["levels"]
        cosines = [t["cosine"] for t in levels.get("tensors", [])]
        cells = [name, f"{min(cosines):.6f}" if cosines else "-"]
        for probe in probes:
            d = levels.get("distribution", {}).get(probe)
            cells.append(f"{d['kl_mean']:.2e} / {100 * d['top1_agreement']:.1f}%" if d else "-")
        for task in tasks:
            t = levels.get("tasks", {}).get(task, {}).get("delta")
            cells.append(f"{100 * t['delta']:+.1f} [{100 * t['ci_low']:+.1f}, {100 * t['ci_high']:+.1f}]" if t else "-")
        curve = levels.get("distractors", {}).get(name) or []
        cells.append(f"{100 * curve[-1][1]:.0f}% at {curve[-1][0]}" if curve else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def run_validation(
    reference_spec: str,
    candidate_specs: Sequence[str],
    benchmark_specs: Sequence[str],
    output: Path,
    *,
    limit: int | None = 200,
    seed: int = 0,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    extra_runs: Sequence[BenchmarkRun] = (),
    allow_calibration_overlap: bool = False,
) -> dict[str, dict[str, Any]]:
    """Validate candidates against the reference on the benchmarks; write the artifact to ``output``.

    A quantized arm whose calibration set shares items or images with a benchmark subset is refused (exit 2)
    unless ``allow_calibration_overlap``, which marks its reports instead."""
    if not candidate_specs:
        raise UsageError("no candidate to validate", where="--candidate", fix="pass at least one --candidate")
    output = Path(output)
    refuse_overwrite(output, force=force)
    runs = [*load_runs(benchmark_specs, limit=limit, seed=seed), *extra_runs]
    reference = open_backend(reference_spec)
    candidates = [open_backend(spec) for spec in candidate_specs]
    names = [arm.name for arm in (reference, *candidates)]
    if len(set(names)) != len(names):
        raise UsageError(
            f"two arms have the same name: {names}",
            where="--reference / --candidate",
            fix="compare different exports, precisions, providers or engines (each arm is named by them)",
        )
    overlaps = calibration_overlaps([reference, *candidates], runs)
    refuse_overlap(overlaps, allow_calibration_overlap)
    partial = output.with_name(f".{output.name}.partial")
    reports = validate(
        reference, candidates, processor_for(reference), runs, partial,
        model_name=str(reference_spec.split(":", 1)[1]), tool_versions=tool_versions(), progress=progress,
        calibration=overlaps,
    )  # fmt: skip
    with staged_output(output, force=force) as staging:
        failures = write_reports(staging, reports)
        write_manifest(staging, {
            "schema": SCHEMA, "schema_version": 1, "status": "rejected" if failures else "ok",
            "reference": reference_spec, "candidates": list(candidate_specs),
            "benchmarks": [run.name for run in runs], "limit": limit, "seed": seed,
            "verdicts": {name: r["header"]["verdict"] for name, r in reports.items()},
        })  # fmt: skip
    shutil.rmtree(partial, ignore_errors=True)
    if failures:
        raise GateFailure(
            f"{len(failures)} gates failed: " + "; ".join(failures[:4]),
            where=str(output / "index.md"),
            fix="read the drift reports; the artifact is kept and marked rejected",
        )
    return reports


def validate_export(
    model_dir: Path,
    export_dirs: Path | Sequence[Path],
    precision: str,
    output: Path,
    *,
    checkpoint: Path | None = None,
    benchmark_specs: Sequence[str] = (),
    synthetic: bool = False,
    limit: int | None = 100,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """The pipeline's validation stage: PyTorch fp32 on ``model_dir`` as the reference against the exports,
    side by side with a float ONNX baseline exported to a temporary directory here (fp32 for fp16; fp16 for a
    quantized precision, whose ``checkpoint`` also runs as the quantized PyTorch arm)."""
    import tempfile

    from owl3.export.pipeline import export_model

    exports = [Path(export_dirs)] if isinstance(export_dirs, (str, Path)) else [Path(d) for d in export_dirs]
    baselines = {"fp32": [], "fp16": ["fp32"]}.get(precision, ["fp16"])  # PyTorch fp32 is the reference
    with tempfile.TemporaryDirectory(prefix=".owl3-baseline-", dir=Path(output).parent) as scratch:
        candidates = []
        for baseline in baselines:
            candidates.append(
                f"onnx:{export_model(model_dir, Path(scratch) / baseline, baseline, validate=False, progress=progress)}"
            )
        candidates += [f"pytorch:{checkpoint}"] if checkpoint is not None else []
        candidates += [f"onnx:{d}" for d in exports]
        runs = []
        if synthetic:
            from owl3.validate.synthetic_runs import synthetic_runs

            runs = synthetic_runs(Path(scratch) / "synthetic", limit=limit)
        return run_validation(
            f"pytorch:{model_dir}:fp32", candidates, benchmark_specs, output,
            limit=limit, force=force, progress=progress, extra_runs=runs,
        )  # fmt: skip
