"""CPU decode speed of the torch-free runtime per precision and export flavour, against the memory-read ceiling.

    python bench/quantized_runtime.py                                   # random 1B-class model, every precision
    python bench/quantized_runtime.py --preset demo --precisions fp32 int4 --samples 1    # quick smoke run
    python bench/quantized_runtime.py --precisions fp32 int8 --levels 0 4 --threads 2

Pipeline, all under --workdir (artifacts whose manifest.json exists are reused; delete them to rebuild): a float
checkpoint (random bf16 weights of --preset, or the packaged demo model), quantized checkpoints by round-to-nearest
(int4: rtn4; int8 and w8a8: method rtn; decode speed depends on the integer format, not on GPTQ vs RTN), then
exports without validation: fp32 and fp16, and per quantized precision the ort flavour (MatMulNBits, per
accuracy level) and the tensorrt flavour (Q/DQ, fp16 compute; here it runs on ONNX Runtime's CPU kernels).

Each export runs in its own child process (peak RSS isolated): a text prompt of about --prompt-tokens tokens, one
warm-up, then --repeats greedy runs of --new-tokens with end tokens ignored; medians of time to first token and of
decode time per token. "Weight MiB/token" is the byte size of the decoder graph's initializers except those only
gathered (the embedding table: one row per token). "Ceiling" = weight bytes per token / decode time per token /
read bandwidth, measured here with numpy (max-reduce over --probe-gib GiB of float32, best of 5).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from measure import child_result, peak_rss_kib, report, tensor_bytes

# precision: (recipe, overrides). Round-to-nearest everywhere the recipes allow: quantizing is fast, speed the same.
QUANTIZED = {
    "int4": ("rtn4", {}),
    "int8": ("int8", {"method": "rtn", "act_order": False}),
    "w8a8": ("w8a8", {"method": "rtn", "act_order": False}),
}
FLOATS = ("fp32", "fp16")
# accuracy level 0 of 8-bit MatMulNBits is a known slow fallback (fp32 math on dequantized weights)
DEFAULT_LEVELS = {"int4": (0, 4), "int8": (4,), "w8a8": (4,)}
GOAL_SPEEDUP = {"int4": 3.0, "int8": 1.8}  # decode tokens/s over fp32, same run
GOAL_CEILING = 0.8  # every precision
# onnx.TensorProto data types -> bytes per element (INT4 / UINT4 pack two per byte)


@dataclass(frozen=True)
class Export:
    """One export to measure: a float precision, or a quantized one in a flavour (and accuracy level for ort)."""

    precision: str
    flavour: str | None = None
    level: int | None = None
    attention: str = "grouped"  # the ort flavour's self-attention kernel (export --attention)

    @property
    def label(self) -> str:
        kernel = "" if self.attention == "grouped" else f" {self.attention}"
        if self.flavour is None:
            return self.precision + kernel
        return f"{self.precision} {self.flavour}" + ("" if self.level is None else f" L{self.level}") + kernel

    @property
    def dirname(self) -> str:
        return "export-" + self.label.replace(" ", "-")


def plan(precisions: list[str], flavours: list[str], levels: list[int] | None) -> list[Export]:
    """Every export the options ask for, floats first (fp32 is the reference of the speed-up column)."""
    exports = [Export(p) for p in FLOATS if p in precisions]
    for precision in (p for p in QUANTIZED if p in precisions):
        if "ort" in flavours:
            exports += [Export(precision, "ort", level) for level in levels or DEFAULT_LEVELS[precision]]
        if "tensorrt" in flavours:
            exports.append(Export(precision, "tensorrt"))
    return exports


# ---- artifacts -----------------------------------------------------------------------------------------------


def float_checkpoint(preset: str, workdir: Path) -> Path:
    """The packaged demo model, or a random bf16 checkpoint of the preset (written once, then reused)."""
    if preset == "demo":
        from owl3.demo import default_model_dir

        return default_model_dir()
    import torch
    from common import write_random_checkpoint

    from owl3.config import Owl3Config

    final = workdir / f"{preset}-checkpoint"
    if not (final / "config.json").is_file():
        staging = workdir / f"{preset}-checkpoint.partial"
        shutil.rmtree(staging, ignore_errors=True)
        say(f"writing a random {preset} checkpoint")
        write_random_checkpoint(Owl3Config.preset(preset), staging, torch.bfloat16)
        staging.rename(final)
    return final


def quantized_checkpoint(model_dir: Path, out: Path, precision: str, samples: int) -> Path:
    from owl3.quantize import CalibrationConfig, quantize_model, recipe

    if not (out / "manifest.json").is_file():
        name, overrides = QUANTIZED[precision]
        say(f"quantizing {precision} (recipe {name}, {overrides or 'defaults'}, {samples} calibration samples)")
        quantize_model(model_dir, out, recipe(name, **overrides), CalibrationConfig(samples=samples), force=True)
    return out


def exported(source: Path, out: Path, export: Export) -> Path:
    from owl3.export.pipeline import export_model

    if not (out / "manifest.json").is_file():
        say(f"exporting {export.label}")
        if export.flavour is None:
            export_model(source, out, export.precision, attention=export.attention, force=True, validate=False)
        else:
            level = 4 if export.level is None else export.level  # ignored by the tensorrt flavour
            export_model(source, out, target=export.flavour, accuracy_level=level, attention=export.attention,
                         force=True, validate=False)  # fmt: skip
    return out


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def decode_weight_bytes(graph: Path) -> int:
    """Bytes of the initializers one decode step reads: all except those consumed only by Gather as data
    (an embedding table, of which one row per token is read). Dims are in the proto even for external data."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    gathered, other = set(), set()
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            (gathered if node.op_type == "Gather" and position == 0 else other).add(name)
    read = [t for t in model.graph.initializer if t.name in other or t.name not in gathered]
    return int(sum(tensor_bytes(t) for t in read))


