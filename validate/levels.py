"""The comparison levels L1 (tensors), L2 (next-token distributions) and L3 (tasks) for one reference
and any number of candidate backends, on identical preprocessed inputs (see validation.md).

L1 and L2 run on the fixed probes (text only, one cut image, three images). L2 is teacher-forced on the
prompt followed by the reference's own greedy continuation: both arms score the same tokens, at every
position that predicts one (in a probe with images, every position that sees an image), so a model
with short answers still gives L2 dozens of positions per probe rather than its answer's two. L3 asks
every item of a benchmark of every arm with greedy decoding; predictions are appended to a per-arm
JSON-lines cache, so an interrupted run resumes without redoing finished items. An item whose media
cannot be read is excluded from every arm and counted with its reason.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from owl3.errors import InvalidInputError
from owl3.media import load_video_frames
from owl3.processor import Owl3Processor
from owl3.validate.backends import Backend, Inputs
from owl3.validate.compare import TensorComparison, compare_distributions, compare_tensors
from owl3.validate.items import Item, Task

PROBE_NEW_TOKENS = 16


def _graph_of(name: str) -> str:
    if name == "image_embeds":
        return "vision"
    return "visual_memory" if name.startswith("visual_") else "decoder"


def compare_probe_tensors(
    reference: dict[str, dict[str, np.ndarray]], candidate: dict[str, dict[str, np.ndarray]]
) -> list[TensorComparison]:
    """L1: every output both arms produced, per probe, named ``<probe>/<graph>/<output>``."""
    results = []
    for probe, ref_out in reference.items():
        cand_out = candidate[probe]
        for name in sorted(set(ref_out) & set(cand_out)):
            results.append(compare_tensors(f"{probe}/{_graph_of(name)}/{name}", ref_out[name], cand_out[name]))
    return results


def teacher_forced(inputs: Inputs, continuation: Sequence[int]) -> Inputs:
    """The probe with the reference's continuation appended; new positions see all images, as in decoding."""
    extra = np.asarray([continuation], dtype=np.int64)
    offsets = inputs["media_offset"]
    tail = np.repeat(offsets[:, -1:], extra.shape[1], axis=1)
    return {
        "input_ids": np.concatenate([inputs["input_ids"], extra], axis=1),
        "media_offset": np.concatenate([offsets, tail], axis=1),
        "pixel_values": inputs.get("pixel_values"),
    }


def scored_positions(forced: Inputs) -> np.ndarray:
    """The positions L2 compares: every one that predicts a following token; with images, only those that
    see at least one image (``media_offset[..., 1] > 0``), so the image group measures the image paths."""
    length = forced["input_ids"].shape[1]
    positions = np.arange(length - 1)
    if forced.get("pixel_values") is not None:
        positions = positions[forced["media_offset"][0, : length - 1, 1] > 0]
    return positions


class ProbeRun:
    """The reference's traces and continuations on the probes, computed once for every candidate."""

    def __init__(self, reference: Backend, probes: dict[str, Inputs]) -> None:
        self.probes = {}
        self.traces = {}
        for name, inputs in probes.items():
            continuation = reference.generate(inputs, PROBE_NEW_TOKENS)
            forced = teacher_forced(inputs, continuation)
            self.probes[name] = (forced, scored_positions(forced))
            self.traces[name] = reference.trace(forced)

    def compare(self, candidate: Backend) -> dict[str, Any]:
        """L1 tensor comparisons and L2 distributions (text-only and with-images probes separately)."""
        traces = {name: candidate.trace(forced) for name, (forced, _) in self.probes.items()}
        tensors = compare_probe_tensors(self.traces, traces)
        groups: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {"text": [], "images": []}
        for name, (forced, positions) in self.probes.items():
            group = "images" if forced.get("pixel_values") is not None else "text"
            targets = forced["input_ids"][0, positions + 1]
            groups[group].append(
                (self.traces[name]["logits"][0, positions], traces[name]["logits"][0, positions], targets)
            )
        distribution, kl_values = {}, {}
        for group, parts in groups.items():
            if not parts:
                continue
            ref, cand, targets = (np.concatenate([p[k] for p in parts]) for k in range(3))
            distribution[group] = compare_distributions(ref, cand, targets)
            kl_values[group] = _kl_per_position(ref, cand).tolist()
        return {"tensors": tensors, "distribution": distribution, "kl_values": kl_values}


