"""Fixed probe prompts for tensor (L1) and next-token (L2) comparisons: text only, one cut image, three
uncut images, built with the model's own processor so every backend gets identical inputs (torch-free)."""

from __future__ import annotations

from typing import Any

from PIL import Image

from owl3.demo import demo_image
from owl3.processor import Owl3Processor


def validation_cases(processor: Owl3Processor) -> dict[str, dict[str, Any]]:
    """Processor outputs (numpy) for: text only, one cut image, three uncut images."""
    pictures = [demo_image(), demo_image(200, 320).rotate(90, expand=True), Image.new("RGB", (64, 64), (30, 160, 60))]

    def ask(text: str, images: list | None, cut: bool) -> dict[str, Any]:
        messages = [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        return dict(processor(messages, images=images, cut_enable=cut, return_tensors="np"))

    return {
        "text": ask("Describe a red circle next to a blue square.", None, True),
        "one_image": ask("<|image|>\nWhat shape is on the left?", pictures[:1], True),
        "three_images": ask("<|image|><|image|><|image|>\nWhich image shows a green square?", pictures, False),
    }
