"""The drift report writer (owl3.validate.report): three files, self-contained HTML, plots, graceful gaps."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest

from owl3.errors import UsageError
from owl3.validate.report import validate_report, write_report
from owl3.validate.report_format import fmt_p, fmt_pct, fmt_pts, fmt_sci
from owl3.validate.report_html import render_html
from owl3.validate.report_markdown import markdown_table, render_markdown
from owl3.validate.report_svg import plot_layers, worst_over_probes
from owl3.validate.report_tables import SCHEMA, Table, layer_series
from tests.report_fixtures import example_report

PLOTS = ("layers", "kl", "forest", "distractors")


@pytest.fixture(scope="module")
def accepted() -> dict:
    return example_report()


@pytest.fixture(scope="module")
def rejected() -> dict:
    return example_report(rejected=True)


def test_fixtures_have_the_intended_verdicts(accepted: dict, rejected: dict) -> None:
    assert accepted["header"]["verdict"] == "accepted" and not accepted["header"]["failures"]
    assert rejected["header"]["verdict"] == "rejected"
    failing = " ".join(rejected["header"]["failures"])
    assert "mmbench" in failing and "images: mean KL" in failing and "present_key_24" in failing
    assert validate_report(accepted) == [] and validate_report(rejected) == []


def test_writes_three_files_and_no_temporary_ones(tmp_path: Path, accepted: dict) -> None:
    paths = write_report(accepted, tmp_path / "out")
    assert set(paths) == {"json", "markdown", "html"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "report.json", "report.md"]
    assert all(path.stat().st_size > 1000 for path in paths.values())


def test_json_round_trips(tmp_path: Path, accepted: dict) -> None:
    paths = write_report(accepted, tmp_path)
    assert json.loads(paths["json"].read_text(encoding="utf-8")) == {"schema": SCHEMA, **accepted}


def test_refuses_to_overwrite_unless_asked(tmp_path: Path, accepted: dict, rejected: dict) -> None:
    write_report(accepted, tmp_path)
    with pytest.raises(UsageError, match="already there"):
        write_report(rejected, tmp_path)
    assert "accepted" in (tmp_path / "report.md").read_text(encoding="utf-8").lower()
    write_report(rejected, tmp_path, overwrite=True)
    assert "REJECTED" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_html_is_self_contained(accepted: dict, rejected: dict) -> None:
    for report in (accepted, rejected):
        page = render_html(report)
        assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
        assert "http://" not in page and "https://" not in page
        for forbidden in ("<script", "<link", "@import", "url(", "<img", "<iframe", "@font-face"):
            assert forbidden not in page.lower(), forbidden
        assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")


def test_html_has_one_plot_of_each_kind(accepted: dict) -> None:
    page = render_html(accepted)
    for kind in PLOTS:
        assert page.count(f'data-plot="{kind}"') == 1, kind
    assert page.count("<svg") == len(PLOTS)
    assert page.count("<svg") == page.count("</svg>")
    # axis labels and legends are drawn
    for label in ("layer index", "share of positions (%)", "percentage points", "accuracy (%)", "ort-int4-gptq"):
        assert label in page


def test_accepted_banner(accepted: dict) -> None:
    page = render_html(accepted)
    assert 'class="banner accepted"' in page and "Accepted" in page
    assert 'class="banner rejected"' not in page


def test_rejected_report_lists_its_failures(rejected: dict) -> None:
    page, markdown = render_html(rejected), render_markdown(rejected)
    assert 'class="banner rejected"' in page and "Rejected" in page
    for failure in rejected["header"]["failures"]:
        assert failure.replace("<", "&lt;").replace(">", "&gt;") in page
        assert failure in markdown
    assert "**Verdict: REJECTED**" in markdown
    assert "**FAIL**" in markdown and "✗ fail" in page


@pytest.mark.parametrize(
    ("levels", "plots"),
    [
        ((), ()),
        (("graph",), ()),
        (("graph", "tensors"), ("layers",)),
        (("graph", "tensors", "distribution"), ("layers", "kl")),
        (("tasks",), ("forest",)),
        (("distractors",), ("distractors",)),
    ],
)
def test_missing_levels_degrade_gracefully(tmp_path: Path, levels: tuple, plots: tuple) -> None:
    report = example_report(levels=levels)
    paths = write_report(report, tmp_path)
    page, markdown = paths["html"].read_text(encoding="utf-8"), paths["markdown"].read_text(encoding="utf-8")
    for kind in PLOTS:
        assert (f'data-plot="{kind}"' in page) == (kind in plots), kind
    missing = 5 - len(levels)
    assert page.count("Not run: the comparison stopped earlier") == missing
    assert markdown.count("Not run.") == missing


def test_plots_are_left_out_when_their_data_is(accepted: dict) -> None:
    report = copy.deepcopy(accepted)
    levels = report["levels"]
    levels["tensors"] = [t for t in levels["tensors"] if not layer_series([t])]  # whole outputs only
    for d in levels["distribution"].values():
        del d["kl_values"]
    levels["distractors"] = {}
    page = render_html(report)
    assert 'data-plot="layers"' not in page and 'data-plot="kl"' not in page
    assert 'data-plot="distractors"' not in page and 'data-plot="forest"' in page
    assert "decoder/logits" in page and "mean KL" in page


def test_exact_matches_and_non_finite_values_render(tmp_path: Path, accepted: dict) -> None:
    report = copy.deepcopy(accepted)
    for entry in report["levels"]["tensors"]:
        entry.update(max_abs=0.0, mean_abs=0.0, max_rel=0.0, cosine=1.0, sqnr_db=float("inf"))
    for d in report["levels"]["distribution"].values():
        d["kl_values"] = [0.0] * len(d["kl_values"])
    paths = write_report(report, tmp_path)
    assert "∞" in paths["html"].read_text(encoding="utf-8")
    assert json.loads(paths["json"].read_text(encoding="utf-8"))["levels"]["tensors"][0]["sqnr_db"] == float("inf")


def test_markdown_has_the_verdict_and_aligned_tables(accepted: dict) -> None:
    markdown = render_markdown(accepted)
    assert "**Verdict: ACCEPTED**" in markdown
    for heading in ("## L0 · Graph", "## L1 · Tensors", "## L2 · Next-token distribution", "## L3 · Tasks"):
        assert heading in markdown
    assert "| benchmark" in markdown and "| vqav2" in markdown and "| KL range" in markdown
    assert "smoke gate" in markdown  # the certify statements
    assert "truncated JPEG (2)" in markdown
    block: list[str] = []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            assert len({len(row) for row in block}) == 1, block[0]  # padded: reads as a grid in a terminal
            block = []


def test_certify_statement_is_computed_when_absent(accepted: dict) -> None:
    report = copy.deepcopy(accepted)
    del report["levels"]["tasks"]["vqav2"]["certify"]
    assert "1,000 units are too few to certify a drop of 1.0 point" in render_markdown(report)


def test_text_from_the_report_is_escaped(accepted: dict) -> None:
    report = copy.deepcopy(accepted)
    report["header"]["model"] = "<script>alert(1)</script>"
    page = render_html(report)
    assert "<script>" not in page and "&lt;script&gt;" in page


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["header"].update(verdict="ok"), "'accepted' or 'rejected'"),
        (lambda r: r["header"].update(verdict="rejected"), "make them agree"),
        (lambda r: r["header"].pop("gate"), "header.gate"),
        (lambda r: r["header"]["arms"]["candidate"].pop("backend"), "arms.candidate"),
        (lambda r: r["levels"]["tasks"]["pope"].update(margin=1.0), "fraction"),
        (lambda r: r["levels"].update(speed={}), "unknown levels"),
        (lambda r: r.update(schema="owl3.drift-report/0"), "schema"),
    ],
)
def test_invalid_reports_are_refused_before_writing(tmp_path: Path, accepted: dict, edit, message: str) -> None:
    report = copy.deepcopy(accepted)
    edit(report)
    with pytest.raises(ValueError, match=message):
        write_report(report, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_numbers_are_formatted_for_people() -> None:
    assert fmt_sci(3.2e-4) == "3.2e−4" and fmt_sci(0.0) == "0" and fmt_sci(float("inf")) == "∞"
    assert fmt_sci(None) == "—" and fmt_sci(float("nan")) == "NaN"
    assert fmt_pts(-0.0123) == "−1.2" and fmt_pts(0.004) == "+0.4" and fmt_pts(-0.0004) == "0.0"
    assert fmt_pct(0.8125) == "81.2%" and fmt_pct(0.99421, 2) == "99.42%"
    assert fmt_p(0.0386) == "0.039" and fmt_p(7e-20) == "7.0e−20" and fmt_p(None) == "—"


def test_layer_series_groups_by_trailing_index() -> None:
    entries = [{"name": n} for n in ("decoder/logits", "decoder/present_key_10", "decoder/present_key_2", "x_1")]
    series = layer_series(entries)
    assert list(series) == ["decoder/present_key", "x"]
    assert [layer for layer, _ in series["decoder/present_key"]] == [2, 10]


def test_layer_plot_draws_one_line_per_output_with_the_worst_probe() -> None:
    def entry(name: str, max_abs: float) -> dict:
        return {"name": name, "max_abs": max_abs}

    entries = [
        entry("text/decoder/present_key_0", 1e-6),
        entry("images/decoder/present_key_0", 3e-6),
        entry("text/decoder/present_key_1", 5e-6),
        entry("images/decoder/present_key_1", float("nan")),
        entry("video/decoder/present_key_1", 1e-3),
        entry("images/visual_memory/visual_key_0", 2e-6),
    ]
    merged = worst_over_probes(layer_series(entries), lambda e: e["max_abs"])
    assert list(merged) == ["decoder/present_key", "visual_memory/visual_key"]
    assert merged["decoder/present_key"][0] == (0, 3e-6) and math.isnan(merged["decoder/present_key"][1][1])
    svg = plot_layers([{**e, "cosine": 1.0} for e in entries], {})
    assert svg is not None and svg.count("<polyline") == 2 * 2  # two outputs, two panels


def test_markdown_table_escapes_pipes() -> None:
    text = markdown_table(Table(["a", "b"], [["x|y", True], ["z", None]], (1,)))
    assert "x\\|y" in text and "pass" in text and "—" in text


def test_non_finite_kl_values_are_counted_not_hidden(accepted: dict) -> None:
    report = copy.deepcopy(accepted)
    report["levels"]["distribution"]["images"]["kl_values"][:5] = [float("nan")] * 5
    page, markdown = render_html(report), render_markdown(report)
    assert "5 non-finite, not drawn" in page
    assert "| non-finite" in markdown


def test_numpy_values_are_written_as_plain_json(tmp_path: Path, accepted: dict) -> None:
    import numpy as np

    report = copy.deepcopy(accepted)
    report["levels"]["distribution"]["text"]["kl_values"] = np.asarray(
        report["levels"]["distribution"]["text"]["kl_values"]
    )
    report["levels"]["tasks"]["pope"]["excluded"]["count"] = np.int64(0)
    paths = write_report(report, tmp_path)
    loaded = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert (
        loaded["levels"]["distribution"]["text"]["kl_values"] == accepted["levels"]["distribution"]["text"]["kl_values"]
    )


def test_empty_levels_say_so(accepted: dict) -> None:
    report = copy.deepcopy(accepted)
    report["levels"]["distractors"] = {}
    assert "No entries recorded for this level." in render_html(report)
    assert "Distractor resistance: measured" in render_markdown(report)


def test_a_failed_write_keeps_the_previous_report(tmp_path: Path, accepted: dict, rejected: dict, monkeypatch) -> None:
    write_report(accepted, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    original = Path.write_text

    def full_disk(self: Path, *args, **kwargs):  # the third file hits a full disk
        if self.name.startswith(".report.html"):
            raise OSError(28, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_report(rejected, tmp_path, overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary left, nothing replaced


def test_a_task_gate_decision_in_the_entry_wins(rejected: dict) -> None:
    report = copy.deepcopy(rejected)
    tasks = report["levels"]["tasks"]
    assert tasks["mmbench"]["delta"]["lower_bound"] < -tasks["mmbench"]["margin"]
    tasks["mmbench"]["failures"] = []  # e.g. a smoke-gate policy: not significantly worse on a small subset
    for name in ("vqav2", "pope"):
        tasks[name]["gated"] = False  # reported only
    markdown, page = render_markdown(report), render_html(report)
    assert "### mmbench · accuracy (circular) · pass" in markdown
    assert "### pope · accuracy (yes/no) · not gated" in markdown
    assert page.count(">not gated<") >= 2 and "delta, not gated" in page
    assert "L3 · Tasks: pass" in markdown  # the gated benchmark passed; the others do not count
    for name in tasks:
        tasks[name]["gated"] = False
    assert "L3 · Tasks: measured" in render_markdown(report)
