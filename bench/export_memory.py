"""Peak RSS and time of exporting large random Owl3 checkpoints on this machine (prints a table, writes JSON).

    python bench/export_memory.py --preset 1b-class-unverified            # Qwen2-0.5B-sized decoder + SigLIP-400m
    python bench/export_memory.py --preset 7b-240728 --no-validate        # needs ~35 GB of free disk

A random checkpoint of the preset is written shard by shard (bf16 or fp32), then `owl3-export --precision P` runs
in a child process that reports its own peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import run_cli_measured, write_random_checkpoint

from owl3.config import Owl3Config
from owl3.model.weights import count_parameters


def run_export(checkpoint: Path, output: Path, precision: str, validate: bool) -> dict[str, float]:
    args = ["--precision", precision, "--model", str(checkpoint), "--output", str(output)]
    if not validate:
        args.append("--no-validate")
    seconds, peak_gib = run_cli_measured(args, "export")
    written = sum(p.stat().st_size for p in output.iterdir())
    return {
        "seconds": round(seconds, 1),
        "peak_rss_gib": round(peak_gib, 2),
        "written_gib": round(written / 2**30, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b-class-unverified")
    parser.add_argument("--precision", default="fp16", choices=("fp32", "fp16"))
    parser.add_argument("--checkpoint-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--no-validate", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=Path("bench-results/export_memory.json"))
    args = parser.parse_args()
    config = Owl3Config.preset(args.preset)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="owl3-bench-"))
    checkpoint = workdir / "checkpoint"
    started = time.perf_counter()
    write_random_checkpoint(config, checkpoint, getattr(torch, args.checkpoint_dtype))
    ckpt_bytes = sum(p.stat().st_size for p in checkpoint.iterdir())
    elapsed = time.perf_counter() - started
    print(f"wrote a random {args.preset} checkpoint: {ckpt_bytes / 2**30:.2f} GiB in {elapsed:.0f} s")
    rows = []
    for validate in [False] if args.no_validate else [False, True]:
        result = run_export(checkpoint, workdir / f"export-{'v' if validate else 'nv'}", args.precision, validate)
        rows.append({"validate": validate, **result})
    record = {
        "preset": args.preset,
        "parameters": count_parameters(config),
        "checkpoint_dtype": args.checkpoint_dtype,
        "checkpoint_gib": round(ckpt_bytes / 2**30, 2),
        "precision": args.precision,
        "runs": rows,
    }
    header = ("preset", "params", "ckpt GiB", "prec", "validate", "peak RSS GiB", "out GiB", "s")
    print("\n{:22} {:>8} {:>9} {:>5} {:>9} {:>13} {:>8} {:>6}".format(*header))
    for row in rows:
        print(
            f"{args.preset:22} {record['parameters'] / 1e9:7.2f}B {record['checkpoint_gib']:9.2f} {args.precision:>5} "
            f"{row['validate']!s:>9} {row['peak_rss_gib']:13.2f} {row['written_gib']:8.2f} {row['seconds']:6.0f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {args.json}; working files in {workdir}")


if __name__ == "__main__":
    main()
