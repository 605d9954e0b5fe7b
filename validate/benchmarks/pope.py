"""POPE in the official format: one JSON-lines file per split, COCO val2014 images.

Layout of ``root``: for each split (random, popular, adversarial) one file whose name contains the split
and ends in ``.json`` or ``.jsonl`` (``coco_pope_random.json`` as released, ``ImageQA_POPE_random.jsonl``
as in the mPLUG-Owl3 evaluation), each line ``{"question_id", "image", "text", "label"}``; images in
``val2014/`` (else ``images/``, else ``root``). Splits without a file are skipped; none at all is an error.

Prompt (spec §9): ``"<|image|>{text} Answer the question using a single word or phrase."``, with cut.
Item id = ``{split}-{question_id}`` (ids restart per split), cluster = image, category = split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from owl3.validate.benchmarks.common import (
    SHORT_ANSWER,
    DatasetError,
    first_dir,
    read_jsonl,
    require_keys,
    subset,
)
from owl3.validate.items import Item

POPE_PROMPT = "<|image|>{question} " + SHORT_ANSWER
POPE_SPLITS = ("random", "popular", "adversarial")


def load_pope(root: Path, *, limit: int | None = None, seed: int = 0, task_name: str = "pope") -> list[Item]:
    """POPE items of every split found; ``limit`` takes a subset stratified by split."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("the POPE directory does not exist", where=str(root), fix="pass the POPE directory")
    files = {split: path for split in POPE_SPLITS if (path := _split_file(root, split)) is not None}
    if not files:
        raise DatasetError(
            f"no POPE split file found (looked for *{{{','.join(POPE_SPLITS)}}}*.json / .jsonl)",
            where=str(root),
            fix="put coco_pope_random.json (and popular, adversarial) there",
        )
    image_dir = first_dir(root, ["val2014", "images"])
    items = []
    for split, path in files.items():
        for i, record in enumerate(read_jsonl(path)):
            entry = require_keys(record, ["question_id", "image", "text", "label"], path, f"record {i}")
            items.append(_item(entry, split, image_dir, path, task_name))
    return subset(items, limit, seed)


def _split_file(root: Path, split: str) -> Path | None:
    found = sorted(p for p in root.iterdir() if p.is_file() and split in p.name.lower() and _is_json(p))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise DatasetError(f"several files for split {split!r}: {names}", where=str(root), fix="keep one per split")
    return found[0] if found else None


def _is_json(path: Path) -> bool:
    return path.suffix.lower() in (".json", ".jsonl")


def _item(entry: dict[str, Any], split: str, image_dir: Path, path: Path, task: str) -> Item:
    label = str(entry["label"]).strip().lower()
    if label not in ("yes", "no"):
        raise DatasetError(
            f"question {entry['question_id']} has label {entry['label']!r}, not yes/no",
            where=str(path),
            fix="use the official POPE file",
        )
    return Item(
        id=f"{split}-{entry['question_id']}",
        task=task,
        prompt=POPE_PROMPT.format(question=entry["text"]),
        answer=label,
        images=(image_dir / str(entry["image"]),),
        cut=True,
        cluster=f"image-{entry['image']}",
        category=split,
        meta={"question_id": entry["question_id"], "split": split},
    )
