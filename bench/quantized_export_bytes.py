"""Bytes, time and peak memory of quantizing and exporting a large random Owl3 (prints a table, writes JSON).

    python bench/quantized_export_bytes.py --preset 7b-240728 --workdir /tmp/bench/7b     # ~30 GB of disk
    python bench/quantized_export_bytes.py --preset demo --workdir /tmp/qb                # a quick check

A random bf16 checkpoint of the preset is written (or reused from WORKDIR/checkpoint), quantized by round to
nearest (``rtn4``, or ``--recipe``: the integers' layout, hence the bytes, is the same as GPTQ's), then exported
in each flavour with ``owl3-export export --no-validate``; every stage runs in a child process that reports its
own peak RSS. Bytes are read from the saved graphs (initializer dims and types):

- quantized Linear layers: their integer weights, scales and zero points against K x N x 2 fp16 bytes
  (goals: at most 0.27 at int4, 0.52 at int8);
- the language model (decoder graph and the hyper layers' v_kv_proj in the visual-memory graph, each tensor
  once): against its parameter count x 2 fp16 bytes (goals: at most 0.37 at int4, 0.58 at int8).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import onnx
import torch
from common import run_cli_measured, write_random_checkpoint
from measure import tensor_bytes

from owl3.config import Owl3Config
from owl3.model.safetensors_files import discover_checkpoint
from owl3.model.weights import tensor_table

_QUANTIZED_SUFFIXES = (".nbits_B", ".nbits_scales", ".nbits_zero_points", ".qdq_weight", ".qdq_scale")
GOALS = {"int4": (0.27, 0.37), "int8": (0.52, 0.58), "w8a8": (0.52, 0.58)}


def language_model_bytes(export: Path) -> dict[str, float]:
    """Bytes of the language model's tensors in an export, split into quantized-Linear tensors and the rest."""
    seen: dict[str, float] = {}
    for graph in ("decoder", "visual_memory"):
        proto = onnx.load(str(export / f"{graph}.onnx"), load_external_data=False)
        for tensor in proto.graph.initializer:
            seen[tensor.name] = tensor_bytes(tensor)
    quantized = sum(b for n, b in seen.items() if n.endswith(_QUANTIZED_SUFFIXES))
    return {"quantized_linear": quantized, "total": sum(seen.values())}


def fp16_reference(config: Owl3Config, quantized: Path) -> dict[str, float]:
    """fp16 bytes of the language model and of its quantized Linears (K x N x 2, from the checkpoint's qweights)."""
    table = tensor_table(config)
    lm = sum(math.prod(s) for n, s in table.items() if n.startswith("language_model."))
    if config.text.tie_word_embeddings:
        lm += math.prod(table["language_model.model.embed_tokens.weight"])  # lm_head stored separately in fp16
    names = discover_checkpoint(quantized).tensors
    packed = [n.removesuffix(".qweight") for n in names if n.endswith(".qweight")]
    return {"total": 2 * lm, "quantized_linear": 2 * sum(math.prod(table[f"{m}.weight"]) for m in packed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="7b-240728", help="config preset, or 'demo' for the packaged model")
    parser.add_argument("--recipe", default="rtn4", help="quantization recipe (rtn4 by default: fast, same layout)")
    parser.add_argument("--samples", type=int, default=2, help="calibration samples")
    parser.add_argument("--flavours", nargs="*", default=["ort", "tensorrt"])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.preset == "demo":
        from owl3.demo import default_model_dir

        checkpoint = default_model_dir()
    else:
        checkpoint = args.workdir / "checkpoint"
        if not (checkpoint / "config.json").is_file():
            write_random_checkpoint(Owl3Config.preset(args.preset), checkpoint, torch.bfloat16)
    config = Owl3Config.from_hf_json(checkpoint)
    quantized = args.workdir / f"{args.recipe}-gptq"
    runs: list[dict[str, Any]] = []
    cli = ["quantize", "--precision", args.recipe, "--model", str(checkpoint), "--output", str(quantized)]
    seconds, peak = run_cli_measured([*cli, "--samples", str(args.samples), "--force"], "quantize")
    runs.append({"stage": f"quantize {args.recipe}", "seconds": round(seconds, 1), "peak_rss_gib": round(peak, 2)})
    precision = json.loads((quantized / "manifest.json").read_text())["precision"]
    reference = fp16_reference(config, quantized)
    for flavour in args.flavours:
        out = args.workdir / f"{args.recipe}-{flavour}"
        cli = ["export", "--model", str(quantized), "--target", flavour, "--output", str(out), "--no-validate"]
        seconds, peak = run_cli_measured([*cli, "--force"], f"export {flavour}")
        found = language_model_bytes(out)
        runs.append({
            "stage": f"export {flavour}", "seconds": round(seconds, 1), "peak_rss_gib": round(peak, 2),
            "disk_gib": round(sum(p.stat().st_size for p in out.iterdir()) / 2**30, 3),
            "quantized_linear_ratio": round(found["quantized_linear"] / reference["quantized_linear"], 4),
            "language_model_ratio": round(found["total"] / reference["total"], 4),
        })  # fmt: skip
    record = {"preset": args.preset, "recipe": args.recipe, "precision": precision, "goals": GOALS.get(precision),
              "fp16_bytes": reference, "runs": runs}  # fmt: skip
    goal_linear, goal_lm = GOALS.get(precision, (math.inf, math.inf))
    print(f"{'stage':22} {'s':>7} {'peak RSS GiB':>13} {'disk GiB':>9} {'Linear/fp16':>12} {'LM/fp16':>9}")
    for run in runs:
        ratios = ""
        if "language_model_ratio" in run:
            linear, lm = run["quantized_linear_ratio"], run["language_model_ratio"]
            ratios = (f"{run['disk_gib']:9.3f} {linear:7.4f} {'ok' if linear <= goal_linear else 'MISS':>4} "
                      f"{lm:5.4f} {'ok' if lm <= goal_lm else 'MISS':>3}")  # fmt: skip
        print(f"{run['stage']:22} {run['seconds']:7.1f} {run['peak_rss_gib']:13.2f} {ratios}")
    print(f"goals ({precision}): quantized Linears <= {goal_linear} x fp16, language model <= {goal_lm} x fp16")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    print(json.dumps(record), file=sys.stderr)


if __name__ == "__main__":
    main()
