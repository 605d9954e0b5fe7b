"""Shared fixtures: tiny seeded models written in the real checkpoint layout, then loaded by the loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from owl3.config import Owl3Config


def write_tiny_checkpoint(
    out_dir: Path, config: Owl3Config | None = None, *, seed: int = 0, std: float = 0.05, **save_options: object
) -> Path:
    """A seeded random model of ``config`` (tiny by default) saved as a Hugging Face checkpoint directory."""
    from owl3.checkpoint import random_state_dict, save_checkpoint

    config = config or Owl3Config.tiny()
    save_checkpoint(random_state_dict(config, seed=seed, std=std), config, out_dir, **save_options)
    return out_dir


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path):
    from owl3.model.weights import load_model

    model = load_model(tiny_checkpoint, dtype=torch.float32)
    model.image_token_id = IMAGE_TOKEN
    return model


# The tiny model's vocabulary is 512; tests place images with this id (the demo tokenizer's id is separate).
IMAGE_TOKEN = 511


def prompt_with_images(length: int, placeholders: list[int], seed: int = 0, batch: int = 1) -> torch.Tensor:
    """Random token ids [batch, length] in [0, 500) with the image token at the given positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 500, (batch, length), generator=g)
    ids[:, placeholders] = IMAGE_TOKEN
    return ids


def random_pixels(n: int, config: Owl3Config | None = None, seed: int = 1) -> torch.Tensor:
    size = (config or Owl3Config.tiny()).vision.image_size
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default demo checkpoint (real layout, tokenizer included), built once per test session."""
    from owl3.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo") / "owl3-demo")


def _export(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, precision: str, target: str = "ort") -> Path:
    from owl3.export.pipeline import export_model

    out = tmp_path_factory.mktemp("exports") / f"demo-{precision}-{target}"
    return export_model(model_dir, out, precision, target=target)


@pytest.fixture(scope="session")
def demo_export_fp32(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Path:
    """The demo model exported and validated in fp32, ONNX Runtime flavour: fused operators, in-place cache."""
    return _export(tmp_path_factory, demo_model_dir, "fp32")


@pytest.fixture(scope="session")
def demo_export_fp32_standard(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Path:
    """The same in the TensorRT flavour: standard operators, concatenated cache (what the fused one replaces)."""
    return _export(tmp_path_factory, demo_model_dir, "fp32", "tensorrt")


@pytest.fixture(scope="session")
def demo_export_fp16(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Path:
    return _export(tmp_path_factory, demo_model_dir, "fp16")


@pytest.fixture(scope="session")
def demo_export_fp16_trt(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Path:
    return _export(tmp_path_factory, demo_model_dir, "fp16", "tensorrt")


def quantize_demo(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path, name: str, **recipe_options: object
) -> Path:
    """``model_dir`` quantized with recipe ``name`` on 24 built-in calibration samples."""
    from owl3.quantize import CalibrationConfig, quantize_model, recipe

    text_only = bool(recipe_options.pop("text_only", False))
    output = tmp_path_factory.mktemp("quantized") / name
    return quantize_model(
        model_dir, output, recipe(name, **recipe_options), CalibrationConfig(samples=24, text_only=text_only)
    )


@pytest.fixture(scope="session")
def demo_int4(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Path:
    """The demo model as a GPTQ int4 checkpoint (shared by the quantize, loading and validation tests)."""
    return quantize_demo(tmp_path_factory, demo_model_dir, "int4")


@pytest.fixture(scope="session")
def demo_w8a8(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Path:
    return quantize_demo(tmp_path_factory, demo_model_dir, "w8a8")
