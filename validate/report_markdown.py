"""The drift report as Markdown (owl3.validate.report): padded pipe tables that read as well in a terminal."""

from __future__ import annotations

from typing import Any

from owl3.validate.report_tables import (
    LEVELS,
    OUTCOME_WORDS,
    SCHEMA,
    Cell,
    Table,
    calibration_texts,
    category_table,
    certify_text,
    distractor_table,
    distribution_table,
    excluded_text,
    graph_table,
    kl_decade_table,
    level_state,
    task_passed,
    task_table,
    tensor_tables,
)


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
    out += [line for text in calibration_texts(header) for line in (text, "")]
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
            verdict = OUTCOME_WORDS[task_passed(task)]
            out += [f"### {name} · {task['metric']} · {verdict}", "", certify_text(task), "", excluded_text(task), ""]
            if task.get("categories"):
                out += [markdown_table(category_table(task["categories"])), ""]
        return out
    return [markdown_table(distractor_table(data)), ""]
