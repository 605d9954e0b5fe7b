"""``owl3-export export``: a thin wrapper of ``owl3.export.pipeline.export_model`` (one graph set, one flavour)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXPORT_HELP = "export a float or a quantized (GPTQ) checkpoint to ONNX graphs, validated against PyTorch"


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from owl3.export.specs import ACCURACY_LEVEL, ACCURACY_LEVELS, ATTENTION_KERNELS, FLAVOURS, PRECISIONS

    parser = subparsers.add_parser("export", help=EXPORT_HELP, description=EXPORT_HELP + ".")
    parser.add_argument("--model", type=Path, help="checkpoint directory: float, or written by 'owl3-export quantize'")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="float checkpoints: fp32 (default) or fp16; a quantized one exports its own",
    )
    parser.add_argument(
        "--target", choices=FLAVOURS, default="ort",
        help="ort: ONNX Runtime's fused operators, in-place KV cache (quantized: MatMulNBits, fp32 compute); "
        "tensorrt: standard operators (quantized: Q/DQ, fp16, opset 21)",
    )  # fmt: skip
    parser.add_argument(
        "--accuracy-level", type=int, choices=ACCURACY_LEVELS, default=ACCURACY_LEVEL,
        help=f"ort flavour: MatMulNBits accuracy_level (0 exact fp32, 4 int8 activations; default {ACCURACY_LEVEL})",
    )  # fmt: skip
    parser.add_argument(
        "--unfused", action="store_true",
        help="ort flavour: standard attention with a concatenated KV cache instead of ONNX Runtime's fused "
        "operators and in-place cache (for comparison)",
    )  # fmt: skip
    parser.add_argument(
        "--attention", choices=ATTENTION_KERNELS, default="grouped",
        help="fused ort flavour, the decoder's self-attention: grouped (standard operators, the cache read once "
        "per KV head: fastest on CPU) or gqa (ONNX Runtime's GroupQueryAttention, flash attention on CUDA)",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, required=True, help="export directory")
    parser.add_argument("--no-validate", action="store_true", help="skip the comparison with PyTorch")
    parser.add_argument("--force", action="store_true", help="replace an existing export directory of ours")
    return parser


CHECK_HELP = "report what the TensorRT ONNX parser (10.3, 11.1) would reject in an export's graphs, per node"


def add_check_trt_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("check-trt", help=CHECK_HELP, description=CHECK_HELP + ".")
    parser.add_argument("export", type=Path, help="export directory (or any folder of .onnx graphs)")
    parser.add_argument("--trt-version", nargs="*", default=["10.3", "11.1"], help="support tables to check against")
    parser.add_argument("--json", type=Path, help="write the full report here")
    return parser


def cmd_check_trt(args: argparse.Namespace) -> int:
    """Exit 0 when every graph passes for every version asked, 3 when a graph would be rejected."""
    from owl3.export.trt_check import check_export, format_report, write_report

    report = check_export(args.export, tuple(args.trt_version))
    print(format_report(report))
    if args.json:
        write_report(report, args.json)
    return 0 if all(result["ready"] for result in report.values()) else 3


ENGINE_HELP = "build TensorRT engines from an export, on the device that will run them (needs TensorRT)"


def add_build_engine_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("build-engine", help=ENGINE_HELP, description=ENGINE_HELP + ".")
    parser.add_argument("export", type=Path, help="export directory (TensorRT flavour, fp16 or fp32)")
    parser.add_argument("--output", type=Path, help="engine directory (default: EXPORT-engines)")
    parser.add_argument("--max-images", type=int, default=8, help="images (crops, frames) per request (default 8)")
    parser.add_argument("--max-context", type=int, help="tokens of context (default: the model's)")
    parser.add_argument("--max-batch", type=int, default=1, help="samples per request (default 1)")
    parser.add_argument("--workspace-mib", type=int, default=2048, help="builder workspace (default 2048 MiB)")
    parser.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0-5 (default 3)")
    parser.add_argument("--force", action="store_true", help="replace an existing engine directory of ours")
    return parser


def cmd_build_engine(args: argparse.Namespace) -> int:
    from owl3.config import Owl3Config
    from owl3.export.engine import build_engines
    from owl3.runtime.manifest import read_export
    from owl3.runtime.profiles import ProfileLimits

    config = Owl3Config.from_hf_json(read_export(args.export, "size")["config"])
    limits = ProfileLimits.for_config(
        config, max_batch=args.max_batch, max_images=args.max_images, max_context=args.max_context
    )
    output = args.output or args.export.with_name(f"{args.export.name}-engines")
    build_engines(
        args.export, output, limits=limits, workspace_mib=args.workspace_mib, optimization_level=args.opt_level,
        force=args.force, progress=_note,
    )  # fmt: skip
    print(output)
    return 0


def cmd_export_stage(args: argparse.Namespace) -> int:
    from owl3.cli import resolve_model_dir
    from owl3.export.pipeline import export_model

    model_dir = resolve_model_dir(args.model)
    export_model(
        model_dir, args.output, args.precision, target=args.target, accuracy_level=args.accuracy_level,
        fused=False if args.unfused else None, attention=args.attention, force=args.force,
        validate=not args.no_validate, progress=_note,
    )  # fmt: skip
    print(args.output)
    return 0


def _note(message: str) -> None:
    print(f"owl3-export: {message}", file=sys.stderr)
