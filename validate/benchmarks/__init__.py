"""Benchmark loaders and official scoring for task-level validation (L3), spec §9.

``load_benchmark(name, root)`` reads a benchmark's official files into ``Item``s (official prompt, media
paths, cut flag, ground truth, unit / cluster / category) and returns them with the benchmark's ``Task``
(official extraction and scoring). Media are never decoded here; malformed annotation files raise
``DatasetError``. ``subset`` and ``id_list_hash`` pick and name the evaluated subset.

A new benchmark (for example synthetic data in the VQAv2 or MMBench format) is added with
``register_benchmark``; names are unique.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from owl3.errors import UsageError
from owl3.validate.benchmarks.common import DatasetError, id_list_hash, subset
from owl3.validate.benchmarks.mmbench import load_mmbench
from owl3.validate.benchmarks.mvbench import load_mvbench
from owl3.validate.benchmarks.nextqa import load_nextqa
from owl3.validate.benchmarks.pope import load_pope
from owl3.validate.benchmarks.scoring import MMBenchTask, MVBenchTask, NextQATask, PopeTask, VQAAccuracyTask
from owl3.validate.benchmarks.vqav2 import load_vqav2
from owl3.validate.items import Item, Task

Loader = Callable[..., list[Item]]  # (root: Path, *, limit: int | None, seed: int) -> list[Item]


class Benchmark(NamedTuple):
    loader: Loader
    task: Task


BENCHMARKS: dict[str, Benchmark] = {
    "vqav2": Benchmark(load_vqav2, VQAAccuracyTask("vqav2")),
    "mmbench": Benchmark(load_mmbench, MMBenchTask("mmbench")),
    "pope": Benchmark(load_pope, PopeTask("pope")),
    "nextqa": Benchmark(load_nextqa, NextQATask("nextqa")),
    "mvbench": Benchmark(load_mvbench, MVBenchTask("mvbench")),
}


def register_benchmark(name: str, loader: Loader, task: Task) -> None:
    """Add a benchmark; a name already registered is refused rather than silently replaced."""
    if name in BENCHMARKS:
        raise UsageError(f"benchmark {name!r} is already registered", where="register_benchmark", fix="pick a new name")
    BENCHMARKS[name] = Benchmark(loader, task)


def load_benchmark(name: str, root: Path, *, limit: int | None = None, seed: int = 0) -> tuple[list[Item], Task]:
    """The items of benchmark ``name`` under ``root`` (a stratified subset of ``limit`` units) and its task."""
    if name not in BENCHMARKS:
        raise UsageError(
            f"unknown benchmark {name!r}", where="load_benchmark", fix=f"use one of {', '.join(sorted(BENCHMARKS))}"
        )
    loader, task = BENCHMARKS[name]
    items = loader(Path(root), limit=limit, seed=seed)
    if not items:
        raise DatasetError(f"the {name} files hold no items", where=str(root), fix="check the dataset files")
    return items, task


__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "DatasetError",
    "MMBenchTask",
    "MVBenchTask",
    "NextQATask",
    "PopeTask",
    "VQAAccuracyTask",
    "id_list_hash",
    "load_benchmark",
    "load_mmbench",
    "load_mvbench",
    "load_nextqa",
    "load_pope",
    "load_vqav2",
    "register_benchmark",
    "subset",
]
