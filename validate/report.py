"""The drift report of one comparison run (a candidate backend against the reference, levels L0-L3).

``write_report(report, out_dir)`` writes three files, each atomically (temporary file, then rename):

- ``report.json``: the ``report`` dict as given, plus ``"schema"``; ``json.load`` gives it back (non-finite
  floats such as an exact-match SQNR are written as Python's ``Infinity`` / ``NaN`` tokens).
- ``report.md``: verdict, then one table per level with every number behind the plots; fine in a terminal.
- ``report.html``: one self-contained page (inline CSS and SVG, no script, no external resource): a verdict
  banner, a table per level, the certify statements and four plots drawn here in Python: per-layer error,
  KL histogram, forest plot of the task deltas against the margins, distractor curves.

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

import html
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owl3.errors import UsageError
from owl3.validate.stats import PairedDelta, certify_statement, detectable_drop, non_inferior

SCHEMA = "owl3.drift-report/1"
LEVELS = {
    "graph": "L0 · Graph",
    "tensors": "L1 · Tensors",
    "distribution": "L2 · Next-token distribution",
    "tasks": "L3 · Tasks",
    "distractors": "Distractor resistance",
}
FILES = {"json": "report.json", "markdown": "report.md", "html": "report.html"}
_LAYER = re.compile(r"^(?P<series>.+)_(?P<layer>\d+)$")  # "decoder/present_key_12" -> series, layer 12


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


# --- numbers for people ----------------------------------------------------------------------------------------------


def _minus(text: str) -> str:
    return text.replace("-", "−")


def fmt_sci(value: float | None, digits: int = 2) -> str:
    """3.2e-4 style (KL, abs errors); 0, ∞ and NaN spelled out."""
    if value is None:
        return "—"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return _minus("-∞" if value < 0 else "∞")
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    return _minus(f"{mantissa}e{int(exponent)}")


def fmt_pct(fraction: float, decimals: int = 1) -> str:
    return f"{fraction * 100:.{decimals}f}%"


def fmt_pts(fraction: float) -> str:
    """A delta in points with its sign: +0.4, −1.2 (and 0.0 for what rounds to zero)."""
    text = f"{fraction * 100:+.1f}"
    return "0.0" if text in ("+0.0", "-0.0") else _minus(text)


def fmt_p(p: float | None) -> str:
    if p is None:
        return "—"
    return f"{p:.3f}" if p >= 0.001 else fmt_sci(p)


def _fmt_db(value: float) -> str:
    return "∞" if math.isinf(value) else _minus(f"{value:.1f} dB")


# --- tables shared by the Markdown and HTML renderers ----------------------------------------------------------------

Cell = str | bool | None  # True / False: a pass / fail badge; None: not gated


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Cell]]
    numeric: tuple[int, ...] = ()  # right-aligned columns


def _status(failures: list[str] | None) -> bool | None:
    return None if failures is None else not failures


def graph_table(checks: list[dict[str, Any]]) -> Table:
    return Table(["check", "status", "detail"], [[c["name"], bool(c["passed"]), c.get("detail", "")] for c in checks])


def _tensor_row(label: str, t: dict[str, Any]) -> list[Cell]:
    shape = "×".join(str(d) for d in t.get("shape", ()))
    return [
        label,
        shape,
        fmt_sci(t["max_abs"]),
        fmt_sci(t["mean_abs"]),
        fmt_sci(t["max_rel"]),
        f"{t['cosine']:.6f}",
        fmt_sci(1 - t["cosine"]),
        _fmt_db(t["sqnr_db"]),
        f"{t['nan']} / {t['inf']}",
        _status(t.get("failures")),
    ]


_TENSOR_HEADERS = [
    "output",
    "shape",
    "max abs",
    "mean abs",
    "max rel",
    "cosine",
    "1 − cos",
    "SQNR",
    "NaN / Inf",
    "status",
]


def layer_series(tensors: list[dict[str, Any]]) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """Per-layer outputs grouped by series name ("decoder/present_key"), sorted by layer index."""
    series: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for entry in tensors:
        match = _LAYER.match(entry["name"])
        if match:
            series.setdefault(match["series"], []).append((int(match["layer"]), entry))
    return {name: sorted(points, key=lambda p: p[0]) for name, points in series.items()}


def tensor_tables(tensors: list[dict[str, Any]]) -> tuple[Table, Table | None]:
    """(whole outputs plus each per-layer series' worst layer, one row per layer index or None)."""
    series = layer_series(tensors)
    layered = {id(entry) for points in series.values() for _, entry in points}
    summary = [_tensor_row(t["name"], t) for t in tensors if id(t) not in layered]
    for name, points in series.items():
        entries = [entry for _, entry in points]
        gated = [e["failures"] for e in entries if "failures" in e]
        worst = {
            "max_abs": max(e["max_abs"] for e in entries),
            "mean_abs": max(e["mean_abs"] for e in entries),
            "max_rel": max(e["max_rel"] for e in entries),
            "cosine": min(e["cosine"] for e in entries),
            "sqnr_db": min(e["sqnr_db"] for e in entries),
            "nan": sum(e["nan"] for e in entries),
            "inf": sum(e["inf"] for e in entries),
            **({"failures": [f for fs in gated for f in fs]} if gated else {}),
        }
        label = f"{name}_{points[0][0]}…{points[-1][0]} (worst)"
        summary.append(_tensor_row(label, worst))
    return Table(_TENSOR_HEADERS, summary, (2, 3, 4, 5, 6, 7, 8)), per_layer_table(series)


def per_layer_table(series: dict[str, list[tuple[int, dict[str, Any]]]]) -> Table | None:
    """One row per layer index; for each series its max abs error, 1 - cosine and gate status."""
    if not series:
        return None
    by_layer = {name: dict(points) for name, points in series.items()}
    layers = sorted({layer for points in series.values() for layer, _ in points})
    headers = ["layer"]
    for name in series:
        short = name.rsplit("/", 1)[-1]
        headers += [f"{short} max abs", f"{short} 1 − cos", f"{short} status"]
    rows: list[list[Cell]] = []
    for layer in layers:
        row: list[Cell] = [str(layer)]
        for name in series:
            entry = by_layer[name].get(layer)
            row += ["—", "—", None] if entry is None else [
                fmt_sci(entry["max_abs"]), fmt_sci(1 - entry["cosine"]), _status(entry.get("failures"))
            ]  # fmt: skip
        rows.append(row)
    numeric = tuple(i for i in range(len(headers)) if i == 0 or i % 3 != 0)
    return Table(headers, rows, numeric)


def distribution_table(sets: dict[str, dict[str, Any]]) -> Table:
    rows: list[list[Cell]] = []
    for name, d in sets.items():
        ratio = d.get("perplexity_ratio")
        rows.append(
            [
                name,
                f"{d['positions']:,}",
                fmt_sci(d["kl_mean"]),
                fmt_sci(d["kl_p99"]),
                fmt_sci(d["kl_max"]),
                fmt_pct(d["top1_agreement"], 2),
                "—" if ratio is None else f"{ratio:.4f}",
                _status(d.get("failures")),
            ]
        )
    headers = ["prompts", "positions", "mean KL", "p99 KL", "max KL", "top-1 agreement", "perplexity ratio", "status"]
    return Table(headers, rows, (1, 2, 3, 4, 5, 6))


def kl_values(sets: dict[str, dict[str, Any]]) -> dict[str, list[float]]:
    """The per-position KL values of each prompt set that has them (lists or arrays)."""
    out = {}
    for name, d in sets.items():
        values = d.get("kl_values")
        if values is not None and len(values):
            out[name] = [float(v) for v in values]
    return out


def kl_decades(values: list[float]) -> dict[str, int]:
    """Counts of KL values per decade ("[1e−3, 1e−2)"), with "0 (exact)" and "non-finite" rows when present."""
    counts: dict[str, int] = {}
    for v in sorted(values, key=lambda v: (not math.isfinite(v), v)):
        if not math.isfinite(v):
            key = "non-finite"
        elif v <= 0:  # exact match (rounding can give tiny negatives)
            key = "0 (exact)"
        else:
            e = math.floor(math.log10(v))
            key = _minus(f"[1e{e}, 1e{e + 1})")
        counts[key] = counts.get(key, 0) + 1
    return counts


def kl_decade_table(sets: dict[str, dict[str, Any]]) -> Table | None:
    with_values = kl_values(sets)
    if not with_values:
        return None
    binned = {name: kl_decades(values) for name, values in with_values.items()}
    keys = kl_decades([v for values in with_values.values() for v in values])  # every row, in order
    rows: list[list[Cell]] = [
        [key, *[fmt_pct(binned[name].get(key, 0) / len(values)) for name, values in with_values.items()]]
        for key in keys
    ]
    headers = ["KL range", *[f"{name} (share of positions)" for name in binned]]
    return Table(headers, rows, tuple(range(1, 1 + len(binned))))


def task_passed(task: dict[str, Any]) -> bool | None:
    """The benchmark's gate outcome: None when reported only ("gated": false); the producer's decision when
    the entry lists its "failures" (a smoke-gate policy may differ); else non-inferiority at the margin."""
    if task.get("gated") is False:
        return None
    if "failures" in task:
        return not task["failures"]
    return non_inferior(PairedDelta.from_json(task["delta"]), task["margin"])


def task_table(tasks: dict[str, dict[str, Any]]) -> Table:
    deltas = {name: PairedDelta.from_json(task["delta"]) for name, task in tasks.items()}
    levels = {f"{d.confidence * 100:.0f}%" for d in deltas.values()}
    rows: list[list[Cell]] = []
    for name, task in tasks.items():
        d = deltas[name]
        ci = f"[{fmt_pts(d.ci_low)}, {fmt_pts(d.ci_high)}]"
        rows.append(
            [
                name,
                f"{d.n_units:,} ({d.n_clusters:,})",
                fmt_pct(d.reference_accuracy),
                fmt_pct(d.candidate_accuracy),
                f"{fmt_pts(d.delta)} pt",
                ci if len(levels) == 1 else f"{ci} ({d.confidence * 100:.0f}%)",
                fmt_pts(d.lower_bound),
                _minus(f"-{task['margin'] * 100:.1f}"),
                f"{d.lost} / {d.gained}",
                fmt_p(d.mcnemar_p),
                task_passed(task),
            ]
        )
    level = levels.pop() if len(levels) == 1 else ""
    headers = ["benchmark", "units (clusters)", "reference", "candidate", "delta", f"{level} CI".strip(),
               "lower bound", "margin", "lost / gained", "McNemar p", "status"]  # fmt: skip
    return Table(headers, rows, tuple(range(1, 10)))


def category_table(categories: dict[str, dict[str, Any]]) -> Table:
    rows: list[list[Cell]] = [
        [
            name,
            f"{c['n_units']:,}",
            fmt_pct(c["reference"]),
            fmt_pct(c["candidate"]),
            fmt_pts(c["candidate"] - c["reference"]),
        ]
        for name, c in categories.items()
    ]
    return Table(["category", "units", "reference", "candidate", "delta (pt)"], rows, (1, 2, 3, 4))


def excluded_text(task: dict[str, Any]) -> str:
    """Observed discordance, then the items excluded from both arms and why."""
    d = task["delta"]
    changed = d["lost"] + d["gained"]
    text = f"{changed:,} of {d['n_units']:,} units changed score ({fmt_pct(changed / d['n_units'])} discordant). "
    excluded = task.get("excluded") or {"count": 0, "reasons": {}}
    if not excluded["count"]:
        return text + "No item excluded."
    reasons = ", ".join(f"{reason} ({count})" for reason, count in excluded.get("reasons", {}).items())
    return text + f"{excluded['count']} item(s) excluded from both arms" + (f": {reasons}." if reasons else ".")


def certify_text(task: dict[str, Any]) -> str:
    return task.get("certify") or certify_statement(task["delta"]["n_units"], task["margin"])


def distractor_table(arms: dict[str, list[list[float]]]) -> Table:
    counts = sorted({point[0] for points in arms.values() for point in points})
    by_arm = {arm: {p[0]: p for p in points} for arm, points in arms.items()}
    rows: list[list[Cell]] = []
    for n in counts:
        cells: list[Cell] = [f"{n:g}"]
        for arm in arms:
            p = by_arm[arm].get(n)
            cells.append("—" if p is None else f"{fmt_pct(p[1])} [{fmt_pct(p[2])}, {fmt_pct(p[3])}]")
        rows.append(cells)
    return Table(["N distractors", *arms], rows, tuple(range(len(arms) + 1)))


def level_state(level: str, levels: dict[str, Any]) -> str:
    """ "not run", "measured" (informational or no entries), "pass" or "fail"."""
    if level not in levels:
        return "not run"
    status = level_status(level, levels[level]) if levels[level] else None
    return "measured" if status is None else "pass" if status else "fail"


def level_status(level: str, data: Any) -> bool | None:
    """True / False when the level was gated and passed / failed; None when it is informational."""
    if level == "graph":
        return all(check["passed"] for check in data)
    if level == "tasks":
        outcomes = [task_passed(task) for task in data.values()]
        gated = [outcome for outcome in outcomes if outcome is not None]
        return all(gated) if gated else None
    entries = data if level == "tensors" else list(data.values()) if level == "distribution" else []
    gated = [entry["failures"] for entry in entries if "failures" in entry]
    return (not any(gated)) if gated else None


# --- Markdown --------------------------------------------------------------------------------------------------------


def _md_cell(cell: Cell) -> str:
    if cell is None:
        return "—"
    if isinstance(cell, bool):
        return "pass" if cell else "**FAIL**"
    return cell.replace("|", "\\|")


def markdown_table(table: Table) -> str:
    """A pipe table padded to column widths, so it reads as well in a terminal as rendered."""
    cells = [[_md_cell(c) for c in row] for row in table.rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(table.headers)]

    def line(values: list[str]) -> str:
        pairs = enumerate(zip(values, widths, strict=True))
        padded = [v.rjust(w) if i in table.numeric else v.ljust(w) for i, (v, w) in pairs]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w + 1) + ":" if i in table.numeric else "-" * (w + 2) for i, w in enumerate(widths)]
    return "\n".join([line(table.headers), "|" + "|".join(rule) + "|", *map(line, cells)])


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: verdict and failures, arms, then every level's tables and statements."""
    header, levels = report["header"], report.get("levels", {})
    ref, cand = header["arms"]["reference"], header["arms"]["candidate"]
    out = [f"# Drift report: {cand['name']} vs {ref['name']}", ""]
    out.append(
        f"**Verdict: {header['verdict'].upper()}** (gate {header['gate']['name']}, v{header['gate']['version']})"
    )
    out += ["", *[f"- {failure}" for failure in header["failures"]]] if header["failures"] else []
    states = {level: level_state(level, levels) for level in LEVELS}
    out += ["", "; ".join(f"{title}: {states[level].replace('fail', 'FAIL')}" for level, title in LEVELS.items())]
    out += ["", f"Model {header['model']}, created {header['created']}.", ""]
    arms = Table(
        ["arm", "name", "precision", "backend"],
        [[role, arm["name"], arm["precision"], arm["backend"]] for role, arm in header["arms"].items()],
    )
    out += [markdown_table(arms), ""]
    for level, title in LEVELS.items():
        out += [f"## {title}", ""]
        if level not in levels:
            out += ["Not run.", ""]
            continue
        out += _markdown_level(level, levels[level])
    out += ["## Provenance", ""]
    out += [markdown_table(Table(["tool", "version"], [[k, v] for k, v in header["tool_versions"].items()])), ""]
    out += [markdown_table(Table(["subset", "id hash"], [[k, v] for k, v in header["subsets"].items()])), ""]
    out += [f"Schema {report.get('schema', SCHEMA)}.", ""]
    return "\n".join(out)


