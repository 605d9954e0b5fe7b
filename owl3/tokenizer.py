"""Tokenizer loading, checking and a deterministic demo tokenizer (spec §7.4, §7.6).

mPLUG-Owl3 uses the Qwen2 byte-level BPE tokenizer plus one added special token, ``<|image|>``. This module
reads ``tokenizer.json`` with the ``tokenizers`` library only (no transformers, no torch: the edge runtime
imports it), checks that the four tokens the chat format needs each encode to exactly one id, and can build
and write a small Qwen2-style tokenizer for tiny test checkpoints.

The demo tokenizer is trained on a corpus generated in code, so two builds are byte-for-byte identical
(``to_str()``); its special tokens come after the BPE vocabulary, in the Qwen2 order
``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, then ``<|image|>``.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

from owl3.errors import TokenizerError, UsageError

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image|>")
TOKENIZER_FILE = "tokenizer.json"

# Qwen2's pre-tokenizer split (as in its tokenizer.json): contractions, letter runs, single digits,
# punctuation runs, newlines, spaces.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_BYTE_ALPHABET = 256


# ---- loading ----------------------------------------------------------------------------------------


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """Read ``tokenizer.json`` from a model directory (or the file itself) and check the chat tokens.

    Raises TokenizerError naming the path when the file is missing or unparseable, or when any of
    ``SPECIAL_TOKENS`` is absent or does not encode to exactly its own single id.
    """
    path = Path(model_dir)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(
            "expected a tokenizer.json file, found none",
            where=str(path),
            fix="copy tokenizer.json from the original checkpoint into the model directory",
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust parser raises a bare Exception for any malformed file
        raise TokenizerError(
            f"tokenizer.json could not be parsed: {exc}",
            where=str(path),
            fix="restore tokenizer.json from the original checkpoint (it may be truncated)",
        ) from exc
    check_special_tokens(tokenizer, where=str(path))
    return tokenizer


def check_special_tokens(tokenizer: Tokenizer, *, where: str = "tokenizer") -> None:
    """Raise TokenizerError listing every chat token that is missing or not a single added token."""
    missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise TokenizerError(
            f"the tokenizer lacks the chat tokens {missing} (needs all of {list(SPECIAL_TOKENS)})",
            where=where,
            fix="use the tokenizer.json shipped with the mPLUG-Owl3 checkpoint; it adds <|image|>",
        )
    split = [t for t in SPECIAL_TOKENS if tokenizer.encode(t, add_special_tokens=False).ids != [token_id(tokenizer, t)]]
    if split:
        raise TokenizerError(
            f"the tokens {split} are in the vocabulary but do not encode to one id (not added tokens)",
            where=where,
            fix="declare them in the 'added_tokens' section of tokenizer.json with special=true",
        )


def token_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of ``token``; TokenizerError when the tokenizer lacks it."""
    value = tokenizer.token_to_id(token)
    if value is None:
        raise TokenizerError(f"the tokenizer lacks {token!r}", where="tokenizer", fix="use the checkpoint's tokenizer")
    return value


# ---- demo tokenizer -----------------------------------------------------------------------------------

_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "grey")
_SHAPES = ("circle", "square", "triangle", "star", "rectangle", "line", "dot", "cube", "heart", "arrow")
_POSITIONS = (
    "on the left",
    "on the right",
    "at the top",
    "at the bottom",
    "in the center",
    "in the top left corner",
    "in the bottom right corner",
    "above the line",
    "below the circle",
    "next to the square",
)
_OBJECTS = ("cat", "dog", "car", "tree", "house", "person", "table", "cup", "book", "flower", "window", "chair")
_SIZES = ("small", "large", "tiny", "big", "bright", "dark")
_COUNTS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_QUESTIONS = (
    "Describe the image.",
    "Describe this image in detail.",
    "Which image shows {n} {c} {s}s?",
    "How many {c} {s}s are there?",
    "What colour is the {s} {p}?",
    "Is there a {c} {s} {p}? Answer the question using a single word or phrase.",
    "Where is the {c} {s}?",
    "Question: what shape is {p}?\nOptions: A. {s}\nB. circle\nAnswer with the option's letter.",
)
_ANSWERS = (
    "There is a {c} {s} {p}.",
    "The image shows {n} {c} {s}s, {d} in total.",
    "Yes, the {s} is {c}.",
    "No. The {s} {p} is {c}!",
    "I count {d} shapes: {n} of them are {c}.",
    "The {c} {s} is {p}; it is {d} pixels wide (about {d}0%).",
    "A {z} {o} sits {p}, next to a {c} {s}.",
    "The picture contains a {z} {c} {o} and {n} {s}s.",
)


