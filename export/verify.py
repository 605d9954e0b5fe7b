"""Built-in validation of an export: each graph against the PyTorch reference on real image+text inputs.

Inputs come from the model's own processor (a text-only prompt, one cut image, three uncut images). Each
graph gets the *reference* inputs (graph isolation): the vision graph the pixels, the visual-memory graph
the reference image embeddings, the decoder the reference visual memory, for a prefill and one decode
step on the ONNX KV cache. Outputs are compared with ``owl3.validate.compare`` and gated by
``owl3.validate.gates`` (fp32 against PyTorch fp32; fp16 against PyTorch fp16 with the same fp32 islands).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from owl3.export.specs import past_key, past_value, visual_key, visual_value
from owl3.model.attention import fp32_islands
from owl3.model.weights import load_model
from owl3.processor import Owl3Processor
from owl3.validate.compare import compare_distributions, compare_tensors
from owl3.validate.gates import GATES, export_gate
from owl3.validate.probes import validation_cases

_TORCH = {"fp32": torch.float32, "fp16": torch.float16}
_NUMPY = {"fp32": np.float32, "fp16": np.float16}


class _Graphs:
    def __init__(self, directory: Path, flavour: str | None) -> None:
        from owl3.runtime.backend import session_config

        options = ort.SessionOptions()
        options.log_severity_level = 3
        for key, value in session_config(flavour).items():
            options.add_session_config_entry(key, value)
        self.sessions = {
            name: ort.InferenceSession(str(directory / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
            for name in ("vision", "visual_memory", "decoder")
        }

        self.fused = "seqlens_k" in {i.name for i in self.sessions["decoder"].get_inputs()}

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.sessions[name]
        if name == "decoder" and self.fused:
            feeds = _in_place_feeds(feeds)
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


def _in_place_feeds(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fused decoder's feeds for the same step: the past copied into buffers of capacity past + seq (the
    presents it returns are those buffers, filled), and the cache lengths."""
    batch, length = feeds["input_ids"].shape
    past = feeds["past_key_0"].shape[2]
    out = dict(feeds)
    for name, value in feeds.items():
        if name.startswith("past_"):
            buffer = np.zeros((*value.shape[:2], past + length, value.shape[3]), np.float32)  # fp32 cache
            buffer[:, :, :past] = value
            out[name] = buffer
    out["seqlens_k"] = np.full(batch, past + length - 1, dtype=np.int32)
    out["total_sequence_length"] = np.array(past + length, dtype=np.int32)
    return out


def verify_export(
    directory: Path,
    model_dir: Path,
    precision: str,
    quantized: dict[str, Any] | None = None,
    flavour: str | None = None,
) -> dict[str, Any]:
    """Compare every graph with PyTorch on the same checkpoint in the graphs' float ``precision``; returns
    {"gate", "passed", "failures", "cases": {...}}. ``quantized``: the flavour record of a quantized export,
    whose gate is ``export_gate`` (PyTorch computes with exactly the checkpoint's integers and scales)."""
    gate = export_gate(quantized) if quantized else GATES[f"onnx-{precision}"]
    model = load_model(model_dir, dtype=_TORCH[precision])
    processor = Owl3Processor.from_pretrained(model_dir)
    graphs = _Graphs(directory, flavour)
    islands = fp32_islands() if precision != "fp32" else contextlib.nullcontext()
    cases, failures = {}, []
    with torch.inference_mode(), islands:
        for name, inputs in validation_cases(processor).items():
            results = _verify_case(model, graphs, inputs, precision)
            for comparison in results["tensors"]:
                failures += [
                    f"{name}: {f}" for f in gate.check_tensor(comparison, is_logits="logits" in comparison.name)
                ]
            failures += gate.check_distribution(f"{name}: next token", results["distribution"])
            cases[name] = {
                "tensors": [c.to_json() for c in results["tensors"]],
                "distribution": results["distribution"].to_json(),
            }
    return {"gate": gate.to_json(), "passed": not failures, "failures": failures, "cases": cases}


