"""The default model: a small seeded mPLUG-Owl3 in the real checkpoint layout, built without any download.

Every command falls back to it when no ``--model`` is given, so a fresh machine can run the whole tool.
It is the exact architecture (SigLIP, projector, Qwen2 with hyper layers) at tiny sizes, with random
seeded weights and its own byte-level BPE tokenizer carrying the Owl3 special tokens: its answers are
not meaningful, its numerics and file layout are real. It is built deterministically on first use into
the cache directory (``$OWL3_HOME``, else ``$XDG_CACHE_HOME/owl3-export``, else ``~/.cache/owl3-export``)
in a staging directory renamed into place, so an interrupted build never leaves a half model behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from owl3.config import Owl3Config, TextConfig, VisionConfig

DEMO_NAME = "owl3-demo-random-v1"
DEMO_SEED = 0
DEMO_VOCAB = 1024


def demo_config() -> Owl3Config:
    """Tiny sizes of the 240728 architecture; 56 px images in 14 px patches (16 visual tokens each)."""
    return Owl3Config(
        text=TextConfig(
            vocab_size=DEMO_VOCAB,
            hidden_size=128,
            intermediate_size=352,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=1_000_000.0,
            max_position_embeddings=4096,
        ),
        vision=VisionConfig(
            hidden_size=96,
            intermediate_size=192,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=56,
            patch_size=14,
        ),
        hyper_layers=(0, 2),
        name=DEMO_NAME,
    )


def cache_dir() -> Path:
    if os.environ.get("OWL3_HOME"):
        return Path(os.environ["OWL3_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "owl3-export"


def default_model_dir() -> Path:
    """The default model's directory, built on first call."""
    target = cache_dir() / DEMO_NAME
    if not (target / "config.json").is_file():
        build_demo_model(target)
    return target


def build_demo_model(target: Path) -> Path:
    """Write the demo checkpoint and tokenizer to ``target`` atomically (staging dir, then rename)."""
    from owl3.checkpoint import random_state_dict, save_checkpoint
    from owl3.tokenizer import build_demo_tokenizer, token_id, write_tokenizer

    config = demo_config()
    tokenizer = build_demo_tokenizer(DEMO_VOCAB)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        built = staging / "model"
        eos = [token_id(tokenizer, "<|im_end|>"), token_id(tokenizer, "<|endoftext|>")]
        state = random_state_dict(config, seed=DEMO_SEED, std=0.05)
        save_checkpoint(state, config, built, generation_eos=eos)
        write_tokenizer(tokenizer, built)
        try:
            os.rename(built, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def demo_image(width: int = 320, height: int = 200) -> Image.Image:
    """A deterministic picture (a red disc and a blue square on a sky gradient) for the demo command."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = 150 + (x * 60 // width)
    pixels[..., 1] = 190 + (y * 50 // height)
    pixels[..., 2] = 235
    disc = (x - width * 0.3) ** 2 + (y - height * 0.5) ** 2 < (height * 0.25) ** 2
    pixels[disc] = (220, 30, 30)
    square = (abs(x - width * 0.72) < height * 0.18) & (abs(y - height * 0.5) < height * 0.18)
    pixels[square] = (30, 60, 200)
    return Image.fromarray(pixels, mode="RGB")
