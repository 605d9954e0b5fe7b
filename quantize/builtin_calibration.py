"""The built-in calibration set: generated shape pictures (``owl3.synthetic``) asked in the official formats.

Item ``i`` draws from its own random stream (``item_rng(seed, CALIBRATION_STREAM, i)``), a stream neither
training nor the held-out benchmarks use, and its kind cycles through ``MIX``: single-image VQA questions
(cut, as VQAv2), multiple choice (MMBench prompt, cut), two to four images without cut ("Image k:"
prompts, as the multi-image and distractor tasks), descriptions (long answers: many tokens that see the image),
and text-only turns (plain decoding must stay calibrated too). Pictures are JPEG bytes, as the benchmarks
store them, so their sha256 identifies them in the manifest.
"""

from __future__ import annotations

import numpy as np

from owl3.quantize.calibration import CALIBRATION_STREAM
from owl3.synthetic import (
    LETTERS,
    SINGLE_IMAGE_CATEGORIES,
    ask,
    distractor_prompt,
    item_rng,
    jpeg_bytes,
    mmbench_prompt,
    name_image,
    random_scene,
    scene_for,
    vqa_prompt,
    which_image,
)
from owl3.validate.items import Item

MIX = ("vqa", "vqa", "vqa", "mc", "multi", "describe", "vqa", "multi", "mc", "text")
TEXT_TURNS = (
    ("Describe a red circle next to a blue square.", "There are 2 shapes: a red circle and a blue square."),
    ("What colours can a shape have?", "red, green, blue or yellow"),
    ("Name three shapes.", "circle, square and triangle"),
    ("How many sides does a square have?", "4"),
)


def builtin_items(count: int, seed: int, image_size: int) -> list[Item]:
    """``count`` calibration items (prompt and answer), pictures ``image_size`` pixels wide."""
    return [_item(i, item_rng(seed, CALIBRATION_STREAM, i), MIX[i % len(MIX)], image_size, seed) for i in range(count)]


def _item(index: int, rng: np.random.Generator, kind: str, size: int, seed: int) -> Item:
    ident = f"{seed}:{index}"
    if kind == "text":
        prompt, answer = TEXT_TURNS[int(rng.integers(len(TEXT_TURNS)))]
        return Item(id=ident, task="builtin", prompt=prompt, answer=answer)
    if kind == "multi":
        return _multi(ident, rng, size)
    category = "describe" if kind == "describe" else SINGLE_IMAGE_CATEGORIES[int(rng.integers(4))]
    scene = scene_for(rng, category, size)
    question = ask(rng, scene, category, multiple_choice=kind == "mc")
    picture = (jpeg_bytes(scene.render()),)
    if kind == "mc":
        letter = LETTERS[question.options.index(question.answer)]
        prompt = mmbench_prompt(question.text, question.options)
        return Item(id=ident, task="builtin", prompt=prompt, answer=letter, images=picture)
    prompt = vqa_prompt(question.text) if kind == "vqa" else f"<|image|>\n{question.text}"
    return Item(id=ident, task="builtin", prompt=prompt, answer=question.answer, images=picture)


def _multi(ident: str, rng: np.random.Generator, size: int) -> Item:
    """Two to four images without cut: "which image shows ..." or a question about one named image."""
    count = int(rng.integers(2, 5))
    if rng.random() < 0.5:
        scenes, question = which_image(rng, count, size)
        text, answer = question.text, question.answer
    else:
        scenes = [random_scene(rng, size) for _ in range(count)]
        target = int(rng.integers(count))
        category = "count" if len(scenes[target].shapes) < 2 else str(rng.choice(["count", "relation"]))
        asked = ask(rng, scenes[target], category)
        text, answer = name_image(asked.text, target + 1), asked.answer
    pictures = tuple(jpeg_bytes(scene.render()) for scene in scenes)
    prompt = distractor_prompt(count, text)
    return Item(id=ident, task="builtin", prompt=prompt, answer=answer, images=pictures, cut=False)
