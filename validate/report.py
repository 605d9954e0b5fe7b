"""The drift report of one comparison run (a candidate backend against the reference, levels L0-L3).

``write_report(report, out_dir)`` writes three files, each atomically (temporary file, then rename):

- ``report.json``: the ``report`` dict as given, plus ``"schema"``; ``json.load`` gives it back (non-finite
  floats such as an exact-match SQNR are written as Python's ``Infinity`` / ``NaN`` tokens).
- ``report.md``: verdict, then one table per level with every number behind the plots; fine in a terminal.
- ``report.html``: one self-contained page (inline CSS and SVG, no script, no external resource): a verdict
  banner, a table per level, the certify statements and four plots drawn here in Python: per-layer error,
  KL histogram, forest plot of the task deltas against the margins, distractor curves.

The work is split by output: ``report_tables`` (the level states and tables both renderers share, with
``SCHEMA`` and ``LEVELS``), ``report_format`` (numbers for people), ``report_markdown``, ``report_html`` and
``report_svg`` (the plots). This module checks the schema and writes the files.

Schema ``owl3.drift-report/1``. Fractions everywhere (0.005 = 0.5 points); reports format them as points::

    {
      "schema": "owl3.drift-report/1",                # optional on input
      "header": {
        "model": "mPLUG-Owl3-2B-241014",
        "arms": {"reference": {"name": "pytorch-fp16", "precision": "fp16", "backend": "PyTorch 2.5 CUDA"},
                 "candidate": {"name": "ort-int4", "precision": "int4-gptq-g128", "backend": "ONNX Runtime"}},
        "created": "2025-01-31T12:00:00Z",           # ISO 8601
        "tool_versions": {"owl3-export": "0.1.0", "onnxruntime": "1.20.1", ...},
        "gate": {"key": "int4-gptq", **Gate.to_json()},   # "version" and "name" required; limits optional
        "subsets": {"vqav2": "sha256:...", ...},     # hash of each benchmark subset's sorted item ids
        "verdict": "accepted" | "rejected",
        "failures": ["mmbench: lower bound -1.4 pt <= -1.0 pt", ...],   # empty if and only if accepted
      },
      "levels": {                                     # each level optional: absent = not run
        "graph": [{"name": "onnx.checker full_check", "passed": true, "detail": "..."}],          # L0
        "tensors": [{**TensorComparison.to_json(), "failures": [...]}],                             # L1
            # per-layer outputs end in "_<layer index>" ("decoder/present_key_3"): they are plotted by
            # layer, one series per prefix; "failures" (Gate.check_tensor) is optional
        "distribution": {"text": {**DistributionComparison.to_json(), "kl_values": [...],        # L2
                                  "failures": [...]}, "images": {...}},   # kl_values: KL per position
        "tasks": {"mmbench": {                                                                      # L3
            "metric": "accuracy (circular)",
            "margin": 0.01,                          # non-inferiority margin, fraction, > 0
            "delta": PairedDelta.to_json(),
            "categories": {"OCR": {"n_units": 78, "reference": 0.81, "candidate": 0.79}, ...},
            "excluded": {"count": 2, "reasons": {"truncated JPEG": 2}},     # excluded from both arms
            "certify": "...",                        # optional: stats.certify_statement(n_units, margin)
            "failures": [...],                       # optional: the gate's decision, which wins over the
            "gated": true,                           #   plain non-inferiority check; gated=false: reported only
        }},
        "distractors": {"pytorch-fp16": [[0, 0.82, 0.79, 0.85], [1, 0.81, 0.78, 0.84], ...], ...},
            # per arm: [N distractor images, accuracy, CI low, CI high]
      },
    }
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from owl3.errors import UsageError
from owl3.validate.report_html import render_html
from owl3.validate.report_markdown import render_markdown
from owl3.validate.report_tables import LEVELS, SCHEMA

FILES = {"json": "report.json", "markdown": "report.md", "html": "report.html"}


def write_report(report: dict[str, Any], out_dir: Path, *, overwrite: bool = False) -> dict[str, Path]:
    """Write report.json, report.md and report.html of ``report`` (schema above) into ``out_dir``.

    Everything is rendered before the first file is written; each file is renamed into place. Returns
    {"json": path, "markdown": path, "html": path}. Refuses to replace existing reports unless ``overwrite``.
    """
    problems = validate_report(report)
    if problems:
        raise ValueError(f"the drift report does not follow {SCHEMA}:\n  - " + "\n  - ".join(problems))
    out_dir = Path(out_dir)
    paths = {kind: out_dir / name for kind, name in FILES.items()}
    existing = [path.name for path in paths.values() if path.exists()]
    if existing and not overwrite:
        raise UsageError(
            f"a drift report is already there ({', '.join(existing)})",
            where=str(out_dir),
            fix="choose another output directory or pass overwrite=True",
        )
    full = {"schema": SCHEMA, **report}
    texts = {
        "json": json.dumps(full, indent=2, ensure_ascii=False, default=_json_default) + "\n",
        "markdown": render_markdown(full),
        "html": render_html(full),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    temporaries = {kind: path.with_name(f".{path.name}.tmp-{os.getpid()}") for kind, path in paths.items()}
    try:  # all three written before any is renamed: a failure leaves the previous report whole
        for kind, temporary in temporaries.items():
            temporary.write_text(texts[kind], encoding="utf-8")
        for kind, temporary in temporaries.items():
            os.replace(temporary, paths[kind])
    finally:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)
    return paths


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays as plain numbers and lists; anything else is a schema error."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON data: put numbers, strings, lists and dicts in the report")


def validate_report(report: dict[str, Any]) -> list[str]:
    """Every way ``report`` departs from the schema, as actionable messages (empty when it is valid)."""
    if not isinstance(report, dict):
        return [f"the report must be a dict, found {type(report).__name__}"]
    problems = []
    if report.get("schema", SCHEMA) != SCHEMA:
        problems.append(f"schema is {report['schema']!r}; this writer knows {SCHEMA!r}")
    header = report.get("header")
    if not isinstance(header, dict):
        return [*problems, "header is missing: give model, arms, created, tool_versions, gate, subsets, verdict"]
    for key in ("model", "arms", "created", "tool_versions", "gate", "subsets", "verdict", "failures"):
        if key not in header:
            problems.append(f"header.{key} is missing")
    for role in ("reference", "candidate"):
        arm = header.get("arms", {}).get(role)
        if not isinstance(arm, dict) or not {"name", "precision", "backend"} <= arm.keys():
            problems.append(f"header.arms.{role} needs name, precision and backend")
    if "version" not in header.get("gate", {}) or "name" not in header.get("gate", {}):
        problems.append("header.gate needs the gate's name and version (Gate.to_json())")
    verdict, failures = header.get("verdict"), header.get("failures", [])
    if verdict not in ("accepted", "rejected"):
        problems.append(f"header.verdict must be 'accepted' or 'rejected', found {verdict!r}")
    elif (verdict == "rejected") != bool(failures):
        problems.append(f"header.verdict is {verdict!r} but header.failures lists {len(failures)}: make them agree")
    levels = report.get("levels", {})
    unknown = set(levels) - set(LEVELS)
    if unknown:
        problems.append(f"unknown levels {sorted(unknown)}; known: {list(LEVELS)}")
    for name, task in levels.get("tasks", {}).items():
        if not {"metric", "margin", "delta"} <= task.keys():
            problems.append(f"levels.tasks.{name} needs metric, margin and delta")
        elif not 0 < task["margin"] < 1:
            problems.append(f"levels.tasks.{name}.margin is a fraction in (0, 1), found {task['margin']}")
    for arm, points in levels.get("distractors", {}).items():
        if any(len(point) != 4 for point in points):
            problems.append(f"levels.distractors.{arm}: each point is [N, accuracy, CI low, CI high]")
    return problems
