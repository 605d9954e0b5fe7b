"""The validator on quantized checkpoints: the PyTorch backend, the quantized gates, and calibration overlap."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from owl3.errors import UsageError
from owl3.quantize import CalibrationConfig, quantize_model
from owl3.synthetic import write_vqa_benchmark
from owl3.validate.backends import open_backend
from owl3.validate.gates import GATES, gate_for
from owl3.validate.run import run_validation


def test_a_quantized_checkpoint_is_a_pytorch_backend(demo_int4: Path, tmp_path: Path) -> None:
    backend = open_backend(f"pytorch:{demo_int4}")
    assert (backend.name, backend.precision, backend.kind) == ("pytorch-int4", "int4", "pytorch")
    assert backend.calibration["samples"] == 24 and len(backend.calibration["id_hashes"]) == 24
    elsewhere = tmp_path / "elsewhere"  # a GPTQ checkpoint without our manifest: named from its config
    shutil.copytree(demo_int4, elsewhere)
    (elsewhere / "manifest.json").unlink()
    other = open_backend(f"pytorch:{elsewhere}")
    assert (other.name, other.precision, other.calibration) == ("pytorch-int4", "int4", None)


@pytest.mark.parametrize(
    ("precision", "kl", "top1", "cosine"),
    [("int8", 5e-3, 0.97, 0.999), ("w8a8", 2e-2, 0.93, 0.99), ("int4", 5e-2, 0.90, 0.99)],
)
def test_quantized_gates_are_the_validation_doc_values(precision: str, kl: float, top1: float, cosine: float) -> None:
    for kind in ("pytorch", "onnx"):
        gate = gate_for(kind, precision)
        assert (gate.max_kl_mean, gate.min_top1, gate.min_cosine) == (kl, top1, cosine)
    assert GATES["onnx-fp16"].max_kl_mean == 1e-3  # unchanged


def test_evaluating_on_calibration_items_is_refused_then_marked(demo_model_dir: Path, tmp_path: Path) -> None:
    data = write_vqa_benchmark(tmp_path / "vqa", 8)
    calibrated = quantize_model(
        demo_model_dir, tmp_path / "q", "int8", CalibrationConfig(f"vqav2:{data}", samples=4, seed=0)
    )
    specs = dict(
        reference_spec=f"pytorch:{demo_model_dir}",
        candidate_specs=[f"pytorch:{calibrated}"],
        benchmark_specs=[f"vqav2:{data}"],
        limit=6,
    )
    with pytest.raises(
        UsageError, match=r"overlap the calibration set \(pytorch-int8: vqav2 shares 4 items and 4 images"
    ) as error:
        run_validation(**specs, output=tmp_path / "refused")
    assert "--allow-calibration-overlap" in error.value.fix and not (tmp_path / "refused").exists()
    run_validation(**specs, output=tmp_path / "marked", allow_calibration_overlap=True)
    report = json.loads((tmp_path / "marked" / "pytorch-int8" / "report.json").read_text())
    [info] = report["header"]["calibration"]
    assert info["overlap"] == {"vqav2": {"items": 4, "media": 4}} and info["allowed"] is True
    assert (
        "WARNING: pytorch-int8 was calibrated on 4 samples"
        in (tmp_path / "marked" / "pytorch-int8" / "report.md").read_text()
    )
    assert "not independent of calibration" in (tmp_path / "marked" / "pytorch-int8" / "report.html").read_text()
