"""Torch-free measurement helpers shared by the benchmarks (importable from their measured child processes)."""

from __future__ import annotations

import json
import math
import resource
import subprocess
from pathlib import Path
from typing import Any

# Bytes per element of ONNX tensor types (TensorProto enum values), 4-bit types at half a byte.
ONNX_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 21: 0.5, 22: 0.5}


def tensor_bytes(tensor) -> float:
    """Bytes of an ONNX TensorProto's data from its dims and type (present even when the data is external)."""
    if tensor.data_type not in ONNX_BYTES:
        raise SystemExit(f"initializer {tensor.name} has ONNX data type {tensor.data_type}: add it to ONNX_BYTES")
    return ONNX_BYTES[tensor.data_type] * math.prod(tensor.dims)


def peak_rss_kib() -> int:
    """This process's peak resident set in KiB. VmHWM, not ru_maxrss: Linux carries the parent's peak into a
    child's ru_maxrss across fork and exec, so a child of a large parent would report the parent's peak."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def report(result: dict[str, Any]) -> None:
    """In a measured child: print its result as the one line ``child_result`` reads."""
    print("RESULT " + json.dumps(result), flush=True)


def child_result(command: list[str], what: str) -> dict[str, Any]:
    """Run a measuring child process and return the result it reported; exits with its stderr on failure."""
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"measuring {what} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))
