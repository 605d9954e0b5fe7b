"""Recipes: validated on construction, and what each quantizes (every default float decision has a test)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from owl3.config import Owl3Config
from owl3.quantize.recipes import FLOAT_BY_DEFAULT, RECIPES, RecipeError, float_decision, recipe
from owl3.quantize.stage import linear_shapes, plan_modules

DECODER = "language_model.model.layers.{}.{}"
HYPER_GATE = r"language_model\.model\.layers\.\d+\.self_attn\.gate_proj\.0"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"bits": 3}, "bits 3 is not supported"),
        ({"bits": 8}, "8-bit weights need group_size -1"),
        ({"group_size": 100}, "4-bit weights need a group size"),
        ({"method": "awq"}, "unknown method"),
        ({"damp": 0.0}, "damp 0.0 is outside"),
        ({"method": "rtn"}, "act_order only changes GPTQ's column order"),
        ({"smoothquant_alpha": 0.5}, "SmoothQuant settings need int8 activations"),
        ({"activations": "int8", "smoothquant_alpha": 0.5, "v_kv_smoothing": "shared"}, "need 8-bit weights"),
        ({"lm_head": "int2"}, "lm_head='int2' is not supported"),
        ({"vision": "fp8"}, "vision='fp8' is not supported"),
        ({"include": ()}, "include matches nothing"),
        ({"exclude": ("layers.[",)}, "not a regular expression"),
    ],
)
def test_invalid_recipes_are_refused_with_a_fix(overrides: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message) as error:
        recipe("int4", **overrides)
    assert error.value.exit_code == 2 and error.value.fix


def test_w8a8_needs_its_smoothquant_settings() -> None:
    with pytest.raises(RecipeError, match="smoothquant_alpha must be in"):
        recipe("w8a8", smoothquant_alpha=1.5)
    with pytest.raises(RecipeError, match="v_kv_smoothing"):
        recipe("w8a8", v_kv_smoothing="both")
    with pytest.raises(RecipeError, match="unknown recipe 'int3'"):
        recipe("int3")
    with pytest.raises(RecipeError, match="unknown recipe options"):
        recipe("int4", bit=4)


def test_the_recipes() -> None:
    assert (RECIPES["int4"].bits, RECIPES["int4"].group_size, RECIPES["int4"].method) == (4, 128, "gptq")
    assert (RECIPES["rtn4"].method, RECIPES["rtn4"].group_size) == ("rtn", 128)
    assert (RECIPES["int8"].bits, RECIPES["int8"].group_size, RECIPES["int8"].activations) == (8, -1, None)
    w8a8 = RECIPES["w8a8"]
    assert (w8a8.activations, w8a8.smoothquant_alpha, w8a8.group_size) == ("int8", 0.5, -1)
    assert w8a8.v_kv_smoothing in ("separate", "shared")


@pytest.mark.parametrize("name", ["q_proj", "k_proj", "v_proj", "o_proj", "v_kv_proj"])
def test_every_attention_linear_is_quantized_hyper_v_kv_proj_included(name: str) -> None:
    assert recipe("int4").scheme_for(DECODER.format(0, f"self_attn.{name}")) == (4, 128)


@pytest.mark.parametrize("name", ["gate_proj", "up_proj", "down_proj"])
def test_every_mlp_linear_is_quantized(name: str) -> None:
    assert recipe("int8").scheme_for(DECODER.format(27, f"mlp.{name}")) == (8, -1)


@pytest.mark.parametrize(
    ("module", "pattern"),
    [
        ("vision_model.encoder.layers.3.mlp.fc1", r"vision_model\..*"),
        ("vision_model.encoder.layers.0.self_attn.q_proj", r"vision_model\..*"),
        ("vision2text_model", r"vision2text_model"),
        ("language_model.lm_head", r"language_model\.lm_head"),
        ("language_model.model.embed_tokens", r"language_model\.model\.embed_tokens"),
        ("language_model.model.layers.8.self_attn.gate_proj.0", HYPER_GATE),
    ],
)
def test_each_float_by_default_decision_holds(module: str, pattern: str) -> None:
    """The vision tower, the projector, lm_head, the embeddings and the hyper gate stay float, each for a
    written reason."""
    assert recipe("int4").scheme_for(module) is None
    assert float_decision(module) == FLOAT_BY_DEFAULT[pattern]
    assert len(FLOAT_BY_DEFAULT[pattern]) > 40  # a reason, not a label


def test_overrides_quantize_lm_head_and_vision_to_int8_per_channel() -> None:
    chosen = recipe("int4", lm_head="int8", vision="int8")
    assert chosen.scheme_for("language_model.lm_head") == (8, -1)
    assert chosen.scheme_for("vision_model.encoder.layers.3.mlp.fc2") == (8, -1)
    assert chosen.scheme_for("vision2text_model") is None  # the projector has no override
    assert chosen.scheme_for("language_model.model.layers.0.self_attn.gate_proj.0") is None


def test_lm_head_can_be_int4_in_groups_of_32_like_the_peers_but_vision_cannot() -> None:
    assert recipe("int4", lm_head="int4").scheme_for("language_model.lm_head") == (4, 32)
    with pytest.raises(RecipeError, match="vision='int4' is not supported") as error:
        recipe("int4", vision="int4")
    assert "'int8'" in error.value.fix and "'int4'" not in error.value.fix


def test_exclude_wins_and_include_cannot_reach_float_by_design_modules() -> None:
    chosen = recipe("int4", exclude=(r"language_model\.model\.layers\.0\..*",))
    assert chosen.scheme_for(DECODER.format(0, "mlp.down_proj")) is None
    assert chosen.scheme_for(DECODER.format(1, "mlp.down_proj")) == (4, 128)
    greedy = recipe("int4", include=(r"language_model\..*",))
    with pytest.raises(RecipeError, match="stays in float by design") as error:
        greedy.scheme_for("language_model.model.layers.0.self_attn.gate_proj.0")
    assert "lm_head='int8'" in error.value.fix


def test_plan_adapts_group_size_per_layer_and_refuses_unpackable_layers() -> None:
    from owl3.demo import demo_config

    config = demo_config()  # MLP K = 352: groups of 32
    plan = plan_modules(config, recipe("int4"))
    assert plan[DECODER.format(0, "mlp.down_proj")].group_size == 32
    assert plan[DECODER.format(0, "mlp.up_proj")].group_size == 128
    assert plan[DECODER.format(0, "self_attn.v_kv_proj")].bits == 4
    assert DECODER.format(1, "self_attn.v_kv_proj") not in plan  # layer 1 is not a hyper layer
    assert all(not p.activations for p in plan.values())
    w8a8 = plan_modules(config, recipe("w8a8", lm_head="int8"))
    assert w8a8[DECODER.format(0, "mlp.down_proj")].activations
    assert not w8a8["language_model.lm_head"].activations  # overrides are weight-only
    tiny = Owl3Config.tiny()
    odd = replace(tiny, text=replace(tiny.text, intermediate_size=100))
    with pytest.raises(RecipeError, match=r"mlp\.down_proj: in_features 100 has no group size") as error:
        plan_modules(odd, recipe("int4"))
    assert "--exclude" in error.value.fix


def test_linear_shapes_lists_lm_head_even_when_tied() -> None:
    config = Owl3Config.qwen2_0_5b_class_unverified()
    shapes = linear_shapes(config)
    assert shapes["language_model.lm_head"] == (config.text.vocab_size, config.text.hidden_size)
    assert "language_model.model.embed_tokens" not in shapes
