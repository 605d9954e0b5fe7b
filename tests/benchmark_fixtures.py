"""Tiny benchmark datasets in each official format, written into a directory for loader and scoring tests.

Every writer returns the dataset root and uses real media: JPEG/PNG images made with PIL, base64 PNGs in the
MMBench TSV (with circular variants), short MPEG-4 videos written with PyAV. Contents are deterministic.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

VQA_ANSWER_TYPES = ("yes/no", "number", "other")
MMBENCH_CATEGORIES = ("attribute_reasoning", "coarse_perception", "coarse_perception", "logic_reasoning")
NEXTQA_TYPES = ("CW", "CH", "TN", "TP", "TC", "DC", "DL", "DO")


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (40, 30)) -> bytes:
    """A small noise image encoded as ``fmt``."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_vqav2(root: Path, *, num_images: int = 3, questions_per_image: int = 2) -> Path:
    """val2014 questions + annotations JSON (10 answers each) and ``val2014/COCO_val2014_%012d.jpg``."""
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    questions, annotations = [], []
    for n in range(num_images):
        image_id = 1000 + n
        (root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg").write_bytes(image_bytes(n))
        for k in range(questions_per_image):
            qid = image_id * 1000 + k
            answer_type = VQA_ANSWER_TYPES[(n * questions_per_image + k) % len(VQA_ANSWER_TYPES)]
            questions.append({"image_id": image_id, "question": f"What is thing {k}?", "question_id": qid})
            answers = ["2"] * 6 + ["two"] * 2 + ["3", "many"]
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "question_type": "what is",
                    "answer_type": answer_type,
                    "multiple_choice_answer": "2",
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)
                    ],
                }
            )
    _write_json(
        root / "v2_OpenEnded_mscoco_val2014_questions.json", {"data_subtype": "val2014", "questions": questions}
    )
    _write_json(root / "v2_mscoco_val2014_annotations.json", {"annotations": annotations})
    return root


def mmbench_rows(num_questions: int = 4, *, circular: bool = True) -> list[dict[str, str]]:
    """MMBench rows: question q has 2 + q % 3 options (A.. up to D), rotated once per option when circular."""
    rows = []
    for q in range(num_questions):
        options = [f"option {chr(97 + i)} of {q}" for i in range(2 + q % 3)]
        image = base64.b64encode(image_bytes(100 + q, "PNG")).decode("ascii")
        answer_text = options[q % len(options)]
        for shift in range(len(options) if circular else 1):
            rotated = options[shift:] + options[:shift]
            row = {
                "index": str(q + shift * 1_000_000),
                "question": f"Which option fits image {q}?",
                "hint": "nan" if q % 2 else f"A hint for {q}.",
                "answer": "ABCDE"[rotated.index(answer_text)],
                "category": f"l3-{q}",
                "l2-category": MMBENCH_CATEGORIES[q % len(MMBENCH_CATEGORIES)],
                "image": image,
            }
            row.update({"ABCD"[i]: (rotated[i] if i < len(rotated) else "") for i in range(4)})
            rows.append(row)
    return rows


MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image")


def write_mmbench(
    root: Path,
    rows: list[dict[str, str]] | None = None,
    *,
    columns: Sequence[str] = MMBENCH_COLUMNS,
    name: str = "mmbench_dev_en.tsv",
) -> Path:
    """The rows (default ``mmbench_rows()``) as the official TSV with ``columns``; returns the directory."""
    rows = mmbench_rows() if rows is None else rows
    root.mkdir(parents=True, exist_ok=True)
    with (root / name).open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return root


def write_pope(
    root: Path, *, per_split: int = 4, splits: tuple[str, ...] = ("random", "popular", "adversarial")
) -> Path:
    """``coco_pope_{split}.json`` (JSON lines) and the COCO images they name."""
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    for s, split in enumerate(splits):
        lines = []
        for k in range(per_split):
            image = f"COCO_val2014_{2000 + k:012d}.jpg"
            (root / "val2014" / image).write_bytes(image_bytes(200 + k))
            label = "yes" if (k + s) % 2 == 0 else "no"
            record = {
                "question_id": k + 1,
                "image": image,
                "text": f"Is there a thing {k} in the image?",
                "label": label,
            }
            lines.append(json.dumps(record))
        (root / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_video(path: Path, *, num_frames: int = 12, size: tuple[int, int] = (32, 32), fps: int = 4) -> Path:
    """A short MPEG-4 video whose frame i has brightness 16 * i (so sampled frames can be told apart)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(num_frames):
            pixels = np.full((size[1], size[0], 3), min(255, 16 * i), np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_nextqa(root: Path, *, num_videos: int = 2) -> Path:
    """``val.csv`` in the official columns (one question per type, spread over the videos) and ``videos/``."""
    root.mkdir(parents=True, exist_ok=True)
    videos = [str(4_000_000_000 + v) for v in range(num_videos)]
    for video in videos:
        write_video(root / "videos" / f"{video}.mp4")
    columns = ["video", "frame_count", "width", "height", "question", "answer", "qid", "type"]
    columns += [f"a{i}" for i in range(5)]
    with (root / "val.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for q, qtype in enumerate(NEXTQA_TYPES):
            options = [f"answer {i} to {q}" for i in range(5)]
            writer.writerow(
                [videos[q % num_videos], 12, 32, 32, f"why did thing {q} happen", q % 5, q, qtype, *options]
            )
    return root


MVBENCH_TASKS = {"action_antonym": "ssv2_video", "my_custom_task": ""}  # task -> media folder under video/


def write_mvbench(root: Path, *, per_task: int = 3, frame_task: bool = True) -> Path:
    """``json/{task}.json`` for an official task (with its media prefix) and a custom one, their videos,
    and (``frame_task``) an episodic_reasoning entry whose media is a folder of 30 JPEG frames."""
    for task, prefix in MVBENCH_TASKS.items():
        entries = []
        for k in range(per_task):
            video = f"{task}_{k}.mp4"
            write_video(root / "video" / prefix / video)
            candidates = [f"choice {i} for {k}" for i in range(3)]
            entries.append(
                {
                    "video": video,
                    "question": f"What happens in clip {k}?",
                    "candidates": candidates,
                    "answer": candidates[k % 3],
                }
            )
        _write_json(root / "json" / f"{task}.json", entries)
    if frame_task:
        folder = root / "video" / "tvqa" / "frames_fps3_hq" / "clip_0"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(1, 31):
            (folder / f"{i:05d}.jpg").write_bytes(image_bytes(300 + i, size=(16, 16)))
        entry = {
            "video": "clip_0",
            "question": "Who speaks first?",
            "candidates": ["Ross", "Rachel"],
            "answer": "Rachel",
            "start": 1.0,
            "end": 9.0,
        }
        _write_json(root / "json" / "episodic_reasoning.json", [entry])
    return root


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