def _verify_case(model, graphs: _Graphs, inputs: dict[str, Any], precision: str) -> dict[str, Any]:
    f = _NUMPY[precision]
    config = model.config
    tensors = []
    ids = torch.from_numpy(inputs["input_ids"])
    memory, visible = None, torch.zeros_like(ids)
    if inputs.get("pixel_values") is not None:
        pixels = torch.from_numpy(inputs["pixel_values"])
        embeds = model.encode_images(pixels)
        onnx_embeds = graphs.run("vision", {"pixel_values": pixels.numpy().astype(f)})["image_embeds"]
        tensors.append(compare_tensors("vision/image_embeds", _np(embeds), onnx_embeds))
        memory, visible = model.memory_from_media(embeds, torch.from_numpy(inputs["media_offset"]))
        tensors += _verify_memory(model, graphs, embeds, inputs["media_offset"], memory, f)
    positions = torch.arange(ids.shape[1])[None]
    logits, present = model.language_model(ids, positions, None, memory, visible)
    feeds = _decoder_feeds(config, ids, positions, visible, positions, None, memory, f)  # every position
    onnx_out = graphs.run("decoder", feeds)
    tensors.append(compare_tensors("decoder/prefill/logits", _np(logits), onnx_out["logits"]))
    tensors.append(compare_tensors("decoder/prefill/present_key_0", _np(present[0][0]), onnx_out["present_key_0"]))
    # One decode step on the ONNX cache, with the token both backends agree to feed.
    token = logits[:, -1:].argmax(-1)
    step_visible = memory.image_counts[:, None] if memory is not None else torch.zeros_like(token)
    position = torch.full_like(token, ids.shape[1])
    ref_step, _ = model.language_model(token, position, present, memory, step_visible)
    onnx_past = [(onnx_out[f"present_key_{i}"], onnx_out[f"present_value_{i}"]) for i in range(len(present))]
    step_feeds = _decoder_feeds(config, token, position, step_visible, torch.zeros_like(token), onnx_past, memory, f)
    onnx_step = graphs.run("decoder", step_feeds)
    tensors.append(compare_tensors("decoder/decode/logits", _np(ref_step), onnx_step["logits"]))
    reference_all = np.concatenate([_np(logits), _np(ref_step)], axis=1)
    candidate_all = np.concatenate([onnx_out["logits"], onnx_step["logits"]], axis=1)
    return {"tensors": tensors, "distribution": compare_distributions(reference_all, candidate_all)}


def _verify_memory(model, graphs: _Graphs, embeds, media_offset: np.ndarray, memory, f) -> list:
    from owl3.placement import parse_media_offset

    placement = parse_media_offset(media_offset, embeds.shape[0])
    per_sample = _np(embeds)[placement.gather_index(embeds.shape[0])]
    onnx_memory = graphs.run(
        "visual_memory", {"image_embeds": per_sample.astype(f), "image_positions": placement.positions}
    )
    results = []
    for j, (k, v) in enumerate(memory.kv):
        results.append(compare_tensors(f"visual_memory/{visual_key(j)}", _np(k), onnx_memory[visual_key(j)]))
        results.append(compare_tensors(f"visual_memory/{visual_value(j)}", _np(v), onnx_memory[visual_value(j)]))
    return results


def _decoder_feeds(config, ids, positions, visible, logit_positions, past, memory, f) -> dict[str, np.ndarray]:
    text = config.text
    b, nkv, hd = ids.shape[0], text.num_key_value_heads, text.head_dim
    empty = np.zeros((b, nkv, 0, hd), dtype=f)
    feeds = {"input_ids": _np(ids), "position_ids": _np(positions), "visible_images": _np(visible)}
    feeds["logit_positions"] = _np(logit_positions)
    for i in range(text.num_hidden_layers):
        feeds[past_key(i)] = past[i][0] if past else empty
        feeds[past_value(i)] = past[i][1] if past else empty
    for j in range(len(config.hyper_layers)):
        feeds[visual_key(j)] = _np(memory.kv[j][0]).astype(f) if memory else empty
        feeds[visual_value(j)] = _np(memory.kv[j][1]).astype(f) if memory else empty
    return feeds


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()
