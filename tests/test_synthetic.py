"""owl3.synthetic (scenes, questions, benchmark writers in the official formats) and the training script."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from owl3 import synthetic as syn
from owl3.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_demo_model.py"


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _script():
    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


# ---- generator --------------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not() -> None:
    def image(seed: int, index: int) -> bytes:
        return syn.jpeg_bytes(syn.random_scene(syn.item_rng(seed, 0, index)).render())

    assert [image(5, i) for i in range(8)] == [image(5, i) for i in range(8)]
    assert image(5, 0) != image(6, 0)
    assert image(5, 0) != image(5, 1)


def test_writers_are_deterministic(tmp_path: Path) -> None:
    for run in ("a", "b"):
        syn.write_vqa_benchmark(tmp_path / run / "vqa", 8)
        syn.write_mc_benchmark(tmp_path / run / "mc", 4)
        syn.write_distractor_benchmark(tmp_path / run / "distractor", 2, counts=(0, 3))
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")


def test_scenes_are_drawn_as_described() -> None:
    """Each shape's centre has its palette colour, shapes never overlap, and every size is visible."""
    for index in range(200):
        scene = syn.random_scene(syn.item_rng(7, 0, index))
        pixels = np.asarray(scene.render(), dtype=np.int32)
        assert 1 <= len(scene.shapes) <= 3
        assert len({s.colour for s in scene.shapes}) == len({(s.row, s.col) for s in scene.shapes}) == len(scene.shapes)
        for shape in scene.shapes:
            assert shape.half * 2 >= 0.15 * syn.IMAGE_SIZE  # at least 9.6 px across
            cell = syn.IMAGE_SIZE / syn.GRID  # each shape lies inside its grid cell
            assert shape.col * cell <= shape.cx - shape.half and shape.cx + shape.half <= (shape.col + 1) * cell
            assert shape.row * cell <= shape.cy - shape.half and shape.cy + shape.half <= (shape.row + 1) * cell
            centre = pixels[round(shape.cy), round(shape.cx)]
            assert np.abs(centre - np.asarray(syn.COLOURS[shape.colour])).max() <= 40, (index, shape)
        for a in scene.shapes:
            for b in scene.shapes:
                if a is not b:
                    assert max(abs(a.cx - b.cx), abs(a.cy - b.cy)) > a.half + b.half


def _named(text: str) -> list[tuple[str, str]]:
    colours, shapes = "|".join(syn.COLOURS), "|".join(syn.SHAPES)
    return re.findall(rf"\b({colours}) ({shapes})\b", text)


def _check_answer(scene: syn.Scene, question: syn.Question) -> None:
    """Recompute the answer of ``question`` from the scene itself."""
    text, shapes = question.text, scene.shapes
    if question.category == "colour":
        kind = next(k for k in syn.SHAPES if f"the {k}?" in text)
        assert [s.colour for s in shapes if s.kind == kind] == [question.answer]
    elif question.category == "shape":
        colour = next(c for c in syn.COLOURS if f"the {c} object" in text)
        assert [s.kind for s in shapes if s.colour == colour] == [question.answer]
    elif question.category == "count":
        kind = next((k for k in syn.SHAPES if f"many {k}s" in text), None)
        assert question.answer == str(sum(1 for s in shapes if kind in (None, s.kind)))
    elif question.category == "relation":
        (c1, k1), (c2, k2) = _named(text)
        a = next(s for s in shapes if (s.colour, s.kind) == (c1, k1))
        b = next(s for s in shapes if (s.colour, s.kind) == (c2, k2))
        truth = {"left": a.col < b.col, "right": a.col > b.col, "above": a.row < b.row, "below": a.row > b.row}
        if question.answer in ("yes", "no"):
            asked = "left" if "left of" in text else "above"
            assert truth[asked] == (question.answer == "yes")
        else:
            assert truth[question.answer]
            assert not truth[{"left": "right", "right": "left", "above": "below", "below": "above"}[question.answer]]
    elif question.category == "describe":
        assert sorted(_named(question.answer)) == sorted((s.colour, s.kind) for s in shapes)
        assert str(len(shapes)) in question.answer or len(shapes) == 1
        for (colour, kind), where in zip(
            _named(question.answer), re.findall(r" at the (\w+ \w+)", question.answer), strict=True
        ):
            assert where == syn.quadrant(next(s for s in shapes if (s.colour, s.kind) == (colour, kind)))
    elif question.category == "where":
        ((colour, kind),) = _named(text)
        shape = next(s for s in shapes if (s.colour, s.kind) == (colour, kind))
        vertical, horizontal = question.answer.split()
        assert vertical == ("top" if shape.cy < syn.IMAGE_SIZE / 2 else "bottom")
        assert horizontal == ("left" if shape.cx < syn.IMAGE_SIZE / 2 else "right")
    if question.options:
        assert question.answer in question.options and len(set(question.options)) == len(question.options)


