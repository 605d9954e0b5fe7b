"""Decode step cost against context length, and time to first token with images: the fused ONNX Runtime
flavour's two self-attention kernels over the in-place KV cache (grouped, the default; gqa, ONNX Runtime's
GroupQueryAttention) against the standard decoder (concatenated cache), one run.

    python bench/decode_context.py                                  # 1B-class model, fp32 / int8 / int4
    python bench/decode_context.py --preset demo --precisions fp32 --contexts 32 256 --steps 4   # smoke run

Exports under --workdir (reused when their manifest exists): per precision the ort flavour with each kernel
(``export_model(..., attention=...)``) and unfused (``fused=False``, the layout before the fused kernels); quantized
weights by round-to-nearest (speed depends on the integer format only). Measured in one
child process per precision (its layouts in turns, --rounds times, median) with --threads intra-op threads:

- decode ms/token at each --contexts length: the request's cache is filled with random values up to that
  length (a step's cost does not depend on them; a real prefill of 4,096 tokens would dominate the run), then
  --steps greedy decode steps after two warm-ups, median per step. Goal: the step at the longest context costs
  at most 1.1x the step at the shortest.
- time to first token for a prompt with 1 and with 4 images (uncut), median of --repeats after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from measure import child_result, report
from quantized_runtime import float_checkpoint, quantized_checkpoint, say

GOAL_FLATNESS = 1.1  # decode step at the longest context / at the shortest
LAYOUTS = ("unfused", "gqa", "grouped")  # unfused: concatenated cache; the others: in place


def export_for(source: Path, out: Path, precision: str, layout: str) -> Path:
    from owl3.export.pipeline import export_model

    if not (out / "manifest.json").is_file():
        say(f"exporting {precision} {layout}")
        float_precision = precision if precision in ("fp32", "fp16") else None
        fused, attention = layout != "unfused", layout if layout != "unfused" else "grouped"
        export_model(
            source, out, float_precision, target="ort", fused=fused, attention=attention, force=True, validate=False
        )
    return out


# ---- the measurement, in a child process -----------------------------------------------------------------------


def child(export_dirs: list[Path], contexts: list[int], steps: int, repeats: int, rounds: int,
          images: list[int], threads: int | None) -> None:  # fmt: skip
    """All layouts of one precision in one process, measured in turns (``rounds`` times each, median), so that
    the machine's drift during the run falls on every layout alike; one result per export directory."""
    from owl3.runtime import Owl3Session

    sessions = [Owl3Session(d, "cpu", verify="size", intra_op_threads=threads, max_context=max(contexts) + 64)
                for d in export_dirs]  # fmt: skip
    decode = [{c: [] for c in contexts} for _ in sessions]
    ttft = [{n: [] for n in images} for _ in sessions]
    for _ in range(rounds):
        for i, session in enumerate(sessions):
            for c in contexts:
                decode[i][c].append(decode_step_ms(session, c, steps))
        for i, session in enumerate(sessions):
            for n in images:
                ttft[i][n].append(ttft_ms(session, n, repeats))

    def medians(lists: dict[int, list[float]]) -> dict[str, float]:
        return {str(key): statistics.median(values) for key, values in lists.items()}

    report([{"decode_ms": medians(d), "ttft_ms": medians(t)} for d, t in zip(decode, ttft, strict=True)])


def decode_step_ms(session: Any, context: int, steps: int) -> float:
    """Median time of one decode step with ``context`` tokens already cached (random values), text only."""
    text, rng = session.config.text, np.random.default_rng(0)
    shape = (1, text.num_key_value_heads, context, text.head_dim)
    visual = {name: np.zeros((1, text.num_key_value_heads, 0, text.head_dim), session._float)
              for name in session._visual_names}  # fmt: skip
    cache = session._new_cache(1, context + steps + 3, context + steps + 3)  # as grown by such a request
    previous = None
    if cache is not None:
        for _, buffer in cache.buffers.values():
            filled = np.zeros(buffer.shape(), np.float32)  # the fused cache is fp32 in every precision
            filled[:, :, :context] = rng.standard_normal(shape)
            buffer.update_inplace(filled)
        cache.length = context
    else:
        previous = {present: rng.standard_normal(shape).astype(session._float) for _, present in session._past_pairs}
    token, times = np.array([[42]]), []
    for step in range(steps + 2):  # two warm-ups
        started = time.perf_counter()
        position = np.array([[context + step]])
        previous = session._decode(token, position, np.zeros_like(token), previous, visual, cache)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times[2:])


