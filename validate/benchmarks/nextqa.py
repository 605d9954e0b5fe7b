"""NExT-QA multiple choice in the official CSV format, 8 frames by the evaluation's 'middle' rule.

``root`` is the CSV (``video, frame_count, width, height, question, answer, qid, type, a0..a4``) or a
directory holding exactly one ``*.csv``. Videos are ``{video}.mp4`` in ``videos/`` (else ``NExTVideo/``,
else beside the CSV); when ``map_vid_vidorID.json`` sits beside the CSV (the raw release's nested folders)
the path is ``{map[video]}.mp4`` instead.

Prompt (spec §9), without cut::

    <|video|>\\nQuestion: {question}\\nOptions: A. {a0}\\nB. {a1}...\\nAnswer with the option’s letter ...

Unit = ``{video}_{qid}``, cluster = video, category = question type with TP merged into TN, and
``meta["group"]`` the type's first letter (C causal, T temporal, D descriptive).
"""

from __future__ import annotations

from pathlib import Path

from owl3.validate.benchmarks.common import (
    ANSWER_WITH_LETTER,
    LETTERS,
    DatasetError,
    find_file,
    first_dir,
    read_json,
    read_table,
    subset,
)
from owl3.validate.items import Item

NEXTQA_PROMPT = "<|video|>\nQuestion: {question}\nOptions: {options}\n" + ANSWER_WITH_LETTER
NEXTQA_FRAMES = 8
REQUIRED_COLUMNS = ("video", "question", "answer", "qid", "type", "a0", "a1")


def load_nextqa(root: Path, *, limit: int | None = None, seed: int = 0, task_name: str = "nextqa") -> list[Item]:
    """NExT-QA multiple-choice items; ``limit`` takes a subset stratified by question type."""
    path = find_file(Path(root), ["*.csv"], "NExT-QA CSV")
    rows = read_table(path, ",", REQUIRED_COLUMNS)
    option_columns = [f"a{i}" for i in range(len(LETTERS)) if f"a{i}" in rows[0]] if rows else []
    video_dir = first_dir(path.parent, ["videos", "NExTVideo"])
    mapping_file = path.parent / "map_vid_vidorID.json"
    mapping = read_json(mapping_file) if mapping_file.is_file() else {}
    if not isinstance(mapping, dict):
        raise DatasetError("the video id map is not an object", where=str(mapping_file), fix="use the official map")
    items = []
    for line, row in enumerate(rows, start=1):
        options = [row.get(column) or "" for column in option_columns]
        answer = _answer(row, len(options), line, path)
        video = row["video"]
        qtype = "TN" if row["type"] == "TP" else row["type"]
        items.append(
            Item(
                id=f"{video}_{row['qid']}",
                task=task_name,
                prompt=NEXTQA_PROMPT.format(question=row["question"], options=_options(options)),
                answer=LETTERS[answer],
                video=video_dir / f"{mapping.get(video, video)}.mp4",
                num_frames=NEXTQA_FRAMES,
                cut=False,
                cluster=f"video-{video}",
                category=qtype,
                meta={"group": qtype[:1], "type": row["type"], "qid": row["qid"], "video": video},
            )
        )
    return subset(items, limit, seed)


def _options(texts: list[str]) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, texts, strict=False))


def _answer(row: dict[str, str], count: int, line: int, path: Path) -> int:
    value = row.get("answer")
    if value is None or not value.strip().isdigit() or int(value) >= count:
        raise DatasetError(
            f"data row {line}: answer {value!r} is not an option index 0..{count - 1}",
            where=str(path),
            fix="use the official NExT-QA CSV",
        )
    return int(value)
