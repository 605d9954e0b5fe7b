"""owl3-export: mPLUG-Owl3 for the edge.

The core namespace is torch-free on import: ``owl3.runtime`` imports ``owl3.processor`` on devices
without torch, so the torch-backed names below are loaded lazily, on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from owl3.config import Owl3Config, TextConfig, VisionConfig
from owl3.errors import Owl3Error

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("owl3.model.weights", "load_model"),
    "Owl3Model": ("owl3.model.owl3", "Owl3Model"),
    "Owl3Processor": ("owl3.processor", "Owl3Processor"),
}

if TYPE_CHECKING:
    from owl3.model.owl3 import Owl3Model
    from owl3.model.weights import load_model
    from owl3.processor import Owl3Processor


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'owl3' has no attribute {name!r}")


__all__ = [
    "Owl3Config",
    "Owl3Error",
    "Owl3Model",
    "Owl3Processor",
    "TextConfig",
    "VisionConfig",
    "__version__",
    "load_model",
]
