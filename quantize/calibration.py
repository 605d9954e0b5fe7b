"""Calibration data: image+text conversations in the model's own chat format, deterministic for a seed.

Sources (``CalibrationConfig.source``):
- ``builtin``: generated shape pictures with questions and answers in the demo model's formats (VQA, multiple
  choice, several images, descriptions) and a few text-only turns. Right for the demo model; on a real
  checkpoint it still runs, with a warning.
- a folder of images (each asked one of a few generic prompts) or a JSON-lines file of
  ``{"id", "images": [paths] | "image": path, "prompt", "answer", "cut"}`` (paths relative to the file; ``cut``
  defaults to true for one image and false for several, as the official evaluation runs multi-image tasks);
- ``NAME:DIR``: a benchmark subset through the validator's own loaders (``vqav2:DIR``, ``mmbench:DIR``, ...).

Each item becomes one sample: the processor's prompt followed by the answer (when there is one) and
``<|im_end|>``, so prompt and answer tokens after an image see the cross-attention they see at inference and
the hyper layers' ``v_kv_proj`` sees real visual memory. ``text_only`` drops every image and placeholder: the
same conversations without pictures, so a report can show what images buy.

Unreadable media are skipped and counted; a set with no images is refused unless ``text_only`` was asked for.
The ids and media (sha256 of their bytes) of every sample go into the quantized checkpoint's manifest, so the
validator can refuse an evaluation subset that overlaps the calibration set.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from owl3.errors import InvalidInputError, UsageError
from owl3.processor import IMAGE_TOKEN, VIDEO_TOKEN, Owl3Processor
from owl3.validate.items import Item, id_hash, item_key, media_hashes

BUILTIN = "builtin"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FOLDER_PROMPTS = (
    "Describe this image.",
    "What is in this picture?",
    "Describe the image in detail.",
    "What are the main objects and their colours?",
)
CALIBRATION_STREAM = 20  # owl3.synthetic random stream of the built-in set (training uses 5 and 10-13)
Inputs = dict[str, Any]


class CalibrationError(InvalidInputError):
    """The calibration source is missing, malformed, empty, or has no images where they are needed (exit 3)."""


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration data comes from and how much of it."""

    source: str = BUILTIN
    samples: int = 128
    seed: int = 0
    text_only: bool = False
    max_tokens: int = 4096  # longer samples are skipped and counted

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise UsageError(f"samples must be >= 1, found {self.samples}", where="--samples", fix="use 128")
        if self.max_tokens < 16:
            raise UsageError(f"max_tokens {self.max_tokens} is too small", where="calibration", fix="use 4096")


@dataclass
class CalibrationSet:
    """Preprocessed samples (numpy, as the processor gives them) and what the manifest records of them."""

    config: CalibrationConfig
    samples: list[Inputs]
    ids: list[str]
    media: list[str] = field(default_factory=list)  # sha256 of every image / video used
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return sum(0 if s["pixel_values"] is None else len(s["pixel_values"]) for s in self.samples)

    @property
    def tokens(self) -> int:
        return sum(int(s["input_ids"].shape[1]) for s in self.samples)

    def record(self) -> dict[str, Any]:
        ids = sorted(id_hash(i) for i in self.ids)
        return {
            "source": self.config.source,
            "seed": self.config.seed,
            "text_only": self.config.text_only,
            "samples": len(self.samples),
            "tokens": self.tokens,
            "images": self.images,
            "skipped": dict(self.skipped),
            "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
            "id_hashes": ids,
            "media_hashes": sorted(set(self.media)),
        }


# ---- loading ----------------------------------------------------------------------------------------------


def load_calibration(
    config: CalibrationConfig,
    processor: Owl3Processor,
    *,
    image_size: int,
    warn: Callable[[str], None] | None = None,
) -> CalibrationSet:
    """Read, select and preprocess the calibration items of ``config`` (see the module docstring)."""
    items = calibration_items(config, image_size=image_size, warn=warn)
    if config.text_only:
        items = [text_only(item) for item in items]
    result = CalibrationSet(config, [], [])
    for item in items:
        try:
            sample = conversation_inputs(processor, item)
        except InvalidInputError as exc:
            _count(result.skipped, f"unreadable: {exc.problem}")
            continue
        if sample["input_ids"].shape[1] > config.max_tokens:
            _count(result.skipped, f"longer than {config.max_tokens} tokens")
            continue
        result.samples.append(sample)
        result.ids.append(item_key(item))
        result.media += media_hashes(item)
    if not result.samples:
        raise CalibrationError(
            f"no usable calibration sample ({sum(result.skipped.values())} skipped: {result.skipped})",
            where=config.source,
            fix="check the images and prompts of the calibration source",
        )
    if result.images == 0 and not config.text_only:
        raise CalibrationError(
            "the calibration set holds no image: the hyper layers' v_kv_proj would be quantized blind",
            where=config.source,
            fix="use a source with images, or pass --text-only to calibrate on text on purpose",
        )
    return result


