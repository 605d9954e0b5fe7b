"""The torch-free runtime (ONNX Runtime) against the PyTorch reference on the same fp32 weights.

    python bench/runtime_vs_pytorch.py                           # a random 1B-class model (Qwen2-0.5B + SigLIP-400m)
    python bench/runtime_vs_pytorch.py --model DIR --images 1 4  # any checkpoint

For each number of images (uncut, one placeholder each): time to first token (vision + visual memory + prefill)
and decode time per token, greedy, end tokens ignored so both arms decode the same count. Images never enter the
KV cache, so the decode step should stay nearly flat as images grow. Prints a table, writes JSON. Ratios are
measured in one run on one machine; absolute times mean something only on the target device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import write_random_checkpoint
from PIL import Image

from owl3.config import Owl3Config
from owl3.export.pipeline import export_model
from owl3.model.weights import load_model
from owl3.runtime import Owl3Session


def pictures(count: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def time_torch(model, inputs: dict, new_tokens: int) -> tuple[float, float]:
    started = time.perf_counter()
    steps = model.stream_generate(
        torch.from_numpy(inputs["input_ids"]),
        pixel_values=torch.from_numpy(inputs["pixel_values"]),
        media_offset=torch.from_numpy(inputs["media_offset"]),
        max_new_tokens=new_tokens,
        eos_token_id=[],
    )
    next(steps)
    first = time.perf_counter() - started
    clock = time.perf_counter()
    count = sum(1 for _ in steps)
    return first, (time.perf_counter() - clock) / max(count, 1)


def time_runtime(session: Owl3Session, inputs: dict, new_tokens: int) -> tuple[float, float]:
    timings: dict[str, float] = {}
    steps = session.stream_ids(
        inputs["input_ids"], inputs["pixel_values"], inputs["media_offset"],
        max_new_tokens=new_tokens, eos_token_ids=[], timings=timings,
    )  # fmt: skip
    for _ in steps:
        pass
    return timings["time_to_first_token_s"], timings["decode_s"] / max(timings["new_tokens"] - 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: a random --preset model)")
    parser.add_argument("--preset", default="1b-class-unverified")
    parser.add_argument("--images", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="runs per arm and image count (median reported)")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path, default=Path("bench-results/runtime_vs_pytorch.json"))
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="owl3-bench-"))
    model_dir = args.model
    if model_dir is None:
        model_dir = workdir / "checkpoint"
        write_random_checkpoint(Owl3Config.preset(args.preset), model_dir, torch.float32)
    export_dir = workdir / "export-fp32"
    if not export_dir.exists():
        export_model(model_dir, export_dir, "fp32", validate=False)
    model = load_model(model_dir, dtype=torch.float32)
    session = Owl3Session(export_dir, provider="cpu", verify="size")
    size = model.config.vision.image_size
    rows = []
    for count in args.images:
        messages = [
            {"role": "user", "content": "<|image|>" * count + "\nDescribe the images."},
            {"role": "assistant", "content": ""},
        ]
        inputs = session.processor(messages, images=pictures(count, size), cut_enable=False, return_tensors="np")
        with torch.inference_mode():
            torch_runs = [time_torch(model, inputs, args.new_tokens) for _ in range(args.repeats)]
        ort_runs = [time_runtime(session, inputs, args.new_tokens) for _ in range(args.repeats)]
        row = {
            "images": count,
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "visual_tokens": count * model.config.image_tokens,
            "torch_ttft_s": statistics.median(r[0] for r in torch_runs),
            "runtime_ttft_s": statistics.median(r[0] for r in ort_runs),
            "torch_decode_ms": 1000 * statistics.median(r[1] for r in torch_runs),
            "runtime_decode_ms": 1000 * statistics.median(r[1] for r in ort_runs),
        }
        rows.append(row)
        print(f"measured {count} images", flush=True)
    header = (
        "images",
        "visual tok",
        "TTFT torch s",
        "TTFT ORT s",
        "ratio",
        "decode torch ms",
        "decode ORT ms",
        "ratio",
    )
    print("\n{:>6} {:>10} {:>12} {:>10} {:>6} {:>15} {:>13} {:>6}".format(*header))
    for r in rows:
        print(
            f"{r['images']:6d} {r['visual_tokens']:10d} {r['torch_ttft_s']:12.2f} {r['runtime_ttft_s']:10.2f} "
            f"{r['torch_ttft_s'] / r['runtime_ttft_s']:6.2f} {r['torch_decode_ms']:15.1f} "
            f"{r['runtime_decode_ms']:13.1f} {r['torch_decode_ms'] / r['runtime_decode_ms']:6.2f}"
        )
    record = {"model": str(model_dir), "config": model.config.name, "new_tokens": args.new_tokens, "rows": rows}
    record["torch_threads"] = torch.get_num_threads()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2))
    print(f"\nratio > 1: the runtime is faster. Wrote {args.json}")


if __name__ == "__main__":
    main()
