"""Train the packaged demo model (owl3/demo_model/) on the synthetic shapes task; run from the repo root.

    .venv/bin/python scripts/train_demo_model.py                   # train, evaluate, write owl3/demo_model/
    .venv/bin/python scripts/train_demo_model.py --eval-only DIR   # evaluate a saved model

The model is ``owl3.demo.demo_config()``: the exact Owl3 code (SigLIP, projector, Qwen2 with hyper layers)
at tiny sizes. Its byte-level BPE tokenizer is trained here on the synthetic corpus, with the Owl3 special
tokens. Training has two stages, both seeded, torch on 2 threads:

1. Vision: the SigLIP tower and projector learn what each 16 px patch shows (empty, or which colour and
   shape; on the global view also its grid row and column) through a linear probe that is then dropped.
   The scene generator knows every cell, so each view gives 16 labels: a dense signal that takes the
   vision tower from random to ~99% right per patch in about a minute, standing in for the pretrained
   SigLIP of the real model. The tower is then frozen.
2. Projector and language model (hyper layers included), on conversations built by ``Owl3Processor``
   exactly as at inference (ChatML, cut or not), loss on every assistant answer and its ``<|im_end|>``:
   several questions per image (official
   VQAv2 and MMBench prompts, free-form chat, descriptions), "Which image shows ...?" over 2-4 images,
   questions about a named image among 0-32 distractors (no cut, as the official eval runs multi-image
   tasks), and text-only option lists ("Which option is blue?") aimed at the option-letter lookup.

Held-out evaluation writes the synthetic benchmarks in their official formats (owl3.synthetic) and scores
the saved (fp16) model with the validator's own loaders, prompts and scorers (VQA accuracy, MMBench
circular), plus "which image" items scored by exact match.
"""

from __future__ import annotations

import argparse
import io
import math
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer

from owl3 import synthetic as syn
from owl3.checkpoint import random_state_dict, save_checkpoint
from owl3.demo import DEMO_VOCAB, demo_config
from owl3.model.owl3 import Owl3Model
from owl3.processor import CUT_ANCHORS, Owl3Processor, cut_image, cut_prompt, select_anchor
from owl3.tokenizer import build_demo_tokenizer, token_id, write_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "owl3" / "demo_model"
COLOURS = list(syn.COLOURS)
PATCH_CLASSES = 1 + len(COLOURS) * len(syn.SHAPES)  # empty, or (colour, shape)


@dataclass(frozen=True)
class Sample:
    turns: tuple[tuple[str, str], ...]  # (user message, answer); the first message holds the placeholders
    images: tuple[bytes, ...]  # JPEG files
    cut: bool
    category: str


@dataclass(frozen=True)
class Settings:
    seed: int = syn.TRAIN_SEED
    steps: int = 1000
    batch: int = 24  # conversations per step
    tokens_per_pass: int = 3000  # micro-batches (gradients accumulate over the step) hold at most this many
    lr: float = 1e-3
    init_std: float = 0.05
    warmup: int = 50
    weight_decay: float = 0.05
    vision_steps: int = 700
    vision_batch: int = 32  # scenes per vision step (each cut into 4 crops + the global view)
    vision_lr: float = 2e-3
    mix: tuple[float, float, float, float] = (0.6, 0.1, 0.2, 0.1)  # single, which, distractor, options
    log_every: int = 25


# ---- tokenizer ----------------------------------------------------------------------------------------


def corpus(seed: int) -> list[str]:
    """Prompt and answer texts of the task (training seed range), chat scaffolding and the cut prompts."""
    lines = ["system", "user", "assistant", "0123456789", syn.VQA_SUFFIX, syn.MC_SUFFIX]
    lines += [cut_prompt(r, c).replace("<|image|>", " ") for r, c in (*CUT_ANCHORS, (1, 1))]
    lines += [syn.image_list_prompt(40).replace("<|image|>", " ")]
    for i in range(3000):
        sample = conversation(np.random.default_rng([seed, 99, i]), None)
        lines += [text.replace("<|image|>", " ") for turn in sample.turns for text in turn]
    return lines


