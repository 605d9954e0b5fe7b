"""TensorRT optimization profiles derived from the runtime's request limits (torch-free, TensorRT-free).

Every dynamic input of every graph gets (min, opt, max) shapes, so an engine (``owl3-export build-engine``) or the
ONNX Runtime TensorRT execution provider covers exactly what ``Owl3Session`` may send, and no shape makes
TensorRT rebuild. Minimums allow empty caches and memories (a past length of 0, no visual tokens); ``opt`` is a
single-image decode step halfway through the context, the shape decoding spends its time in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from owl3.config import Owl3Config
from owl3.export.specs import graph_specs

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ProfileLimits:
    """What a profile must cover: requests of up to ``max_batch`` samples, ``max_images`` images (crops and
    frames) per request, ``max_visual_tokens`` visual tokens per sample and ``max_context`` tokens of context."""

    max_batch: int
    max_images: int
    max_visual_tokens: int
    max_context: int

    def __post_init__(self) -> None:
        from owl3.errors import UsageError

        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive integer, found {value!r}", where="engine profile")

    @classmethod
    def for_config(
        cls, config: Owl3Config, *, max_batch: int = 1, max_images: int = 8, max_context: int | None = None
    ) -> ProfileLimits:
        """Defaults sized for 8 GB Orin boards: one sample, 8 images, the model's context (or ``max_context``)."""
        context = max_context or config.text.max_position_embeddings
        return cls(max_batch, max_images, max_images * config.image_tokens, context)


# Positions projected onto the vocabulary per run: generation asks for 1, validation's teacher-forced trace for
# every prompt position. TensorRT sizes activation memory for the profile's maximum, and the full context
# (32,768 x 151,936 fp32 logits = 20 GB) would not build on an 8 GB Orin; 512 rows are 311 MB.
MAX_LOGIT_ROWS = 512


def dim_ranges(limits: ProfileLimits, config: Owl3Config) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each named dynamic dim of the graph specs."""
    half = max(1, limits.max_context // 2)
    return {
        "num_images": (1, 1, limits.max_images),
        "batch": (1, 1, limits.max_batch),
        "max_images": (1, 1, limits.max_images),
        "seq": (1, 1, limits.max_context),
        "logit_count": (1, 1, min(limits.max_context, MAX_LOGIT_ROWS)),
        "past": (0, half, limits.max_context - 1),
        "capacity": (1, half, limits.max_context),  # the fused decoder's in-place cache
        "visual": (0, config.image_tokens, limits.max_visual_tokens),
    }


def graph_profiles(
    config: Owl3Config, compute: str, limits: ProfileLimits, fused: bool = False
) -> dict[str, dict[str, list[Shape]]]:
    """{graph: {input name: [min shape, opt shape, max shape]}} for every input with a dynamic dim."""
    ranges = dim_ranges(limits, config)
    profiles: dict[str, dict[str, list[Shape]]] = {}
    for name, spec in graph_specs(config, compute, fused).items():
        inputs = {}
        for tensor in spec.inputs:
            if all(isinstance(d, int) for d in tensor.shape):
                continue
            inputs[tensor.name] = [
                tuple(d if isinstance(d, int) else ranges[d][k] for d in tensor.shape) for k in range(3)
            ]
        profiles[name] = inputs
    return profiles


def ort_tensorrt_options(profile: dict[str, list[Shape]]) -> dict[str, str]:
    """ONNX Runtime TensorRT EP options ``trt_profile_{min,opt,max}_shapes`` (``name:d1xd2,...``) of one graph."""
    keys = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")
    return {
        key: ",".join(f"{name}:{'x'.join(str(d) for d in shapes[k])}" for name, shapes in profile.items())
        for k, key in enumerate(keys)
    }


def to_json(profiles: dict[str, dict[str, list[Shape]]]) -> dict[str, Any]:
    return {g: {name: [list(s) for s in shapes] for name, shapes in p.items()} for g, p in profiles.items()}
