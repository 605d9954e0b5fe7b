"""Processor and model together on the demo checkpoint: the official input contract end to end."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from owl3.demo import build_demo_model, demo_image
from owl3.model.weights import load_model
from owl3.processor import CutPromptMismatchWarning, Owl3Processor


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    directory = build_demo_model(tmp_path_factory.mktemp("demo") / "model")
    return load_model(directory), Owl3Processor.from_pretrained(directory)


def _messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]


def test_loader_reads_the_image_token_and_stop_tokens_from_the_checkpoint(demo) -> None:
    model, processor = demo
    assert model.image_token_id == processor.image_token_id
    assert model.eos_token_ids == processor.eos_token_ids


def test_processor_output_drives_the_model_with_and_without_media_offset(demo) -> None:
    model, processor = demo
    inputs = processor(_messages("<|image|>\nDescribe this image."), images=[demo_image()])
    assert inputs["pixel_values"].shape[0] == int((inputs["input_ids"] == processor.image_token_id).sum())
    with torch.inference_mode():
        given = model(inputs["input_ids"], inputs["pixel_values"], inputs["media_offset"]).logits
        derived = model(inputs["input_ids"], inputs["pixel_values"]).logits
    assert torch.equal(given, derived) and torch.isfinite(given).all()


def test_official_multi_image_cut_quirk_uses_only_the_first_crops(demo) -> None:
    model, processor = demo
    images = [Image.new("RGB", (500, 300), (200, 0, 0)), Image.new("RGB", (500, 500), (0, 0, 200))]
    with pytest.warns(CutPromptMismatchWarning, match="9 <\\|image\\|> placeholders for 12 crops"):
        inputs = processor(_messages("<|image|><|image|>\nCompare."), images=images)
    assert inputs["pixel_values"].shape[0] == 12 and int(inputs["media_offset"][0, -1, 1]) == 9
    with torch.inference_mode():
        all_crops = model(inputs["input_ids"], inputs["pixel_values"], inputs["media_offset"]).logits
        first_nine = model(inputs["input_ids"], inputs["pixel_values"][:9], inputs["media_offset"]).logits
    assert torch.equal(all_crops, first_nine)  # the official model silently ignores crops 10-12
    # The fixed path: one cut prompt per image, placeholders and crops agree, no warning.
    exact = Owl3Processor(processor.tokenizer, processor.image_size, multi_image_cut="exact")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed = exact(_messages("<|image|><|image|>\nCompare."), images=images)
    assert int((fixed["input_ids"] == processor.image_token_id).sum()) == fixed["pixel_values"].shape[0] == 12


def test_video_frames_generate_end_to_end(demo, tmp_path: Path) -> None:
    model, processor = demo
    frames = [Image.new("RGB", (64, 48), (i * 60, 100, 255 - i * 60)) for i in range(4)]
    inputs = processor(_messages("<|video|>\nWhat changes?"), videos=[frames])
    size = model.config.vision.image_size
    assert inputs["pixel_values"].shape == (4, 3, size, size)
    tokens = model.generate(
        inputs["input_ids"],
        pixel_values=inputs["pixel_values"],
        media_offset=inputs["media_offset"],
        max_new_tokens=5,
    )
    assert tokens.shape[0] == 1 and 1 <= tokens.shape[1] <= 5
