"""Config: the official config.json read once (1-based hyper_layers), presets, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from owl3.config import Owl3Config
from owl3.errors import ConfigError

OFFICIAL_7B_240728 = {  # the verbatim values of spec §2.1
    "architectures": ["mPLUGOwl3Model"],
    "auto_map": {"AutoConfig": "configuration_mplugowl3.mPLUGOwl3Config"},
    "model_type": "mplugowl3",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "vocab_size": 151851,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "use_sliding_window": False,
    "sliding_window": 131072,
    "max_window_layers": 28,
    "hyper_layers": [1, 9, 17, 25],
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 384,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
    },
}


def test_official_config_equals_preset_with_0_based_hyper_layers(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_7B_240728))
    config = Owl3Config.from_hf_json(tmp_path)
    preset = Owl3Config.owl3_7b_240728()
    assert config.text == preset.text and config.vision == preset.vision
    assert config.hyper_layers == (0, 8, 16, 24)
    assert config.image_tokens == 729 and config.vision.layers_run == 26
    assert config.text.head_dim == 128 and config.text.num_kv_groups == 7


def test_to_hf_dict_round_trips() -> None:
    for preset in (Owl3Config.tiny(), Owl3Config.owl3_7b_240728()):
        raw = preset.to_hf_dict()
        assert raw["hyper_layers"] == [i + 1 for i in preset.hyper_layers]
        again = Owl3Config.from_hf_json(raw)
        assert (again.text, again.vision, again.hyper_layers) == (preset.text, preset.vision, preset.hyper_layers)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}, "unsupported architecture"),
        ({"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"]}, "'qwen2_vl'"),
        ({"hyper_layers": [1, 40]}, "hyper layer indices must be distinct and within 0..27"),
        ({"num_attention_heads": 27}, "not divisible by num_attention_heads 27"),
        ({"use_sliding_window": True}, "use_sliding_window is true"),
        ({"rope_scaling": {"type": "yarn", "factor": 4}}, "rope_scaling"),
        ({"hidden_size": "big"}, "malformed value|non-numeric|positive integer"),
        ({"vision_config": {"model_type": "clip_vision_model"}}, "clip_vision_model"),
    ],
)
def test_bad_configs_are_refused_naming_what_is_supported(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        Owl3Config.from_hf_json({**OFFICIAL_7B_240728, **change})
    assert "config.json" in str(info.value) or "config" in str(info.value)


def test_unsupported_architecture_error_lists_what_is_supported() -> None:
    with pytest.raises(ConfigError, match="owl3-export supports mPLUG-Owl3 revision 240728"):
        Owl3Config.from_hf_json({**OFFICIAL_7B_240728, "model_type": "llava"})


def test_missing_and_invalid_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"expected a config\.json file, found none"):
        Owl3Config.from_hf_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Owl3Config.from_hf_json(tmp_path)


def test_unverified_preset_is_marked_and_unknown_preset_refused() -> None:
    assert "unverified" in Owl3Config.preset("1b-class-unverified").name
    with pytest.raises(ConfigError, match="unknown preset"):
        Owl3Config.preset("13b")
