"""Quantization accuracy on the trained demo model, and quantization time and memory on large random models.

    python bench/quantize.py --part accuracy                     # demo model: every recipe vs PyTorch fp32
    python bench/quantize.py --part resources --preset 1b-class-unverified --samples 8
    python bench/quantize.py --part resources --preset 7b-240728 --samples 2   # ~40 GB of disk, hours on 2 cores

Accuracy: the packaged demo model is quantized with the built-in calibration set by every variant below, then one
validator run compares each quantized PyTorch model with PyTorch fp32 at every level (L1 tensors, L2 next-token KL
and top-1 on text and image probes, L3 synthetic VQA / multiple choice / distractors). Resources: a random
checkpoint of the preset is written (bf16), then ``owl3-export quantize`` runs in a child process that reports its
own peak resident memory. Each part prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {  # name: (recipe, overrides, calibration)
    "int8": ("int8", {}, {}),
    "int8-rtn": ("int8", {"method": "rtn", "act_order": False}, {}),
    "w8a8-shared-v_kv": ("w8a8", {"v_kv_smoothing": "shared"}, {}),
    "w8a8-separate-v_kv": ("w8a8", {"v_kv_smoothing": "separate"}, {}),
    "int4": ("int4", {}, {}),
    "int4-no-act-order": ("int4", {"act_order": False}, {}),
    "int4-text-only": ("int4", {}, {"text_only": True}),
    "rtn4": ("rtn4", {}, {}),
}


def accuracy(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from owl3.demo import default_model_dir
    from owl3.errors import GateFailure
    from owl3.quantize import CalibrationConfig, quantize_model, recipe
    from owl3.validate.run import run_validation
    from owl3.validate.synthetic_runs import synthetic_runs

    model_dir = default_model_dir()
    chosen = [v for v in VARIANTS if not args.variants or v in args.variants]
    rows: dict[str, dict[str, Any]] = {}
    for name in chosen:
        recipe_name, overrides, calibration = VARIANTS[name]
        started = time.perf_counter()
        output = quantize_model(
            model_dir, workdir / name, recipe(recipe_name, **overrides), CalibrationConfig(**calibration), force=True
        )
        manifest = json.loads((output / "manifest.json").read_text())
        rows[name] = {
            "seconds": round(time.perf_counter() - started, 1),
            "mean_relative_error": manifest["summary"]["mean_relative_error"],
            "variant": manifest["variant"],
        }
        print(f"quantized {name} in {rows[name]['seconds']} s", file=sys.stderr)
    runs = synthetic_runs(workdir / "synthetic", limit=args.limit)
    candidates = [f"pytorch:{workdir / name}" for name in chosen]
    try:
        reports = run_validation(f"pytorch:{model_dir}:fp32", candidates, [], workdir / "report", limit=args.limit,
                                 force=True, extra_runs=runs)  # fmt: skip
    except GateFailure:
        reports = None  # reports are written either way; read them back
    for name in chosen:
        report_dir = workdir / "report" / f"pytorch-{rows[name]['variant']}"
        report = reports[report_dir.name] if reports else json.loads((report_dir / "report.json").read_text())
        rows[name].update(summarize(report))
    return {"model": str(model_dir), "limit": args.limit, "variants": rows}


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    levels, header = report["levels"], report["header"]
    out: dict[str, Any] = {"verdict": header["verdict"], "failures": header["failures"]}
    for group, d in levels["distribution"].items():
        out[f"kl_{group}"], out[f"top1_{group}"] = d["kl_mean"], d["top1_agreement"]
    out["min_cosine"] = min(t["cosine"] for t in levels["tensors"])
    for bench, task in levels["tasks"].items():
        delta = task["delta"]
        out[bench] = {
            "reference": delta["reference_accuracy"],
            "candidate": delta["candidate_accuracy"],
            "delta": delta["delta"],
        }
    return out


def resources(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import torch
    from common import run_cli_measured, write_random_checkpoint

    from owl3.config import Owl3Config
    from owl3.model.weights import count_parameters

    config = Owl3Config.preset(args.preset)
    checkpoint = workdir / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        started = time.perf_counter()
        write_random_checkpoint(config, checkpoint, torch.bfloat16)
        print(f"wrote a random {args.preset} checkpoint in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    rows = []
    for precision in args.precisions:
        output = workdir / f"{precision}-gptq"
        cli = ["quantize", "--precision", precision, "--model", str(checkpoint), "--output", str(output), "--force"]
        cli += ["--samples", str(args.samples), "--device", args.device]
        seconds, peak_gib = run_cli_measured(cli, "quantize")
        manifest = json.loads((output / "manifest.json").read_text())
        rows.append({
            "precision": precision, "seconds": round(seconds, 1), "peak_rss_gib": round(peak_gib, 2),
            "written_gib": round(sum(p.stat().st_size for p in output.iterdir()) / 2**30, 2),
            "calibration_tokens": manifest["calibration"]["tokens"], "images": manifest["calibration"]["images"],
            "verification": "logits" if manifest["verification"].get("logits") else manifest["verification"],
            "stage_seconds": manifest["seconds"],
        })  # fmt: skip
    return {"preset": args.preset, "parameters": count_parameters(config), "device": args.device, "runs": rows}


def print_accuracy(record: dict[str, Any]) -> None:
    head = ("variant", "KL text", "KL img", "top1 txt", "top1 img", "min cos", "VQA", "MC", "distr.", "verdict", "s")
    print("{:20} {:>8} {:>8} {:>8} {:>8} {:>8} {:>13} {:>13} {:>13} {:>9} {:>5}".format(*head))
    for name, row in record["variants"].items():
        tasks = [row.get(b, {}) for b in ("synthetic-vqa", "synthetic-mc", "synthetic-distractors")]
        cells = [f"{100 * t['candidate']:.1f} ({100 * t['delta']:+.1f})" if t else "-" for t in tasks]
        print(
            f"{name:20} {row['kl_text']:8.1e} {row['kl_images']:8.1e} {100 * row['top1_text']:7.1f}% "
            f"{100 * row['top1_images']:7.1f}% {row['min_cosine']:8.5f} {cells[0]:>13} {cells[1]:>13} {cells[2]:>13} "
            f"{row['verdict']:>9} {row['seconds']:5.0f}"
        )


def print_resources(record: dict[str, Any]) -> None:
    head = ("preset", "params", "precision", "tokens", "images", "peak RSS GiB", "out GiB", "s")
    print("{:22} {:>8} {:>9} {:>7} {:>6} {:>13} {:>8} {:>7}".format(*head))
    for row in record["runs"]:
        size = f"{record['parameters'] / 1e9:7.2f}B"
        print(
            f"{record['preset']:22} {size:>8} {row['precision']:>9} {row['calibration_tokens']:7d} {row['images']:6d} "
            f"{row['peak_rss_gib']:13.2f} {row['written_gib']:8.2f} {row['seconds']:7.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("accuracy", "resources"), default="accuracy")
    parser.add_argument("--variants", nargs="*", help=f"accuracy: a subset of {list(VARIANTS)}")
    parser.add_argument("--limit", type=int, default=200, help="accuracy: scoring units per synthetic benchmark")
    parser.add_argument("--preset", default="1b-class-unverified", help="resources: the random model's preset")
    parser.add_argument("--precisions", nargs="*", default=["int4"], help="resources: recipes to run")
    parser.add_argument("--samples", type=int, default=8, help="resources: calibration samples")
    parser.add_argument("--device", default="auto", help="resources: auto, cpu or cuda")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="owl3-bench-quantize-"))
    workdir.mkdir(parents=True, exist_ok=True)
    record = accuracy(args, workdir) if args.part == "accuracy" else resources(args, workdir)
    (print_accuracy if args.part == "accuracy" else print_resources)(record)
    target = (
        args.json
        or Path("bench-results") / f"quantize_{args.part}{'' if args.part == 'accuracy' else '_' + args.preset}.json"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {target}; working files in {workdir}")


if __name__ == "__main__":
    main()