def _markdown_level(level: str, data: Any) -> list[str]:
    if not data:
        return ["No entries recorded for this level.", ""]
    if level == "graph":
        return [markdown_table(graph_table(data)), ""]
    if level == "tensors":
        summary, per_layer = tensor_tables(data)
        out = [markdown_table(summary), ""]
        return out + (["### Per layer", "", markdown_table(per_layer), ""] if per_layer else [])
    if level == "distribution":
        out = [markdown_table(distribution_table(data)), ""]
        decades = kl_decade_table(data)
        return out + (["### KL per position, by decade", "", markdown_table(decades), ""] if decades else [])
    if level == "tasks":
        out = [markdown_table(task_table(data)), ""]
        for name, task in data.items():
            verdict = _OUTCOME[task_passed(task)][0]
            out += [f"### {name} · {task['metric']} · {verdict}", "", certify_text(task), "", excluded_text(task), ""]
            if task.get("categories"):
                out += [markdown_table(category_table(task["categories"])), ""]
        return out
    return [markdown_table(distractor_table(data)), ""]


# --- SVG plots (drawn here: no plotting dependency, nothing external) ------------------------------------------------

PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000")  # Okabe-Ito: colour-blind safe
DASHES = ("", "7 4", "2 3", "10 3 2 3")  # second cue besides colour, per series
PASS_COLOUR, FAIL_COLOUR, INK, MUTED, GRID, AXIS = "#0072B2", "#D55E00", "#1f2937", "#6b7280", "#eceef1", "#9ca3af"
_HALO = {"stroke": "#fff", "stroke_width": 4, "paint_order": "stroke", "stroke_linejoin": "round"}  # legible on lines
_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


