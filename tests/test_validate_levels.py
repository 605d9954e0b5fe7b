"""Validator levels on the demo model: probes (L1, L2) and the resumable task runner (L3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from owl3.processor import Owl3Processor
from owl3.validate.backends import OnnxBackend, PyTorchBackend, open_backend
from owl3.validate.items import Item
from owl3.validate.levels import ProbeRun, run_items, scored_positions, teacher_forced, unit_scores
from owl3.validate.probes import validation_cases


@pytest.fixture(scope="module")
def arms(demo_model_dir: Path, demo_export_fp32: Path, demo_export_fp16: Path):
    return PyTorchBackend(demo_model_dir), OnnxBackend(demo_export_fp32), OnnxBackend(demo_export_fp16)


@pytest.fixture(scope="module")
def probes(demo_model_dir: Path, arms) -> ProbeRun:
    return ProbeRun(arms[0], validation_cases(Owl3Processor.from_pretrained(demo_model_dir)))


def test_onnx_fp32_matches_pytorch_layer_by_layer(probes: ProbeRun, arms) -> None:
    result = probes.compare(arms[1])
    names = {t.name.split("/", 1)[1] for t in result["tensors"]}
    layers = arms[0].model.config.text.num_hidden_layers
    assert {f"decoder/present_key_{i}" for i in range(layers)} <= names
    assert {"vision/image_embeds", "visual_memory/visual_key_0", "decoder/logits"} <= names
    assert max(t.max_abs for t in result["tensors"] if t.name.endswith("logits")) <= 1e-4
    for group in ("text", "images"):
        assert result["distribution"][group].top1_agreement == 1.0
        assert result["distribution"][group].kl_mean < 1e-8
        assert len(result["kl_values"][group]) == result["distribution"][group].positions


def test_onnx_fp16_drift_is_small_but_measured(probes: ProbeRun, arms) -> None:
    result = probes.compare(arms[2])
    assert all(t.nan == 0 and t.inf == 0 for t in result["tensors"])
    assert min(t.cosine for t in result["tensors"]) > 0.999
    assert 0 < result["distribution"]["images"].kl_mean < 1e-3  # fp16 really differs, within the gate


def test_l2_scores_the_whole_forced_sequence_not_just_the_answer(probes: ProbeRun, arms) -> None:
    """Every position predicting a prompt or answer token counts (image probes: those that see an image),
    so the trained demo model's short answers still give L2 dozens of positions per probe."""
    result = probes.compare(arms[0])
    for forced, positions in probes.probes.values():
        length = forced["input_ids"].shape[1]
        if forced.get("pixel_values") is None:
            assert positions.tolist() == list(range(length - 1))
        else:
            sees = forced["media_offset"][0, :, 1] > 0
            assert positions.tolist() == [t for t in range(length - 1) if sees[t]] and len(positions) >= 20
    for group in ("text", "images"):
        expected = sum(
            len(p) for f, p in probes.probes.values() if (f.get("pixel_values") is not None) == (group == "images")
        )
        assert result["distribution"][group].positions == expected
        assert result["distribution"][group].kl_max == 0.0 and result["distribution"][group].perplexity_ratio == 1.0


def test_scored_positions_skip_those_before_the_first_image() -> None:
    forced = {
        "input_ids": np.array([[1, 9, 2, 5, 6]]),
        "media_offset": np.array([[[0, 0], [0, 0], [0, 1], [0, 1], [0, 1]]]),
        "pixel_values": np.zeros((1, 3, 4, 4), dtype=np.float32),
    }
    assert scored_positions(forced).tolist() == [2, 3]
    assert scored_positions({**forced, "pixel_values": None}).tolist() == [0, 1, 2, 3]


def test_teacher_forcing_extends_media_offset_with_all_images_visible() -> None:
    inputs = {"input_ids": np.array([[1, 9, 2]]), "media_offset": np.array([[[0, 0], [0, 0], [0, 1]]])}
    forced = teacher_forced(inputs, [5, 6])
    assert forced["input_ids"].tolist() == [[1, 9, 2, 5, 6]]
    assert forced["media_offset"][0, :, 1].tolist() == [0, 0, 1, 1, 1]


class ExactMatch:
    name, binary = "exact", True

    def score(self, item: Item, prediction: str) -> float:
        return float(prediction.strip().lower() == item.answer)

    def unit_score(self, scores) -> float:
        return float(all(s == 1.0 for s in scores))


def test_task_runner_resumes_and_excludes_unreadable_media(demo_model_dir: Path, arms, tmp_path: Path) -> None:
    picture = tmp_path / "p.png"
    Image.new("RGB", (40, 30), (200, 0, 0)).save(picture)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    items = [
        Item(id="a", task="t", prompt="<|image|>What colour?", answer="red", images=(str(picture),)),
        Item(id="b", task="t", prompt="<|image|>What colour?", answer="red", images=(str(broken),)),
        Item(id="c", task="t", prompt="Say hi.", answer="hi"),
    ]
    processor = Owl3Processor.from_pretrained(demo_model_dir)
    chosen = {"pytorch-fp32": arms[0], "onnx-fp32": arms[1]}
    predictions, excluded = run_items(chosen, items, processor, tmp_path / "cache", max_new_tokens=4)
    assert set(excluded) == {"b"} and "broken.jpg" in excluded["b"]
    assert predictions["pytorch-fp32"] == predictions["onnx-fp32"]  # greedy fp32: identical answers
    assert sorted(predictions["onnx-fp32"]) == ["a", "c"]

    class Exploding:
        name = "exploding"

        def generate(self, inputs, max_new_tokens):
            raise AssertionError("a finished item was asked again")

    again, _ = run_items({"onnx-fp32": Exploding()}, items[::2], processor, tmp_path / "cache", max_new_tokens=4)
    assert again["onnx-fp32"] == predictions["onnx-fp32"]  # resumed from the cache, nothing recomputed
    scores = unit_scores(ExactMatch(), items, predictions["onnx-fp32"], excluded)
    assert set(scores) == {"a", "c"}


def test_backend_specs(demo_model_dir: Path) -> None:
    from owl3.errors import UsageError

    assert open_backend(f"pytorch:{demo_model_dir}").name == "pytorch-fp32"
    with pytest.raises(UsageError, match="unknown backend"):
        open_backend(f"tensorflow:{demo_model_dir}")
