"""What the drift report's Markdown and HTML renderers share (owl3.validate.report): the schema name, the level
titles, each level's gate state, and every table as rows of formatted cells.

A ``Table`` holds strings and status cells only; ``report_markdown`` and ``report_html`` decide how they look.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from owl3.validate.report_format import fmt_db, fmt_p, fmt_pct, fmt_pts, fmt_sci, minus
from owl3.validate.stats import PairedDelta, certify_statement, detectable_drop, non_inferior

SCHEMA = "owl3.drift-report/1"
LEVELS = {
    "graph": "L0 · Graph",
    "tensors": "L1 · Tensors",
    "distribution": "L2 · Next-token distribution",
    "tasks": "L3 · Tasks",
    "distractors": "Distractor resistance",
}
OUTCOME_WORDS = {True: "pass", False: "FAIL", None: "not gated"}  # task_passed() -> the word shown
_LAYER = re.compile(r"^(?P<series>.+)_(?P<layer>\d+)$")  # "decoder/present_key_12" -> series, layer 12

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
        fmt_db(t["sqnr_db"]),
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
            key = minus(f"[1e{e}, 1e{e + 1})")
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
                minus(f"-{task['margin'] * 100:.1f}"),
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


def calibration_texts(header: dict[str, Any]) -> list[str]:
    """One sentence per quantized arm: its calibration set and whether it overlaps the evaluated subsets."""
    out = []
    for info in header.get("calibration", []):
        ids = info["ids_sha256"][:12]
        what = f"{info['arm']} was calibrated on {info['samples']} samples ({info['source']}, ids {ids})"
        if not info["overlap"]:
            out.append(f"{what}; none of them or their images is in the evaluated subsets.")
            continue
        shared = ", ".join(f"{b}: {o['items']} items, {o['media']} images" for b, o in info["overlap"].items())
        out.append(
            f"WARNING: {what}, and the evaluated subsets share some of them ({shared}); this evaluation was "
            "allowed with --allow-calibration-overlap, so its task scores are not independent of calibration."
        )
    return out


def certify_text(task: dict[str, Any]) -> str:
    """The benchmark's certify statement: the producer's, else the one its size and margin give."""
    return task.get("certify") or certify_statement(task["delta"]["n_units"], task["margin"])


def detectable_drop_exceeds(task: dict[str, Any]) -> bool:
    """True when the benchmark subset is too small to certify its own margin (a smoke gate)."""
    return detectable_drop(task["delta"]["n_units"]) > task["margin"]


def distractor_table(arms: dict[str, list[list[float]]]) -> Table:
    """One row per distractor count N, one column per arm: accuracy [95% CI].

    An arm with several points at the same N (repeated runs) shows every one of them in that cell, in the order
    given and separated by "; ": none is dropped and they are not averaged, as the plot draws them all too.
    """
    counts = sorted({point[0] for points in arms.values() for point in points})
    by_arm: dict[str, dict[float, list[list[float]]]] = {arm: {} for arm in arms}
    for arm, points in arms.items():
        for p in points:
            by_arm[arm].setdefault(p[0], []).append(p)
    rows: list[list[Cell]] = []
    for n in counts:
        cells: list[Cell] = [f"{n:g}"]
        for arm in arms:
            found = by_arm[arm].get(n, [])
            cells.append("; ".join(f"{fmt_pct(p[1])} [{fmt_pct(p[2])}, {fmt_pct(p[3])}]" for p in found) or "—")
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
