"""The drift report's plots as inline SVG (owl3.validate.report), drawn here: no plotting dependency, nothing
fetched. ``Scale``, ``Svg``, axes and legends are the primitives; ``plot_layers`` (per-layer error), ``plot_kl``
(KL histogram), ``plot_forest`` (task deltas against margins) and ``plot_distractors`` (accuracy against N) each
return one ``<svg>`` element, or None when there is nothing to draw.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from owl3.validate.report_format import fmt_pts, fmt_sci, minus
from owl3.validate.report_tables import OUTCOME_WORDS, kl_values, layer_series, task_passed
from owl3.validate.stats import PairedDelta

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
        return [(v, minus(f"{round(v, 10):g}")) for v in values]


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


def worst_over_probes(
    series: dict[str, list[tuple[int, dict[str, Any]]]], metric: Callable[[dict[str, Any]], float]
) -> dict[str, list[tuple[int, float]]]:
    """Per-layer series merged across probes ("text/decoder/present_key" and "images/decoder/present_key"
    become "decoder/present_key"), keeping the largest ``metric`` at each layer: one line per output kind."""
    merged: dict[str, dict[int, float]] = {}
    for name, points in series.items():
        kind = name.split("/", 1)[-1]
        for layer, entry in points:
            value = metric(entry)
            previous = merged.setdefault(kind, {}).get(layer)
            if previous is None or math.isnan(value) or (not math.isnan(previous) and value > previous):
                merged[kind][layer] = value  # a NaN stays: it must show
    return {kind: sorted(values.items()) for kind, values in merged.items()}


def plot_layers(tensors: list[dict[str, Any]], gate: dict[str, Any]) -> str | None:
    """Two log-scale panels by layer index: max abs error and 1 - cosine, one line per output kind (the
    worst of the probes at each layer)."""
    series = layer_series(tensors)
    if not series:
        return None
    svg = Svg(1040, 380, "layers", "Per-layer error of the candidate against the reference")
    names = list(worst_over_probes(series, lambda e: e["max_abs"]))
    _legend(svg, 90, 20, [(n, PALETTE[i % 7], DASHES[i % 4] or "solid") for i, n in enumerate(names)])
    layers = [layer for points in series.values() for layer, _ in points]
    min_cos = gate.get("min_cosine")
    panels = [
        ("max abs error (log scale)", lambda e: e["max_abs"], None),
        ("1 − cosine similarity (log scale)", lambda e: 1 - e["cosine"], None if min_cos is None else 1 - min_cos),
    ]
    for p, (label, metric, gate_value) in enumerate(panels):
        left = 90 + p * 520
        values = worst_over_probes(series, metric)
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


_COLOURS = {True: PASS_COLOUR, False: FAIL_COLOUR, None: MUTED}
_OUTCOME = {o: (OUTCOME_WORDS[o], _COLOURS[o]) for o in (True, False, None)}


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
    """Accuracy against the number of distractor images N (log(1 + N) axis), a 95% CI band per arm.

    Every point is drawn: an arm with several points at one N gets a marker for each, joined in the order given.
    """
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
