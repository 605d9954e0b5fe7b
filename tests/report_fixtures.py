"""A realistic drift report dict (schema of owl3.validate.report) for tests: INT4 GPTQ against PyTorch fp16.

Built from the real comparison and statistics functions on seeded synthetic data, so every number has
the shape and the consistency of a real run. ``example_report(rejected=True)`` degrades the candidate
until two decoder layers, the image-prompt KL and MMBench fail their gates; ``levels`` leaves levels out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from owl3.validate.compare import compare_distributions, compare_tensors
from owl3.validate.gates import Gate
from owl3.validate.stats import certify_statement, paired_delta

LEVEL_NAMES = ("graph", "tensors", "distribution", "tasks", "distractors")
GATE = Gate("INT4 GPTQ (group 128) vs fp16", min_cosine=0.99, max_kl_mean=5e-2, min_top1=0.90)


def example_report(*, rejected: bool = False, levels: tuple[str, ...] = LEVEL_NAMES, seed: int = 0) -> dict[str, Any]:
    """A report with the given levels; failures and verdict follow from the gate checks of the data."""
    rng = np.random.default_rng(seed)
    builders = {
        "graph": _graph,
        "tensors": _tensors,
        "distribution": _distribution,
        "tasks": _tasks,
        "distractors": _distractors,
    }
    built = {name: builders[name](rng, rejected) for name in levels}
    failures = [f for name in ("tensors", "distribution") if name in built for f in _failures(built[name])]
    for name, task in built.get("tasks", {}).items():  # the plain non-inferiority gate
        bound, margin = task["delta"]["lower_bound"], task["margin"]
        failed = bound <= -margin
        task["failures"] = (
            [f"{name}: delta lower bound {bound * 100:+.1f} pt <= -{margin * 100:.1f} pt"] if failed else []
        )
        failures += task["failures"]
    return {
        "header": {
            "model": "mPLUG-Owl3-2B-241014",
            "arms": {
                "reference": {"name": "pytorch-fp16", "precision": "fp16", "backend": "PyTorch 2.5.1 (CUDA 12.4)"},
                "candidate": {
                    "name": "ort-int4-gptq",
                    "precision": "int4 GPTQ, group 128",
                    "backend": "ONNX Runtime 1.20.1 (CUDA EP)",
                },
            },
            "created": "2025-01-31T14:05:09Z",
            "tool_versions": {"owl3-export": "0.1.0", "torch": "2.5.1", "onnxruntime": "1.20.1", "numpy": "2.1.3"},
            "gate": {"key": "int4-gptq", **GATE.to_json()},
            "subsets": {
                "vqav2": "sha256:3f1c9a7be2d04b6a",
                "mmbench": "sha256:9b27e01dd4c2f851",
                "pope": "sha256:c4e8a2f3170b9d66",
            },
            "verdict": "rejected" if failures else "accepted",
            "failures": failures,
        },
        "levels": built,
    }


def _failures(entries: Any) -> list[str]:
    items = entries if isinstance(entries, list) else list(entries.values())
    return [f for entry in items for f in entry.get("failures", [])]


def _graph(rng: np.random.Generator, rejected: bool) -> list[dict[str, Any]]:
    return [
        {"name": "onnx.checker full_check", "passed": True, "detail": "decoder.onnx, vision.onnx"},
        {"name": "strict shape inference", "passed": True, "detail": "all outputs typed"},
        {"name": "no float MatMul on quantized weights", "passed": True, "detail": "196 MatMulNBits, 0 MatMul"},
    ]


def _tensors(rng: np.random.Generator, rejected: bool) -> list[dict[str, Any]]:
    """Logits and vision embeddings, then 28 decoder layers' present key/value, error growing with depth
    (and layers 24-25 breaking the cosine gate when rejected)."""
    noise = 0.08 if rejected else 0.02
    comparisons = []
    for name, shape in (("decoder/logits", (1, 64, 512)), ("vision/image_embeds", (1, 729, 64))):
        ref = rng.normal(size=shape)
        comparisons.append(compare_tensors(name, ref, ref + rng.normal(scale=noise, size=shape)))
    for layer in range(28):
        scale = noise * (0.3 + layer / 20) * (3 if rejected and layer in (24, 25) else 1)
        for kind in ("present_key", "present_value"):
            ref = rng.normal(size=(2, 32, 16))
            cand = ref + rng.normal(scale=scale, size=ref.shape)
            comparisons.append(compare_tensors(f"decoder/{kind}_{layer}", ref, cand))
    return [
        {
            **c.to_json(),
            "shape": list(c.shape),  # as JSON gives it back
            "failures": GATE.check_tensor(c, is_logits=c.name == "decoder/logits"),
        }
        for c in comparisons
    ]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _distribution(rng: np.random.Generator, rejected: bool) -> dict[str, dict[str, Any]]:
    """600 positions of a 256-token vocabulary per prompt set; image prompts drift more (and fail if rejected)."""
    out = {}
    for name, noise in (("text", 0.12), ("images", 0.35 if rejected else 0.16)):
        ref = rng.normal(scale=3.0, size=(600, 256))
        cand = ref + rng.normal(scale=noise, size=ref.shape) * rng.lognormal(0, 0.6, size=(600, 1))
        result = compare_distributions(ref, cand, targets=ref.argmax(-1))
        log_ref, log_cand = _log_softmax(ref), _log_softmax(cand)
        kl = np.sum(np.exp(log_ref) * (log_ref - log_cand), axis=-1)  # [600] KL(ref || cand) per position
        out[name] = {
            **result.to_json(),
            "kl_values": [float(v) for v in kl],
            "failures": GATE.check_distribution(name, result),
        }
    return out


def _task(
    rng: np.random.Generator,
    n_units: int,
    cluster_size: int,
    *,
    binary: bool,
    drop: float,
    flip: float,
    metric: str,
    categories: list[str],
    margin: float = 0.01,
) -> dict[str, Any]:
    """One benchmark: units lose with rate flip + drop and gain with rate flip; clusters of cluster_size units."""
    clusters = np.arange(n_units) // cluster_size
    if binary:
        ref = (rng.random(n_units) < 0.78).astype(float)
        cand = ref.copy()
        cand[(ref == 1) & (rng.random(n_units) < (flip + drop) / 0.78)] = 0.0
        cand[(ref == 0) & (rng.random(n_units) < flip / 0.22)] = 1.0
    else:
        levels = np.array([0.0, 0.3, 0.6, 0.9, 1.0])
        ref = rng.choice(levels, n_units, p=[0.15, 0.05, 0.1, 0.15, 0.55])
        step = rng.choice([-1, 0, 1], n_units, p=[flip + drop, 1 - 2 * flip - drop, flip])  # one VQA level
        cand = levels[np.clip(np.searchsorted(levels, ref) + step, 0, 4)]
    which = rng.integers(0, len(categories), n_units)
    breakdown = {
        category: {
            "n_units": int(np.sum(which == i)),
            "reference": float(ref[which == i].mean()),
            "candidate": float(cand[which == i].mean()),
        }
        for i, category in enumerate(categories)
    }
    return {
        "metric": metric,
        "margin": margin,
        "delta": paired_delta(ref, cand, clusters, binary=binary, seed=0).to_json(),
        "categories": breakdown,
        "excluded": {"count": 0, "reasons": {}},
        "certify": certify_statement(n_units, margin),
    }


def _tasks(rng: np.random.Generator, rejected: bool) -> dict[str, dict[str, Any]]:
    mmbench_categories = ["coarse perception", "fine-grained perception", "attribute reasoning", "relation reasoning"]
    tasks = {
        "vqav2": _task(rng, 1000, 3, binary=False, drop=0.004, flip=0.03, metric="VQA accuracy",
                       categories=["yes/no", "number", "other"]),
        "mmbench": _task(rng, 1200, 4, binary=True, drop=0.045 if rejected else -0.003, flip=0.01,
                         metric="accuracy (circular)", categories=[*mmbench_categories, "logic"]),
        "pope": _task(rng, 3000, 6, binary=True, drop=0.0, flip=0.01, metric="accuracy (yes/no)",
                      categories=["random", "popular", "adversarial"]),
    }  # fmt: skip
    tasks["vqav2"]["excluded"] = {"count": 3, "reasons": {"truncated JPEG": 2, "0-byte image": 1}}
    return tasks


def _distractors(rng: np.random.Generator, rejected: bool) -> dict[str, list[list[float]]]:
    out = {}
    for arm, collapse in (("pytorch-fp16", 0.0015), ("ort-int4-gptq", 0.006 if rejected else 0.002)):
        points = []
        for n in (0, 1, 5, 10, 20, 50, 100):
            acc = 0.84 * np.exp(-collapse * n) + rng.normal(0, 0.004)
            half = 1.96 * np.sqrt(acc * (1 - acc) / 400)
            points.append([n, float(acc), float(acc - half), float(acc + half)])
        out[arm] = points
    return out