def ttft_ms(session: Any, images: int, repeats: int) -> float:
    """Median time to first token of a chat prompt with ``images`` random images (uncut)."""
    from PIL import Image

    rng = np.random.default_rng(images)
    pictures = [Image.fromarray(rng.integers(0, 256, (320, 480, 3), dtype=np.uint8)) for _ in range(images)]
    content = "<|image|>" * images + "What is in the pictures?"
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": ""}]
    times = []
    for _ in range(repeats + 1):
        result = session.generate(messages, images=pictures, cut_enable=False, max_new_tokens=1)
        times.append(result.timings["time_to_first_token_s"])
    return 1000 * statistics.median(times[1:])


def measure(export_dirs: list[Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    command = [sys.executable, __file__, "--child", *map(str, export_dirs), "--steps", str(args.steps),
               "--repeats", str(args.repeats), "--rounds", str(args.rounds),
               "--ttft-images", *map(str, args.ttft_images), "--contexts", *map(str, args.contexts)]  # fmt: skip
    if args.threads:
        command += ["--threads", str(args.threads)]
    return child_result(command, ", ".join(map(str, export_dirs)))


# ---- report ----------------------------------------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]], contexts: list[int], images: list[int]) -> None:
    cells = [f"{c} ms" for c in contexts] + ["slope"] + [f"TTFT {n}img" for n in images]
    print("\n{:10} {:8} ".format("precision", "layout") + " ".join(f"{c:>10}" for c in cells) + "  goal")
    for r in rows:
        decode = [f"{r['decode_ms'][str(c)]:10.1f}" for c in contexts] + [f"{r['slope']:9.2f}x"]
        ttft = [f"{r['ttft_ms'][str(n)]:10.0f}" for n in images]
        mark = "met" if r["slope"] <= GOAL_FLATNESS else "MISSED"
        print(f"{r['precision']:10} {r['layout']:8} " + " ".join(decode + ttft) + f"  {mark} (<= {GOAL_FLATNESS}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b-class-unverified", help="an Owl3Config preset, or demo")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8", "int4"], choices=["fp32", "int8", "int4"])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32, 1024, 4096])
    parser.add_argument("--steps", type=int, default=12, help="timed decode steps per context (median)")
    parser.add_argument("--repeats", type=int, default=2, help="timed TTFT runs after a warm-up (median)")
    parser.add_argument("--rounds", type=int, default=3, help="turns over the layouts (median of the turns)")
    parser.add_argument("--ttft-images", type=int, nargs="*", default=[1, 4], help="TTFT prompts: images in each")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path, default=Path("bench-results/decode_context.json"))
    parser.add_argument("--child", type=Path, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.contexts, args.steps, args.repeats, args.rounds, args.ttft_images, args.threads)
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="owl3-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = float_checkpoint(args.preset, workdir)
    rows = []
    for precision in args.precisions:
        source = model_dir
        if precision not in ("fp32", "fp16"):
            out = workdir / f"{args.preset}-{precision}-rtn"
            source = quantized_checkpoint(model_dir, out, precision, samples=2)
        directories = [export_for(source, workdir / f"{args.preset}-{precision}-ort-{layout}", precision, layout)
                       for layout in args.layouts]  # fmt: skip
        say(f"measuring {precision}: {', '.join(args.layouts)} in turns")
        for layout, directory, result in zip(args.layouts, directories, measure(directories, args), strict=True):
            decode = result["decode_ms"]
            slope = decode[str(max(args.contexts))] / decode[str(min(args.contexts))]
            rows.append({"precision": precision, "layout": layout, "directory": str(directory), **result,
                         "slope": slope})  # fmt: skip
    print_table(rows, args.contexts, args.ttft_images)
    print(
        f"\ndecode: median of {args.steps} steps after 2 warm-ups, cache pre-filled to the context; TTFT: median "
        f"of {args.repeats} after a warm-up, uncut images; the layouts of a precision in turns, median of "
        f"{args.rounds} turns; {args.threads} threads; RTN integers. Goal: step at "
        f"{max(args.contexts)} tokens <= {GOAL_FLATNESS}x the step at {min(args.contexts)}."
    )
    record = {"preset": args.preset, "threads": args.threads, "steps": args.steps, "repeats": args.repeats,
              "rounds": args.rounds,
              "contexts": args.contexts, "goal_flatness": GOAL_FLATNESS, "rows": rows}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.json}; working files in {workdir}")


if __name__ == "__main__":
    main()
