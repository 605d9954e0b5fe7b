"""The validation stage end to end on the demo model: artifact, verdicts, exit codes, resume, exclusions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from owl3.artifacts import read_manifest
from owl3.errors import GateFailure, UsageError
from owl3.validate import backends
from owl3.validate.run import SCHEMA, parse_benchmark, run_validation
from owl3.validate.synthetic_runs import synthetic_runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    return synthetic_runs(tmp_path_factory.mktemp("synthetic") / "data", limit=6, distractor_questions=1)


def test_validation_writes_one_report_per_candidate(
    demo_model_dir: Path, demo_export_fp32: Path, demo_export_fp16: Path, runs, tmp_path: Path
) -> None:
    out = tmp_path / "validation"
    reports = run_validation(
        f"pytorch:{demo_model_dir}", [f"onnx:{demo_export_fp32}", f"onnx:{demo_export_fp16}"], [], out,
        extra_runs=runs,
    )  # fmt: skip
    assert set(reports) == {"onnx-fp32", "onnx-fp16"}
    manifest = read_manifest(out, schema=SCHEMA)
    assert manifest["status"] == "ok" and manifest["verdicts"] == {"onnx-fp32": "accepted", "onnx-fp16": "accepted"}
    for name in reports:
        assert {p.name for p in (out / name).iterdir()} == {"report.json", "report.md", "report.html"}
        report = json.loads((out / name / "report.json").read_text())
        assert set(report["levels"]) >= {"graph", "tensors", "distribution", "tasks", "distractors"}
        assert set(report["levels"]["tasks"]) == {"synthetic-vqa", "synthetic-mc", "synthetic-distractors"}
        curve = report["levels"]["distractors"]["pytorch-fp32"]
        assert [point[0] for point in curve] == [0, 1, 2, 4, 8, 16, 32]
    fp32 = reports["onnx-fp32"]["levels"]["tasks"]["synthetic-vqa"]["delta"]
    assert fp32["lost"] == fp32["gained"] == 0  # greedy fp32 answers are identical
    assert "onnx-fp16" in (out / "index.md").read_text()
    assert not (tmp_path / ".validation.partial").exists()


def test_failed_gate_exits_6_and_keeps_the_artifact_rejected(
    demo_model_dir: Path, demo_export_fp32: Path, runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from owl3.validate import gates

    monkeypatch.setitem(gates.GATES, "onnx-fp32", gates.Gate("impossible", max_abs=0.0))
    out = tmp_path / "validation"
    with pytest.raises(GateFailure, match="gates failed") as info:
        run_validation(f"pytorch:{demo_model_dir}", [f"onnx:{demo_export_fp32}"], [], out, extra_runs=runs[:1])
    assert info.value.exit_code == 6
    assert read_manifest(out, schema=SCHEMA)["status"] == "rejected"
    report = json.loads((out / "onnx-fp32" / "report.json").read_text())
    assert report["header"]["verdict"] == "rejected" and "max abs error" in report["header"]["failures"][0]


def test_interrupted_run_resumes_without_redoing_items(
    demo_model_dir: Path, demo_export_fp32: Path, runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = backends.OnnxBackend.generate

    def flaky(self, inputs, max_new_tokens):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, inputs, max_new_tokens)

    monkeypatch.setattr(backends.OnnxBackend, "generate", flaky)
    out = tmp_path / "validation"
    args = (f"pytorch:{demo_model_dir}", [f"onnx:{demo_export_fp32}"], [], out)
    with pytest.raises(KeyboardInterrupt):
        run_validation(*args, extra_runs=runs[:1])
    assert not out.exists() and (tmp_path / ".validation.partial").is_dir()
    calls["n"] = 100  # no more interruptions
    run_validation(*args, extra_runs=runs[:1])
    assert calls["n"] - 100 == len(runs[0].items) - 3  # only the unfinished items were asked again


def test_unreadable_media_are_excluded_from_both_arms(
    demo_model_dir: Path, demo_export_fp32: Path, runs, tmp_path: Path
) -> None:
    vqa = runs[0]
    victim = Path(vqa.items[0].images[0])
    damaged = tmp_path / victim.name
    damaged.write_bytes(victim.read_bytes()[:200])  # a truncated JPEG
    items = [type(vqa.items[0])(**{**vqa.items[0].__dict__, "images": (damaged,)}), *vqa.items[1:]]
    run = type(vqa)(vqa.name, items, vqa.task, vqa.max_new_tokens, vqa.metric)
    reports = run_validation(
        f"pytorch:{demo_model_dir}", [f"onnx:{demo_export_fp32}"], [], tmp_path / "v", extra_runs=[run]
    )
    task = reports["onnx-fp32"]["levels"]["tasks"]["synthetic-vqa"]
    assert task["excluded"]["count"] == 1 and task["delta"]["n_units"] == len(items) - 1
    assert any(damaged.name in reason for reason in task["excluded"]["reasons"])


def test_bad_benchmark_specs_are_refused() -> None:
    with pytest.raises(UsageError, match="use NAME:DIR"):
        parse_benchmark("imagenet:/data")
    with pytest.raises(UsageError, match="use NAME:DIR"):
        parse_benchmark("vqav2")


def test_validate_command_on_fixtures_in_every_official_format(
    demo_model_dir: Path, demo_export_fp32: Path, tmp_path: Path, capsys
) -> None:
    from owl3.cli import main
    from tests import benchmark_fixtures as fx

    roots = {
        "vqav2": fx.write_vqav2(tmp_path / "vqav2"),
        "mmbench": fx.write_mmbench(tmp_path / "mmbench"),
        "pope": fx.write_pope(tmp_path / "pope"),
        "nextqa": fx.write_nextqa(tmp_path / "nextqa"),
        "mvbench": fx.write_mvbench(tmp_path / "mvbench"),
    }
    specs = [arg for name, root in roots.items() for arg in ("--benchmark", f"{name}:{root}")]
    out = tmp_path / "report"
    argv = ["validate", "--reference", f"pytorch:{demo_model_dir}", "--candidate", f"onnx:{demo_export_fp32}"]
    assert main([*argv, *specs, "--limit", "3", "--output", str(out)]) == 0
    report = json.loads((out / "onnx-fp32" / "report.json").read_text())
    assert set(report["levels"]["tasks"]) == set(roots)
    for name, task in report["levels"]["tasks"].items():
        assert task["delta"]["n_units"] >= 1, name
        assert task["delta"]["lost"] == task["delta"]["gained"] == 0, name  # fp32: identical greedy answers
    assert str(out / "index.md") in capsys.readouterr().out


def test_the_fused_decoder_is_validated_against_the_unfused_one_at_every_level(
    demo_model_dir: Path, demo_export_fp32: Path, runs, tmp_path: Path
) -> None:
    """The validator's one comparison path takes two exports of the same weights: the fused ort flavour
    against the unfused one, under the fp32 gate (max abs 1e-4, identical top-1), every level."""
    from owl3.export.pipeline import export_model

    unfused = export_model(demo_model_dir, tmp_path / "unfused", "fp32", fused=False, validate=False)
    out = tmp_path / "validation"
    reports = run_validation(f"onnx:{unfused}", [f"onnx:{demo_export_fp32}"], [], out, extra_runs=runs[:2])
    assert set(reports) == {"onnx-fp32"}
    assert read_manifest(out, schema=SCHEMA)["verdicts"] == {"onnx-fp32": "accepted"}
    report = reports["onnx-fp32"]
    assert report["header"]["arms"]["reference"]["name"] == "onnx-fp32-unfused"
    assert set(report["levels"]) >= {"graph", "tensors", "distribution", "tasks"}
    delta = report["levels"]["tasks"]["synthetic-vqa"]["delta"]
    assert delta["lost"] == delta["gained"] == 0