def test_every_question_type_is_answerable_from_its_scene() -> None:
    seen = set()
    for index in range(300):
        rng = syn.item_rng(11, 0, index)
        scene = syn.random_scene(rng)
        for category in (*syn.SINGLE_IMAGE_CATEGORIES, "describe", "where"):
            if syn.askable(scene, category):
                for multiple_choice in (False, True):
                    question = syn.ask(rng, scene, category, multiple_choice=multiple_choice)
                    _check_answer(scene, question)
                    seen.add((category, question.answer in ("yes", "no")))
            else:
                with pytest.raises(UsageError):
                    syn.ask(rng, scene, category)
        scenes, question = syn.which_image(rng, 2 + index % 3)
        ((colour, kind),) = _named(question.text)
        holders = [i + 1 for i, s in enumerate(scenes) if s.has(colour, kind)]
        assert [f"Image {i}" for i in holders] == [question.answer]
    assert {c for c, _ in seen} == {*syn.SINGLE_IMAGE_CATEGORIES, "describe", "where"} and ("relation", True) in seen


def test_prompts_follow_the_official_templates() -> None:
    assert syn.vqa_prompt("What colour is the circle?") == (
        "<|image|>What colour is the circle? Answer the question using a single word or phrase."
    )
    assert syn.mmbench_prompt("Q?", ["red", "blue"], "") == (
        "<|image|>Context: N/A\nQuestion: Q?\nOptions: A. red\nB. blue\n"
        "Answer with the option\u2019s letter from the given choices directly."
    )
    assert syn.distractor_prompt(2, syn.name_image("What shape is the red object?", 2)) == (
        "Image 1: <|image|>\nImage 2: <|image|>\nIn Image 2, what shape is the red object?"
        " Answer the question using a single word or phrase."
    )


# ---- writers: the official layouts --------------------------------------------------------------------------