def build_tokenizer(seed: int, vocab_size: int = DEMO_VOCAB) -> Tokenizer:
    """Qwen2-style byte-level BPE (owl3.tokenizer.build_demo_tokenizer) trained on ``corpus(seed)``."""
    return build_demo_tokenizer(vocab_size, corpus=corpus(seed))


# ---- training conversations ---------------------------------------------------------------------------


def _jpeg(rng: np.random.Generator, scene: syn.Scene) -> bytes:
    return syn.jpeg_bytes(scene.render(), quality=int(rng.integers(80, 96)))


def _question(rng: np.random.Generator, scene: syn.Scene) -> syn.Question:
    category = str(rng.choice(syn.SINGLE_IMAGE_CATEGORIES))
    while not syn.askable(scene, category):
        category = str(rng.choice(syn.SINGLE_IMAGE_CATEGORIES))
    return syn.ask(rng, scene, category, multiple_choice=bool(rng.random() < 0.4))


def _turn(rng: np.random.Generator, scene: syn.Scene, image: str) -> tuple[str, str]:
    """One (message, answer) about ``scene``: official VQAv2 or MMBench prompt, or free-form chat;
    ``image`` ("<|image|>" or "") opens the message as in the official prompts."""
    if rng.random() < 0.25:
        question = syn.ask(rng, scene, str(rng.choice(["describe", "where"], p=[1 / 3, 2 / 3])))
        return (f"{image}\n{question.text}" if image else question.text), question.answer
    question = _question(rng, scene)
    if not question.options:
        return image + question.text + syn.VQA_SUFFIX, question.answer
    hint = "" if rng.random() < 0.7 else "The picture shows simple shapes on a plain background."
    prompt = syn.mmbench_prompt(question.text, question.options, hint).removeprefix("<|image|>")
    return image + prompt, syn.LETTERS[question.options.index(question.answer)]


def single_image(rng: np.random.Generator) -> Sample:
    """2-5 questions about one image (cut 70% of the time, as the official single-image eval)."""
    scene = syn.random_scene(rng)
    turns = [_turn(rng, scene, "<|image|>" if t == 0 else "") for t in range(int(rng.integers(2, 6)))]
    return Sample(tuple(turns), (_jpeg(rng, scene),), bool(rng.random() < 0.7), "single")


def which_image(rng: np.random.Generator) -> Sample:
    """ "Which image shows a ...?" over 2-4 images (no cut), then more of them and "In Image k, ..."."""
    scenes, question = syn.which_image(rng, int(rng.integers(2, 5)))
    turns = [(syn.image_list_prompt(len(scenes)) + question.text + syn.VQA_SUFFIX, question.answer)]
    unique = [
        (shape.name, i)
        for i, scene in enumerate(scenes)
        for shape in scene.shapes
        if sum(other.has(shape.colour, shape.kind) for other in scenes) == 1 and shape.name not in question.text
    ]
    for j in rng.permutation(len(unique))[: int(rng.integers(1, 4))]:
        name, i = unique[int(j)]
        text = str(rng.choice(["Which image shows a {}?", "Which image contains a {}?"])).format(name)
        turns.append((text + syn.VQA_SUFFIX, f"Image {i + 1}"))
    for _ in range(int(rng.integers(0, 3))):
        k = int(rng.integers(len(scenes)))
        q = syn.ask(rng, scenes[k], "shape" if rng.random() < 0.5 else "count")
        turns.append((syn.name_image(q.text, k + 1) + syn.VQA_SUFFIX, q.answer))
    return Sample(tuple(turns), tuple(_jpeg(rng, s) for s in scenes), False, "which")


