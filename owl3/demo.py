"""The default model: a small mPLUG-Owl3 of the exact architecture, available without any download.

Every command falls back to it when no ``--model`` is given, so a fresh machine can run the whole tool.
It is the 240728 architecture (SigLIP, projector, Qwen2 with hyper layers) at tiny sizes (``demo_config()``,
64 px images, 16 visual tokens each) with its own byte-level BPE tokenizer carrying the Owl3 special
tokens.

Where the package ships a trained model in ``owl3/demo_model/`` (``scripts/train_demo_model.py`` trains it
on the synthetic task of ``owl3.synthetic``), that is the default. Otherwise a seeded *random* model is
built deterministically on first use into the user cache (``$OWL3_HOME``, else
``$XDG_CACHE_HOME/owl3-export``, else ``~/.cache/owl3-export``): its numerics and file layout are real,
its answers are not. Both are written through a staging directory renamed into place, so an interrupted
build never leaves a half model behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from owl3.config import Owl3Config, TextConfig, VisionConfig
from owl3.synthetic import COLOURS, Scene, Shape, cell_centre

DEMO_NAME = "owl3-demo-shapes-v1"
RANDOM_NAME = "owl3-demo-random-v3"  # the cache directory of the random fallback (v3: 3 vision layers)
DEMO_SEED = 0  # the training seed (owl3.synthetic.TRAIN_SEED)
DEMO_VOCAB = 512


def demo_config() -> Owl3Config:
    """Tiny sizes of the 240728 architecture; 64 px images in 16 px patches (16 visual tokens each)."""
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
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=64,
            patch_size=16,
        ),
        hyper_layers=(0, 2),
        name=DEMO_NAME,
    )


def cache_dir() -> Path:
    if os.environ.get("OWL3_HOME"):
        return Path(os.environ["OWL3_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "owl3-export"


def packaged_model_dir() -> Path:
    """``owl3/demo_model/`` inside the installed package (config, fp16 weights, tokenizer, TRAINING.md)."""
    return Path(__file__).resolve().parent / "demo_model"


def default_model_dir() -> Path:
    """The packaged trained model when the package ships one (read-only), else the seeded random model."""
    if (packaged_model_dir() / "config.json").is_file():
        return packaged_model_dir()
    target = cache_dir() / RANDOM_NAME
    if not (target / "config.json").is_file():
        build_demo_model(target)
    return target


def build_demo_model(target: Path) -> Path:
    """A writable copy of the default model at ``target``: the packaged one copied, or the random one built."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        built = staging / "model"
        if (packaged_model_dir() / "config.json").is_file():
            shutil.copytree(packaged_model_dir(), built)
            for path in built.iterdir():
                path.chmod(0o644)  # the installed files may be read-only; the copy is the caller's
        else:
            _write_random_model(built)
        try:
            os.rename(built, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_random_model(directory: Path) -> None:
    """The seeded random model of ``demo_config()`` with its tokenizer, in the real checkpoint layout."""
    from owl3.checkpoint import random_state_dict, save_checkpoint
    from owl3.tokenizer import build_demo_tokenizer, token_id, write_tokenizer

    config = demo_config()
    tokenizer = build_demo_tokenizer(DEMO_VOCAB)
    eos = [token_id(tokenizer, "<|im_end|>"), token_id(tokenizer, "<|endoftext|>")]
    save_checkpoint(random_state_dict(config, seed=DEMO_SEED, std=0.05), config, directory, generation_eos=eos)
    write_tokenizer(tokenizer, directory)


def demo_image(width: int = 192, height: int | None = None) -> Image.Image:
    """The picture the demo command asks about: a fixed scene of the synthetic task (``owl3.synthetic``),
    a red circle at the top left, a yellow triangle at the bottom left and a blue square at the bottom right."""
    height = height or width

    def shape(kind: str, colour: str, row: int, col: int) -> Shape:
        cx, cy = cell_centre(row, col, width, height)
        return Shape(kind, colour, row, col, cx, cy, min(width, height) * 0.085, COLOURS[colour])

    shapes = (shape("circle", "red", 0, 0), shape("triangle", "yellow", 3, 1), shape("square", "blue", 2, 3))
    return Scene(width, height, (228, 228, 228), shapes).render()
