"""A seeded synthetic multi-image task for the packaged demo model, and writers in the official formats.

Torch-free (numpy + PIL). A *scene* is a plain light background with 1-3 shapes (circle, square,
triangle), each in a distinct colour of the palette (red, green, blue, yellow), each in its own cell of
a 4 x 4 grid (with a little jitter), so "left of" and "above" are never ambiguous. Questions need the
image to be answered, and every answer is one word or a short phrase:

====================  ==========================================  ===================
category              question (one of several phrasings)         answer
====================  ==========================================  ===================
``colour``            What colour is the circle?                  red
``shape``             What shape is the blue object?              square
``count``             How many shapes are there? / ...circles?    2 (digits, 0-3)
``relation``          Is the red circle to the left or to the     left / right /
                      right of the blue square? (or above/below,  above / below /
                      or a yes/no form)                           yes / no
``which_image``       Which image shows a red circle?             Image 2
                      (2-4 images, exactly one matches)
``describe``          Describe this image.                        There are 2 shapes: a
                                                                  red circle at the top
                                                                  left and ...
``where``             Where is the red circle?                    top left
====================  ==========================================  ===================

Randomness: every item draws from ``item_rng(seed, stream, index)``. Training uses seeds below
``HELDOUT_SEED_MIN``; the benchmark writers refuse them, so held-out items never share a random stream
with training items (defaults: ``VQA_SEED``, ``MC_SEED``, ``DISTRACTOR_SEED``).

Benchmarks (images are JPEG, quality 95):

- ``write_vqa_benchmark(root, n, seed)``: VQAv2 layout. ``root/v2_OpenEnded_mscoco_val2014_questions.json``
  (``{"questions": [{"image_id", "question", "question_id"}], ...}``), ``root/v2_mscoco_val2014_annotations.json``
  (``{"annotations": [{"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer",
  "answers": 10 x {"answer", "answer_confidence", "answer_id"}}]}``) and ``root/val2014/COCO_val2014_%012d.jpg``.
  One single-image question per image; ``question_type`` is the category. Official prompt, cut:
  ``"<|image|>{question} Answer the question using a single word or phrase."``.
- ``write_mc_benchmark(root, n, seed)``: MMBench layout, ``root/MMBench_DEV_EN.tsv`` with the columns
  index, question, hint, A, B, C, D, answer, category, l2-category, image (base64 JPEG). ``n`` questions,
  each written once per circular rotation of its options (2-4 rows): rotation r has index
  ``base + r * 1000000`` and the options shifted by r, so ``index % 1000000`` groups the variants. Unused
  option columns and absent hints are empty. Official MMBench prompt (``mmbench_prompt``), cut.
- ``write_distractor_benchmark(root, n, seed, counts)``: the VQAv2 layout above, plus per question the keys
  ``image_ids`` (every image of the prompt, in order), ``num_distractors`` (N) and ``target_position``
  (1-based k); ``image_id`` is the target image. Each of the ``n`` base questions about one target image
  is asked once for every N in ``counts`` (``question_id = base * 100 + index of N in counts``), among N
  irrelevant scenes drawn from a shared pool. The question names the image ("In Image 3, what colour is
  the circle?"); the prompt is ``distractor_prompt(N + 1, question)``, i.e. ``"Image 1: <|image|>\\n
  Image 2: <|image|>\\n...{question} Answer the question using a single word or phrase."``, without cut
  (as the official eval runs multi-image tasks). ``root/distractor_meta.json`` holds ``counts``, ``cut``
  (false), the ``prompt`` template and, per question id, N, k and the image list, so a validator can plot
  accuracy against N.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from owl3.errors import UsageError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 195, 20),
}
SHAPES = ("circle", "square", "triangle")
SINGLE_IMAGE_CATEGORIES = ("colour", "shape", "count", "relation")
CATEGORIES = (*SINGLE_IMAGE_CATEGORIES, "which_image", "describe", "where")  # the last two: free-form chat
IMAGE_SIZE = 64
GRID = 4  # cells per side (16 px at 64 px: one vision patch); one shape per cell

TRAIN_SEED = 0
HELDOUT_SEED_MIN = 1000
VQA_SEED, MC_SEED, DISTRACTOR_SEED = 1001, 1002, 1003
DISTRACTOR_COUNTS = (0, 1, 2, 4, 8, 16, 32)
JPEG_QUALITY = 95
CIRCULAR_OFFSET = 1_000_000

VQA_SUFFIX = " Answer the question using a single word or phrase."
MC_SUFFIX = "Answer with the option\u2019s letter from the given choices directly."
VQA_QUESTIONS_FILE = "v2_OpenEnded_mscoco_val2014_questions.json"
VQA_ANNOTATIONS_FILE = "v2_mscoco_val2014_annotations.json"
VQA_IMAGE_DIR = "val2014"
MC_FILE = "MMBench_DEV_EN.tsv"
MC_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image")
DISTRACTOR_META_FILE = "distractor_meta.json"
LETTERS = "ABCD"
_L2 = {
    "colour": "finegrained_perception (instance-level)",
    "shape": "finegrained_perception (instance-level)",
    "count": "finegrained_perception (cross-instance)",
    "relation": "relation_reasoning",
}
_HINT = "The picture shows simple shapes on a plain background."


# ---- scenes -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # one of COLOURS
    row: int  # grid cell, 0 = top
    col: int  # grid cell, 0 = left
    cx: float  # centre in pixels
    cy: float
    half: float  # half of the side / radius in pixels
    rgb: tuple[int, int, int]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]

    def render(self) -> Image.Image:
        """The RGB image, drawn 4x larger and box-filtered down (soft edges, deterministic)."""
        scale = 4
        big = Image.new("RGB", (self.width * scale, self.height * scale), self.background)
        draw = ImageDraw.Draw(big)
        for s in self.shapes:
            x0, y0 = (s.cx - s.half) * scale, (s.cy - s.half) * scale
            x1, y1 = (s.cx + s.half) * scale, (s.cy + s.half) * scale
            if s.kind == "circle":
                draw.ellipse((x0, y0, x1, y1), fill=s.rgb)
            elif s.kind == "square":
                draw.rectangle((x0, y0, x1, y1), fill=s.rgb)
            else:
                draw.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=s.rgb)
        return big.resize((self.width, self.height), Image.Resampling.BOX)

    def by_kind(self, kind: str) -> list[Shape]:
        return [s for s in self.shapes if s.kind == kind]

    def has(self, colour: str, kind: str) -> bool:
        return any(s.colour == colour and s.kind == kind for s in self.shapes)


def item_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The random stream of one item: independent per (seed, stream, index)."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


def cell_centre(row: int, col: int, width: int, height: int) -> tuple[float, float]:
    """The pixel centre of grid cell (row, col) in a ``width`` x ``height`` image."""
    return width * (2 * col + 1) / (2 * GRID), height * (2 * row + 1) / (2 * GRID)


def random_scene(
    rng: np.random.Generator, width: int = IMAGE_SIZE, height: int | None = None, num_shapes: int | None = None
) -> Scene:
    """1-3 shapes in distinct colours and distinct grid cells on a plain light background."""
    height = height or width
    count = int(rng.integers(1, 4)) if num_shapes is None else num_shapes
    colours = rng.permutation(list(COLOURS))[:count]
    cells = rng.permutation(GRID * GRID)[:count]
    side = min(width, height)
    shapes = []
    for colour, cell in zip(colours, cells, strict=True):
        row, col = divmod(int(cell), GRID)
        half = side * rng.uniform(0.075, 0.095)
        cx, cy = cell_centre(row, col, width, height)
        cx, cy = cx + side * rng.uniform(-0.02, 0.02), cy + side * rng.uniform(-0.02, 0.02)
        rgb = tuple(int(np.clip(v + rng.integers(-12, 13), 0, 255)) for v in COLOURS[str(colour)])
        kind = str(rng.choice(SHAPES))
        shapes.append(Shape(kind, str(colour), row, col, float(cx), float(cy), float(half), rgb))  # type: ignore[arg-type]
    grey = int(rng.integers(200, 251))
    background = tuple(int(np.clip(grey + rng.integers(-6, 7), 0, 255)) for _ in range(3))
    return Scene(width, height, background, tuple(shapes))  # type: ignore[arg-type]


def jpeg_bytes(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=0)  # 4:4:4: small shapes keep their colour
    return buffer.getvalue()


# ---- questions ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    category: str
    options: tuple[str, ...] = ()  # multiple-choice options (the answer among them), when asked as MC


def askable(scene: Scene, category: str) -> bool:
    """Whether ``ask`` can ask ``category`` about ``scene`` (a unique shape kind; two shapes for relations)."""
    if category == "colour":
        return any(len(scene.by_kind(k)) == 1 for k in SHAPES)
    if category == "relation":
        return len(scene.shapes) >= 2
    return category in ("shape", "count", "describe", "where")


def ask(rng: np.random.Generator, scene: Scene, category: str, *, multiple_choice: bool = False) -> Question:
    """A question of ``category`` about ``scene`` and its answer; ``multiple_choice`` adds shuffled options."""
    if not askable(scene, category):
        raise UsageError(f"cannot ask a {category} question about this scene", where="synthetic.ask")
    if category == "colour":
        kind = str(rng.choice([k for k in SHAPES if len(scene.by_kind(k)) == 1]))
        template = _pick(rng, ("What colour is the {}?", "What color is the {}?", "Which colour is the {}?"))
        answer, options = scene.by_kind(kind)[0].colour, list(COLOURS)
        return _question(rng, template.format(kind), answer, category, options, multiple_choice)
    if category == "shape":
        shape = scene.shapes[int(rng.integers(len(scene.shapes)))]
        template = _pick(rng, ("What shape is the {} object?", "What is the shape of the {} object?"))
        return _question(rng, template.format(shape.colour), shape.kind, category, list(SHAPES), multiple_choice)
    if category == "count":
        if rng.random() < 0.5:
            text = _pick(rng, ("How many shapes are there?", "How many objects are in the image?"))
            return _question(rng, text, str(len(scene.shapes)), category, ["1", "2", "3", "4"], multiple_choice)
        kind = str(rng.choice(SHAPES))
        answer = str(len(scene.by_kind(kind)))
        return _question(rng, f"How many {kind}s are there?", answer, category, ["0", "1", "2", "3"], multiple_choice)
    if category == "relation":
        return _relation(rng, scene, multiple_choice)
    if category == "describe":
        return Question(_pick(rng, ("Describe this image.", "Describe the image.")), describe(scene), category)
    if category == "where":
        shape = scene.shapes[int(rng.integers(len(scene.shapes)))]
        return Question(f"Where is the {shape.name}?", quadrant(shape), category)
    raise UsageError(f"unknown category {category!r}", where="synthetic.ask", fix=f"use one of {CATEGORIES}")


def _relation(rng: np.random.Generator, scene: Scene, multiple_choice: bool) -> Question:
    first, second = (scene.shapes[int(i)] for i in rng.permutation(len(scene.shapes))[:2])
    horizontal = first.col != second.col and (first.row == second.row or rng.random() < 0.5)
    if horizontal:
        text = f"Is the {first.name} to the left or to the right of the {second.name}?"
        answer, options, yes_no = ("left" if first.col < second.col else "right"), ["left", "right"], "left of"
        truth = first.col < second.col
    else:
        text = f"Is the {first.name} above or below the {second.name}?"
        answer, options, yes_no = ("above" if first.row < second.row else "below"), ["above", "below"], "above"
        truth = first.row < second.row
    if not multiple_choice and rng.random() < 0.3:
        text = f"Is the {first.name} {yes_no} the {second.name}?"
        answer = "yes" if truth else "no"
    return _question(rng, text, answer, "relation", options, multiple_choice)


def _question(
    rng: np.random.Generator, text: str, answer: str, category: str, options: list[str], multiple_choice: bool
) -> Question:
    chosen = tuple(str(o) for o in rng.permutation(options)) if multiple_choice else ()
    return Question(text, answer, category, chosen)


def _pick(rng: np.random.Generator, choices: Sequence[str]) -> str:
    return choices[int(rng.integers(len(choices)))]


def quadrant(shape: Shape) -> str:
    """Where a shape sits: "top left", "top right", "bottom left" or "bottom right" (exact on the 4 x 4 grid)."""
    return f"{'top' if shape.row < GRID / 2 else 'bottom'} {'left' if shape.col < GRID / 2 else 'right'}"


def describe(scene: Scene) -> str:
    """A short description, shapes read left to right, then top to bottom, each with its quadrant."""
    names = [f"a {s.name} at the {quadrant(s)}" for s in sorted(scene.shapes, key=lambda s: (s.col, s.row))]
    if len(names) == 1:
        return f"There is {names[0]}."
    listed = ", ".join(names[:-1]) + " and " + names[-1]
    return f"There are {len(names)} shapes: {listed}."


def which_image(rng: np.random.Generator, num_images: int, width: int = IMAGE_SIZE) -> tuple[list[Scene], Question]:
    """``num_images`` scenes of which exactly one shows the asked colour and shape; answer "Image k"."""
    scenes = [random_scene(rng, width) for _ in range(num_images)]
    target = int(rng.integers(num_images))
    shape = scenes[target].shapes[int(rng.integers(len(scenes[target].shapes)))]
    for i in range(num_images):
        while i != target and scenes[i].has(shape.colour, shape.kind):
            scenes[i] = random_scene(rng, width)
    text = _pick(rng, ("Which image shows a {}?", "Which image contains a {}?")).format(shape.name)
    return scenes, Question(text, f"Image {target + 1}", "which_image")


def scene_for(rng: np.random.Generator, category: str, width: int = IMAGE_SIZE) -> Scene:
    """A random scene about which ``category`` can be asked."""
    while True:
        scene = random_scene(rng, width)
        if askable(scene, category):
            return scene


# ---- prompts (the official templates, spec §9) ----------------------------------------------------------


def vqa_prompt(question: str) -> str:
    return f"<|image|>{question}{VQA_SUFFIX}"


def mmbench_prompt(question: str, options: Sequence[str], hint: str = "") -> str:
    lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"<|image|>Context: {hint or 'N/A'}\nQuestion: {question}\nOptions: {lines}\n{MC_SUFFIX}"


def image_list_prompt(num_images: int) -> str:
    """``"Image 1: <|image|>\\nImage 2: <|image|>\\n"``...: the multi-image prefix (no cut)."""
    return "".join(f"Image {i + 1}: <|image|>\n" for i in range(num_images))


def distractor_prompt(num_images: int, question: str) -> str:
    return f"{image_list_prompt(num_images)}{question}{VQA_SUFFIX}"


def name_image(question: str, position: int) -> str:
    """``"What colour is the circle?"`` -> ``"In Image 3, what colour is the circle?"``."""
    return f"In Image {position}, {question[0].lower()}{question[1:]}"


# ---- writers ------------------------------------------------------------------------------------------


def check_heldout_seed(seed: int) -> None:
    if seed < HELDOUT_SEED_MIN:
        raise UsageError(
            f"benchmark seed {seed} is in the training range (< {HELDOUT_SEED_MIN})",
            where="synthetic benchmark",
            fix=f"use a held-out seed >= {HELDOUT_SEED_MIN} (defaults {VQA_SEED}, {MC_SEED}, {DISTRACTOR_SEED})",
        )


def vqa_items(n: int, seed: int) -> Iterator[tuple[Scene, Question]]:
    """The single-image held-out questions of ``write_vqa_benchmark``, categories in turn."""
    for i in range(n):
        rng = item_rng(seed, 1, i)
        category = SINGLE_IMAGE_CATEGORIES[i % len(SINGLE_IMAGE_CATEGORIES)]
        scene = scene_for(rng, category)
        yield scene, ask(rng, scene, category)


def write_vqa_benchmark(root: str | Path, n: int = 400, seed: int = VQA_SEED) -> Path:
    """VQAv2-format benchmark of ``n`` questions (layout in the module docstring); returns ``root``."""
    check_heldout_seed(seed)
    root = Path(root)
    records = []
    for i, (scene, question) in enumerate(vqa_items(n, seed)):
        image_id = 900_000 + i
        _write_image(root, image_id, jpeg_bytes(scene.render()))
        records.append((image_id * 1000, image_id, question, {}))
    return _write_vqa(root, records)


def _write_image(root: Path, image_id: int, data: bytes) -> None:
    (root / VQA_IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    (root / VQA_IMAGE_DIR / f"COCO_val2014_{image_id:012d}.jpg").write_bytes(data)


def _write_vqa(root: Path, records: list[tuple[int, int, Question, dict]]) -> Path:
    """records: (question_id, image_id, question, extra question keys) -> the two VQAv2 JSON files."""
    questions, annotations = [], []
    for question_id, image_id, question, extra in records:
        questions.append({"image_id": image_id, "question": question.text, "question_id": question_id, **extra})
        answers = [{"answer": question.answer, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]
        annotations.append(
            {
                "question_id": question_id,
                "image_id": image_id,
                "question_type": question.category,
                "answer_type": _answer_type(question.answer),
                "multiple_choice_answer": question.answer,
                "answers": answers,
            }
        )
    info = {"description": "owl3 synthetic shapes benchmark (held-out)", "version": "1.0"}
    common = {"info": info, "license": {"name": "CC0"}, "data_type": "mscoco", "data_subtype": "val2014"}
    _write_json(root / VQA_QUESTIONS_FILE, {**common, "task_type": "Open-Ended", "questions": questions})
    _write_json(root / VQA_ANNOTATIONS_FILE, {**common, "annotations": annotations})
    return root


def _answer_type(answer: str) -> str:
    return "yes/no" if answer in ("yes", "no") else "number" if answer.isdigit() else "other"


def mc_items(n: int, seed: int) -> Iterator[tuple[Scene, Question, str]]:
    """The held-out multiple-choice questions of ``write_mc_benchmark``: (scene, question, hint)."""
    for i in range(n):
        rng = item_rng(seed, 2, i)
        category = SINGLE_IMAGE_CATEGORIES[i % len(SINGLE_IMAGE_CATEGORIES)]
        scene = scene_for(rng, category)
        question = ask(rng, scene, category, multiple_choice=True)
        yield scene, question, _HINT if rng.random() < 0.3 else ""


def write_mc_benchmark(root: str | Path, n: int = 200, seed: int = MC_SEED) -> Path:
    """MMBench-format TSV of ``n`` questions with every circular rotation; returns the TSV path."""
    check_heldout_seed(seed)
    path = Path(root) / MC_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(MC_COLUMNS)
        for i, (scene, question, hint) in enumerate(mc_items(n, seed)):
            image = base64.b64encode(jpeg_bytes(scene.render())).decode("ascii")
            for r in range(len(question.options)):
                options = question.options[r:] + question.options[:r]
                letter = LETTERS[options.index(question.answer)]
                cells = [*options, *[""] * (4 - len(options))]
                category, l2 = question.category, _L2[question.category]
                writer.writerow([i + r * CIRCULAR_OFFSET, question.text, hint, *cells, letter, category, l2, image])
    return path


def write_distractor_benchmark(
    root: str | Path, n: int = 60, seed: int = DISTRACTOR_SEED, counts: Sequence[int] = DISTRACTOR_COUNTS
) -> Path:
    """VQAv2-format distractor benchmark: ``n`` questions, each asked among N irrelevant images for every
    N in ``counts`` (layout in the module docstring); returns ``root``."""
    check_heldout_seed(seed)
    if not counts or len(counts) > 100 or min(counts) < 0:
        raise UsageError("counts must be 1 to 100 values >= 0", where="write_distractor_benchmark")
    root = Path(root)
    pool_rng = item_rng(seed, 4, 0)
    pool_ids = [20_000_000 + k for k in range(max(2 * max(counts), 1))]  # the distractor scenes
    for image_id in pool_ids:
        _write_image(root, image_id, jpeg_bytes(random_scene(pool_rng).render()))
    records, meta = [], []
    for i in range(n):
        rng = item_rng(seed, 3, i)
        category = SINGLE_IMAGE_CATEGORIES[i % len(SINGLE_IMAGE_CATEGORIES)]
        scene = scene_for(rng, category)
        question = ask(rng, scene, category)
        target_id = 10_000_000 + i
        _write_image(root, target_id, jpeg_bytes(scene.render()))
        for j, count in enumerate(counts):
            position = int(rng.integers(count + 1)) + 1
            chosen = [pool_ids[int(k)] for k in rng.choice(len(pool_ids), size=count, replace=False)]
            image_ids = [*chosen[: position - 1], target_id, *chosen[position - 1 :]]
            named = Question(name_image(question.text, position), question.answer, question.category)
            extra = {"image_ids": image_ids, "num_distractors": count, "target_position": position}
            records.append((i * 100 + j, target_id, named, extra))
            meta.append({"question_id": i * 100 + j, **extra})
    _write_vqa(root, records)
    template = "Image 1: <|image|>\n...Image {N+1}: <|image|>\n{question}" + VQA_SUFFIX
    _write_json(
        root / DISTRACTOR_META_FILE, {"counts": list(counts), "cut": False, "prompt": template, "questions": meta}
    )
    return root


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