@dataclass(frozen=True)
class Scale:
    """Maps data in [lo, hi] onto pixels [start, end], linearly or by log10 (then lo > 0)."""

    lo: float
    hi: float
    start: float
    end: float
    log: bool = False

    def __call__(self, value: float) -> float:
        f = math.log10 if self.log else float
        return self.start + (f(value) - f(self.lo)) / (f(self.hi) - f(self.lo)) * (self.end - self.start)

    def ticks(self) -> list[tuple[float, str]]:
        if self.log:
            first, last = math.ceil(math.log10(self.lo) - 1e-9), math.floor(math.log10(self.hi) + 1e-9)
            step = max(1, math.ceil((last - first) / 7))
            return [
                (10.0**e, "1" if e == 0 else f"10{str(e).translate(_SUPERSCRIPT)}")
                for e in range(first, last + 1, step)
            ]
        step = _nice_step(self.hi - self.lo, 6)
        first = math.ceil(self.lo / step - 1e-9)
        values = [k * step for k in range(first, math.floor(self.hi / step + 1e-9) + 1)]
        return [(v, _minus(f"{round(v, 10):g}")) for v in values]


def _nice_step(span: float, count: int) -> float:
    raw = max(span, 1e-12) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))


def _nice_range(lo: float, hi: float, count: int = 6) -> tuple[float, float]:
    step = _nice_step(hi - lo, count)
    return math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step


