"""The drift report as one self-contained HTML page (owl3.validate.report): inline CSS and SVG, no script, no
external resource. A verdict banner, level chips, the compared arms, one section per level, provenance.
"""

from __future__ import annotations

import html
from typing import Any

from owl3.validate.report_format import fmt_pct, fmt_sci
from owl3.validate.report_svg import plot_distractors, plot_forest, plot_kl, plot_layers
from owl3.validate.report_tables import (
    LEVELS,
    SCHEMA,
    Cell,
    Table,
    calibration_texts,
    category_table,
    certify_text,
    detectable_drop_exceeds,
    distractor_table,
    distribution_table,
    excluded_text,
    graph_table,
    level_state,
    task_passed,
    task_table,
    tensor_tables,
)

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
        caption = (
            "Log scales. Each line is one per-layer output (key / value caches, visual keys / values), the worst "
            "of the probes at each layer; the dashed line is the gate's cosine limit; the table has every probe."
        )
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
    calibration = "".join(f'<p class="sub">{e(text)}</p>' for text in calibration_texts(header))
    return (
        f'<div class="eyebrow">owl3-export · drift report</div><h1>{title}</h1>'
        f'<p class="sub">{e(header["model"])} · gate “{e(gate["name"])}” v{e(str(gate["version"]))} · '
        f"{e(header['created'])}</p>{calibration}{banner}"
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
