"""VQAv2 (val) in the official format: questions JSON, annotations JSON, COCO images.

Layout of ``root`` (any directory in this format works, e.g. synthetic data)::

    *questions*.json     {"data_subtype": "val2014", "questions": [{"image_id", "question", "question_id"}, ...]}
    *annotations*.json   {"annotations": [{"question_id", "image_id", "answers": [{"answer", ...} x10],
                                           "question_type", "answer_type"}, ...]}
    val2014/             COCO_val2014_%012d.jpg  (the folder named by data_subtype; else images/, else root)

Prompt (spec §9): ``"<|image|>{question} Answer the question using a single word or phrase."``, with cut.
Unit = question id, cluster = image id, category = answer type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from owl3.validate.benchmarks.common import (
    SHORT_ANSWER,
    DatasetError,
    find_file,
    first_dir,
    read_json,
    require_keys,
    require_list,
    subset,
)
from owl3.validate.items import Item

VQA_PROMPT = "<|image|>{question} " + SHORT_ANSWER


def load_vqav2(root: Path, *, limit: int | None = None, seed: int = 0, task_name: str = "vqav2") -> list[Item]:
    """VQAv2 items with their 10 human answers; ``limit`` takes a stratified subset (``subset``)."""
    root = Path(root)
    questions_file = find_file(root, ["*questions*.json"], "VQAv2 questions file")
    annotations_file = find_file(root, ["*annotations*.json"], "VQAv2 annotations file")
    questions_doc = require_keys(read_json(questions_file), ["questions"], questions_file, "the questions file")
    annotations = _annotations_by_id(annotations_file)
    data_subtype = str(questions_doc.get("data_subtype", "val2014"))
    image_dir = first_dir(questions_file.parent, [data_subtype, "images"])
    items = []
    for i, record in enumerate(require_list(questions_doc["questions"], questions_file, "'questions'")):
        question = require_keys(record, ["image_id", "question", "question_id"], questions_file, f"question {i}")
        if not isinstance(question["image_id"], int):
            raise DatasetError(
                f"question {i} has image_id {question['image_id']!r}, not an integer",
                where=str(questions_file),
                fix="use the official questions file (COCO image ids are integers)",
            )
        annotation = annotations.get(str(question["question_id"]))
        if annotation is None:
            raise DatasetError(
                f"question {question['question_id']} has no annotation (a test split has none)",
                where=str(annotations_file),
                fix="use the val questions with their annotations file",
            )
        items.append(_item(question, annotation, image_dir, data_subtype, task_name))
    return subset(items, limit, seed)


def _annotations_by_id(path: Path) -> dict[str, dict[str, Any]]:
    document = require_keys(read_json(path), ["annotations"], path, "the annotations file")
    by_id = {}
    for i, record in enumerate(require_list(document["annotations"], path, "'annotations'")):
        annotation = require_keys(record, ["question_id", "answers"], path, f"annotation {i}")
        answers = require_list(annotation["answers"], path, f"annotation {i} 'answers'")
        if not answers:
            raise DatasetError(f"annotation {i} has no answers", where=str(path), fix="use the official annotations")
        for j, answer in enumerate(answers):
            require_keys(answer, ["answer"], path, f"annotation {i} answer {j}")
        by_id[str(annotation["question_id"])] = annotation
    return by_id


def _item(question: dict[str, Any], annotation: dict[str, Any], image_dir: Path, subtype: str, task: str) -> Item:
    image_id = question["image_id"]
    return Item(
        id=str(question["question_id"]),
        task=task,
        prompt=VQA_PROMPT.format(question=question["question"]),
        answer=[str(a["answer"]) for a in annotation["answers"]],
        images=(image_dir / f"COCO_{subtype}_{image_id:012d}.jpg",),
        cut=True,
        cluster=f"image-{image_id}",
        category=str(annotation.get("answer_type", "")),
        meta={"question_type": annotation.get("question_type", ""), "image_id": image_id},
    )