def _decades(values: list[float], extra: float | None = None) -> tuple[float, float]:
    """[10^a, 10^b] around the positive finite values (and ``extra``), at least one decade wide."""
    positive = [v for v in [*values, *([extra] if extra else [])] if v > 0 and math.isfinite(v)]
    if not positive:
        return 1e-12, 1e-11
    lo, hi = math.floor(math.log10(min(positive))), math.ceil(math.log10(max(positive)))
    return 10.0 ** max(lo, -15), 10.0 ** max(hi, lo + 1)


class Svg:
    """An inline <svg> built element by element; attribute names use '_' for '-' (stroke_width)."""

    def __init__(self, width: int, height: int, kind: str, title: str) -> None:
        self.width, self.height, self.kind, self.title = width, height, kind, title
        self.parts: list[str] = []

    def add(self, tag: str, text: str | None = None, **attrs: Any) -> None:
        pairs = [f'{k.rstrip("_").replace("_", "-")}="{_attr(v)}"' for k, v in attrs.items() if v is not None]
        opening = f"<{tag} {' '.join(pairs)}"
        self.parts.append(f"{opening}/>" if text is None else f"{opening}>{html.escape(text)}</{tag}>")

    def line(self, x1: float, y1: float, x2: float, y2: float, stroke: str, width: float = 1, dash: str = "") -> None:
        self.add("line", x1=x1, y1=y1, x2=x2, y2=y2, stroke=stroke, stroke_width=width, stroke_dasharray=dash or None)

    def text(self, x: float, y: float, text: str, *, anchor: str = "start", size: float = 12, **attrs: Any) -> None:
        self.add("text", text, x=x, y=y, text_anchor=anchor, font_size=size, fill=attrs.pop("fill", INK), **attrs)

    def render(self) -> str:
        head = (
            f'<svg class="plot" data-plot="{self.kind}" viewBox="0 0 {self.width} {self.height}" width="{self.width}" '
            f'height="{self.height}" role="img" aria-label="{_attr(self.title)}">'
            f"<title>{html.escape(self.title)}</title>"
        )
        return head + "".join(self.parts) + "</svg>"


def _attr(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.2f}".rstrip("0").rstrip(".")
    return html.escape(str(value), quote=True)


def _axes(
    svg: Svg, x: Scale, y: Scale, xlabel: str, ylabel: str, xticks: list[tuple[float, str]] | None = None
) -> None:
    """Grid, axis lines, tick labels and axis titles of the panel x.start..x.end by y.end..y.start."""
    left, right, top, bottom = x.start, x.end, y.end, y.start
    for value, label in y.ticks():
        py = y(value)
        svg.line(left, py, right, py, GRID)
        svg.text(left - 8, py, label, anchor="end", size=11.5, fill=MUTED, dy="0.32em")
    for value, label in xticks if xticks is not None else x.ticks():
        px = x(value)
        svg.line(px, bottom, px, bottom + 5, AXIS)
        svg.text(px, bottom + 19, label, anchor="middle", size=11.5, fill=MUTED)
    svg.line(left, bottom, right, bottom, AXIS)
    svg.line(left, top, left, bottom, AXIS)
    svg.text((left + right) / 2, bottom + 42, xlabel, anchor="middle", size=12.5, fill=INK)
    cy = (top + bottom) / 2
    svg.text(
        left - 58, cy, ylabel, anchor="middle", size=12.5, fill=INK, transform=f"rotate(-90 {left - 58:.1f} {cy:.1f})"
    )


def _legend(svg: Svg, x: float, y: float, items: list[tuple[str, str, str]], max_x: float | None = None) -> None:
    """Legend entries (label, colour, swatch) in rows from (x, y); swatch: 'solid', a dash pattern, 'band',
    'point', 'diamond' or 'triangle'."""
    cursor, max_x = x, max_x or svg.width - 10
    for label, colour, swatch in items:
        width = 30 + 6.6 * len(label)
        if cursor + width > max_x and cursor > x:
            cursor, y = x, y + 20
        if swatch == "band":
            svg.add("rect", x=cursor, y=y - 6, width=22, height=12, fill=colour, fill_opacity=0.2, rx=2)
        elif swatch == "point":
            svg.add("circle", cx=cursor + 11, cy=y, r=5, fill=colour)
        elif swatch == "diamond":
            svg.add(
                "rect",
                x=cursor + 6.5,
                y=y - 4.5,
                width=9,
                height=9,
                fill=colour,
                transform=f"rotate(45 {cursor + 11} {y})",
            )
        elif swatch == "triangle":
            svg.add("path", d=f"M{cursor + 15},{y - 7}L{cursor + 15},{y + 7}L{cursor + 8},{y}Z", fill=colour)
        else:
            svg.line(cursor, y, cursor + 22, y, colour, 2.2, "" if swatch == "solid" else swatch)
        svg.text(cursor + 28, y, label, size=12, fill=INK, dy="0.32em")
        cursor += width + 14


def plot_layers(tensors: list[dict[str, Any]], gate: dict[str, Any]) -> str | None:
    """Two log-scale panels by layer index: max abs error and 1 - cosine, one line per per-layer series."""
    series = layer_series(tensors)
    if not series:
        return None
    svg = Svg(1040, 380, "layers", "Per-layer error of the candidate against the reference")
    names = list(series)
    _legend(svg, 90, 20, [(n, PALETTE[i % 7], DASHES[i % 4] or "solid") for i, n in enumerate(names)])
    layers = [layer for points in series.values() for layer, _ in points]
    min_cos = gate.get("min_cosine")
    panels = [
        ("max abs error (log scale)", lambda e: e["max_abs"], None),
        ("1 − cosine similarity (log scale)", lambda e: 1 - e["cosine"], None if min_cos is None else 1 - min_cos),
    ]
    for p, (label, metric, gate_value) in enumerate(panels):
        left = 90 + p * 520
        values = {name: [(layer, metric(e)) for layer, e in points] for name, points in series.items()}
        lo, hi = _decades([v for pts in values.values() for _, v in pts], gate_value)
        x = Scale(min(layers) - 0.5, max(layers) + 0.5, left, left + 420)
        y = Scale(lo, hi, 310, 60, log=True)
        step = max(1, round(_nice_step(max(layers) - min(layers) + 1, 8)))
        ticks = [(v, str(v)) for v in range(min(layers), max(layers) + 1) if (v - min(layers)) % step == 0]
        _axes(svg, x, y, "layer index", label, ticks)
        if gate_value is not None:
            svg.line(left, y(gate_value), left + 420, y(gate_value), INK, 1.3, "5 4")
            svg.text(left + 6, y(gate_value) - 6, f"gate {fmt_sci(gate_value, 1)}", size=11, **_HALO)
        for i, name in enumerate(names):
            drawn = [(x(layer), y(min(max(v, lo), hi))) for layer, v in values[name] if math.isfinite(v)]
            colour = PALETTE[i % 7]
            svg.add("polyline", points=" ".join(f"{a:.1f},{b:.1f}" for a, b in drawn), fill="none", stroke=colour,
                    stroke_width=1.8, stroke_dasharray=DASHES[i % 4] or None)  # fmt: skip
            for a, b in drawn:
                svg.add("circle", cx=a, cy=b, r=2.6, fill=colour)
    return svg.render()