def distractors(rng: np.random.Generator, pool: list[tuple[syn.Scene, bytes]] | None) -> Sample:
    """Questions about named images among 1-33 (no cut), the number log-uniform: small ones more often."""
    count = int(np.exp(rng.uniform(0, np.log(34))))
    if pool is None:  # text only (the tokenizer corpus)
        scenes = [syn.random_scene(rng) for _ in range(count)]
        images: tuple[bytes, ...] = ()
    else:
        chosen = [pool[int(i)] for i in rng.choice(len(pool), size=count - 1, replace=False)]
        scene = syn.random_scene(rng)
        at = int(rng.integers(count))
        scenes = [*(c[0] for c in chosen[:at]), scene, *(c[0] for c in chosen[at:])]
        images = (*(c[1] for c in chosen[:at]), _jpeg(rng, scene), *(c[1] for c in chosen[at:]))
    turns = []
    for t in range(int(rng.integers(2, 5))):
        k = int(rng.integers(count))
        question = _question(rng, scenes[k])
        text = syn.name_image(question.text, k + 1) + syn.VQA_SUFFIX
        answer = question.answer
        if question.options:
            hint = syn.name_image(question.text, k + 1)
            text = syn.mmbench_prompt(hint, question.options).removeprefix("<|image|>")
            answer = syn.LETTERS[question.options.index(question.answer)]
        turns.append((syn.image_list_prompt(count) + text if t == 0 else text, answer))
    return Sample(tuple(turns), images, False, "distractor")


def option_lookup(rng: np.random.Generator) -> Sample:
    """Text only: "Which option is blue?" over an MMBench option list, 2-4 times (the letter lookup)."""
    words = [COLOURS, list(syn.SHAPES), ["0", "1", "2", "3"], ["left", "right"], ["above", "below"], ["yes", "no"]]
    turns = []
    for _ in range(int(rng.integers(2, 7))):
        options = [str(o) for o in rng.permutation(words[int(rng.integers(len(words)))])]
        answer = options[int(rng.integers(len(options)))]
        text = str(rng.choice(["Which option is {}?", "Which option says {}?"])).format(answer)
        turns.append((syn.mmbench_prompt(text, options).removeprefix("<|image|>"), syn.LETTERS[options.index(answer)]))
    return Sample(tuple(turns), (), False, "options")


KINDS = ("single", "which", "distractor", "options")


def conversation(
    rng: np.random.Generator, pool: list[tuple[syn.Scene, bytes]] | None, kind: str | None = None
) -> Sample:
    kind = kind or str(rng.choice(KINDS))
    if kind == "single":
        return single_image(rng)
    if kind == "which":
        return which_image(rng)
    if kind == "distractor":
        return distractors(rng, pool)
    return option_lookup(rng)


def training_batch(settings: Settings, step: int, pool: list[tuple[syn.Scene, bytes]]) -> list[Sample]:
    rng = syn.item_rng(settings.seed, 10, step)
    kinds = rng.choice(KINDS, size=settings.batch, p=settings.mix)
    return [
        conversation(syn.item_rng(settings.seed, 11, step * 1000 + i), pool, str(kind)) for i, kind in enumerate(kinds)
    ]


def encode(processor: Owl3Processor, sample: Sample, with_answer: bool = True) -> dict[str, np.ndarray]:
    """Owl3Processor inputs of the conversation (the last answer left for generation); with the answer,
    its ids + ``<|im_end|>`` are appended and ``targets`` marks every assistant answer and its end token."""
    messages = []
    for user, reply in sample.turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    messages[-1] = {"role": "assistant", "content": ""}
    inputs = processor(messages, images=list(sample.images), cut_enable=sample.cut, return_tensors="np")
    ids, offset = inputs["input_ids"][0], inputs["media_offset"][0]
    if not with_answer:
        return {"ids": ids, "offset": offset, "pixels": inputs["pixel_values"]}
    tokenizer = processor.tokenizer
    answer = tokenizer.encode(sample.turns[-1][1] + "<|im_end|>", add_special_tokens=False).ids
    full = np.concatenate([ids, np.asarray(answer, dtype=np.int64)])
    offset = np.concatenate([offset, np.repeat(offset[-1:], len(answer), axis=0)])
    targets = np.full(len(full), -100, dtype=np.int64)
    header = tokenizer.encode("\n<|im_start|>assistant\n", add_special_tokens=False).ids
    end = token_id(tokenizer, "<|im_end|>")
    for start in range(len(full) - len(header) + 1):
        if full[start : start + len(header)].tolist() == header:
            first = start + len(header)
            last = first + int(np.argmax(full[first:] == end))  # the answer's <|im_end|>
            targets[first - 1 : last] = full[first : last + 1]  # position t predicts token t + 1
    return {"ids": full, "offset": offset, "pixels": inputs["pixel_values"], "targets": targets}


