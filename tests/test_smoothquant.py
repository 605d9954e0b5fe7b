"""SmoothQuant: the pure functions, and that smoothing a hyper decoder layer leaves its float function unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from owl3.config import Owl3Config
from owl3.model.owl3 import attention_for_layer
from owl3.model.qwen2 import Qwen2DecoderLayer
from owl3.model.safetensors_files import discover_checkpoint
from owl3.quantize import recipe
from owl3.quantize.checkpoint_io import WeightSource
from owl3.quantize.gptq import Hessian
from owl3.quantize.layerwise import DECODER_GROUPS, BlockQuantizer, capture
from owl3.quantize.model_pass import SampleState, decoder_step
from owl3.quantize.smoothquant import (
    column_absmax,
    smoothed_absmax,
    smoothed_hessian,
    smoothing_vector,
)
from owl3.quantize.stage import plan_modules


def test_smoothing_vector_formula_floor_and_fp16_headroom() -> None:
    act, wmax = torch.tensor([16.0, 1.0, 0.0, 1e-12]), torch.tensor([0.25, 4.0, 1.0, 1.0])
    s = smoothing_vector(act, wmax, 0.5)
    assert s[:2].tolist() == pytest.approx([16**0.5 / 0.25**0.5, 1 / 2])
    assert s[2] == 1.0  # a dead channel is left alone
    assert s[3] == pytest.approx(1e-5)  # floored
    headroom = smoothing_vector(torch.tensor([1e-6]), torch.tensor([1.0]), 0.5, norm_weight=torch.tensor([3.0]))
    assert float(3.0 / headroom) <= 6.0e4  # the folded norm weight stays inside fp16
    assert column_absmax([torch.tensor([[1.0, -5.0]]), torch.tensor([[-2.0, 0.5]])]).tolist() == [2.0, 5.0]


def test_smoothed_statistics_follow_exactly_from_the_raw_ones() -> None:
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 9)
    s = torch.rand(8, generator=torch.Generator().manual_seed(1)) + 0.5
    raw, direct = Hessian(8), Hessian(8)
    raw.add(x)
    direct.add(x / s)
    torch.testing.assert_close(smoothed_hessian(raw.finish(), s), direct.finish(), rtol=1e-5, atol=1e-6)
    assert smoothed_absmax(x.abs().amax(dim=0), s) == pytest.approx(float((x / s).abs().max()), rel=1e-6)


def test_smoothing_a_hyper_layer_leaves_its_float_function_unchanged(demo_model_dir: Path) -> None:
    config = Owl3Config.from_hf_json(demo_model_dir)
    plan = plan_modules(config, recipe("w8a8", v_kv_smoothing="separate"))
    source = WeightSource(discover_checkpoint(demo_model_dir), torch.device("cpu"))
    prefix = "language_model.model.layers.0."  # a hyper layer
    with torch.device("meta"):
        layer = Qwen2DecoderLayer(config.text, attention_for_layer(config, 0))
    layer = source.load(layer, prefix, plan)
    g = torch.Generator().manual_seed(2)
    state = SampleState(
        input_ids=None,
        hidden=torch.randn(1, 9, 128, generator=g),
        images=torch.randn(1, 2, 16, 128, generator=g) * 3,
        image_positions=torch.tensor([[2, 5]]),
        visible=torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2, 2]]),
    )
    attn, x, images = layer.self_attn, layer.input_layernorm(state.hidden), layer.input_layernorm(state.images)
    with torch.no_grad():
        before = {
            "q": attn.q_proj(x),
            "k": attn.k_proj(x),
            "v_kv": attn.v_kv_proj(images),
            "out": decoder_step(config, layer, state),
        }
    quantizer = BlockQuantizer(recipe("w8a8", v_kv_smoothing="separate"), plan, torch.device("cpu"))
    members = list(DECODER_GROUPS[0].members)
    with capture(layer, ["self_attn.q_proj", "self_attn.v_kv_proj"], torch.device("cpu")) as stats, torch.no_grad():
        decoder_step(config, layer, state)
    smooth = quantizer._smooth(layer, DECODER_GROUPS[0], members, members, stats)
    assert smooth["self_attn.q_proj"][1] is None  # folded into input_layernorm
    s_v, pre = smooth["self_attn.v_kv_proj"]  # its own vector, applied explicitly on top of the text one
    with torch.no_grad():
        x, images = layer.input_layernorm(state.hidden), layer.input_layernorm(state.images)
        after = {"q": attn.q_proj(x), "k": attn.k_proj(x), "v_kv": attn.v_kv_proj(images * pre)}
    for key in ("q", "k", "v_kv"):  # equal up to the fp16 rounding of the folded norm weight
        torch.testing.assert_close(after[key], before[key], rtol=2e-3, atol=2e-3 * float(before[key].abs().max()))
    assert s_v.shape == (128,) and not torch.equal(s_v, smooth["self_attn.q_proj"][0])