def plot_kl(sets: dict[str, dict[str, Any]], gate: dict[str, Any]) -> str | None:
    """Histogram of KL(ref ‖ cand) per position on log-spaced bins, one outline per prompt set, means marked."""
    raw = kl_values(sets)
    data = {name: [max(0.0, v) for v in values if math.isfinite(v)] for name, values in raw.items()}
    if not any(data.values()):
        return None
    gate_value = gate.get("max_kl_mean")
    lo, hi = _decades([v for values in data.values() for v in values], gate_value)
    decades = round(math.log10(hi / lo))
    per = 5 if decades <= 6 else 2 if decades <= 12 else 1
    bins = decades * per
    edges = [lo * 10 ** (k / per) for k in range(bins + 1)]
    svg = Svg(1040, 380, "kl", "Histogram of KL(reference ‖ candidate) per position")
    shares = {}
    for name, values in data.items():
        counts = [0] * bins
        for v in values:  # values at or below lo (exact zeros included) go to the first bin
            k = 0 if v <= lo else min(bins - 1, int((math.log10(v) - math.log10(lo)) * per))
            counts[k] += 1
        shares[name] = [100 * c / len(raw[name]) for c in counts]
    top_share = _nice_range(0, max(max(s) for s in shares.values()))[1]
    x, y = Scale(lo, hi, 90, 1010, log=True), Scale(0, top_share, 310, 60)
    _axes(svg, x, y, "KL(reference ‖ candidate) per position (log scale)", "share of positions (%)")
    items = []
    for i, (name, share) in enumerate(shares.items()):
        colour, mean = PALETTE[i % 7], sets[name]["kl_mean"]
        path = [f"M{x(edges[0]):.1f},{y(0):.1f}"]
        for k, s in enumerate(share):
            path.append(f"L{x(edges[k]):.1f},{y(s):.1f}L{x(edges[k + 1]):.1f},{y(s):.1f}")
        path.append(f"L{x(edges[-1]):.1f},{y(0):.1f}Z")
        svg.add("path", d="".join(path), fill=colour, fill_opacity=0.16, stroke=colour, stroke_width=1.8,
                stroke_dasharray=DASHES[i % 4] or None)  # fmt: skip
        if lo <= mean <= hi:
            svg.line(x(mean), 60, x(mean), 310, colour, 2, "2 3")
        hidden = len(raw[name]) - len(data[name])
        label = f"{name}: {len(raw[name]):,} positions, mean {fmt_sci(mean)}"
        label += f" ({hidden:,} non-finite, not drawn)" if hidden else ""
        items.append((label, colour, DASHES[i % 4] or "solid"))
    if gate_value is not None:
        svg.line(x(gate_value), 52, x(gate_value), 310, INK, 1.5, "6 4")
        svg.text(x(gate_value) + 6, 64, f"gate: mean KL ≤ {fmt_sci(gate_value, 1)}", size=11.5, **_HALO)
        items.append(("gate on the mean", INK, "6 4"))
    _legend(svg, 90, 20, [*items, ("dotted: each set's mean", MUTED, "2 3")])
    return svg.render()


_OUTCOME = {True: ("pass", PASS_COLOUR), False: ("FAIL", FAIL_COLOUR), None: ("not gated", MUTED)}


def plot_forest(tasks: dict[str, dict[str, Any]]) -> str | None:
    """Forest plot: each benchmark's delta (points) with its two-sided CI, one-sided lower bound and -margin."""
    if not tasks:
        return None
    rows = [(name, PairedDelta.from_json(t["delta"]), t["margin"], task_passed(t)) for name, t in tasks.items()]
    row_h, top = 48, 64
    bottom = top + row_h * len(rows)
    values = [v * 100 for _, d, m, _ in rows for v in (d.ci_low, d.ci_high, d.lower_bound, -m, 0.0)]
    lo, hi = _nice_range(min(values) - 0.3, max(values) + 0.3)
    x = Scale(lo, hi, 220, 760)
    svg = Svg(1040, bottom + 62, "forest", "Accuracy delta per benchmark with confidence intervals and margins")
    for i in range(0, len(rows), 2):
        svg.add("rect", x=10, y=top + i * row_h, width=1020, height=row_h, fill="#f7f8fa")
    svg.line(x.start, bottom, x.end, bottom, AXIS)
    svg.text((x.start + x.end) / 2, bottom + 42, "delta = candidate − reference (percentage points)", anchor="middle")
    for value, label in x.ticks():
        svg.line(x(value), top, x(value), bottom, GRID)
        svg.line(x(value), bottom, x(value), bottom + 5, AXIS)
        svg.text(x(value), bottom + 19, label, anchor="middle", size=11.5, fill=MUTED)
    svg.line(x(0), top - 6, x(0), bottom, AXIS, 1.4)
    svg.text(790, top - 12, "delta [two-sided CI]", size=11.5, fill=MUTED)
    svg.text(1020, top - 12, "gate", anchor="end", size=11.5, fill=MUTED)
    for i, (name, d, margin, passed) in enumerate(rows):
        _forest_row(svg, x, top + i * row_h + row_h / 2, row_h, name, d, margin, passed)
    if len({m for _, _, m, _ in rows}) == 1:  # one shared margin: label its line once
        svg.text(x(-rows[0][2] * 100), top - 8, f"−{rows[0][2] * 100:.1f}", anchor="middle", size=11)
    outcomes = {passed for *_, passed in rows}
    items = [(f"delta, {_OUTCOME[o][0].lower()}", _OUTCOME[o][1], "diamond" if o is False else "point")
             for o in (True, False, None) if o in outcomes]  # fmt: skip
    items += [("two-sided 95% CI", INK, "solid"), ("one-sided 95% lower bound", INK, "triangle")]
    _legend(svg, 220, 22, [*items, ("−margin (non-inferiority)", INK, "4 3")], max_x=1030)
    return svg.render()


