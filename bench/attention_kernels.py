"""The decoder's self-attention alone, per kernel, against the context, and the cache-read floor under it.

    python bench/attention_kernels.py                                        # 1B-class shapes, 24 layers
    python bench/attention_kernels.py --layers 2 --contexts 32 256 --rounds 1 --steps 3   # smoke run

What a decode step's self-attention costs without the rest of the decoder, so that a kernel can be judged on its
own: --layers layers of exactly what the exported decoder runs per layer (``owl3.export.fused.FusedKernels``:
the two ``RotaryEmbedding``s and the self-attention kernel, the step's indices and mask computed once per graph),
traced and translated by the same code as the decoder, each layer's output the next layer's query, each layer
with its own K and V buffers [1, nkv, capacity, hd] bound in place through the runtime's own IO binding
(``OrtGraph.bind``), one new token per step. Kernels: "grouped" (the default) and "gqa" (ONNX Runtime's
``GroupQueryAttention``), measured in turns in one process (--rounds turns, median), --threads intra-op threads.
The "gqa" stack keeps its two ``RotaryEmbedding`` nodes, as the decoder's hyper layers do: its other layers
rotate inside ``GroupQueryAttention`` (``owl3.export.packing.rotary_into_attention``, which needs the packed
q/k/v projection this stack does not have), so per layer it times two nodes more than those layers run.

The floor: a step must read every cached row once. "cache MiB" is what the layers' K and V hold at a context;
"numpy read" is the time numpy takes to sum an array of that size here (one pass over the memory, a lower
bound for any kernel on this machine that keeps the cache in fp32).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

KERNELS = ("grouped", "gqa")


def export_stack(path: Path, kernel: str, layers: int, heads: int, kv_heads: int, head_dim: int) -> None:
    """``layers`` fused self-attention layers as one ONNX graph at ``path`` (inputs q, k, v, position_ids,
    seqlens_k, total_sequence_length, past_key_i / past_value_i; outputs out, present_key_i / present_value_i)."""
    import torch
    from torch import nn
    from torch.export import Dim

    from owl3.export.fused import TRANSLATIONS, FusedKernels, register_contrib_schemas
    from owl3.export.onnx_export import _quiet_exporter_logs
    from owl3.export.specs import OPSET
    from owl3.model.attention import rope_inv_freq

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            angles = torch.arange(8192, dtype=torch.float32)[:, None] * rope_inv_freq(head_dim, 1e6)
            self.register_buffer("cos_cache", angles.cos())
            self.register_buffer("sin_cache", angles.sin())

        def forward(self, q, k, v, position_ids, seqlens_k, total, past):
            kernels = FusedKernels(position_ids, seqlens_k, total, self.cos_cache, self.sin_cache, kernel)
            out, presents = q, []
            for index in range(layers):
                out, _, (key, value) = kernels.self_attention(
                    out, k, v, (past[2 * index], past[2 * index + 1]), heads, kv_heads
                )
                presents += [key, value]
            return out, presents

    register_contrib_schemas()
    step, capacity = Dim("step", min=1, max=4096), Dim("capacity", min=2, max=65536)
    args = (torch.zeros(1, 2, heads * head_dim), torch.zeros(1, 2, kv_heads * head_dim),
            torch.zeros(1, 2, kv_heads * head_dim), torch.zeros(1, 2, dtype=torch.int64),
            torch.ones(1, dtype=torch.int32), torch.tensor(2, dtype=torch.int32),
            [torch.zeros(1, kv_heads, 8, head_dim) for _ in range(2 * layers)])  # fmt: skip
    dynamic = ({1: step}, {1: step}, {1: step}, {1: step}, None, None, [{2: capacity}] * (2 * layers))
    names = [f"past_{part}_{i}" for i in range(layers) for part in ("key", "value")]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_exporter_logs():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            Stack(), args, dynamo=True, dynamic_shapes=dynamic, opset_version=OPSET,
            input_names=["q", "k", "v", "position_ids", "seqlens_k", "total_sequence_length", *names],
            output_names=["out", *(n.replace("past_", "present_") for n in names)],
            custom_translation_table=TRANSLATIONS,
        )  # fmt: skip
    program.save(str(path))


def step_ms(backend: Any, kernel: str, layers: int, heads: int, kv_heads: int, head_dim: int, context: int,
            steps: int) -> tuple[float, np.ndarray]:  # fmt: skip
    """Median ms of one decode step of ``kernel`` with ``context`` rows cached (random values, seeded by the
    context), and the outputs of every step."""
    rng = np.random.default_rng(context)
    allocate, graph = backend.buffer, backend.graphs[kernel]
    buffers = {}
    for index in range(layers):
        for part in ("key", "value"):
            values = np.zeros((1, kv_heads, context + steps + 3, head_dim), np.float32)
            values[:, :, :context] = rng.standard_normal((1, kv_heads, context, head_dim))
            buffers[f"past_{part}_{index}"] = (f"present_{part}_{index}", allocate(values))
    binding = graph.bind(buffers)
    times, outs = [], []
    for step in range(steps + 2):  # two warm-ups
        rows = context + step
        feeds = {"q": rng.standard_normal((1, 1, heads * head_dim), dtype=np.float32),
                 "k": rng.standard_normal((1, 1, kv_heads * head_dim), dtype=np.float32),
                 "v": rng.standard_normal((1, 1, kv_heads * head_dim), dtype=np.float32),
                 "position_ids": np.array([[rows]]), "seqlens_k": np.array([rows], np.int32),
                 "total_sequence_length": np.array(rows + 1, np.int32)}  # fmt: skip
        started = time.perf_counter()
        outs.append(binding.run(feeds, shapes={"out": (1, 1, heads * head_dim)})["out"])
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times[2:]), np.concatenate(outs, axis=1)


def numpy_read_ms(mib: float, repeats: int = 5) -> float:
    values = np.ones(int(mib * (1 << 20)) // 4, np.float32)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        values.sum()
        times.append(time.perf_counter() - started)
    return 1000 * min(times)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort

    from owl3.runtime.backend import OrtBackend, OrtGraph

    shape = (args.layers, args.heads, args.kv_heads, args.head_dim)
    graphs = {}
    with tempfile.TemporaryDirectory(prefix="attention-kernels-") as scratch:
        for kernel in args.kernels:
            path = Path(scratch) / f"{kernel}.onnx"
            export_stack(path, kernel, *shape)
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            graphs[kernel] = OrtGraph(kernel, session, "cpu")
    backend = OrtBackend(graphs, "cpu", ("CPUExecutionProvider",))
    results: dict[str, dict[int, list[float]]] = {k: {c: [] for c in args.contexts} for k in args.kernels}
    for _ in range(args.rounds):
        for context in args.contexts:
            outs = {}
            for kernel in args.kernels:
                ms, outs[kernel] = step_ms(backend, kernel, *shape, context, args.steps)
                results[kernel][context].append(ms)
            first = outs[args.kernels[0]]
            for kernel, out in outs.items():  # the kernels compute the same attention: else the race is void
                if not np.allclose(out, first, atol=1e-4, rtol=1e-4):
                    raise SystemExit(f"{kernel} and {args.kernels[0]} disagree at {context} tokens: "
                                     f"max abs {np.abs(out - first).max():.2e}")  # fmt: skip
    rows = []
    for kernel in args.kernels:
        ms = {str(c): statistics.median(v) for c, v in results[kernel].items()}
        rows.append({"kernel": kernel, "ms": ms, "slope": ms[str(args.contexts[-1])] / ms[str(args.contexts[0])]})
    floor = []
    for context in args.contexts:
        mib = args.layers * 2 * args.kv_heads * context * args.head_dim * 4 / (1 << 20)
        floor.append({"context": context, "cache_mib": mib, "numpy_read_ms": numpy_read_ms(mib)})
    return {"layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
            "threads": args.threads, "steps": args.steps, "rounds": args.rounds, "contexts": args.contexts,
            "rows": rows, "floor": floor}  # fmt: skip


def print_table(result: dict[str, Any]) -> None:
    contexts = result["contexts"]
    print(f"\n{result['layers']} self-attention layers, {result['heads']} query / {result['kv_heads']} KV heads, "
          f"head dim {result['head_dim']}, {result['threads']} threads; ms per decode step, median of "
          f"{result['rounds']} turns x {result['steps']} steps")  # fmt: skip
    print("{:10} ".format("kernel") + " ".join(f"{c:>10}" for c in contexts) + "      slope")
    for row in result["rows"]:
        print(f"{row['kernel']:10} " + " ".join(f"{row['ms'][str(c)]:10.2f}" for c in contexts)
              + f"  {row['slope']:8.2f}x")  # fmt: skip
    print("{:10} ".format("cache MiB") + " ".join(f"{f['cache_mib']:10.1f}" for f in result["floor"]))
    print("{:10} ".format("numpy read") + " ".join(f"{f['numpy_read_ms']:10.2f}" for f in result["floor"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=14, help="query heads (1B-class: 14)")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32, 1024, 4096])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per context (median)")
    parser.add_argument("--rounds", type=int, default=3, help="turns over the kernels (median of the turns)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("bench-results/attention_kernels.json"))
    args = parser.parse_args(argv)
    result = measure(args)
    print_table(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
