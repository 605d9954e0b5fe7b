"""``owl3-export quantize``: a thin wrapper of ``owl3.quantize.quantize_model``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

QUANTIZE_HELP = "quantize a checkpoint (GPTQ int4, int8, W8A8) into a GPTQ-format checkpoint directory"


def add_quantize_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from owl3.quantize.recipes import RECIPES

    parser = subparsers.add_parser("quantize", help=QUANTIZE_HELP, description=QUANTIZE_HELP + ".")
    parser.add_argument("--precision", required=True, choices=sorted(RECIPES), help="the recipe")
    parser.add_argument("--model", type=Path, help="float checkpoint directory (default: the demo model)")
    parser.add_argument("--output", type=Path, help="output directory (default: exports/<model>-<variant>-gptq)")
    parser.add_argument(
        "--calibration",
        default="builtin",
        help="builtin, a folder of images, a JSONL of image paths and prompts, or NAME:DIR of a benchmark",
    )
    parser.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="calibration selection seed")
    parser.add_argument("--text-only", action="store_true", help="calibrate without images (for comparison)")
    parser.add_argument(
        "--lm-head", choices=("int8", "int4"),
        help="quantize lm_head too: int8 per channel, int4 in groups of 32 (kept in float by default)",
    )  # fmt: skip
    parser.add_argument("--vision", choices=("int8",), help="quantize the vision tower's weights too")
    parser.add_argument("--exclude", action="append", default=[], help="regex of modules kept in float (repeatable)")
    parser.add_argument("--no-act-order", action="store_true", help="GPTQ in plain column order")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory of ours")
    return parser


def cmd_quantize(args: argparse.Namespace) -> int:
    from owl3.cli import model_name, resolve_model_dir
    from owl3.quantize.calibration import CalibrationConfig
    from owl3.quantize.recipes import recipe
    from owl3.quantize.stage import quantize_model, variant_name

    model_dir = resolve_model_dir(args.model)
    overrides = {"lm_head": args.lm_head, "vision": args.vision}
    if args.exclude:
        overrides["exclude"] = tuple(args.exclude)
    if args.no_act_order:
        overrides["act_order"] = False
    chosen = recipe(args.precision, **overrides)
    calibration = CalibrationConfig(args.calibration, args.samples, args.seed, args.text_only)
    variant = variant_name(chosen, calibration).replace("+", "-")
    output = args.output or Path("exports") / f"{model_name(model_dir)}-{variant}-gptq"
    quantize_model(model_dir, output, chosen, calibration, device=args.device, force=args.force, progress=_note)
    print(output)
    return 0


def _note(message: str) -> None:
    print(f"owl3-export: {message}", file=sys.stderr)