def collate(encoded: list[dict[str, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: pads come after every real token, so causal attention never reads them."""
    length = max(len(e["ids"]) for e in encoded)
    ids = np.full((len(encoded), length), pad_id, dtype=np.int64)
    targets = np.full((len(encoded), length), -100, dtype=np.int64)
    offset = np.zeros((len(encoded), length, 2), dtype=np.int64)
    start = 0
    for b, e in enumerate(encoded):
        n = len(e["ids"])
        ids[b, :n], targets[b, :n] = e["ids"], e["targets"]
        offset[b, :n] = e["offset"]
        offset[b, n:] = e["offset"][-1]
        if e["pixels"] is not None:  # images of the batch are concatenated; text-only rows keep -1000000
            offset[b] += np.asarray([start, start])
            start += len(e["pixels"])
    with_images = [e["pixels"] for e in encoded if e["pixels"] is not None]
    pixels = np.concatenate(with_images) if with_images else None
    return {
        "input_ids": torch.from_numpy(ids),
        "targets": torch.from_numpy(targets),
        "media_offset": torch.from_numpy(offset),
        "pixel_values": None if pixels is None else torch.from_numpy(pixels),
    }


# ---- stage 1: the vision tower --------------------------------------------------------------------------


def patch_labels(scene: syn.Scene, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-patch labels of the cut views of ``scene`` ([crops + 1, 16] each): content class (0 empty,
    else 1 + colour * 3 + shape), and on the global view the grid row and column (-100 elsewhere)."""
    grid = np.zeros((syn.GRID, syn.GRID), dtype=np.int64)
    for s in scene.shapes:
        grid[s.row, s.col] = 1 + COLOURS.index(s.colour) * len(syn.SHAPES) + syn.SHAPES.index(s.kind)
    side = demo_config().vision.grid_size  # patches per side of a view
    views = []
    for r in range(rows):
        for c in range(cols):  # a crop's patch (i, j) lies in grid cell (r*G/rows + i*G/(rows*side), ...)
            i, j = np.mgrid[0:side, 0:side]
            views.append(grid[(r * side + i) * syn.GRID // (rows * side), (c * side + j) * syn.GRID // (cols * side)])
    i, j = np.mgrid[0:side, 0:side]
    views.append(grid[i * syn.GRID // side, j * syn.GRID // side])
    content = np.stack(views).reshape(len(views), -1)
    grid_rows = np.full_like(content, -100)
    grid_cols = np.full_like(content, -100)
    grid_rows[-1], grid_cols[-1] = (i * syn.GRID // side).reshape(-1), (j * syn.GRID // side).reshape(-1)
    return content, grid_rows, grid_cols


def train_vision(model: Owl3Model, settings: Settings, log=print) -> None:
    """Stage 1: vision tower + projector through a per-patch linear probe (dropped afterwards)."""
    size = model.config.vision.image_size
    colours, kinds = len(COLOURS) + 1, len(syn.SHAPES) + 1  # factorised heads: colour and kind (0 = empty)
    probe = torch.nn.Linear(model.config.text.hidden_size, PATCH_CLASSES + 2 * syn.GRID + colours + kinds)
    params = [*model.vision_model.parameters(), *model.vision2text_model.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.vision_lr, weight_decay=0.01)
    rng = syn.item_rng(settings.seed, 13, 0)
    started = time.perf_counter()
    for step in range(settings.vision_steps):
        for group in optimizer.param_groups:
            warm = min(1.0, (step + 1) / settings.warmup)
            group["lr"] = settings.vision_lr * warm * 0.5 * (1 + math.cos(math.pi * step / settings.vision_steps))
        pixels, labels = [], []
        for _ in range(settings.vision_batch):
            scene = syn.random_scene(rng)
            image = Image.open(io.BytesIO(_jpeg(rng, scene))).convert("RGB")
            rows, cols = select_anchor(image.width, image.height, size)
            pixels.append(cut_image(image, rows, cols, size))
            labels.append(patch_labels(scene, rows, cols))
        content, grid_rows, grid_cols = (
            torch.from_numpy(np.concatenate(x).reshape(-1)) for x in zip(*labels, strict=True)
        )
        out = probe(model.encode_images(torch.from_numpy(np.concatenate(pixels)))).flatten(0, 1)
        loss = (
            F.cross_entropy(out[:, :PATCH_CLASSES], content)
            + F.cross_entropy(out[:, PATCH_CLASSES : PATCH_CLASSES + syn.GRID], grid_rows)
            + F.cross_entropy(out[:, PATCH_CLASSES + syn.GRID : PATCH_CLASSES + 2 * syn.GRID], grid_cols)
            + F.cross_entropy(
                out[:, -colours - kinds : -kinds], torch.where(content > 0, (content - 1) // len(syn.SHAPES) + 1, 0)
            )
            + F.cross_entropy(out[:, -kinds:], torch.where(content > 0, (content - 1) % len(syn.SHAPES) + 1, 0))
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0 or step + 1 == settings.vision_steps:
            shapes = content > 0
            hit = (out[:, :PATCH_CLASSES].argmax(-1) == content)[shapes].float().mean()
            log(
                f"vision {step + 1:4d}/{settings.vision_steps}  loss {float(loss.detach()):.3f}  "
                f"shape patches right {float(hit):.3f}  {time.perf_counter() - started:5.0f} s"
            )


# ---- stage 2: the whole model ---------------------------------------------------------------------------


def new_model(seed: int, std: float) -> Owl3Model:
    config = demo_config()
    model = Owl3Model(config)
    model.load_state_dict(random_state_dict(config, seed=seed, std=std), strict=True)
    return model


def learning_rate(settings: Settings, step: int) -> float:
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def answer_spans(targets: np.ndarray) -> list[tuple[int, int]]:
    """[first, last) positions of each answer (runs of targets != -100)."""
    marked = np.concatenate([[False], targets != -100, [False]])
    edges = np.flatnonzero(marked[1:] != marked[:-1])
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def micro_batches(encoded: list[dict[str, np.ndarray]], budget: int) -> list[list[dict[str, np.ndarray]]]:
    """Length-sorted groups whose padded size (rows x longest) stays within ``budget`` tokens."""
    groups: list[list[dict[str, np.ndarray]]] = []
    for e in sorted(encoded, key=lambda e: len(e["ids"])):
        if groups and (len(groups[-1]) + 1) * len(e["ids"]) <= budget:
            groups[-1].append(e)
        else:
            groups.append([e])
    return groups


def train(settings: Settings, processor: Owl3Processor, log=print) -> tuple[Owl3Model, dict]:
    torch.manual_seed(settings.seed)
    model = new_model(settings.seed, settings.init_std)
    started = time.perf_counter()
    model.train()
    train_vision(model, settings, log)
    vision_seconds = time.perf_counter() - started
    model.vision_model.requires_grad_(False)  # stage 2 reads the tower's features; the projector adapts
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in trainable if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.98),
    )
    pool_rng = syn.item_rng(settings.seed, 12, 0)
    pool = [(scene, _jpeg(pool_rng, scene)) for scene in (syn.random_scene(pool_rng) for _ in range(1000))]
    pad = token_id(processor.tokenizer, "<|endoftext|>")
    loss_sum, right, answers = 0.0, defaultdict(int), defaultdict(int)
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, step)
        samples = training_batch(settings, step, pool)
        encoded = [dict(encode(processor, s), kind=s.category) for s in samples]
        answer_tokens = sum(int((e["targets"] != -100).sum()) for e in encoded)
        optimizer.zero_grad(set_to_none=True)
        for group in micro_batches(encoded, settings.tokens_per_pass):
            batch = collate(group, pad)
            logits = model(batch["input_ids"], batch["pixel_values"], batch["media_offset"]).logits
            mask = batch["targets"] != -100
            loss = F.cross_entropy(logits[mask], batch["targets"][mask], reduction="sum") / answer_tokens
            loss.backward()
            loss_sum += float(loss.detach())
            hits = ((logits.argmax(-1) == batch["targets"]) | ~mask).numpy()
            for row, e in enumerate(group):
                for first, last in answer_spans(e["targets"]):
                    right[e["kind"]] += int(hits[row, first:last].all())
                    answers[e["kind"]] += 1
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
        optimizer.step()
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            shares = "  ".join(f"{k} {right[k] / answers[k]:.2f}" for k in KINDS if answers[k])
            log(
                f"step {step + 1:5d}/{settings.steps}  loss {loss_sum / settings.log_every:.4f}  "
                f"answers right: {shares}  lr {learning_rate(settings, step):.2e}  "
                f"{time.perf_counter() - started:5.0f} s"
            )
            loss_sum, right, answers = 0.0, defaultdict(int), defaultdict(int)
    model.eval()
    seconds = time.perf_counter() - started
    return model, {"train_seconds": seconds, "vision_seconds": vision_seconds, "steps": settings.steps}


# ---- held-out evaluation --------------------------------------------------------------------------------


def which_image_items(n: int) -> list:
    """Held-out "Which image shows ...?" items over 2-4 images (no cut), scored as VQA answers."""
    from owl3.validate.items import Item

    items = []
    for i in range(n):
        rng = syn.item_rng(syn.VQA_SEED, 5, i)
        scenes, question = syn.which_image(rng, int(rng.integers(2, 5)))
        items.append(
            Item(
                id=f"which-{i}",
                task="synthetic-which-image",
                prompt=syn.image_list_prompt(len(scenes)) + question.text + syn.VQA_SUFFIX,
                answer=[question.answer.lower()] * 10,  # VQA ground truth is lowercase (the scorer keeps its case)
                images=tuple(syn.jpeg_bytes(s.render()) for s in scenes),
                cut=False,
                category=f"{len(scenes)} images",
            )
        )
    return items


def evaluate(model_dir: Path, limit: int | None, which: int, log=print) -> dict:
    """Accuracy of the saved model (loaded in fp32) on the held-out synthetic benchmarks, with the
    validator's loaders, prompts, greedy decoding and official scorers: {benchmark: summary}."""
    from owl3.validate.backends import PyTorchBackend
    from owl3.validate.benchmarks import VQAAccuracyTask
    from owl3.validate.levels import run_items, unit_scores
    from owl3.validate.synthetic_runs import SHORT_ANSWER, synthetic_runs
    from owl3.validate.validator import BenchmarkRun

    backend = PyTorchBackend(model_dir)
    processor = Owl3Processor.from_pretrained(model_dir)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = synthetic_runs(Path(tmp) / "data", limit=limit, distractor_questions=None)
        runs.append(
            BenchmarkRun("synthetic-which-image", which_image_items(which), VQAAccuracyTask("which"), SHORT_ANSWER)
        )
        for run in runs:
            predictions, excluded = run_items(
                {"model": backend}, run.items, processor, Path(tmp) / run.name, max_new_tokens=run.max_new_tokens
            )
            scores = unit_scores(run.task, run.items, predictions["model"], excluded)
            by_category: dict[str, dict[str, float]] = defaultdict(dict)  # each unit once (MMBench: 2-4 items)
            for item in run.items:
                if item.unit in scores:
                    by_category[item.category][item.unit] = scores[item.unit]
            results[run.name] = {
                "overall": sum(scores.values()) / max(len(scores), 1),
                "units": len(scores),
                "per_category": {k: sum(v.values()) / len(v) for k, v in sorted(by_category.items())},
            }
            parts = "  ".join(f"{k} {v:.3f}" for k, v in results[run.name]["per_category"].items())
            log(f"{run.name:24s} {results[run.name]['overall']:.3f} (n={len(scores)})  {parts}")
    return results


# ---- main -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model directory to (re)write")
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--vision-steps", type=int, default=Settings.vision_steps)
    parser.add_argument("--batch", type=int, default=Settings.batch)
    parser.add_argument("--lr", type=float, default=Settings.lr)
    parser.add_argument("--eval-limit", type=int, help="scoring units per benchmark (default: all)")
    parser.add_argument("--eval-only", type=Path, help="evaluate this saved model instead of training")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    which = 100 if args.eval_limit is None else args.eval_limit
    if args.eval_only:
        results = evaluate(args.eval_only, args.eval_limit, which)
        report = args.eval_only / "TRAINING.md"
        if args.eval_limit is None and report.is_file():  # a full evaluation replaces the table
            head = report.read_text(encoding="utf-8").split(ACCURACY_HEADING)[0]
            report.write_text(head + accuracy_table(results), encoding="utf-8")
        return 0
    settings = Settings(steps=args.steps, vision_steps=args.vision_steps, batch=args.batch, lr=args.lr)
    wall = time.perf_counter()
    tokenizer = build_tokenizer(settings.seed)
    processor = Owl3Processor(tokenizer, demo_config().vision.image_size)
    print(f"tokenizer: {tokenizer.get_vocab_size(with_added_tokens=True)} ids; settings {settings}", flush=True)
    model, info = train(settings, processor, log=lambda m: print(m, flush=True))
    info["wall_seconds_to_trained"] = time.perf_counter() - wall
    staging = save(model, tokenizer, args.out)
    results = evaluate(staging, args.eval_limit, which)
    (staging / "TRAINING.md").write_text(training_report(settings, info, results, " ".join(sys.argv)), encoding="utf-8")
    if args.out.exists():
        shutil.rmtree(args.out)
    staging.rename(args.out)
    print(f"wrote {args.out}")
    return 0


def save(model: Owl3Model, tokenizer: Tokenizer, out: Path) -> Path:
    """The fp16 checkpoint and tokenizer in a staging directory beside ``out`` (renamed in by the caller)."""
    staging = out.with_name(f".{out.name}.new")
    shutil.rmtree(staging, ignore_errors=True)
    eos = [token_id(tokenizer, "<|im_end|>"), token_id(tokenizer, "<|endoftext|>")]
    save_checkpoint(model, model.config, staging, generation_eos=eos, dtype=torch.float16, include_unused=False)
    write_tokenizer(tokenizer, staging)
    return staging


def training_report(settings: Settings, info: dict, results: dict, command: str) -> str:
    lines = [
        "# The packaged demo model",
        "",
        "Trained by `scripts/train_demo_model.py` (see its docstring for the method); fp16 weights.",
        "",
        f"Command: `{command}`",
        "",
        f"Settings: `{asdict(settings)}`",
        "",
        f"Training: vision stage {info['vision_seconds']:.0f} s, then {info['steps']} steps; "
        f"{info['train_seconds']:.0f} s in all ({info['wall_seconds_to_trained']:.0f} s with the tokenizer), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
    ]
    return "\n".join(lines) + "\n" + accuracy_table(results)


ACCURACY_HEADING = "Held-out accuracy of these fp16 weights run in fp32"


def accuracy_table(results: dict) -> str:
    lines = [
        f"{ACCURACY_HEADING} (validator loaders, official prompts and scorers):",
        "",
        "| benchmark | accuracy | units | per category |",
        "|---|---|---|---|",
    ]
    for name, summary in results.items():
        parts = ", ".join(f"{k} {v:.3f}" for k, v in summary["per_category"].items())
        lines.append(f"| {name} | {summary['overall']:.3f} | {summary['units']} | {parts} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
