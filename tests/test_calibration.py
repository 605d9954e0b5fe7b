"""Calibration sources: built-in, folder, JSONL and benchmark subsets; text-only; unreadable media; records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from owl3.errors import UsageError
from owl3.processor import Owl3Processor
from owl3.quantize.calibration import CalibrationConfig, CalibrationError, calibration_items, load_calibration
from owl3.synthetic import jpeg_bytes, random_scene, write_vqa_benchmark
from owl3.validate.items import id_hash


@pytest.fixture(scope="module")
def processor(demo_model_dir: Path) -> Owl3Processor:
    return Owl3Processor.from_pretrained(demo_model_dir)


def load(processor: Owl3Processor, **options) -> object:
    return load_calibration(CalibrationConfig(**options), processor, image_size=64)


def test_builtin_is_deterministic_and_mixes_images_text_and_formats(processor: Owl3Processor) -> None:
    first, again, other = load(processor, samples=20), load(processor, samples=20), load(processor, samples=20, seed=1)
    assert first.ids == again.ids and first.media == again.media
    assert all(
        np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(first.samples, again.samples, strict=True)
    )
    assert first.media != other.media
    counts = [0 if s["pixel_values"] is None else len(s["pixel_values"]) for s in first.samples]
    assert 0 in counts and max(counts) >= 2 and first.images == sum(counts)
    texts = [processor.decode(s["input_ids"][0]) for s in first.samples]
    assert any("Cut to" in t for t in texts)  # single images cut, as VQAv2
    assert any("Options:" in t for t in texts)  # MMBench format
    assert any("Image 2:" in t for t in texts)  # several images without cut


def test_samples_end_with_the_answer_and_im_end(processor: Owl3Processor) -> None:
    sample = load(processor, samples=1).samples[0]  # the first built-in item is a VQA question
    ids, offsets = sample["input_ids"][0], sample["media_offset"][0]
    assert ids[-1] == processor.eos_token_ids[0]  # <|im_end|>
    assert processor.decode(ids).rstrip().split("\n")[-1]  # the answer follows the assistant header
    assert offsets.shape == (len(ids), 2) and offsets[-1, 1] == len(sample["pixel_values"])  # answer sees all


def test_text_only_drops_every_image(processor: Owl3Processor) -> None:
    calib = load(processor, samples=12, text_only=True)
    assert calib.images == 0 and all(s["pixel_values"] is None for s in calib.samples)
    assert calib.media == []
    assert all("<|image|>" not in processor.tokenizer.decode(s["input_ids"][0].tolist()) for s in calib.samples)
    assert calib.record()["text_only"] is True


def test_folder_source_skips_and_counts_unreadable_images(processor: Owl3Processor, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes(random_scene(rng).render()))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    calib = load(processor, source=str(tmp_path), samples=10)
    assert len(calib.samples) == 3 and calib.images == 3 * 5  # cut: 2x2 crops and the global view
    assert sum(calib.skipped.values()) == 1 and "unreadable" in next(iter(calib.skipped))
    assert calib.ids == sorted(calib.ids, key=lambda i: calib.ids.index(i))  # stable order
    assert all(i.startswith("calibration:") for i in calib.ids)


def test_jsonl_source_with_relative_paths_and_answers(processor: Owl3Processor, tmp_path: Path) -> None:
    (tmp_path / "pics").mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        (tmp_path / "pics" / f"{i}.jpg").write_bytes(jpeg_bytes(random_scene(rng).render()))
    lines = [
        {"id": "a", "image": "pics/0.jpg", "prompt": "What colour is the circle?", "answer": "red", "cut": False},
        {"id": "b", "images": ["pics/0.jpg", "pics/1.jpg"], "prompt": "<|image|><|image|>\nSame shapes?"},
    ]
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    calib = load(processor, source=str(tmp_path / "calib.jsonl"))
    by_id = dict(zip(calib.ids, calib.samples, strict=True))
    assert set(by_id) == {"calibration:a", "calibration:b"}
    assert len(by_id["calibration:a"]["pixel_values"]) == 1  # cut off on request
    assert processor.decode(by_id["calibration:a"]["input_ids"][0]).endswith("red")
    assert len(by_id["calibration:b"]["pixel_values"]) == 2  # several images: no cut by default


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 1 is not JSON"),
        ('{"image": "x.jpg"}', 'no "prompt"'),
        ('{"prompt": "p", "images": "x"}', "list of paths"),
    ],
)
def test_malformed_jsonl_is_refused_with_the_line(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "bad.jsonl").write_text(line + "\n")
    with pytest.raises(CalibrationError, match=message) as error:
        calibration_items(CalibrationConfig(str(tmp_path / "bad.jsonl")), image_size=64)
    assert error.value.exit_code == 3


def test_benchmark_subset_through_the_validators_loader(processor: Owl3Processor, tmp_path: Path) -> None:
    write_vqa_benchmark(tmp_path / "vqa", 12)
    calib = load(processor, source=f"vqav2:{tmp_path / 'vqa'}", samples=5)
    assert len(calib.samples) == 5 and all(i.startswith("vqav2:") for i in calib.ids)
    record = calib.record()
    assert record["id_hashes"] == sorted(id_hash(i) for i in calib.ids)
    assert len(record["media_hashes"]) == 5 and record["samples"] == 5


def test_a_set_without_images_is_refused_unless_text_only(processor: Owl3Processor, tmp_path: Path) -> None:
    (tmp_path / "text.jsonl").write_text(json.dumps({"prompt": "Hello", "answer": "Hi"}) + "\n")
    with pytest.raises(CalibrationError, match="holds no image") as error:
        load(processor, source=str(tmp_path / "text.jsonl"))
    assert "--text-only" in error.value.fix
    assert load(processor, source=str(tmp_path / "text.jsonl"), text_only=True).images == 0


def test_bad_sources_and_settings(processor: Owl3Processor, tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="found nothing there"):
        load(processor, source=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no image file"):
        load(processor, source=str(tmp_path / "empty"))
    with pytest.raises(UsageError, match="samples must be >= 1"):
        CalibrationConfig(samples=0)
    with pytest.raises(CalibrationError, match="no usable calibration sample"):
        load(processor, samples=3, max_tokens=16)


def test_builtin_on_a_real_checkpoint_warns(processor: Owl3Processor) -> None:
    warnings: list[str] = []
    calibration_items(CalibrationConfig(samples=2), image_size=384, warn=warnings.append)
    assert warnings and "vqav2:DIR" in warnings[0]