def demo_corpus() -> list[str]:
    """A fixed English corpus (a few hundred lines) about colours, shapes, counts and positions."""
    lines: list[str] = []
    combos = itertools.product(_COLOURS, _SHAPES, _POSITIONS)
    for i, (c, s, p) in enumerate(combos):
        if i % 3:  # a deterministic third of the combinations keeps the corpus small
            continue
        fields = {"c": c, "s": s, "p": p, "n": _COUNTS[i % 10], "d": str(i % 97)}
        fields.update(o=_OBJECTS[i % len(_OBJECTS)], z=_SIZES[i % len(_SIZES)])
        lines.append(_QUESTIONS[i % len(_QUESTIONS)].format(**fields))
        lines.append(_ANSWERS[i % len(_ANSWERS)].format(**fields))
    for rows, cols in ((2, 2), (1, 3), (1, 4), (3, 1), (4, 1), (2, 3), (3, 2), (1, 1)):
        cells = " ".join(f"subimg({r},{c})" for r in range(rows) for c in range(cols))
        lines.append(f"Cut to {rows} rows {cols} columns with a global view\n{cells}\nglobal_view")
    lines += ["system", "user", "assistant"] * 4
    lines += ["0123456789", "3.14, 42; 7/8 - 100% (yes) [no] {ok}: 'a' \"b\"?!"]
    return lines


def build_demo_tokenizer(vocab_size: int = 512, corpus: Iterable[str] | None = None) -> Tokenizer:
    """A deterministic Qwen2-style byte-level BPE tokenizer with at most ``vocab_size`` ids in total.

    The 256 byte symbols, the learned merges and the four ``SPECIAL_TOKENS`` (appended last) all count
    toward ``vocab_size``, so a model whose embedding has ``vocab_size`` rows can hold every id.
    ``corpus``: the training text (default: ``demo_corpus()``).
    """
    floor = _BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise UsageError(
            f"vocab_size {vocab_size} is too small for a byte-level tokenizer",
            where="build_demo_tokenizer",
            fix=f"use vocab_size >= {floor} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)",
        )
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(demo_corpus() if corpus is None else corpus, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


# ---- writing ------------------------------------------------------------------------------------------


def write_tokenizer(tokenizer: Tokenizer, model_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` (HF layout).

    Each file is written to a temporary name and renamed into place. Returns the tokenizer.json path.
    Refuses (UsageError) to replace an existing tokenizer.json unless ``overwrite``.
    """
    check_special_tokens(tokenizer)
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / TOKENIZER_FILE
    if target.exists() and not overwrite:
        raise UsageError(
            "a tokenizer.json already exists", where=str(target), fix="choose an empty directory or pass overwrite=True"
        )
    _write_atomic(out / "tokenizer_config.json", _json_text(tokenizer_config(tokenizer)))
    _write_atomic(out / "special_tokens_map.json", _json_text(special_tokens_map()))
    _write_atomic(target, tokenizer.to_str(pretty=True))
    return target


def tokenizer_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """The ``tokenizer_config.json`` dict of a Qwen2 chat checkpoint with ``<|image|>`` added.

    No ``chat_template`` is written: the processor's chunk-wise format (spec §7.4) is the only definition
    of the prompt, and a Jinja template would be a second, divergent one.
    """
    decoder = {
        str(idx): {
            "content": tok.content,
            "lstrip": tok.lstrip,
            "normalized": tok.normalized,
            "rstrip": tok.rstrip,
            "single_word": tok.single_word,
            "special": tok.special,
        }
        for idx, tok in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def special_tokens_map() -> dict[str, Any]:
    """The ``special_tokens_map.json`` dict matching ``tokenizer_config``."""

    def entry(content: str) -> dict[str, Any]:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "eos_token": entry("<|im_end|>"),
        "pad_token": entry("<|endoftext|>"),
    }


def _json_text(obj: dict[str, Any]) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
