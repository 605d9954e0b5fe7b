"""``owl3-export validate``: compare candidates with a reference at every level and write drift reports."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

VALIDATE_HELP = "compare backends (PyTorch float or quantized, ONNX) at every level and write drift reports"


def add_validate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("validate", help=VALIDATE_HELP, description=VALIDATE_HELP + ".")
    parser.add_argument(
        "--reference",
        help="pytorch:DIR[:fp32|fp16|bf16] (default: the demo model, fp32), or onnx:EXPORT_DIR:cpu to gate TensorRT "
        "(engines or --provider tensorrt) against ONNX Runtime CPU on the same graphs",
    )
    parser.add_argument(
        "--candidate",
        action="append",
        default=[],
        help="onnx:EXPORT_DIR[:cpu|cuda|tensorrt], engine:ENGINE_DIR[:EXPORT_DIR] (TensorRT engines, UNVERIFIED) "
        "or pytorch:DIR[:fp32|fp16|bf16] (DIR float or quantized)",
    )
    parser.add_argument(
        "--benchmark", action="append", default=[], help="NAME:DIR in official format (vqav2, mmbench, pope, ...)"
    )
    parser.add_argument("--synthetic", action="store_true", help="add the synthetic benchmark (VQA, MC, distractors)")
    parser.add_argument("--limit", type=int, default=200, help="scoring units per benchmark (stratified subset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("validation"), help="report directory")
    parser.add_argument("--force", action="store_true", help="replace an existing validation artifact of ours")
    parser.add_argument(
        "--allow-calibration-overlap",
        action="store_true",
        help="evaluate a quantized arm on items of its calibration set (refused by default); the reports say so",
    )
    return parser


def cmd_validate(args: argparse.Namespace) -> int:
    from owl3.validate.run import run_validation

    reference = args.reference
    if reference is None:
        from owl3.demo import default_model_dir

        reference = f"pytorch:{default_model_dir()}:fp32"
    extra = []
    if args.synthetic:
        from owl3.validate.synthetic_runs import synthetic_runs

        extra = synthetic_runs(args.output.with_name(f".{args.output.name}.data"), limit=args.limit, seed=args.seed)
    run_validation(
        reference, args.candidate, args.benchmark, args.output,
        limit=args.limit, seed=args.seed, force=args.force, progress=_note, extra_runs=extra,
        allow_calibration_overlap=args.allow_calibration_overlap,
    )  # fmt: skip
    print(args.output / "index.md")
    return 0


def _note(message: str) -> None:
    print(f"owl3-export: {message}", file=sys.stderr)
