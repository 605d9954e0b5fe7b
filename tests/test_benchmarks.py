"""Benchmark loaders and official scoring (spec §9): prompts, normalisation, extraction, subsets, errors."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from owl3.errors import InvalidInputError, UsageError
from owl3.validate.benchmarks import (
    BENCHMARKS,
    DatasetError,
    MMBenchTask,
    MVBenchTask,
    NextQATask,
    PopeTask,
    VQAAccuracyTask,
    id_list_hash,
    load_benchmark,
    load_mmbench,
    load_mvbench,
    load_nextqa,
    load_pope,
    load_vqav2,
    register_benchmark,
    subset,
)
from owl3.validate.benchmarks.mvbench import mvbench_frame_indices
from owl3.validate.benchmarks.scoring import (
    evalai_process,
    mmbench_extract,
    mvbench_check_answer,
    nextqa_extract,
    normalize_vqa_answer,
    pope_label,
    pope_metrics,
    process_punctuation,
    vqa_accuracy,
)
from owl3.validate.items import Item
from tests.benchmark_fixtures import (
    mmbench_rows,
    write_mmbench,
    write_mvbench,
    write_nextqa,
    write_pope,
    write_vqav2,
)

LETTER_LINE = "Answer with the option’s letter from the given choices directly."
SHORT_LINE = "Answer the question using a single word or phrase."


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("benchmarks")
    return {
        "vqav2": write_vqav2(base / "vqav2"),
        "mmbench": write_mmbench(base / "mmbench"),
        "pope": write_pope(base / "pope"),
        "nextqa": write_nextqa(base / "nextqa"),
        "mvbench": write_mvbench(base / "mvbench"),
    }


# ---- official prompts, flags and ids ------------------------------------------------------------------------


def test_vqav2_items(datasets: dict[str, Path]) -> None:
    items = load_vqav2(datasets["vqav2"])
    first = items[0]
    assert first.prompt == f"<|image|>What is thing 0? {SHORT_LINE}"
    assert first.cut and first.task == "vqav2" and first.id == "1000000"
    assert first.images == (datasets["vqav2"] / "val2014" / "COCO_val2014_000000001000.jpg",)
    assert len(first.answer) == 10 and first.category == "yes/no" and first.cluster == "image-1000"
    assert len({i.cluster for i in items}) == 3 and len(items) == 6


def test_mmbench_items_and_circular_units(datasets: dict[str, Path]) -> None:
    items = load_mmbench(datasets["mmbench"])
    assert len(items) == 2 + 3 + 4 + 2  # question q has 2 + q % 3 options, one variant per option
    first = items[0]
    assert first.prompt == (
        "<|image|>Context: A hint for 0.\nQuestion: Which option fits image 0?\n"
        f"Options: A. option a of 0\nB. option b of 0\n{LETTER_LINE}"
    )
    no_hint = next(i for i in items if i.id == "1")
    assert no_hint.prompt.startswith("<|image|>Context: N/A\nQuestion: Which option fits image 1?\nOptions: A.")
    assert no_hint.prompt.count("\n") == 5  # three options
    assert isinstance(first.images[0], bytes) and first.images[0].startswith(b"\x89PNG")
    units = defaultdict(list)
    for item in items:
        units[item.unit].append(item)
    assert sorted(units) == ["0", "1", "2", "3"]  # grouped by (image, question): index % 1e6
    assert [len(units[u]) for u in ("0", "1", "2", "3")] == [2, 3, 4, 2]
    assert units["2"][0].category == "coarse_perception" and all(i.cut for i in items)


def test_pope_items(datasets: dict[str, Path]) -> None:
    items = load_pope(datasets["pope"])
    assert len(items) == 12 and {i.category for i in items} == {"random", "popular", "adversarial"}
    first = next(i for i in items if i.id == "random-1")
    assert first.prompt == f"<|image|>Is there a thing 0 in the image? {SHORT_LINE}"
    assert first.answer == "yes" and first.cut and first.cluster == "image-COCO_val2014_000000002000.jpg"


def test_nextqa_items(datasets: dict[str, Path]) -> None:
    items = load_nextqa(datasets["nextqa"])
    first = items[0]
    options = "\n".join(f"{'ABCDE'[i]}. answer {i} to 0" for i in range(5))
    assert first.prompt == f"<|video|>\nQuestion: why did thing 0 happen\nOptions: {options}\n{LETTER_LINE}"
    assert first.video == datasets["nextqa"] / "videos" / "4000000000.mp4"
    assert (first.num_frames, first.cut, first.images, first.answer) == (8, False, (), "A")
    assert first.id == "4000000000_0" and first.meta["group"] == "C"
    assert "TP" not in {i.category for i in items} and Counter(i.category for i in items)["TN"] == 2


def test_mvbench_items(datasets: dict[str, Path]) -> None:
    items = {i.id: i for i in load_mvbench(datasets["mvbench"])}
    item = items["action_antonym-1"]
    options = "A. choice 0 for 1\nB. choice 1 for 1\nC. choice 2 for 1"
    assert item.prompt == f"<|video|>\nQuestion: What happens in clip 1?\nOptions:\n{options}\n{LETTER_LINE}"
    assert item.answer == "B" and item.meta["gt_answer"] == "B. choice 1 for 1"
    assert item.video == datasets["mvbench"] / "video" / "ssv2_video" / "action_antonym_1.mp4"
    assert (item.num_frames, item.cut, item.category) == (16, False, "action_antonym")
    assert items["my_custom_task-0"].video == datasets["mvbench"] / "video" / "my_custom_task_0.mp4"


def test_mvbench_frame_folder_task_lists_official_frames(datasets: dict[str, Path]) -> None:
    item = next(i for i in load_mvbench(datasets["mvbench"]) if i.category == "episodic_reasoning")
    assert (
        item.prompt == "<|image|>" * 16 + f"\nQuestion: Who speaks first?\nOptions:\nA. Ross\nB. Rachel\n{LETTER_LINE}"
    )
    assert item.video is None and len(item.images) == 16 and all(Path(p).is_file() for p in item.images)
    assert [Path(p).name for p in item.images[:6]] == [f"{i:05d}.jpg" for i in (3, 5, 6, 7, 9, 11)]
    assert mvbench_frame_indices(None, 3, 30, first_idx=1, num_segments=4) == [4, 11, 18, 26]


def test_video_items_decode_with_the_evaluation_rule(datasets: dict[str, Path]) -> None:
    from owl3.media import load_video_frames

    item = load_nextqa(datasets["nextqa"])[0]
    frames = load_video_frames(item.video, sampling="middle", num_frames=item.num_frames)
    brightness = [float(np.asarray(f.convert("L")).mean()) for f in frames]
    expected = [0, 1, 3, 4, 6, 7, 9, 10]  # middle rule, 8 of 12 frames; frame i has brightness 16 i
    assert all(abs(b - 16 * i) < 8 for b, i in zip(brightness, expected, strict=True))


def test_loaders_do_not_touch_media(datasets: dict[str, Path], tmp_path: Path) -> None:
    root = write_vqav2(tmp_path / "vqa")
    missing = root / "val2014" / "COCO_val2014_000000001001.jpg"
    missing.unlink()
    items = load_vqav2(root)
    assert missing in {p for i in items for p in i.images}  # reported later, per item, by the validator


# ---- VQA accuracy ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("dont", "don't"),
        ("A cat\n", "cat"),
        ("yes, it is", "yes it is"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("hello-world", "hello world"),
        ("(a) red", "red"),
        ("Ten Apples!", "10 apples"),
    ],
)
def test_vqa_normalisation(raw: str, normalised: str) -> None:
    assert normalize_vqa_answer(raw) == normalised


def test_period_stripping_stops_after_32_as_in_the_reference() -> None:
    assert process_punctuation("." * 40) == "." * 8


def test_evalai_processor() -> None:
    assert evalai_process("Two dogs, yes?") == "2 dogs yes"
    assert evalai_process("What's THAT") == "what 's that"
    assert evalai_process("  The Dog\n") == "dog"


@pytest.mark.parametrize(("matches", "accuracy"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(matches: int, accuracy: float) -> None:
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("Cat.", answers) == pytest.approx(accuracy)


def test_gt_answers_are_only_processed_when_they_disagree() -> None:
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0  # the prediction becomes "t shirt", the GT does not
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 9 + ["shirt"]) == pytest.approx(1.0)
    assert vqa_accuracy("two", ["two"] * 10) == 0.0  # GT answers never get digits: the official data has "2"


def test_vqav2_task_scores_after_the_evalai_processor(datasets: dict[str, Path]) -> None:
    item = load_vqav2(datasets["vqav2"])[0]  # answers: "2" x6, "two" x2, "3", "many"
    task = BENCHMARKS["vqav2"].task
    assert task.binary is False and task.extract(item, "Two.") == "2"
    assert [task.score(item, p) for p in ("Two", "3", "many", "five")] == pytest.approx([1.0, 0.3, 0.3, 0.0])
    okvqa = VQAAccuracyTask("okvqa", str.strip)
    assert okvqa.name == "okvqa" and okvqa.score(item, " 2 ") == pytest.approx(1.0)


# ---- multiple choice and yes/no ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "letter"),
    [
        ("B", "B"),
        ("The answer is C.", "C"),
        ("(D) something", "D"),
        ("A: yes", "A"),
        ("A. apple or B. pear", "B"),  # letters are tried from E down to A
        ("green pear", "B"),  # option text inside the output
        ("It is a red apple indeed", "A"),
        ("pear", "B"),  # output inside an option text
        ("purple", "X"),
        ("", "A"),  # an empty output is in every option text: the first one wins
    ],
)
def test_mmbench_extraction(output: str, letter: str) -> None:
    assert mmbench_extract(output, ["red apple", "green pear", "blue plum"]) == letter


def test_mmbench_text_fallback_sees_options_a_to_d_only() -> None:
    assert mmbench_extract("kiwi", ["a", "b", "c", "d", "kiwi"]) == "X"


def test_mmbench_circular_unit_fails_with_one_wrong_variant(datasets: dict[str, Path]) -> None:
    items, task = load_benchmark("mmbench", datasets["mmbench"])
    wrong = {"1000001"}  # the second variant of question 1
    scores = defaultdict(list)
    for item in items:
        prediction = "Z" if item.id in wrong else f"{item.answer}."
        scores[item.unit].append(task.score(item, prediction))
    assert {unit: task.unit_score(s) for unit, s in scores.items()} == {"0": 1.0, "1": 0.0, "2": 1.0, "3": 1.0}
    assert isinstance(task, MMBenchTask) and task.binary


def test_mmbench_groups_by_image_and_question_and_resolves_image_references(tmp_path: Path) -> None:
    rows = mmbench_rows(2, circular=False)
    twin = dict(rows[0], index="7", answer="B", A=rows[0]["B"], B=rows[0]["A"])
    twin["image"] = "0"  # VLMEvalKit stores a repeated image as the index of the row holding it
    items = load_mmbench(write_mmbench(tmp_path, [*rows, twin]))
    assert [i.unit for i in items] == ["0", "1", "0"] and items[2].images == items[0].images


def test_pope_labels_and_metrics() -> None:
    outputs = ("Yes, there is.", "No.", " no", "yes.", "I think so", "Yes it is")
    assert [pope_label(p) for p in outputs] == [1, 0, 0, 1, 2, 2]
    metrics = pope_metrics([1, 1, 0, 0, 2], [1, 0, 0, 1, 1])
    assert (metrics["tp"], metrics["fp"], metrics["tn"], metrics["fn"], metrics["other"]) == (1, 1, 1, 1, 1)
    assert metrics["accuracy"] == metrics["precision"] == metrics["recall"] == metrics["f1"] == 0.5
    assert metrics["yes_proportion"] == pytest.approx(0.4)


def test_pope_task(datasets: dict[str, Path]) -> None:
    items, task = load_benchmark("pope", datasets["pope"])
    assert isinstance(task, PopeTask)
    yes_item = next(i for i in items if i.answer == "yes")
    assert task.score(yes_item, "Yes.") == 1.0 and task.score(yes_item, "Maybe") == 0.0
    assert task.extract(yes_item, "Maybe") == "other"
    assert task.metrics(items, ["yes"] * len(items))["recall"] == 1.0


def test_nextqa_scoring(datasets: dict[str, Path]) -> None:
    items, task = load_benchmark("nextqa", datasets["nextqa"])
    item = items[1]  # answer B
    assert isinstance(task, NextQATask) and item.answer == "B"
    assert [task.score(item, p) for p in ("B", "b) two", " B.", "", "A", "Because")] == [1, 1, 1, 0, 0, 1]
    assert nextqa_extract("") == "x" and nextqa_extract("  C") == "c"


@pytest.mark.parametrize(
    ("prediction", "correct"),
    [
        ("B", True),
        ("b.", True),
        ("B. anything", True),
        ("(B) dog", False),  # "(b)" is not inside "b."
        ("I think the dog running", True),  # gt text inside the rest of the output
        ("A", False),
        ("A. the dog running fast", True),
        ("", True),  # the reference passes an empty output ("" is in every string)
    ],
)
def test_mvbench_check_answer(prediction: str, correct: bool) -> None:
    assert mvbench_check_answer(prediction, "B. Dog running.") is correct


def test_mvbench_task(datasets: dict[str, Path]) -> None:
    items, task = load_benchmark("mvbench", datasets["mvbench"])
    item = next(i for i in items if i.id == "action_antonym-2")
    assert isinstance(task, MVBenchTask) and item.answer == "C"
    assert task.score(item, "C.") == 1.0 and task.score(item, "A") == 0.0 and task.extract(item, "C. x") == "c"


# ---- subsets and hashes -------------------------------------------------------------------------------------


def _items(counts: dict[str, int]) -> list[Item]:
    return [
        Item(id=f"{c}{k}", task="t", prompt="p", answer="A", category=c) for c, n in counts.items() for k in range(n)
    ]


def test_subset_is_stratified_deterministic_and_ordered() -> None:
    items = _items({"a": 60, "b": 30, "c": 9, "d": 1})
    chosen = subset(items, 20, seed=0)
    assert Counter(i.category for i in chosen) == {"a": 12, "b": 6, "c": 1, "d": 1}
    assert chosen == subset(list(reversed(items)), 20, seed=0)[::-1]  # independent of file order
    assert chosen == subset(items, 20, seed=0) and chosen != subset(items, 20, seed=1)
    positions = [items.index(i) for i in chosen]
    assert positions == sorted(positions)
    assert subset(items, None, 0) == items and subset(items, 500, 0) == items


def test_subset_proportions_with_remainders_and_too_few_slots() -> None:
    items = _items({"a": 5, "b": 3, "c": 2})
    assert Counter(i.category for i in subset(items, 5, 3)) == {"a": 3, "b": 1, "c": 1}  # tie: first name
    assert Counter(i.category for i in subset(items, 2, 3)) == {"a": 1, "b": 1}  # the largest categories
    with pytest.raises(DatasetError):
        subset(items, 0, 0)


def test_subset_keeps_whole_circular_units(datasets: dict[str, Path]) -> None:
    items = load_mmbench(datasets["mmbench"], limit=2, seed=5)
    units = Counter(i.unit for i in items)
    assert len(units) == 2 and all(n == {"0": 2, "1": 3, "2": 4, "3": 2}[u] for u, n in units.items())


def test_id_list_hash_is_the_sha256_of_sorted_unit_ids(datasets: dict[str, Path]) -> None:
    items = load_mmbench(datasets["mmbench"])
    expected = hashlib.sha256(b"0\n1\n2\n3").hexdigest()
    assert id_list_hash(items) == id_list_hash(reversed(items)) == expected


# ---- registry and malformed files -------------------------------------------------------------------------


def test_registry() -> None:
    assert set(BENCHMARKS) >= {"vqav2", "mmbench", "pope", "nextqa", "mvbench"}
    for name, (loader, task) in BENCHMARKS.items():
        assert callable(loader) and task.name == name
    with pytest.raises(UsageError, match="already registered"):
        register_benchmark("vqav2", load_vqav2, VQAAccuracyTask())
    with pytest.raises(UsageError, match="unknown benchmark"):
        load_benchmark("nope", Path("."))


def _error(call: Callable[..., object], *args: object) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        call(*args)
    assert isinstance(info.value, InvalidInputError) and info.value.exit_code == 3
    return info.value


def test_malformed_vqav2_files(tmp_path: Path) -> None:
    root = write_vqav2(tmp_path / "a")
    questions = root / "v2_OpenEnded_mscoco_val2014_questions.json"
    questions.write_text(questions.read_text()[:50])
    assert _error(load_vqav2, root).where == str(questions)
    root = write_vqav2(tmp_path / "b")
    annotations = root / "v2_mscoco_val2014_annotations.json"
    document = json.loads(annotations.read_text())
    del document["annotations"][1]["answers"]
    annotations.write_text(json.dumps(document))
    error = _error(load_vqav2, root)
    assert error.where == str(annotations) and "answers" in error.problem and "annotation 1" in error.problem
    assert "no VQAv2 questions file" in _error(load_vqav2, tmp_path / "b" / "val2014").problem


def test_malformed_mmbench_tsv(tmp_path: Path) -> None:
    columns = ["index", "question", "hint", "A", "B", "C", "D", "category", "l2-category", "image"]  # no answer
    root = write_mmbench(tmp_path / "a", mmbench_rows(2), columns=columns)
    error = _error(load_mmbench, root)
    assert error.where == str(root / "mmbench_dev_en.tsv") and "answer" in error.problem
    rows = mmbench_rows(2)
    rows[1]["answer"] = "D"
    assert "data row 2" in _error(load_mmbench, write_mmbench(tmp_path / "b", rows)).problem


def test_malformed_pope_nextqa_mvbench(tmp_path: Path) -> None:
    root = write_pope(tmp_path / "pope", splits=("random",))
    (root / "coco_pope_random.json").write_text('{"question_id": 1, "image": "x.jpg"\n')
    error = _error(load_pope, root)
    assert error.where == str(root / "coco_pope_random.json") and "line 1" in error.problem
    root = write_nextqa(tmp_path / "nextqa", num_videos=1)
    csv_file = root / "val.csv"
    csv_file.write_text(csv_file.read_text().replace(",type,", ",kind,"))
    error = _error(load_nextqa, root)
    assert error.where == str(csv_file) and "type" in error.problem
    root = write_mvbench(tmp_path / "mvbench", per_task=1, frame_task=False)
    task_file = root / "json" / "my_custom_task.json"
    task_file.write_text(json.dumps([{"video": "v.mp4", "question": "q", "candidates": ["x"], "answer": "y"}]))
    error = _error(load_mvbench, root)
    assert error.where == str(task_file) and "'y'" in error.problem


def test_empty_benchmark_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no POPE split file"):
        load_benchmark("pope", tmp_path)