def calibration_items(
    config: CalibrationConfig, *, image_size: int, warn: Callable[[str], None] | None = None
) -> list[Item]:
    """The items of the configured source, ``config.samples`` of them, chosen deterministically."""
    source = config.source
    if source == BUILTIN:
        if warn is not None and image_size != 64:
            warn(
                "the built-in calibration set (synthetic shapes) suits the demo model; for a real checkpoint "
                "pass --calibration vqav2:DIR, a folder of your images or a JSONL of image paths and prompts"
            )
        from owl3.quantize.builtin_calibration import builtin_items

        return builtin_items(config.samples, config.seed, image_size)
    name, _, root = source.partition(":")
    if root and re.fullmatch(r"[a-z0-9_]+", name) and not Path(source).exists():
        from owl3.validate.benchmarks import load_benchmark, subset

        items, _task = load_benchmark(name, Path(root), seed=config.seed)
        return subset(items, config.samples, config.seed)
    path = Path(source)
    if path.is_dir():
        return _choose(folder_items(path), config)
    if path.is_file():
        return _choose(jsonl_items(path), config)
    raise CalibrationError(
        "expected 'builtin', a folder of images, a JSONL file or NAME:DIR of a benchmark, found nothing there",
        where=source,
        fix="check the --calibration path",
    )


def _choose(items: list[Item], config: CalibrationConfig) -> list[Item]:
    order = np.random.default_rng(config.seed).permutation(len(items))
    return [items[int(i)] for i in order[: config.samples]]


def folder_items(folder: Path) -> list[Item]:
    """Every image of ``folder`` (sorted by name), each with one of ``FOLDER_PROMPTS``."""
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise CalibrationError(
            f"no image file ({', '.join(IMAGE_SUFFIXES)}) in the folder", where=str(folder), fix="add images"
        )
    return [
        Item(id=p.name, task="calibration", prompt=f"{IMAGE_TOKEN}\n{FOLDER_PROMPTS[i % len(FOLDER_PROMPTS)]}",
             answer=None, images=(p,))
        for i, p in enumerate(images)
    ]  # fmt: skip


def jsonl_items(path: Path) -> list[Item]:
    """``{"id", "images" | "image", "prompt", "answer", "cut"}`` per line; image paths relative to the file."""
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"line {number} is not JSON ({exc})", where=str(path), fix="fix the line") from exc
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise CalibrationError(
                f'line {number} has no "prompt" string', where=str(path), fix='write {"image": ..., "prompt": ...}'
            )
        images = record.get("images", [record["image"]] if "image" in record else [])
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise CalibrationError(f'line {number}: "images" must be a list of paths', where=str(path), fix="fix it")
        prompt = record["prompt"]
        if images and IMAGE_TOKEN not in prompt:
            prompt = IMAGE_TOKEN * len(images) + "\n" + prompt
        answer = record.get("answer")
        items.append(
            Item(
                id=str(record.get("id", number)), task="calibration", prompt=prompt,
                answer=answer if isinstance(answer, str) else None,
                images=tuple(path.parent / i for i in images), cut=bool(record.get("cut", len(images) == 1)),
            )
        )  # fmt: skip
    if not items:
        raise CalibrationError("the JSONL file holds no record", where=str(path), fix="add lines")
    return items


def text_only(item: Item) -> Item:
    """The item without its media: placeholders removed from the prompt, no images or video."""
    prompt = item.prompt.replace(IMAGE_TOKEN, "").replace(VIDEO_TOKEN, "").lstrip("\n")
    return replace(item, prompt=prompt, images=(), video=None)


def answer_text(item: Item) -> str | None:
    """The reference answer as text: a string, or the first of a list of answers (VQA's ten)."""
    if isinstance(item.answer, str):
        return item.answer
    if isinstance(item.answer, list | tuple) and item.answer and isinstance(item.answer[0], str):
        return item.answer[0]
    return None


def conversation_inputs(processor: Owl3Processor, item: Item) -> Inputs:
    """The item's prompt as the model sees it, then its answer and ``<|im_end|>`` when it has one."""
    from owl3.validate.levels import item_inputs, teacher_forced

    inputs = item_inputs(processor, item)
    answer = answer_text(item)
    if answer is None:
        return inputs
    end = processor.eos_token_ids[0]
    return teacher_forced(inputs, [*processor.tokenizer.encode(answer, add_special_tokens=False).ids, end])


def _count(counts: dict[str, int], reason: str) -> None:
    counts[reason] = counts.get(reason, 0) + 1