def _forest_row(
    svg: Svg, x: Scale, cy: float, row_h: float, name: str, d: PairedDelta, margin: float, passed: bool | None
) -> None:
    """One benchmark at height cy: label, -margin line, CI bar, lower-bound triangle, delta marker, numbers."""
    word, colour = _OUTCOME[passed]
    svg.text(22, cy - 3, name, size=13.5, font_weight=600)
    svg.text(22, cy + 14, f"{d.n_units:,} units · {d.n_clusters:,} clusters", size=11, fill=MUTED)
    svg.line(x(-margin * 100), cy - row_h / 2 + 5, x(-margin * 100), cy + row_h / 2 - 5, INK, 1.6, "4 3")
    svg.line(x(d.ci_low * 100), cy, x(d.ci_high * 100), cy, colour, 2.6)
    for end in (d.ci_low, d.ci_high):
        svg.line(x(end * 100), cy - 5, x(end * 100), cy + 5, colour, 2)
    lb = x(d.lower_bound * 100)
    svg.add("path", d=f"M{lb:.1f},{cy - 9:.1f}L{lb:.1f},{cy + 9:.1f}L{lb - 7:.1f},{cy:.1f}Z", fill=colour)
    px = x(d.delta * 100)
    if passed is False:  # a diamond, so pass and fail differ in shape as well as colour
        svg.add("rect", x=px - 5.5, y=cy - 5.5, width=11, height=11, fill=colour, stroke="#fff", stroke_width=1.5,
                transform=f"rotate(45 {px:.1f} {cy:.1f})")  # fmt: skip
    else:
        svg.add("circle", cx=px, cy=cy, r=6, fill=colour, stroke="#fff", stroke_width=1.5)
    ci = f"{fmt_pts(d.delta)} pt  [{fmt_pts(d.ci_low)}, {fmt_pts(d.ci_high)}]"
    svg.text(790, cy, ci, size=12.5, dy="0.32em", font_variant_numeric="tabular-nums")
    svg.text(1020, cy, word, anchor="end", size=12.5, dy="0.32em", fill=colour, font_weight=700)


def plot_distractors(arms: dict[str, list[list[float]]]) -> str | None:
    """Accuracy against the number of distractor images N (log(1 + N) axis), a 95% CI band per arm."""
    points = {arm: sorted(p, key=lambda q: q[0]) for arm, p in arms.items() if p}
    if not points:
        return None
    counts = sorted({p[0] for ps in points.values() for p in ps})
    pos = [math.log10(1 + n) for n in counts]
    span = max(pos[-1] - pos[0], 0.5)
    x = Scale(pos[0] - 0.03 * span, pos[0] + 1.03 * span, 90, 1010)
    lows = [100 * p[2] for ps in points.values() for p in ps]
    highs = [100 * p[3] for ps in points.values() for p in ps]
    lo, hi = max(0.0, math.floor(min(lows) / 10) * 10), min(100.0, math.ceil(max(highs) / 10) * 10)
    y = Scale(lo, max(hi, lo + 10), 320, 60)
    svg = Svg(1040, 390, "distractors", "Accuracy against the number of distractor images")
    ticks = [(math.log10(1 + n), f"{n:g}") for n in counts]
    _axes(svg, x, y, "distractor images added, N (log(1 + N) scale)", "accuracy (%)", ticks)
    items = []
    for i, (arm, ps) in enumerate(points.items()):
        colour, dash = PALETTE[i % 7], DASHES[i % 4]
        xs = [x(math.log10(1 + p[0])) for p in ps]
        band = [f"{a:.1f},{y(100 * p[3]):.1f}" for a, p in zip(xs, ps, strict=True)]
        band += [f"{a:.1f},{y(100 * p[2]):.1f}" for a, p in reversed(list(zip(xs, ps, strict=True)))]
        svg.add("polygon", points=" ".join(band), fill=colour, fill_opacity=0.14, stroke="none")
        line = " ".join(f"{a:.1f},{y(100 * p[1]):.1f}" for a, p in zip(xs, ps, strict=True))
        svg.add("polyline", points=line, fill="none", stroke=colour, stroke_width=2.2, stroke_dasharray=dash or None)
        for a, p in zip(xs, ps, strict=True):
            svg.add("circle", cx=a, cy=y(100 * p[1]), r=3.8, fill=colour, stroke="#fff", stroke_width=1.2)
        items.append((arm, colour, dash or "solid"))
    _legend(svg, 90, 20, [*items, ("shaded: 95% CI", MUTED, "band")])
    return svg.render()


# --- HTML ------------------------------------------------------------------------------------------------------------

