"""Shared by the benchmark scripts: large random checkpoints in the real layout, written tensor by tensor."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from owl3.config import Owl3Config
from owl3.model.weights import table_entries
from owl3.tokenizer import build_demo_tokenizer, write_tokenizer


def write_random_checkpoint(config: Owl3Config, out: Path, dtype: torch.dtype, shard_bytes: int = 2 << 30) -> None:
    """Random weights in the real sharded layout, one tensor at a time (never the whole model in RAM)."""
    out.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    names: list[list[str]] = [[]]
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            save_file(shard, str(out / f"part-{len(names) - 1}.safetensors"), {"format": "pt"})
            shard, size = {}, 0
            names.append([])

    for name, shape, kind in table_entries(config, "required"):
        tensor = (torch.randn(shape, generator=generator) * 0.02 + (1.0 if kind == "norm" else 0.0)).to(dtype)
        if size and size + tensor.nbytes > shard_bytes:
            flush()
        shard[name] = tensor
        names[-1].append(name)
        size += tensor.nbytes
        total += tensor.nbytes
    flush()
    count = len(names) - 1
    for index, group in enumerate(names[:count]):
        final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        (out / f"part-{index}.safetensors").rename(out / final)
        weight_map.update(dict.fromkeys(group, final))
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_json))
    (out / "config.json").write_text(json.dumps(config.to_hf_dict()))
    write_tokenizer(build_demo_tokenizer(1024), out)


# Runs the owl3-export command line in a child process that reports its own peak resident memory
# (measure.peak_rss_kib: VmHWM, which unlike ru_maxrss does not inherit the parent's peak).
CHILD = (
    "import sys\n"
    f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
    "from measure import peak_rss_kib\n"
    "from owl3.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print('PEAK_RSS_KB', peak_rss_kib(), file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def run_cli_measured(args: Sequence[str], what: str) -> tuple[float, float]:
    """``owl3-export ARGS`` in a child process: (seconds, peak RSS in GiB); exits with its stderr on failure."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{what} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    peak_kb = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    return seconds, peak_kb / 2**20
