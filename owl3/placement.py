"""Where images sit in a prompt: the official ``media_offset`` read once, in numpy (torch-free).

Both the PyTorch model and the ONNX runtime use this one implementation, so image placement, the
MI-RoPE positions and the per-token visibility can never differ between backends.

``media_offset[b, t] = (start_b, start_b + #placeholders before t)``; a sample without images holds
-1000000 in column 1. ``start_b`` indexes the batch's concatenated images (pixel_values rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from owl3.errors import PromptError

NO_IMAGES = -1_000_000  # media_offset[..., 1] of a sample without images (official value)


@dataclass(frozen=True)
class ImagePlacement:
    """starts/counts [B]: each sample's rows of the batch images; seen [B, L]: images token t sees
    (its placeholder precedes t); positions [B, n_max]: MI-RoPE position of each image, i.e. its
    placeholder index + 1 (0 for padding)."""

    starts: np.ndarray
    counts: np.ndarray
    seen: np.ndarray
    positions: np.ndarray

    @property
    def max_images(self) -> int:
        return int(self.positions.shape[1])

    def gather_index(self, num_images: int) -> np.ndarray:
        """[B, n_max] rows of the batch images for each sample's image slots (padding repeats a valid row)."""
        index = self.starts[:, None] + np.arange(self.max_images, dtype=np.int64)[None, :]
        return np.minimum(index, max(num_images - 1, 0))


def parse_media_offset(media_offset: np.ndarray, num_images: int) -> ImagePlacement:
    """Validate and read an official media_offset [B, L, 2] against ``num_images`` batch images."""
    offsets = np.asarray(media_offset, dtype=np.int64)
    if offsets.ndim != 3 or offsets.shape[-1] != 2:
        raise PromptError(
            f"media_offset must be [B, L, 2], found {list(offsets.shape)}",
            where="media_offset",
            fix="pass the processor's media_offset, or None to derive it from <|image|> tokens",
        )
    ends = offsets[:, :, 1]
    has_images = (ends >= 0).all(axis=1)
    partial = np.flatnonzero((ends >= 0).any(axis=1) & ~has_images).tolist()
    if partial:
        raise PromptError(
            f"media_offset rows {partial} mix negative and non-negative image counts",
            where="media_offset",
            fix="use -1000000 for every position of a sample without images",
        )
    starts = np.where(has_images, offsets[:, -1, 0], 0)
    seen = np.where(has_images[:, None], ends - starts[:, None], 0)
    counts = seen[:, -1].copy()
    _check(starts, seen, counts, num_images)
    n_max = int(counts.max()) if counts.size else 0
    slots = np.arange(n_max, dtype=np.int64)
    positions = (seen[:, None, :] <= slots[None, :, None]).sum(axis=-1)  # [B, n_max]
    positions = np.where(slots[None, :] < counts[:, None], positions, 0)
    return ImagePlacement(starts=starts, counts=counts, seen=seen, positions=positions.astype(np.int64))


def _check(starts: np.ndarray, seen: np.ndarray, counts: np.ndarray, num_images: int) -> None:
    if (seen < 0).any() or (seen[:, 1:] < seen[:, :-1]).any():
        raise PromptError(
            "media_offset image counts must start at the sample's start and never decrease",
            where="media_offset",
            fix="pass the processor's media_offset unchanged",
        )
    ends = starts + counts
    if (starts < 0).any() or (ends > num_images).any():
        raise PromptError(
            f"media_offset refers to images up to index {int(ends.max())} but {num_images} images were given",
            where="media_offset / pixel_values",
            fix="pass one pixel_values row per referenced image",
        )


def media_offset_from_ids(input_ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """The official media_offset [B, L, 2] from ``<|image|>`` tokens, with global per-sample image starts."""
    is_image = (np.asarray(input_ids) == image_token_id).astype(np.int64)  # [B, L]
    before = np.cumsum(is_image, axis=1) - is_image  # placeholders strictly before t
    per_sample = is_image.sum(axis=1)
    starts = np.cumsum(per_sample) - per_sample  # [B]
    ends = np.where(per_sample[:, None] > 0, starts[:, None] + before, NO_IMAGES)
    return np.stack((np.broadcast_to(starts[:, None], before.shape), ends), axis=-1).astype(np.int64)