_CSS = """
:root{--ink:#1f2937;--muted:#6b7280;--line:#e5e7eb;--bg:#f4f5f7;--card:#fff;--accent:#0072B2;
--ok:#17724f;--ok-bg:#e7f4ee;--ok-line:#b9dec9;--bad:#b3261e;--bad-bg:#fcebea;--bad-line:#f2c1bd}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:36px 28px 56px}
.eyebrow{text-transform:uppercase;letter-spacing:.09em;font-size:12px;font-weight:700;color:var(--accent)}
h1{font-size:30px;line-height:1.2;margin:6px 0 6px;letter-spacing:-.01em}
.sub{color:var(--muted);margin:0}
.banner{display:flex;gap:16px;align-items:flex-start;margin:24px 0 12px;padding:18px 22px;border-radius:12px;
border:1px solid}
.banner.accepted{background:var(--ok-bg);border-color:var(--ok-line)}
.banner.rejected{background:var(--bad-bg);border-color:var(--bad-line)}
.banner .icon{flex:none;width:40px;height:40px;border-radius:50%;color:#fff;font-size:22px;font-weight:700;
display:flex;align-items:center;justify-content:center}
.accepted .icon{background:var(--ok)}.rejected .icon{background:var(--bad)}
.banner h2{margin:0;font-size:21px}.accepted h2{color:var(--ok)}.rejected h2{color:var(--bad)}
.banner p{margin:2px 0 0}.banner ul{margin:8px 0 0;padding-left:20px}.banner li{margin:2px 0}
.chips{display:flex;flex-wrap:wrap;gap:8px;margin:0 0 8px}
.chip{display:inline-flex;align-items:center;gap:8px;padding:5px 12px;border-radius:999px;background:var(--card);
border:1px solid var(--line);color:var(--ink);text-decoration:none;font-size:13px}
.chip b{font-weight:600}.dot{width:9px;height:9px;border-radius:50%;background:#9ca3af}
.dot.pass{background:var(--ok)}.dot.fail{background:var(--bad)}.dot.none{background:none;border:1.5px solid #9ca3af}
section{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:22px 26px;margin-top:18px}
section>h2{display:flex;align-items:center;gap:12px;font-size:19px;margin:0 0 4px}
.lead{color:var(--muted);margin:0 0 14px;font-size:14px;max-width:860px}
h3{font-size:15.5px;margin:24px 0 8px}
.arms{display:grid;grid-template-columns:1fr 1fr;gap:16px}
.arm{border:1px solid var(--line);border-radius:10px;padding:14px 16px}
.arm .role{font-size:12px;text-transform:uppercase;letter-spacing:.07em;color:var(--muted);font-weight:600}
.arm .name{font-size:18px;font-weight:650;margin:2px 0}.arm .meta{color:var(--muted);font-size:14px}
.facts{display:flex;flex-wrap:wrap;gap:6px 28px;margin-top:14px;font-size:14px;color:var(--muted)}
.facts b{color:var(--ink);font-weight:600}
.table-wrap{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:13.5px;font-variant-numeric:tabular-nums}
th{font-size:12.5px;color:var(--muted);font-weight:600;text-align:left;padding:8px 9px;
border-bottom:1.5px solid var(--line);vertical-align:bottom}
table.compact{width:auto;min-width:60%}table.compact td,table.compact th{padding-left:14px;padding-right:14px}
td{padding:7px 9px;border-bottom:1px solid #f0f1f3}
tr:last-child td{border-bottom:0}tbody tr:hover{background:#fafbfc}
.num{text-align:right;white-space:nowrap}
.code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
.badge{display:inline-block;padding:1px 9px;border-radius:999px;font-size:12px;font-weight:650;white-space:nowrap}
.badge.pass{background:var(--ok-bg);color:var(--ok)}.badge.fail{background:var(--bad-bg);color:var(--bad)}
.badge.info,.badge.none{background:#f1f2f4;color:var(--muted)}
figure{margin:16px 0 8px}figure svg{display:block;width:100%;height:auto}
figcaption{color:var(--muted);font-size:13px;margin-top:4px}
.note{background:#eef5fb;border-left:4px solid var(--accent);border-radius:0 8px 8px 0;padding:10px 14px;
margin:10px 0;font-size:14px}
.note.warn{background:#fdf6e7;border-left-color:#E69F00}
.muted{color:var(--muted)}.small{font-size:13px}
details>summary{cursor:pointer;color:var(--accent);font-size:14px;margin:14px 0 6px}
.empty{color:var(--muted);font-style:italic;margin:0}
footer{color:var(--muted);font-size:12.5px;text-align:center;margin-top:26px}
"""

_LEADS = {
    "graph": "Structure only: onnx.checker full check, strict shape inference and the expected operator counts.",
    "tensors": "Every graph output on the same real image and text inputs, teacher-forced. Per-layer outputs are "
    "plotted by layer index; the table gives whole outputs and each per-layer series' worst layer.",
    "distribution": "Next-token distributions over a fixed prompt set, text-only and with images, teacher-forced "
    "on the reference tokens: KL(reference ‖ candidate) per position and top-1 agreement.",
    "tasks": "Benchmark subsets with greedy decoding and the same prompts and answer extraction in both arms. Delta "
    "is candidate − reference in percentage points; a benchmark passes when the one-sided 95% lower bound of the "
    "paired delta is above −margin (non-inferiority).",
    "distractors": "The paper's robustness test: each question is asked with N irrelevant images added. A precision "
    "may hold at N = 1 and collapse at N = 50.",
}


def _badge(status: bool | None, text: str | None = None) -> str:
    kind = "none" if status is None else "pass" if status else "fail"
    label = text or {"none": "not gated", "pass": "✓ pass", "fail": "✗ fail"}[kind]
    return f'<span class="badge {kind}">{html.escape(label)}</span>'


def html_table(table: Table, code_columns: tuple[int, ...] = (0,), *, compact: bool = False) -> str:
    def cell(i: int, value: Cell, tag: str = "td") -> str:
        flags = (("num", i in table.numeric), ("code", tag == "td" and i in code_columns))
        classes = " ".join(c for c, on in flags if on)
        content = _badge(value) if value is None or isinstance(value, bool) else html.escape(value)
        return f"<{tag}{f' class={chr(34)}{classes}{chr(34)}' if classes else ''}>{content}</{tag}>"

    head = "".join(cell(i, h, "th") for i, h in enumerate(table.headers))
    body = "".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(row)) + "</tr>" for row in table.rows)
    opening = '<table class="compact">' if compact else "<table>"
    return f'<div class="table-wrap">{opening}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _figure(svg: str | None, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{html.escape(caption)}</figcaption></figure>" if svg else ""


