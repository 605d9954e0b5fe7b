"""The unit of task-level validation (level L3): one benchmark item, asked identically of every backend.

A benchmark loader turns official files into ``Item``s: the official prompt (with ``<|image|>`` /
``<|video|>`` placeholders), the media as paths or frame lists, whether images are cut, and the ground
truth. A ``Task`` holds the official answer extraction and scoring of its benchmark (spec §9). Both arms
of a comparison get the same items, prompts, preprocessing, greedy decoding and extraction.

Scoring units: most benchmarks score each item; MMBench's circular evaluation scores a *question* as
correct only when every rotated variant is, so items carry ``unit`` (the scored question) and the task's
``unit_score`` folds item scores into it. Statistics are computed over units, resampled by ``cluster``
(the image or video the unit shares with others).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

MediaSource = str | Path | bytes  # a file path, or encoded image bytes (e.g. MMBench's base64-decoded)


@dataclass(frozen=True)
class Item:
    id: str  # unique within its benchmark
    task: str  # benchmark name, e.g. "vqav2", "mmbench", "pope", "nextqa", "mvbench", "synthetic-vqa"
    prompt: str  # the user message, official template, with placeholders
    answer: Any  # ground truth: list[str] of 10 answers (VQA), a letter (multiple choice), "yes"/"no" (POPE)
    images: tuple[MediaSource, ...] = ()
    video: MediaSource | tuple[MediaSource, ...] | None = None  # a video file, or frame sources
    num_frames: int | None = None  # frames to sample from ``video`` ("middle" rule, spec §9)
    cut: bool = True  # image cropping, as the official eval plan sets per task
    unit: str = ""  # scoring unit (defaults to id)
    cluster: str = ""  # statistics cluster: the image / video id (defaults to unit)
    category: str = ""  # breakdown category (l2-category, question type, ...)
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.unit:
            object.__setattr__(self, "unit", self.id)
        if not self.cluster:
            object.__setattr__(self, "cluster", self.unit)

    def messages(self) -> list[dict[str, str]]:
        """The chat messages both arms are asked (empty system prompt, generation header)."""
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": ""}]


def item_key(item: Item) -> str:
    """An item's identity across runs: ``task:id``."""
    return f"{item.task}:{item.id}"


def id_hash(key: str) -> str:
    """The hashed form of an item key kept in manifests (calibration sets): 16 hex digits of its sha256."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def media_hashes(item: Item) -> list[str]:
    """sha256 of each image / video (file or encoded bytes) an item uses; unreadable ones are left out."""
    sources = list(item.images) + (list(item.video) if isinstance(item.video, tuple) else [item.video])
    out = []
    for source in sources:
        if source is None:
            continue
        try:
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
        except OSError:
            continue
        out.append(hashlib.sha256(data).hexdigest())
    return out


class Task(Protocol):
    """Official answer extraction and scoring of one benchmark."""

    name: str
    binary: bool  # unit scores are 0/1 (McNemar) or soft (VQA accuracy: paired bootstrap)

    def score(self, item: Item, prediction: str) -> float:
        """Score one raw model output for one item (extraction included), in [0, 1]."""
        ...

    def unit_score(self, scores: Sequence[float]) -> float:
        """Fold the scores of a unit's items (circular variants) into the unit's score."""
        ...
