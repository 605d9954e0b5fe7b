"""MVBench in the official format: one JSON list per task, videos (or frame folders), 16 frames.

Layout of ``root`` (as released): ``json/{task}.json`` (else ``*.json`` in ``root``), each a list of
``{"video", "question", "candidates", "answer"}`` (some tasks add ``start``/``end`` in seconds), and media
under ``video/`` (else ``videos/``) at the task's official prefix (``star/Charades_v1_480/`` for
action_sequence, ...) when that folder exists, else directly under it.

Prompt (spec §9), without cut; the Question/Options block is rstripped before the last line::

    <|video|>\\nQuestion: {question}\\nOptions:\\nA. {c0}\\nB. {c1}...\\nAnswer with the option’s letter ...

The answer letter is the candidate's position; ``meta["gt_answer"]`` is ``"{letter}. {answer}"``, what
``check_answer`` compares with. Frames: the evaluation's 'middle' rule over the whole video. Frame-folder
tasks (episodic_reasoning) list their 16 frames by MVBench's own index rule (3 fps, files ``%05d.jpg``) and
ask with ``"<|image|>" * 16`` as the official code does (the same text once ``<|video|>`` is expanded); a
missing folder falls back to the folder as a video source, so the validator reports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from owl3.validate.benchmarks.common import (
    ANSWER_WITH_LETTER,
    LETTERS,
    DatasetError,
    first_dir,
    read_json,
    require_keys,
    require_list,
    subset,
)
from owl3.validate.items import Item

MVBENCH_FRAMES = 16
FRAME_FOLDER_FPS = 3
# task -> media folder under video/ (the evaluation's data_list); frame-folder tasks are listed apart.
TASK_PREFIX = {
    "action_sequence": "star/Charades_v1_480",
    "action_prediction": "star/Charades_v1_480",
    "action_antonym": "ssv2_video",
    "fine_grained_action": "Moments_in_Time_Raw/videos",
    "unexpected_action": "FunQA_test/test",
    "object_existence": "clevrer/video_validation",
    "object_interaction": "star/Charades_v1_480",
    "object_shuffle": "perception/videos",
    "moving_direction": "clevrer/video_validation",
    "action_localization": "sta/sta_video",
    "scene_transition": "scene_qa/video",
    "action_count": "perception/videos",
    "moving_count": "clevrer/video_validation",
    "moving_attribute": "clevrer/video_validation",
    "state_change": "perception/videos",
    "fine_grained_pose": "nturgbd",
    "character_order": "perception/videos",
    "egocentric_navigation": "vlnqa",
    "episodic_reasoning": "tvqa/frames_fps3_hq",
    "counterfactual_inference": "clevrer/video_validation",
}
FRAME_FOLDER_TASKS = frozenset({"episodic_reasoning"})


def mvbench_question(question: str, candidates: list[str]) -> str:
    """The official Question/Options block, rstripped."""
    lines = [f"Question: {question}", "Options:"] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(candidates)]
    return ("\n".join(lines) + "\n").rstrip()


def load_mvbench(root: Path, *, limit: int | None = None, seed: int = 0, task_name: str = "mvbench") -> list[Item]:
    """MVBench items of every task file found; ``limit`` takes a subset stratified by task."""
    root = Path(root)
    json_dir = first_dir(root, ["json"])
    files = sorted(json_dir.glob("*.json")) if root.is_dir() else []
    if not files:
        raise DatasetError("no MVBench task file (json/*.json) found", where=str(root), fix="pass the MVBench folder")
    media_dir = first_dir(root, ["video", "videos"])
    items = []
    for path in files:
        records = require_list(read_json(path), path, "the task file")
        for i, record in enumerate(records):
            entry = require_keys(record, ["video", "question", "candidates", "answer"], path, f"entry {i}")
            items.append(_item(entry, path.stem, i, media_dir, path, task_name))
    return subset(items, limit, seed)


def _item(entry: dict[str, Any], category: str, number: int, media_dir: Path, path: Path, task: str) -> Item:
    candidates = require_list(entry["candidates"], path, f"entry {number} 'candidates'")
    matches = [i for i, c in enumerate(candidates) if c == entry["answer"]]
    if not matches or len(candidates) > len(LETTERS):
        raise DatasetError(
            f"entry {number}: the answer {entry['answer']!r} is not one of its {len(candidates)} candidates",
            where=str(path),
            fix="use the official MVBench task file",
        )
    letter = LETTERS[matches[-1]]  # the reference keeps the last equal candidate
    prefix = media_dir / TASK_PREFIX.get(category, "")
    media = (prefix if prefix.is_dir() else media_dir) / str(entry["video"])
    bound = (entry["start"], entry["end"]) if "start" in entry and "end" in entry else None
    question = mvbench_question(str(entry["question"]), [str(c) for c in candidates])
    frames = _frame_folder(media, bound) if category in FRAME_FOLDER_TASKS else None
    head = "<|image|>" * MVBENCH_FRAMES if frames else "<|video|>"
    return Item(
        id=f"{category}-{number}",
        task=task,
        prompt=f"{head}\n{question}\n{ANSWER_WITH_LETTER}",
        answer=letter,
        images=frames or (),
        video=None if frames else media,
        num_frames=None if frames else MVBENCH_FRAMES,
        cut=False,
        cluster=f"video-{media.relative_to(media_dir).as_posix()}",
        category=category,
        meta={"gt_answer": f"{letter}. {entry['answer']}", "bound": bound, "video": str(entry["video"])},
    )


def _frame_folder(folder: Path, bound: tuple[float, float] | None) -> tuple[Path, ...] | None:
    """The 16 frame files MVBench picks from a frame folder, or None when the folder cannot be listed."""
    try:
        count = sum(1 for _ in folder.iterdir())
    except OSError:
        return None
    if count == 0:
        return None
    indices = mvbench_frame_indices(bound, FRAME_FOLDER_FPS, count, first_idx=1, num_segments=MVBENCH_FRAMES)
    return tuple(folder / f"{i:05d}.jpg" for i in indices)


def mvbench_frame_indices(
    bound: tuple[float, float] | None, fps: float, max_frame: int, *, first_idx: int, num_segments: int
) -> list[int]:
    """MVBench ``get_index``: segment middles between ``bound`` (seconds; None = the whole clip)."""
    start, end = bound if bound else (-100000, 100000)
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    segment = (end_idx - start_idx) / num_segments
    return [int(start_idx + segment / 2 + round(segment * i)) for i in range(num_segments)]
