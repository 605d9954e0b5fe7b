"""Torch-free inference on ONNX Runtime (owl3.runtime). Must never import torch.

``Owl3Session(export_dir)`` loads a verified ONNX export (``owl3-export export``) and answers chat
messages with images or videos (``generate``, ``stream``) or runs token ids (``generate_ids``,
``stream_ids``). Only numpy, onnxruntime, PIL, tokenizers and torch-free owl3 modules are imported.
Names are loaded on first use, so ``owl3.runtime.cli`` can be registered without onnxruntime installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "GenerationResult": "owl3.runtime.session",
    "Owl3Session": "owl3.runtime.session",
    "read_export": "owl3.runtime.manifest",
    "RequestLimits": "owl3.runtime.request",
    "SamplingConfig": "owl3.runtime.sampling",
    "stream_text": "owl3.runtime.sampling",
    "PROVIDER_CHOICES": "owl3.runtime.backend",
    "check_model_versions": "owl3.runtime.backend",
    "resolve_providers": "owl3.runtime.backend",
}

if TYPE_CHECKING:
    from owl3.runtime.backend import PROVIDER_CHOICES, check_model_versions, resolve_providers
    from owl3.runtime.manifest import read_export
    from owl3.runtime.request import RequestLimits
    from owl3.runtime.sampling import SamplingConfig, stream_text
    from owl3.runtime.session import GenerationResult, Owl3Session


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'owl3.runtime' has no attribute {name!r}")


__all__ = [
    "PROVIDER_CHOICES",
    "GenerationResult",
    "Owl3Session",
    "RequestLimits",
    "SamplingConfig",
    "check_model_versions",
    "read_export",
    "resolve_providers",
    "stream_text",
]