def _kl_per_position(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ref, cand = log_softmax(reference), log_softmax(candidate)
    return np.sum(np.exp(ref) * (ref - cand), axis=-1)


# ---- L3: tasks -----------------------------------------------------------------------------------------


class PredictionCache:
    """Append-only JSON lines of {"id", "prediction"} per arm: the resume point of an interrupted run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, str] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interruption: that item is redone
                self.done[record["id"]] = record["prediction"]

    def add(self, item_id: str, prediction: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"id": item_id, "prediction": prediction}) + "\n")
        self.done[item_id] = prediction


def item_inputs(processor: Owl3Processor, item: Item) -> Inputs:
    """Preprocess one item exactly as every arm gets it (raises InvalidInputError for unreadable media)."""
    videos = None
    if isinstance(item.video, tuple):  # frame sources
        videos = [list(item.video)]
    elif item.video is not None:  # a video file: the eval's 'middle' frame sampling
        videos = [load_video_frames(item.video, sampling="middle", num_frames=item.num_frames)]
    images = list(item.images) or None
    return dict(processor(item.messages(), images=images, videos=videos, cut_enable=item.cut, return_tensors="np"))


def run_items(
    arms: dict[str, Backend],
    items: Sequence[Item],
    processor: Owl3Processor,
    cache_dir: Path,
    *,
    max_new_tokens: int,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Greedy predictions of every arm for every item: ({arm: {item id: text}}, {excluded id: reason})."""
    caches = {name: PredictionCache(cache_dir / f"{name}.jsonl") for name in arms}
    excluded: dict[str, str] = {}
    started = time.perf_counter()
    for count, item in enumerate(items, start=1):
        pending = [name for name in arms if item.id not in caches[name].done]
        if pending:
            try:
                inputs = item_inputs(processor, item)
            except InvalidInputError as exc:
                excluded[item.id] = exc.one_line()
                continue
            for name in pending:
                tokens = arms[name].generate(inputs, max_new_tokens)
                caches[name].add(item.id, processor.decode(_until_end(tokens, processor.eos_token_ids)))
        if progress and (count % 10 == 0 or count == len(items)):
            progress(f"{count}/{len(items)} items ({time.perf_counter() - started:.0f} s)")
    return {name: cache.done for name, cache in caches.items()}, excluded


def _until_end(tokens: list[int], stop: Sequence[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in stop:
            return tokens[:index]
    return tokens


def unit_scores(
    task: Task, items: Sequence[Item], predictions: dict[str, str], excluded: dict[str, str]
) -> dict[str, float]:
    """Score every scoring unit none of whose items was excluded: {unit: score}."""
    by_unit: dict[str, list[Item]] = {}
    for item in items:
        by_unit.setdefault(item.unit, []).append(item)
    scores = {}
    for unit, members in by_unit.items():
        if any(m.id in excluded or m.id not in predictions for m in members):
            continue
        scores[unit] = task.unit_score([task.score(m, predictions[m.id]) for m in members])
    return scores


def stderr_progress(label: str) -> Callable[[str], None]:
    """Progress lines on stderr: rewritten in place on a terminal, one line per update otherwise."""
    terminal = sys.stderr.isatty()

    def say(message: str) -> None:
        done, _, total = message.split(" ")[0].partition("/")
        last = not terminal or done == total
        print(f"\rowl3-export: {label}: {message}", end="\n" if last else "", file=sys.stderr, flush=True)

    return say