def read_bandwidth(gib: float, threads: int, tries: int = 5) -> float:
    """Best read rate (bytes/s) of a max-reduce over ``gib`` GiB of float32 split across ``threads``."""
    data = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    parts = np.array_split(data, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(tries):
            started = time.perf_counter()
            list(pool.map(np.maximum.reduce, parts))  # numpy releases the GIL in reductions
            best = max(best, data.nbytes / (time.perf_counter() - started))
    return best


# ---- the measurement, in a child process -----------------------------------------------------------------------


def child(export_dir: Path, prompt_tokens: int, new_tokens: int, repeats: int, threads: int | None) -> None:
    """Runs in the child: time the export's greedy decoding and print one JSON line with the medians."""
    from owl3.runtime import Owl3Session

    session = Owl3Session(export_dir, "cpu", verify="size", intra_op_threads=threads)
    ids = prompt_ids(session, prompt_tokens)
    runs = []
    for _ in range(repeats + 1):  # the first run warms up
        timings: dict[str, float] = {}
        for _ in session.stream_ids(ids, max_new_tokens=new_tokens, eos_token_ids=[], timings=timings):
            pass
        runs.append((timings["time_to_first_token_s"], timings["decode_s"] / max(timings["new_tokens"] - 1, 1)))
    result = {
        "prompt_tokens": int(ids.shape[1]),
        "ttft_s": statistics.median(r[0] for r in runs[1:]),
        "decode_s_per_token": statistics.median(r[1] for r in runs[1:]),
        "peak_rss_gib": peak_rss_kib() / 2**20,
    }
    report(result)


def prompt_ids(session: Any, target: int) -> np.ndarray:
    """The chat-formatted ids [1, L] of the shortest plain-text prompt with at least ``target`` tokens."""
    words = ("describe", "the", "small", "red", "circle", "left", "of", "the", "blue", "square", "please")
    for count in range(1, 4 * target):
        text = " ".join(words[i % len(words)] for i in range(count))
        messages = [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        ids = session.processor(messages, return_tensors="np")["input_ids"]
        if ids.shape[1] >= target:
            break
    return ids


def measure(export_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", str(export_dir), "--prompt-tokens", str(args.prompt_tokens),
               "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]  # fmt: skip
    if args.threads:
        command += ["--threads", str(args.threads)]
    return child_result(command, str(export_dir))


# ---- report ----------------------------------------------------------------------------------------------------


def goals(row: dict[str, Any]) -> str:
    """'met' / 'missed' for every goal that applies to the row, with the goal in brackets."""
    marks = []
    if row["precision"] in GOAL_SPEEDUP and row["speedup_vs_fp32"] is not None:
        goal = GOAL_SPEEDUP[row["precision"]]
        marks.append(f"{'met' if row['speedup_vs_fp32'] >= goal else 'MISSED'} (>={goal}x)")
    marks.append(f"{'met' if row['ceiling_fraction'] >= GOAL_CEILING else 'MISSED'} (>={GOAL_CEILING:.0%} ceil)")
    return ", ".join(marks)


def print_table(preset: str, rows: list[dict[str, Any]]) -> None:
    header = ("preset", "export", "disk GiB", "W MiB/tok", "TTFT ms", "tok/s", "vs fp32", "ceiling", "RSS GiB")
    print("\n{:20} {:18} {:>8} {:>9} {:>8} {:>7} {:>7} {:>7} {:>7}  goals".format(*header))
    for r in rows:
        speedup = "-" if r["speedup_vs_fp32"] is None else f"{r['speedup_vs_fp32']:.2f}x"
        print(
            f"{preset:20} {r['export']:18} {r['disk_bytes'] / 2**30:8.3f} {r['weight_bytes_per_token'] / 2**20:9.1f} "
            f"{1000 * r['ttft_s']:8.1f} {r['decode_tokens_per_s']:7.1f} {speedup:>7} {r['ceiling_fraction']:7.0%} "
            f"{r['peak_rss_gib']:7.2f}  {r['goals']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b-class-unverified", help="an Owl3Config preset, or demo")
    parser.add_argument("--precisions", nargs="+", default=[*FLOATS, "int8", "w8a8", "int4"],
                        choices=[*FLOATS, *QUANTIZED])  # fmt: skip
    parser.add_argument("--flavours", nargs="+", default=["ort", "tensorrt"], choices=["ort", "tensorrt"])
    parser.add_argument("--levels", type=int, nargs="+", choices=[0, 4],
                        help="ort accuracy levels (default: 0 and 4 for int4, 4 for int8 and w8a8)")  # fmt: skip
    parser.add_argument("--samples", type=int, default=2, help="calibration samples (w8a8 activation scales)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median reported)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own choice)")
    parser.add_argument("--probe-gib", type=float, default=1.0)
    parser.add_argument("--probe-threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path, default=Path("bench-results/quantized_runtime.json"))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.prompt_tokens, args.new_tokens, args.repeats, args.threads)
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="owl3-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = float_checkpoint(args.preset, workdir)
    exports = plan(args.precisions, args.flavours, args.levels)
    artifacts = {}
    for export in exports:
        source = model_dir
        if export.flavour is not None:
            source = quantized_checkpoint(model_dir, workdir / f"{args.preset}-{export.precision}-rtn",
                                          export.precision, args.samples)  # fmt: skip
        artifacts[export] = exported(source, workdir / f"{args.preset}-{export.dirname}", export)
    bandwidth = read_bandwidth(args.probe_gib, args.probe_threads)
    say(f"read bandwidth {bandwidth / 1e9:.2f} GB/s ({args.probe_threads} threads, numpy)")
    rows = []
    for export, directory in artifacts.items():
        say(f"measuring {export.label}")
        decoder = json.loads((directory / "manifest.json").read_text())["graphs"]["decoder"]["file"]
        result = measure(directory, args)
        weight_bytes = decode_weight_bytes(directory / decoder)
        rows.append({
            "export": export.label, **asdict(export), "directory": str(directory), **result,
            "disk_bytes": directory_bytes(directory), "weight_bytes_per_token": weight_bytes,
            "decode_tokens_per_s": 1 / result["decode_s_per_token"],
            "ceiling_fraction": weight_bytes / result["decode_s_per_token"] / bandwidth,
        })  # fmt: skip
    fp32 = next((r for r in rows if r["export"] == "fp32"), None)
    for row in rows:
        row["speedup_vs_fp32"] = row["decode_tokens_per_s"] / fp32["decode_tokens_per_s"] if fp32 else None
        row["goals"] = goals(row)
    print_table(args.preset, rows)
    print(
        f"\nread ceiling {bandwidth / 1e9:.2f} GB/s; prompt {rows[0]['prompt_tokens']} tokens, {args.new_tokens} "
        f"greedy tokens, median of {args.repeats}. Integer weights come from round-to-nearest (RTN): decode speed "
        f"depends on the integer format, not on GPTQ vs RTN. Goals: int4 >= {GOAL_SPEEDUP['int4']}x and int8 >= "
        f"{GOAL_SPEEDUP['int8']}x fp32 decode tokens/s, every export >= {GOAL_CEILING:.0%} of the read ceiling."
    )
    record = {
        "preset": args.preset, "model": str(model_dir), "weights_method": "rtn", "samples": args.samples,
        "threads": args.threads, "probe_bytes_per_s": bandwidth, "probe_threads": args.probe_threads,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": rows,
        "goals": {"speedup_vs_fp32": GOAL_SPEEDUP, "ceiling_fraction": GOAL_CEILING},
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.json}; working files in {workdir}")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
