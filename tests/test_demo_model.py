"""The packaged demo model (owl3/demo_model/): small, complete, and it does its task on held-out data.

The full held-out figures are in owl3/demo_model/TRAINING.md (written by scripts/train_demo_model.py);
here a fixed slice of the same benchmarks is scored with the validator's own loaders and scorers, so a
broken checkpoint, tokenizer, processor or generation path shows up as lost accuracy.
"""

from __future__ import annotations

import pytest

from owl3.demo import default_model_dir, packaged_model_dir
from owl3.processor import Owl3Processor
from owl3.validate.backends import PyTorchBackend
from owl3.validate.levels import run_items, unit_scores
from owl3.validate.synthetic_runs import synthetic_runs

MODEL = packaged_model_dir()
pytestmark = pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="no packaged demo model")


def test_it_is_the_default_model_and_ships_within_10_mb() -> None:
    assert default_model_dir() == MODEL
    files = {p.name: p.stat().st_size for p in MODEL.iterdir()}
    assert set(files) == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "TRAINING.md",
    }
    assert sum(files.values()) <= 10 * 2**20
    backend = PyTorchBackend(MODEL)
    assert backend.model.config.hyper_layers == (0, 2) and backend.model.config.vision.image_size == 64
    assert "| synthetic-vqa |" in (MODEL / "TRAINING.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[float, dict[str, str]]]:
    """A fixed held-out slice of each synthetic benchmark (official formats and scorers): {benchmark:
    (accuracy over scoring units, {item id: answer})}."""
    root = tmp_path_factory.mktemp("heldout")
    backend, processor = PyTorchBackend(MODEL), Owl3Processor.from_pretrained(MODEL)
    out = {}
    for run in synthetic_runs(root / "data", limit=40, distractor_questions=2):
        predictions, excluded = run_items(
            {"m": backend}, run.items, processor, root / run.name, max_new_tokens=run.max_new_tokens
        )
        values = unit_scores(run.task, run.items, predictions["m"], excluded)
        out[run.name] = (sum(values.values()) / len(values), predictions["m"])
    return out


# Measured on this slice: VQA 0.95 (40 questions), distractors 0.571 (2 questions x 7 values of N); a
# random model scores 0. The floors leave room for float differences between machines.
FLOORS = {"synthetic-vqa": 0.8, "synthetic-distractors": 0.5}


@pytest.mark.parametrize("benchmark", sorted(FLOORS))
def test_held_out_accuracy(runs, benchmark: str) -> None:
    assert runs[benchmark][0] >= FLOORS[benchmark], {name: accuracy for name, (accuracy, _) in runs.items()}


def test_multiple_choice_is_answered_with_an_option_letter(runs) -> None:
    """The MMBench-style prompt is followed (a bare letter every time). Picking the *right* letter is what
    the model has not learned (circular accuracy 7%, TRAINING.md)."""
    answers = runs["synthetic-mc"][1]
    assert len(answers) > 40 and set(answers.values()) <= set("ABCD")