def _jpeg(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.size == (syn.IMAGE_SIZE, syn.IMAGE_SIZE)
    return image


def test_vqa_benchmark_has_the_vqav2_layout(tmp_path: Path) -> None:
    root = syn.write_vqa_benchmark(tmp_path, 12)
    questions = json.loads((root / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    annotations = json.loads((root / "v2_mscoco_val2014_annotations.json").read_text())
    assert questions["task_type"] == "Open-Ended" and questions["data_subtype"] == "val2014"
    assert len(questions["questions"]) == len(annotations["annotations"]) == 12
    by_id = {a["question_id"]: a for a in annotations["annotations"]}
    for q in questions["questions"]:
        assert set(q) == {"image_id", "question", "question_id"}
        ann = by_id[q["question_id"]]
        assert ann["image_id"] == q["image_id"] and ann["question_type"] in syn.SINGLE_IMAGE_CATEGORIES
        assert [a["answer_id"] for a in ann["answers"]] == list(range(1, 11))
        assert {a["answer"] for a in ann["answers"]} == {ann["multiple_choice_answer"]}
        _jpeg((root / "val2014" / f"COCO_val2014_{q['image_id']:012d}.jpg").read_bytes())
    assert {a["question_type"] for a in annotations["annotations"]} == set(syn.SINGLE_IMAGE_CATEGORIES)


def test_mc_benchmark_is_an_mmbench_tsv_with_circular_variants(tmp_path: Path) -> None:
    path = syn.write_mc_benchmark(tmp_path, 8)
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert list(rows[0]) == [
        "index",
        "question",
        "hint",
        "A",
        "B",
        "C",
        "D",
        "answer",
        "category",
        "l2-category",
        "image",
    ]
    groups: dict[int, list[dict]] = {}
    for row in rows:
        groups.setdefault(int(row["index"]) % 1_000_000, []).append(row)
    assert sorted(groups) == list(range(8))
    for base, variants in groups.items():
        options = [[r[k] for k in "ABCD" if r[k]] for r in variants]
        assert len(variants) == len(options[0]) >= 2
        assert sorted(int(r["index"]) for r in variants) == [base + k * 1_000_000 for k in range(len(variants))]
        assert len({r["question"] for r in variants}) == len({r["image"] for r in variants}) == 1
        assert len({r[r["answer"]] for r in variants}) == 1  # the same option text is right in every rotation
        assert len({tuple(o) for o in options}) == len(variants)  # every rotation differs
        _jpeg(base64.b64decode(variants[0]["image"]))


def test_distractor_benchmark_names_one_image_among_n(tmp_path: Path) -> None:
    counts = (0, 1, 4, 32)
    root = syn.write_distractor_benchmark(tmp_path, 3, counts=counts)
    meta = json.loads((root / "distractor_meta.json").read_text())
    questions = json.loads((root / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    assert meta["counts"] == list(counts) and meta["cut"] is False and len(questions) == 3 * len(counts)
    seen_counts = set()
    for q, m in zip(questions, meta["questions"], strict=True):
        n, k, ids = q["num_distractors"], q["target_position"], q["image_ids"]
        assert m == {"question_id": q["question_id"], "num_distractors": n, "target_position": k, "image_ids": ids}
        assert len(ids) == n + 1 == len(set(ids)) and ids[k - 1] == q["image_id"]
        assert q["question"].startswith(f"In Image {k}, ")
        for image_id in ids:
            _jpeg((root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg").read_bytes())
        seen_counts.add(n)
    assert seen_counts == set(counts)


def test_the_official_loaders_and_scorers_read_the_synthetic_benchmarks(tmp_path: Path) -> None:
    """The VQAv2 and MMBench loaders of owl3.validate build exactly our prompts; the true answers score 1."""
    benchmarks = pytest.importorskip("owl3.validate.benchmarks")
    syn.write_vqa_benchmark(tmp_path / "vqa", 8)
    items, task = benchmarks.load_benchmark("vqav2", tmp_path / "vqa")
    questions = json.loads((tmp_path / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    assert sorted(i.prompt for i in items) == sorted(syn.vqa_prompt(q["question"]) for q in questions["questions"])
    assert all(i.cut and Path(i.images[0]).is_file() for i in items)
    assert all(task.score(i, i.answer[0]) == 1.0 and task.score(i, "purple") == 0.0 for i in items)
    path = syn.write_mc_benchmark(tmp_path / "mc", 6)
    items, task = benchmarks.load_benchmark("mmbench", path)
    with path.open(encoding="utf-8", newline="") as handle:
        rows = {row["index"]: row for row in csv.DictReader(handle, delimiter="\t")}
    assert len(items) == len(rows) and len({i.unit for i in items}) == 6
    for item in items:
        row = rows[item.id]
        options = [row[k] for k in "ABCD" if row[k]]
        assert item.prompt == syn.mmbench_prompt(row["question"], options, row["hint"])
        assert task.score(item, item.answer) == 1.0
    syn.write_distractor_benchmark(tmp_path / "distractor", 2, counts=(0, 2))
    items, _ = benchmarks.load_benchmark("vqav2", tmp_path / "distractor")  # a plain VQAv2 reader sees the target
    assert len(items) == 4 and all(Path(i.images[0]).is_file() for i in items)


def test_heldout_seeds_are_disjoint_from_training_seeds(tmp_path: Path) -> None:
    assert syn.TRAIN_SEED < syn.HELDOUT_SEED_MIN <= min(syn.VQA_SEED, syn.MC_SEED, syn.DISTRACTOR_SEED)
    for writer in (syn.write_vqa_benchmark, syn.write_mc_benchmark, syn.write_distractor_benchmark):
        with pytest.raises(UsageError, match="training range"):
            writer(tmp_path / writer.__name__, 2, syn.TRAIN_SEED)
    script = _script()
    assert script.Settings().seed == syn.TRAIN_SEED
    pool = [
        (scene, syn.jpeg_bytes(scene.render()))
        for scene in (syn.random_scene(syn.item_rng(0, 12, i)) for i in range(40))
    ]
    training = {
        image
        for step in range(3)
        for sample in script.training_batch(script.Settings(), step, pool)
        for image in sample.images
    }
    root = syn.write_vqa_benchmark(tmp_path / "vqa", 40)
    heldout = {p.read_bytes() for p in (root / "val2014").iterdir()}
    assert training and heldout and not training & heldout


# ---- the training script ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_script_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "3", "--vision-steps", "2", "--eval-limit", "4", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step     3/3" in result.stdout and "synthetic-vqa" in result.stdout
    from owl3 import load_model

    model = load_model(out)
    assert model.config.vision.image_size == 64
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", "TRAINING.md"}
    assert "| synthetic-mc |" in (out / "TRAINING.md").read_text(encoding="utf-8")


def test_patch_labels_follow_each_shape_into_the_cut_views() -> None:
    """The vision stage's labels: a shape in grid cell (row, col) labels one patch of the global view and
    2 x 2 patches of the crop that holds it (a 2 x 2 cut doubles every cell); all other patches are empty."""
    script = _script()
    scene = syn.Scene(64, 64, (230, 230, 230), (syn.Shape("square", "blue", 1, 2, 40.0, 24.0, 5.0, (35, 75, 215)),))
    content, rows, cols = script.patch_labels(scene, 2, 2)
    label = 1 + list(syn.COLOURS).index("blue") * 3 + syn.SHAPES.index("square")
    assert content.shape == (5, 16)
    assert np.flatnonzero(content[4]).tolist() == [1 * 4 + 2] and content[4, 6] == label
    crop = content[1].reshape(4, 4)  # row 0 of crops, column 1: grid rows 0-1, columns 2-3
    assert np.argwhere(crop).tolist() == [[2, 0], [2, 1], [3, 0], [3, 1]] and (crop[crop > 0] == label).all()
    assert not content[[0, 2, 3]].any()
    assert rows[4].tolist() == [r for r in range(4) for _ in range(4)] and cols[4].tolist() == [0, 1, 2, 3] * 4
    assert (rows[:4] == -100).all() and (cols[:4] == -100).all()
