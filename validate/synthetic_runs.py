"""The synthetic benchmark as validation runs: written once in the official formats, then read back by the
same loaders and scored by the same scorers as real data (VQAv2 format, MMBench format with circular
variants, and the distractor variant with N irrelevant images, N from 0 to 32)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from owl3.synthetic import (
    DISTRACTOR_META_FILE,
    VQA_IMAGE_DIR,
    VQA_QUESTIONS_FILE,
    distractor_prompt,
    write_distractor_benchmark,
    write_mc_benchmark,
    write_vqa_benchmark,
)
from owl3.validate.benchmarks import MMBenchTask, VQAAccuracyTask, load_mmbench, load_vqav2, subset
from owl3.validate.items import Item
from owl3.validate.validator import BenchmarkRun

SIZES = {"vqa": 200, "mc": 100, "distractors": 12}  # questions written; distractors: base questions
DISTRACTOR_QUESTIONS = 4  # base questions asked at every N (7 values of N: 28 items of up to 33 images)
SHORT_ANSWER = 8  # max new tokens: every synthetic answer is a word or two


def ensure_synthetic_data(directory: Path) -> Path:
    """Write the three synthetic sets under ``directory`` unless they are already complete there."""
    directory = Path(directory)
    if (directory / "complete").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.staging-", dir=directory.parent))
    try:
        write_vqa_benchmark(staging / "vqa", SIZES["vqa"])
        write_mc_benchmark(staging / "mc", SIZES["mc"])
        write_distractor_benchmark(staging / "distractors", SIZES["distractors"])
        (staging / "complete").write_text("synthetic benchmark written by owl3-export\n", encoding="utf-8")
        if directory.exists():
            shutil.rmtree(directory)
        os.rename(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def load_distractors(root: Path, questions_limit: int | None = None) -> list[Item]:
    """The distractor set: each question asked among N irrelevant images (``meta["distractors"] = N``);
    ``questions_limit`` keeps the first base questions, each with every N."""
    questions = json.loads((root / VQA_QUESTIONS_FILE).read_text(encoding="utf-8"))["questions"]
    meta = {
        str(q["question_id"]): q
        for q in json.loads((root / DISTRACTOR_META_FILE).read_text(encoding="utf-8"))["questions"]
    }
    answers = {item.id: item for item in load_vqav2(root, task_name="synthetic-distractors")}
    items = []
    for question in questions:
        if questions_limit is not None and question["question_id"] // 100 >= questions_limit:
            continue  # question_id = base question * 100 + index of N
        qid = str(question["question_id"])
        info = meta[qid]
        images = tuple(root / VQA_IMAGE_DIR / f"COCO_val2014_{i:012d}.jpg" for i in info["image_ids"])
        items.append(
            Item(
                id=qid,
                task="synthetic-distractors",
                prompt=distractor_prompt(len(images), question["question"]),
                answer=answers[qid].answer,
                images=images,
                cut=False,
                cluster=f"image-{question['image_id']}",
                category=f"N={info['num_distractors']}",
                meta={"distractors": info["num_distractors"], "target_position": info["target_position"]},
            )
        )
    return items


def synthetic_runs(
    directory: Path, *, limit: int | None = None, seed: int = 0, distractor_questions: int | None = DISTRACTOR_QUESTIONS
) -> list[BenchmarkRun]:
    """VQA-style, MMBench-style and distractor runs over the synthetic data in ``directory``; ``limit``
    scoring units per stratified subset, ``distractor_questions`` base distractor questions (each asked
    at every N; None: all of them)."""
    root = ensure_synthetic_data(directory)
    vqa = subset(load_vqav2(root / "vqa", task_name="synthetic-vqa"), limit, seed)
    mc = subset(load_mmbench(root / "mc", task_name="synthetic-mc"), limit, seed)
    return [
        BenchmarkRun("synthetic-vqa", vqa, VQAAccuracyTask("synthetic-vqa"), SHORT_ANSWER, "VQA accuracy"),
        BenchmarkRun("synthetic-mc", mc, MMBenchTask("synthetic-mc"), SHORT_ANSWER, "accuracy (circular)"),
        BenchmarkRun(
            "synthetic-distractors",
            load_distractors(root / "distractors", distractor_questions),
            VQAAccuracyTask("synthetic-distractors"),
            SHORT_ANSWER,
            "VQA accuracy",
        ),
    ]
