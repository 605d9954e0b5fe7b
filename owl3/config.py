"""Typed configuration of mPLUG-Owl3 (revision 7B-240728 layout).

Three frozen dataclasses, one per component, and ``Owl3Config`` joining them. ``Owl3Config.from_hf_json``
is the only code that knows the upstream ``config.json`` key names; in particular the upstream
``hyper_layers`` list is 1-based and is converted here, once, to 0-based layer indices.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from owl3.errors import ConfigError

SUPPORTED_MODEL_TYPE = "mplugowl3"
SUPPORTED_ARCHITECTURE = "mPLUGOwl3Model"
SUPPORTED = (
    "mPLUG-Owl3 revision 240728 layout (model_type 'mplugowl3', architectures ['mPLUGOwl3Model'], "
    "hyper attention with gate_proj, single-Linear projector)"
)

# Upstream defaults applied when a key is absent, as the official config classes do (spec §2.1).
_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "use_sliding_window": False,
    "rope_scaling": None,
}
_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
_DEFAULT_HYPER_LAYERS_1BASED = (1, 9, 17, 25)


@dataclass(frozen=True)
class TextConfig:
    """The Qwen2 language model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        _require_positive(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"))
        _require_positive(self, ("num_attention_heads", "num_key_value_heads", "max_position_embeddings"))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}",
                where="text config",
                fix="fix config.json",
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}",
                where="text config",
                fix="fix config.json",
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"head dim {self.head_dim} is odd; rotary embedding needs an even head dim",
                where="text config",
                fix="fix config.json",
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclass(frozen=True)
class VisionConfig:
    """The SigLIP vision tower. Only the first ``num_hidden_layers - 1`` encoder layers run (spec §3)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _require_positive(self, ("hidden_size", "intermediate_size", "num_attention_heads", "num_channels"))
        _require_positive(self, ("image_size", "patch_size"))
        if self.num_hidden_layers < 2:
            raise ConfigError(
                f"vision num_hidden_layers is {self.num_hidden_layers}; the model reads hidden_states[-2], "
                "so at least 2 layers are needed",
                where="vision config",
                fix="fix config.json",
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}",
                where="vision config",
                fix="fix config.json",
            )
        if self.patch_size > self.image_size:
            raise ConfigError(
                f"vision patch_size {self.patch_size} exceeds image_size {self.image_size}",
                where="vision config",
                fix="fix config.json",
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Patches per side. 384 // 14 = 27: the last 6 pixel rows and columns are never read."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def layers_run(self) -> int:
        """Encoder layers that actually run: the output is hidden_states[-2]."""
        return self.num_hidden_layers - 1


@dataclass(frozen=True)
class Owl3Config:
    """The whole model. ``hyper_layers`` holds 0-based decoder layer indices."""

    text: TextConfig
    vision: VisionConfig
    hyper_layers: tuple[int, ...] = field(default=(0, 8, 16, 24))
    name: str = "custom"

    def __post_init__(self) -> None:
        layers = tuple(int(i) for i in self.hyper_layers)
        object.__setattr__(self, "hyper_layers", layers)
        bad = [i for i in layers if not 0 <= i < self.text.num_hidden_layers]
        if bad or len(set(layers)) != len(layers):
            raise ConfigError(
                f"hyper layer indices must be distinct and within 0..{self.text.num_hidden_layers - 1}, "
                f"found {list(layers)} (0-based)",
                where="config hyper_layers",
                fix="fix hyper_layers in config.json (it is 1-based there)",
            )

    # ---- derived -------------------------------------------------------------------------------
    @property
    def image_tokens(self) -> int:
        """Visual tokens per image (729 for 384px / 14px patches)."""
        return self.vision.num_patches

    def is_hyper(self, layer: int) -> bool:
        return layer in self.hyper_layers

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def tiny(cls) -> Owl3Config:
        """A few-kilobyte model of the exact architecture, for tests. GQA, 2 hyper layers of 4."""
        return cls(
            text=TextConfig(
                vocab_size=512,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                rope_theta=10000.0,
                max_position_embeddings=4096,
                bos_token_id=None,
                eos_token_id=None,
            ),
            vision=VisionConfig(
                hidden_size=48,
                intermediate_size=96,
                num_hidden_layers=3,
                num_attention_heads=4,
                image_size=30,
                patch_size=7,
            ),
            hyper_layers=(0, 2),
            name="tiny",
        )

    @classmethod
    def owl3_7b_240728(cls) -> Owl3Config:
        """The exact mPLUG-Owl3-7B-240728 sizes (spec §2.1)."""
        return cls(
            text=TextConfig(
                vocab_size=151851,
                hidden_size=3584,
                intermediate_size=18944,
                num_hidden_layers=28,
                num_attention_heads=28,
                num_key_value_heads=4,
                rms_norm_eps=1e-6,
                rope_theta=1_000_000.0,
                max_position_embeddings=32768,
                tie_word_embeddings=False,
                bos_token_id=151643,
                eos_token_id=151645,
            ),
            vision=VisionConfig(
                hidden_size=1152,
                intermediate_size=4304,
                num_hidden_layers=27,
                num_attention_heads=16,
                image_size=384,
                patch_size=14,
            ),
            hyper_layers=(0, 8, 16, 24),
            name="mPLUG-Owl3-7B-240728",
        )

    @classmethod
    def qwen2_0_5b_class_unverified(cls) -> Owl3Config:
        """UNVERIFIED: a 1B-class model (Qwen2-0.5B decoder, real SigLIP-400m tower).

        The real 1B-241014 config was not available (spec §2.3); these sizes come from stock Qwen2-0.5B
        and its hyper layer placement is a guess. Use it for benchmarks, never to load a real checkpoint
        without reading its config.json.
        """
        big = cls.owl3_7b_240728()
        return cls(
            text=replace(
                big.text,
                hidden_size=896,
                intermediate_size=4864,
                num_hidden_layers=24,
                num_attention_heads=14,
                num_key_value_heads=2,
                tie_word_embeddings=True,
                vocab_size=151_936,  # Qwen2-0.5B's own (the 7B-240728 has 151,851, which int4/int8 packing refuses)
            ),
            vision=big.vision,
            hyper_layers=(0, 8, 16),
            name="1B-class (unverified)",
        )

    @classmethod
    def preset(cls, name: str) -> Owl3Config:
        presets = {
            "tiny": cls.tiny,
            "7b-240728": cls.owl3_7b_240728,
            "1b-class-unverified": cls.qwen2_0_5b_class_unverified,
        }
        if name not in presets:
            raise ConfigError(
                f"unknown preset {name!r}",
                where="config preset",
                fix=f"use one of {sorted(presets)}",
            )
        return presets[name]()

    # ---- upstream config.json ------------------------------------------------------------------
    @classmethod
    def from_hf_json(cls, source: str | Path | dict[str, Any]) -> Owl3Config:
        """Read an official ``config.json`` (a path to the file or its directory, or the parsed dict)."""
        where = "config.json"
        if isinstance(source, dict):
            raw = source
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            where = str(path)
            raw = read_config_json(path)
        return _parse_hf_config(raw, where)

    def to_hf_dict(self) -> dict[str, Any]:
        """The official config.json layout (1-based ``hyper_layers``), as the real checkpoint has it."""
        text = asdict(self.text)
        vision = asdict(self.vision)
        out: dict[str, Any] = {
            "architectures": [SUPPORTED_ARCHITECTURE],
            "auto_map": {
                "AutoConfig": "configuration_mplugowl3.mPLUGOwl3Config",
                "AutoModel": "modeling_mplugowl3.mPLUGOwl3Model",
                "AutoModelForCausalLM": "modeling_mplugowl3.mPLUGOwl3Model",
            },
            "model_type": SUPPORTED_MODEL_TYPE,
            **text,
            "hidden_act": "silu",
            "use_sliding_window": False,
            "hyper_layers": [i + 1 for i in self.hyper_layers],
            "image_size": self.vision.image_size,
            "patch_size": self.vision.patch_size,
            "vision_config": {**vision, "model_type": "siglip_vision_model"},
            "torch_dtype": "float32",
        }
        return out


# ---- parsing helpers ---------------------------------------------------------------------------


def read_config_json(path: Path) -> dict[str, Any]:
    """A config.json as a dict; ConfigError when it is missing or not a JSON object."""
    if not path.is_file():
        raise ConfigError(
            "expected a config.json file, found none",
            where=str(path),
            fix="point to a Hugging Face model directory that contains config.json",
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config.json is not valid JSON: {exc}", where=str(path), fix="restore the file") from exc
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config.json must hold a JSON object, found {type(raw).__name__}",
            where=str(path),
            fix="restore the file",
        )
    return raw


def _parse_hf_config(raw: dict[str, Any], where: str) -> Owl3Config:
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if model_type != SUPPORTED_MODEL_TYPE or SUPPORTED_ARCHITECTURE not in architectures:
        raise ConfigError(
            f"unsupported architecture: model_type {model_type!r}, architectures {architectures!r}",
            where=where,
            fix=f"owl3-export supports {SUPPORTED}",
        )
    text_raw = {k: raw.get(k, default) for k, default in _TEXT_DEFAULTS.items()}
    if text_raw.pop("hidden_act") != "silu":
        raise ConfigError(
            f"hidden_act {raw.get('hidden_act')!r} is not supported", where=where, fix=f"supported: {SUPPORTED}"
        )
    if text_raw.pop("use_sliding_window"):
        raise ConfigError(
            "use_sliding_window is true; the 240728 model never uses a sliding window",
            where=where,
            fix=f"supported: {SUPPORTED}",
        )
    if text_raw.pop("rope_scaling") is not None:
        raise ConfigError(
            f"rope_scaling {raw.get('rope_scaling')!r} is not supported",
            where=where,
            fix=f"supported: {SUPPORTED} with plain RoPE",
        )
    vision_src = raw.get("vision_config")
    if not isinstance(vision_src, dict):
        raise ConfigError("config.json has no vision_config object", where=where, fix=f"supported: {SUPPORTED}")
    vision_type = vision_src.get("model_type", "siglip_vision_model")
    if vision_type != "siglip_vision_model":
        raise ConfigError(
            f"vision_config.model_type {vision_type!r} is not supported (expected 'siglip_vision_model')",
            where=where,
            fix=f"supported: {SUPPORTED}",
        )
    vision_raw = {k: vision_src.get(k, default) for k, default in _VISION_DEFAULTS.items()}
    if vision_raw.pop("hidden_act") != "gelu_pytorch_tanh":
        raise ConfigError(
            f"vision hidden_act {vision_src.get('hidden_act')!r} is not supported",
            where=where,
            fix="supported: gelu_pytorch_tanh (SigLIP)",
        )
    hyper_1based = raw.get("hyper_layers", _DEFAULT_HYPER_LAYERS_1BASED)
    if not isinstance(hyper_1based, list | tuple) or not all(isinstance(i, int) for i in hyper_1based):
        raise ConfigError(
            f"hyper_layers must be a list of 1-based layer numbers, found {hyper_1based!r}",
            where=where,
            fix="fix config.json",
        )
    try:
        text = TextConfig(**text_raw)
        vision = VisionConfig(**vision_raw)
    except TypeError as exc:  # a value of the wrong JSON type reaching arithmetic
        raise ConfigError(f"malformed value in config.json: {exc}", where=where, fix="fix config.json") from exc
    if any(not isinstance(v, int | float) or isinstance(v, bool) for v in _numbers(text, vision)):
        raise ConfigError("config.json holds a non-numeric size", where=where, fix="fix config.json")
    name = str(raw.get("_name_or_path") or "mplugowl3")
    return Owl3Config(text=text, vision=vision, hyper_layers=tuple(i - 1 for i in hyper_1based), name=name)


def _numbers(text: TextConfig, vision: VisionConfig) -> list[Any]:
    return [
        text.vocab_size,
        text.hidden_size,
        text.intermediate_size,
        text.num_hidden_layers,
        text.num_attention_heads,
        text.num_key_value_heads,
        text.rms_norm_eps,
        text.rope_theta,
        vision.hidden_size,
        vision.intermediate_size,
        vision.num_hidden_layers,
        vision.num_attention_heads,
        vision.image_size,
        vision.patch_size,
    ]


def _require_positive(obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(
                f"{name} must be a positive integer, found {value!r}",
                where=type(obj).__name__,
                fix="fix config.json",
            )
