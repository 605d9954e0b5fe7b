"""Train the packaged demo model (owl3/demo_model/) on the synthetic shapes task; run from the repo root.

    .venv/bin/python scripts/train_demo_model.py                   # train, evaluate, write owl3/demo_model/
    .venv/bin/python scripts/train_demo_model.py --eval-only DIR   # evaluate a saved model

The model is ``owl3.demo.demo_config()``: the exact Owl3 code (SigLIP, projector, Qwen2 with hyper layers)
at tiny sizes. Its byte-level BPE tokenizer is trained here on the synthetic corpus, with the Owl3
special tokens. Every training sequence is built by ``Owl3Processor`` exactly as at inference (ChatML,
cut or no cut), and the loss is cross-entropy on the answer tokens and the ``<|im_end|>`` after them.
Data mix: official VQAv2 and MMBench prompts (mostly cut), free-form chat ("<|image|>\\n{q}", descriptions),
"Which image shows ...?" over 2-4 images and questions about a named image among 0-32 distractors (no
cut, as the official eval runs multi-image tasks). Everything is seeded; torch runs on 2 threads.

Held-out evaluation writes the synthetic benchmarks in their official formats (owl3.synthetic), reads
them back, decodes greedily and scores exact match (VQA: lowercased, stripped, trailing period removed)
and the MMBench letter (per row, and circular: a question counts only if all its rotations are right).
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import math
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from owl3 import synthetic as syn
from owl3.checkpoint import random_state_dict, save_checkpoint
from owl3.demo import DEMO_VOCAB, demo_config
from owl3.model.owl3 import Owl3Model
from owl3.processor import CUT_ANCHORS, Owl3Processor, cut_prompt
from owl3.tokenizer import build_demo_tokenizer, token_id, write_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "owl3" / "demo_model"


@dataclass(frozen=True)
class Sample:
    turns: tuple[tuple[str, str], ...]  # (user message, answer); the first message holds the placeholders
    images: tuple[bytes, ...]  # JPEG files
    cut: bool
    category: str


@dataclass(frozen=True)
class Settings:
    seed: int = syn.TRAIN_SEED
    steps: int = 2400
    batch: int = 32
    multi_batch: int = 16
    max_batch_images: int = 128
    lr: float = 1e-3
    init_std: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.05
    multi_fraction: float = 0.3  # share of steps on multi-image batches
    log_every: int = 50


# ---- tokenizer ----------------------------------------------------------------------------------------


def corpus(seed: int) -> list[str]:
    """Prompt and answer texts of the task (training seed range), chat scaffolding and the cut prompts."""
    lines = ["system", "user", "assistant", "0123456789", syn.VQA_SUFFIX, syn.MC_SUFFIX]
    lines += [cut_prompt(r, c).replace("<|image|>", " ") for r, c in (*CUT_ANCHORS, (1, 1))]
    lines += [syn.image_list_prompt(40).replace("<|image|>", " ")]
    for i in range(3000):
        sample = training_sample(np.random.default_rng([seed, 99, i]), kind=None, num_images=None, pool=None)
        lines += [text.replace("<|image|>", " ") for turn in sample.turns for text in turn]
    return lines


def build_tokenizer(seed: int, vocab_size: int = DEMO_VOCAB) -> Tokenizer:
    """Qwen2-style byte-level BPE (owl3.tokenizer.build_demo_tokenizer) trained on ``corpus(seed)``."""
    return build_demo_tokenizer(vocab_size, corpus=corpus(seed))


# ---- training data ------------------------------------------------------------------------------------


def _jpeg(rng: np.random.Generator, scene: syn.Scene) -> bytes:
    return syn.jpeg_bytes(scene.render(), quality=int(rng.integers(80, 96)))


def _single_turn(rng: np.random.Generator, scene: syn.Scene, first: bool) -> tuple[str, str]:
    """One (user message, answer) about ``scene``: official VQAv2 or MMBench prompt, or free-form chat.
    The first turn of a conversation holds the ``<|image|>``; follow-up turns are text only."""
    image = "<|image|>" if first else ""
    category = str(rng.choice(syn.SINGLE_IMAGE_CATEGORIES))
    while not syn.askable(scene, category):
        category = str(rng.choice(syn.SINGLE_IMAGE_CATEGORIES))
    style = rng.random()
    if style < 0.45:  # official VQAv2 prompt
        question = syn.ask(rng, scene, category)
        return image + question.text + syn.VQA_SUFFIX, question.answer
    if style < 0.8:  # official MMBench prompt
        question = syn.ask(rng, scene, category, multiple_choice=True)
        hint = "" if rng.random() < 0.7 else "The picture shows simple shapes on a plain background."
        prompt = syn.mmbench_prompt(question.text, question.options, hint)
        return image + prompt.removeprefix("<|image|>"), syn.LETTERS[question.options.index(question.answer)]
    question = syn.ask(rng, scene, "describe" if rng.random() < 0.4 else category)  # free-form chat
    return (f"{image}\n{question.text}" if first else question.text), question.answer


def training_sample(
    rng: np.random.Generator, kind: str | None, num_images: int | None, pool: list[tuple[syn.Scene, bytes]] | None
) -> Sample:
    """One training conversation of 1-4 turns about the same images. ``kind``: "single" (VQA, MMBench or
    chat turns, cut or not), "which" (2-4 images) or "distractor" (``num_images`` in all, no cut); None
    picks one (for the tokenizer corpus)."""
    if kind is None:
        kind = str(rng.choice(["single", "which", "distractor"]))
        num_images = int(rng.integers(2, 5)) if kind == "which" else int(rng.integers(1, 34))
    turns_wanted = int(rng.integers(1, 5))
    if kind == "which":
        scenes, question = syn.which_image(rng, num_images or 2)
        turns = [(syn.image_list_prompt(len(scenes)) + question.text + syn.VQA_SUFFIX, question.answer)]
        unique = [
            (shape.name, i)
            for i, scene in enumerate(scenes)
            for shape in scene.shapes
            if sum(other.has(shape.colour, shape.kind) for other in scenes) == 1 and shape.name not in question.text
        ]
        for j in rng.permutation(len(unique))[: turns_wanted - 1]:
            name, i = unique[int(j)]
            turns.append((f"Which image shows a {name}?" + syn.VQA_SUFFIX, f"Image {i + 1}"))
        return Sample(tuple(turns), tuple(_jpeg(rng, s) for s in scenes), False, "which_image")
    if kind == "distractor":
        count = (num_images or 1) - 1
        scene = syn.random_scene(rng)
        if pool is None:  # text only (the tokenizer corpus): scenes without pixels
            others = [(syn.random_scene(rng), b"") for _ in range(count)]
        else:
            others = [pool[int(i)] for i in rng.choice(len(pool), size=count, replace=False)]
        position = int(rng.integers(count + 1))
        scenes = [*(o[0] for o in others[:position]), scene, *(o[0] for o in others[position:])]
        images = (*(o[1] for o in others[:position]), _jpeg(rng, scene), *(o[1] for o in others[position:]))
        turns = []
        for t in range(turns_wanted):
            target = position if t == 0 else int(rng.integers(count + 1))
            category = str(rng.choice(syn.SINGLE_IMAGE_CATEGORIES))
            if not syn.askable(scenes[target], category):
                category = "shape"
            question = syn.ask(rng, scenes[target], category)
            text = syn.name_image(question.text, target + 1) + syn.VQA_SUFFIX
            turns.append((syn.image_list_prompt(count + 1) + text if t == 0 else text, question.answer))
        return Sample(tuple(turns), images, False, "distractor")
    scene = syn.random_scene(rng)
    turns = [_single_turn(rng, scene, first=t == 0) for t in range(turns_wanted)]
    return Sample(tuple(turns), (_jpeg(rng, scene),), rng.random() < 0.7, "single")


def training_batch(settings: Settings, step: int, pool: list[tuple[syn.Scene, bytes]]) -> list[Sample]:
    """The samples of one step: single-image, "which image" (2-4 images) or distractor (1-33 images)."""
    rng = syn.item_rng(settings.seed, 10, step)
    if rng.random() >= settings.multi_fraction:
        return [
            training_sample(syn.item_rng(settings.seed, 11, step * 1000 + i), "single", 1, pool)
            for i in range(settings.batch)
        ]
    if rng.random() < 0.4:
        kind, num_images = "which", int(rng.integers(2, 5))
    else:  # 0 to 32 distractors, log-uniform: small N more often
        kind, num_images = "distractor", int(np.exp(rng.uniform(0, np.log(34))))
    size = min(settings.multi_batch, max(4, settings.max_batch_images // num_images))  # bound the vision work
    return [
        training_sample(syn.item_rng(settings.seed, 11, step * 1000 + i), kind, num_images, pool) for i in range(size)
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
        offset[b] += np.asarray([start, start])  # images of the batch are concatenated
        start += len(e["pixels"])
    pixels = np.concatenate([e["pixels"] for e in encoded])
    return {
        "input_ids": torch.from_numpy(ids),
        "targets": torch.from_numpy(targets),
        "media_offset": torch.from_numpy(offset),
        "pixel_values": torch.from_numpy(pixels),
    }


# ---- training -----------------------------------------------------------------------------------------


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


def train(settings: Settings, processor: Owl3Processor, log=print) -> tuple[Owl3Model, dict]:
    torch.manual_seed(settings.seed)
    model = new_model(settings.seed, settings.init_std)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.98),
    )
    pool_rng = syn.item_rng(settings.seed, 12, 0)
    pool = [(scene, _jpeg(pool_rng, scene)) for scene in (syn.random_scene(pool_rng) for _ in range(1000))]
    pad = token_id(processor.tokenizer, "<|endoftext|>")
    model.train()
    started, loss_sum, hits, total = time.perf_counter(), 0.0, 0, 0
    for step in range(settings.steps):
        batch = collate([encode(processor, s) for s in training_batch(settings, step, pool)], pad)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, step)
        logits = model(batch["input_ids"], batch["pixel_values"], batch["media_offset"]).logits
        mask = batch["targets"] != -100
        loss = F.cross_entropy(logits[mask], batch["targets"][mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_sum += float(loss.detach())
        hits += int((logits[mask].argmax(-1) == batch["targets"][mask]).sum())
        total += int(mask.sum())
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            elapsed = time.perf_counter() - started
            log(
                f"step {step + 1:5d}/{settings.steps}  loss {loss_sum / settings.log_every:.4f}  "
                f"token acc {hits / max(total, 1):.3f}  lr {learning_rate(settings, step):.2e}  {elapsed:6.0f} s"
            )
            loss_sum, hits, total = 0.0, 0, 0
    model.eval()
    return model, {"train_seconds": time.perf_counter() - started, "steps": settings.steps}


# ---- held-out evaluation ------------------------------------------------------------------------------


@torch.inference_mode()
def answer(model: Owl3Model, processor: Owl3Processor, sample: Sample, max_new_tokens: int = 12) -> str:
    inputs = encode(processor, sample, with_answer=False)
    new = model.generate(
        torch.from_numpy(inputs["ids"][None]),
        pixel_values=torch.from_numpy(inputs["pixels"]),
        media_offset=torch.from_numpy(inputs["offset"][None]),
        max_new_tokens=max_new_tokens,
        eos_token_id=list(processor.eos_token_ids),
    )
    return processor.decode(new[0])


def vqa_match(prediction: str, answers: list[str]) -> bool:
    """Exact match after lowercasing, stripping and dropping a trailing period."""
    return prediction.strip().lower().rstrip(".").strip() in {a.strip().lower() for a in answers}


def mc_letter(prediction: str, letters: str) -> str:
    """MMBench extraction: a bare letter, or ``\\bX[.,:)]`` tried from the last option letter down."""
    text = prediction.strip()
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    for candidate in (text, text + "."):
        for letter in reversed(letters):
            if re.search(rf"\b{letter}[.,:)]", candidate):
                return letter
    return "X"


def read_vqa(root: Path) -> list[dict]:
    """Items of a VQAv2-layout directory (questions, annotations, val2014 images)."""
    questions = json.loads((root / syn.VQA_QUESTIONS_FILE).read_text())["questions"]
    annotations = {
        a["question_id"]: a for a in json.loads((root / syn.VQA_ANNOTATIONS_FILE).read_text())["annotations"]
    }
    items = []
    for q in questions:
        ann = annotations[q["question_id"]]
        ids = q.get("image_ids", [q["image_id"]])
        images = tuple((root / syn.VQA_IMAGE_DIR / f"COCO_val2014_{i:012d}.jpg").read_bytes() for i in ids)
        items.append(
            {
                "question": q,
                "answers": [a["answer"] for a in ann["answers"]],
                "images": images,
                "category": ann["question_type"],
            }
        )
    return items


def evaluate(model: Owl3Model, processor: Owl3Processor, sizes: dict[str, int], log=print) -> dict:
    """Write the held-out benchmarks, read them back, decode greedily, score; returns per-set accuracies."""
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        per: dict[str, list[bool]] = defaultdict(list)
        for item in read_vqa(syn.write_vqa_benchmark(root / "vqa", sizes["vqa"], syn.VQA_SEED)):
            sample = Sample(((syn.vqa_prompt(item["question"]["question"]), ""),), item["images"], True, "")
            per[item["category"]].append(vqa_match(answer(model, processor, sample), item["answers"]))
        results["vqa"] = _summary(per)
        per, rows = defaultdict(list), defaultdict(list)
        with syn.write_mc_benchmark(root / "mc", sizes["mc"], syn.MC_SEED).open(encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                options = [row[k] for k in syn.LETTERS if row[k]]
                prompt = syn.mmbench_prompt(row["question"], options, row["hint"])
                sample = Sample(((prompt, ""),), (base64.b64decode(row["image"]),), True, "")
                correct = mc_letter(answer(model, processor, sample), syn.LETTERS[: len(options)]) == row["answer"]
                per[row["category"]].append(correct)
                rows[(int(row["index"]) % syn.CIRCULAR_OFFSET, row["category"])].append(correct)
        results["mc_rows"] = _summary(per)
        circular: dict[str, list[bool]] = defaultdict(list)
        for (_, category), marks in rows.items():
            circular[category].append(all(marks))
        results["mc_circular"] = _summary(circular)
        per = defaultdict(list)
        for i in range(sizes["which"]):
            rng = syn.item_rng(syn.VQA_SEED, 5, i)
            scenes, question = syn.which_image(rng, int(rng.integers(2, 5)))
            images = tuple(syn.jpeg_bytes(s.render()) for s in scenes)
            prompt = syn.image_list_prompt(len(scenes)) + question.text + syn.VQA_SUFFIX
            sample = Sample(((prompt, ""),), images, False, "")
            per[f"{len(scenes)} images"].append(vqa_match(answer(model, processor, sample), [question.answer]))
        results["which_image"] = _summary(per)
        per = defaultdict(list)
        for item in read_vqa(syn.write_distractor_benchmark(root / "distractor", sizes["distractor"])):
            count = item["question"]["num_distractors"]
            prompt = syn.distractor_prompt(count + 1, item["question"]["question"])
            sample = Sample(((prompt, ""),), item["images"], False, "")
            per[f"N={count:02d}"].append(vqa_match(answer(model, processor, sample), item["answers"]))
        results["distractor"] = _summary(per)
    for name, summary in results.items():
        parts = "  ".join(f"{k} {v:.3f}" for k, v in summary["per_category"].items())
        log(f"{name:12s} overall {summary['overall']:.3f} (n={summary['n']})  {parts}")
    return results


def _summary(per: dict[str, list[bool]]) -> dict:
    marks = [m for v in per.values() for m in v]
    return {
        "overall": sum(marks) / max(len(marks), 1),
        "n": len(marks),
        "per_category": {k: sum(v) / len(v) for k, v in sorted(per.items())},
    }


# ---- main ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model directory to (re)write")
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--batch", type=int, default=Settings.batch)
    parser.add_argument("--lr", type=float, default=Settings.lr)
    parser.add_argument("--eval-size", type=int, default=400, help="VQA questions (MC: half, others: a tenth)")
    parser.add_argument("--eval-only", type=Path, help="evaluate this saved model instead of training")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = {
        "vqa": args.eval_size,
        "mc": args.eval_size // 2,
        "which": args.eval_size // 2,
        "distractor": max(args.eval_size // 10, 4),
    }
    if args.eval_only:
        from owl3.model.weights import load_model

        model = load_model(args.eval_only)
        evaluate(model, Owl3Processor.from_pretrained(args.eval_only), sizes)
        return 0
    settings = Settings(steps=args.steps, batch=args.batch, lr=args.lr)
    wall = time.perf_counter()
    tokenizer = build_tokenizer(settings.seed)
    processor = Owl3Processor(tokenizer, demo_config().vision.image_size)
    print(f"tokenizer: {tokenizer.get_vocab_size(with_added_tokens=True)} ids; settings {settings}")
    model, info = train(settings, processor)
    info["wall_seconds_to_trained"] = time.perf_counter() - wall
    results = evaluate(model, processor, sizes)
    save(model, tokenizer, args.out, settings, info, results, " ".join(sys.argv))
    print(f"wrote {args.out}")
    return 0


def save(
    model: Owl3Model, tokenizer: Tokenizer, out: Path, settings: Settings, info: dict, results: dict, command: str
) -> None:
    staging = out.with_name(f".{out.name}.new")
    shutil.rmtree(staging, ignore_errors=True)
    eos = [token_id(tokenizer, "<|im_end|>"), token_id(tokenizer, "<|endoftext|>")]
    save_checkpoint(model, model.config, staging, generation_eos=eos, dtype=torch.float16)
    write_tokenizer(tokenizer, staging)
    (staging / "TRAINING.md").write_text(training_report(settings, info, results, command), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def training_report(settings: Settings, info: dict, results: dict, command: str) -> str:
    lines = ["# The packaged demo model", "", f"Command: `{command}`", "", f"Settings: `{settings}`", ""]
    lines += [f"Training: {info['steps']} steps in {info['train_seconds']:.0f} s", ""]
    for name, summary in results.items():
        parts = ", ".join(f"{k} {v:.3f}" for k, v in summary["per_category"].items())
        lines.append(f"- {name}: {summary['overall']:.3f} (n={summary['n']}; {parts})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