def _html_level(level: str, data: Any, gate: dict[str, Any]) -> str:
    if not data:
        return '<p class="empty">No entries recorded for this level.</p>'
    if level == "graph":
        return html_table(graph_table(data), ())
    if level == "tensors":
        summary, per_layer = tensor_tables(data)
        caption = "Log scales. Each line is one per-layer output series; the dashed line is the gate's cosine limit."
        parts = [_figure(plot_layers(data, gate), caption), html_table(summary)]
        if per_layer:
            summary_text = f"Every layer ({len(per_layer.rows)} rows)"
            parts.append(f"<details><summary>{summary_text}</summary>{html_table(per_layer, ())}</details>")
        return "".join(parts)
    if level == "distribution":
        caption = (
            "Share of positions per log-spaced KL bin; values at or below the first bin's edge (exact zeros "
            "included) are counted in the first bin. Dotted lines mark each prompt set's mean KL."
        )
        return _figure(plot_kl(data, gate), caption) + html_table(distribution_table(data), ())
    if level == "tasks":
        caption = (
            "Dot: paired delta; bar: two-sided 95% CI (cluster bootstrap); triangle: one-sided 95% lower bound; "
            "dashed line: −margin. A benchmark passes when its triangle lies right of its dashed line."
        )
        parts = [_figure(plot_forest(data), caption), html_table(task_table(data), ())]
        for name, task in data.items():
            warn = detectable_drop_exceeds(task)
            heading = f"{html.escape(name)} <span class='muted small'>· {html.escape(task['metric'])}</span>"
            parts.append(f"<h3>{heading} {_badge(task_passed(task))}</h3>")
            parts.append(f'<div class="note{" warn" if warn else ""}">{html.escape(certify_text(task))}</div>')
            parts.append(f'<p class="muted small">{html.escape(excluded_text(task))}</p>')
            if task.get("categories"):
                parts.append(html_table(category_table(task["categories"]), (), compact=True))
        return "".join(parts)
    caption = "Accuracy per arm with its 95% CI band; the x axis is log(1 + N)."
    return _figure(plot_distractors(data), caption) + html_table(distractor_table(data), (), compact=True)


def detectable_drop_exceeds(task: dict[str, Any]) -> bool:
    """True when the benchmark subset is too small to certify its own margin (a smoke gate)."""
    return detectable_drop(task["delta"]["n_units"]) > task["margin"]


def _html_header(header: dict[str, Any]) -> str:
    ref, cand, gate = header["arms"]["reference"], header["arms"]["candidate"], header["gate"]
    e = html.escape
    accepted = header["verdict"] == "accepted"
    title = f"{e(cand['name'])} <span class='muted'>vs</span> {e(ref['name'])}"
    if accepted:
        body = "<p>Every gate of this comparison passed.</p>"
    else:
        failures = "".join(f"<li>{e(f)}</li>" for f in header["failures"])
        body = f"<p>{len(header['failures'])} gate failure(s):</p><ul>{failures}</ul>"
    banner = (
        f'<div class="banner {header["verdict"]}"><div class="icon">{"✓" if accepted else "✗"}</div>'
        f"<div><h2>{'Accepted' if accepted else 'Rejected'}</h2>{body}</div></div>"
    )
    return (
        f'<div class="eyebrow">owl3-export · drift report</div><h1>{title}</h1>'
        f'<p class="sub">{e(header["model"])} · gate “{e(gate["name"])}” v{e(str(gate["version"]))} · '
        f"{e(header['created'])}</p>{banner}"
    )


def _html_chips(levels: dict[str, Any]) -> str:
    chips = []
    for level, title in LEVELS.items():
        state = level_state(level, levels)
        kind = {"not run": "none", "measured": "info"}.get(state, state)
        chips.append(f'<a class="chip" href="#{level}"><span class="dot {kind}"></span><b>{title}</b> {state}</a>')
    return f'<nav class="chips">{"".join(chips)}</nav>'


_GATE_LIMITS: dict[str, tuple[str, Any]] = {
    "max_abs": ("L1 logits max abs ≤", fmt_sci),
    "min_cosine": ("L1 cosine ≥", lambda v: f"{v:g}"),
    "finite": ("L1 NaN / Inf", lambda v: "none allowed"),
    "max_kl_mean": ("L2 mean KL ≤", fmt_sci),
    "min_top1": ("L2 top-1 ≥", lambda v: fmt_pct(v, 1)),
}


def _html_arms(header: dict[str, Any]) -> str:
    e = html.escape
    cards = "".join(
        f'<div class="arm"><div class="role">{role}</div><div class="name">{e(arm["name"])}</div>'
        f'<div class="meta">{e(arm["precision"])} · {e(arm["backend"])}</div></div>'
        for role, arm in header["arms"].items()
    )
    gate = header["gate"]
    facts = [f"<span>gate <b>{e(gate['name'])}</b> v{e(str(gate['version']))}</span>"]
    for key, value in gate.items():
        if key in ("name", "version", "key") or value is None or value is False:
            continue
        label, show = _GATE_LIMITS.get(key, (key, str))
        facts.append(f"<span>{e(label)} <b>{e(show(value))}</b></span>")
    facts = " ".join(facts)
    facts_html = f'<div class="facts">{facts}</div>'
    return f'<section id="arms"><h2>Comparison</h2><div class="arms">{cards}</div>{facts_html}</section>'


def _html_provenance(report: dict[str, Any]) -> str:
    header = report["header"]
    tools = Table(["tool", "version"], [[k, str(v)] for k, v in header["tool_versions"].items()])
    subsets = Table(["benchmark subset", "item id hash"], [[k, str(v)] for k, v in header["subsets"].items()])
    return (
        '<section id="provenance"><h2>Provenance</h2><div class="arms">'
        f"<div>{html_table(tools, ())}</div><div>{html_table(subsets, (1,))}</div></div></section>"
    )


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page: inline CSS and SVG, no script, nothing fetched."""
    header, levels = report["header"], report.get("levels", {})
    sections = []
    for level, title in LEVELS.items():
        state = level_state(level, levels)
        badge = _badge({"pass": True, "fail": False}.get(state), None if state in ("pass", "fail") else state)
        if level in levels:
            content = f'<p class="lead">{_LEADS[level]}</p>' + _html_level(level, levels[level], header["gate"])
        else:
            content = '<p class="empty">Not run: the comparison stopped earlier or this level does not apply.</p>'
        sections.append(f'<section id="{level}"><h2>{title} {badge}</h2>{content}</section>')
    ref, cand = header["arms"]["reference"]["name"], header["arms"]["candidate"]["name"]
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Drift report · {html.escape(cand)} vs {html.escape(ref)} · {header['verdict']}</title>"
        f"<style>{_CSS}</style></head><body><main>"
        f"{_html_header(header)}{_html_chips(levels)}{_html_arms(header)}{''.join(sections)}"
        f"{_html_provenance(report)}<footer>{html.escape(report.get('schema', SCHEMA))} · "
        "written by owl3.validate.report</footer></main></body></html>\n"
    )
