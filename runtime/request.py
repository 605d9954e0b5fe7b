"""Request checks of the runtime: ids, pixels, image placement and the limits, before anything runs.

``RequestChecker.prepare`` turns the arguments of ``Owl3Session.stream_ids`` into a ``Request`` or raises
(PromptError, exit 3, for the request; UsageError, exit 2, for options). Limits (``RequestLimits``):

- images: rows of ``pixel_values`` (crops, frames) <= ``max_images``;
- visual tokens: ``batch x n_max x P`` (the visual memory each hyper layer allocates; for one sample the
  number of its images times P) <= ``max_visual_tokens``;
- context: prompt length + ``max_new_tokens`` <= ``max_context`` (default the model's
  ``max_position_embeddings``).

Without ``media_offset`` the placement is derived from ``<|image|>`` tokens, which must number exactly
the images given (both counts in the error), as the PyTorch model requires.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from owl3.config import Owl3Config
from owl3.errors import PromptError, UsageError
from owl3.placement import ImagePlacement, media_offset_from_ids, parse_media_offset
from owl3.processor import DEFAULT_MAX_IMAGES
from owl3.runtime.sampling import SamplingConfig


@dataclass(frozen=True)
class RequestLimits:
    """Per-request bounds, checked before any allocation (see the module docstring)."""

    max_images: int
    max_visual_tokens: int
    max_context: int

    @classmethod
    def for_config(
        cls,
        config: Owl3Config,
        max_images: int = DEFAULT_MAX_IMAGES,
        max_visual_tokens: int | None = None,
        max_context: int | None = None,
    ) -> RequestLimits:
        """Limits for ``config``: visual tokens default to ``max_images * P``, context to the model's."""
        for name, value in (("max_images", max_images), ("max_visual_tokens", max_visual_tokens or 1),
                            ("max_context", max_context or 1)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive integer, found {value!r}", where="Owl3Session")
        model = config.text.max_position_embeddings
        if max_context is not None and max_context > model:
            raise UsageError(
                f"max_context={max_context} exceeds the model's max_position_embeddings of {model}",
                where="Owl3Session",
                fix=f"use max_context <= {model}",
            )
        return cls(max_images, max_visual_tokens or max_images * config.image_tokens, max_context or model)


@dataclass(frozen=True)
class Request:
    """A checked request: everything the decoding loop needs, nothing computed yet."""

    input_ids: np.ndarray  # [B, L] int64
    pixel_values: np.ndarray | None  # [N, 3, S, S] in the export's float dtype
    placement: ImagePlacement
    max_new_tokens: int
    stop: np.ndarray  # end token ids, int64
    pad_token_id: int
    sampling: SamplingConfig


@dataclass(frozen=True)
class RequestChecker:
    """Checks requests for one export: its config, limits, token ids and float dtype (fp32 or fp16)."""

    config: Owl3Config
    limits: RequestLimits
    image_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    float_dtype: np.dtype

    def prepare(
        self,
        input_ids: np.ndarray,
        pixel_values: np.ndarray | None,
        media_offset: np.ndarray | None,
        *,
        max_new_tokens: int = 100,
        eos_token_ids: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        **sampling: Any,
    ) -> Request:
        """Validate a request and check its limits; raises before anything is computed."""
        cfg = SamplingConfig(**sampling)
        ids = self.check_ids(input_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be >= 1, found {max_new_tokens}", where="generate", fix="pass >= 1")
        self.check_context(ids.shape[1], max_new_tokens)
        pixels = None if pixel_values is None else self.check_pixels(pixel_values)
        count = 0 if pixels is None else pixels.shape[0]
        if count > self.limits.max_images:
            raise PromptError(
                f"the request has {count} images (crops/frames), more than max_images={self.limits.max_images}",
                where="pixel_values",
                fix="send fewer images or frames, use cut_enable=False, or raise max_images",
            )
        if media_offset is None:
            offsets = self.derive_media_offset(ids, count)
        else:
            offsets = self.check_offsets(media_offset, ids)
        placement = parse_media_offset(offsets, count)
        self.check_visual_tokens(ids.shape[0], placement.max_images)
        eos = self.eos_token_ids if eos_token_ids is None else eos_token_ids
        stop = np.asarray([eos] if isinstance(eos, int) else list(eos), dtype=np.int64)
        pad = self.pad_token_id if pad_token_id is None else int(pad_token_id)
        return Request(ids, pixels, placement, max_new_tokens, stop, pad, cfg)

    def check_ids(self, input_ids: np.ndarray) -> np.ndarray:
        """Integer [B, L], L >= 1, ids inside the vocabulary -> int64."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise PromptError(
                f"input_ids must be integer [B, L] with L >= 1, found {ids.dtype} {list(ids.shape)}",
                where="generate",
                fix="tokenise the prompt with owl3.Owl3Processor (return_tensors='np')",
            )
        vocab = self.config.text.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise PromptError(
                f"input_ids hold ids from {ids.min()} to {ids.max()}, outside the vocabulary [0, {vocab})",
                where="input_ids",
                fix="tokenise with the tokenizer of this export",
            )
        return ids.astype(np.int64)

    def check_context(self, length: int, max_new_tokens: int) -> None:
        limit = self.limits.max_context
        if length + max_new_tokens > limit:
            owner = "the model's context" if limit == self.config.text.max_position_embeddings else "max_context"
            raise PromptError(
                f"prompt of {length} tokens plus {max_new_tokens} new tokens exceeds {owner} of {limit}",
                where="generate",
                fix="shorten the prompt, use fewer images or lower max_new_tokens",
            )

    def check_visual_tokens(self, batch: int, max_images: int) -> None:
        tokens = batch * max_images * self.config.image_tokens
        if tokens > self.limits.max_visual_tokens:
            raise PromptError(
                f"the request needs {tokens} visual tokens ({max_images} images x {self.config.image_tokens} "
                f"per image x batch {batch}), more than max_visual_tokens={self.limits.max_visual_tokens}",
                where="pixel_values",
                fix="send fewer images or frames, use cut_enable=False, or raise max_visual_tokens",
            )

    def check_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        """Finite float [N, 3, S, S] -> contiguous, in the export's float dtype."""
        pixels = np.asarray(pixel_values)
        size = self.config.vision.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size) or not np.issubdtype(pixels.dtype, np.floating):
            raise PromptError(
                f"pixel_values must be float [N, 3, {size}, {size}], found {pixels.dtype} {list(pixels.shape)}",
                where="pixel_values",
                fix="preprocess images with owl3.Owl3Processor",
            )
        if not np.isfinite(pixels).all():
            raise PromptError("pixel_values hold NaN or Inf", where="pixel_values", fix="preprocess images again")
        return np.ascontiguousarray(pixels, dtype=self.float_dtype)

    def check_offsets(self, media_offset: np.ndarray, ids: np.ndarray) -> np.ndarray:
        offsets = np.asarray(media_offset)
        if offsets.shape != (*ids.shape, 2):
            raise PromptError(
                f"media_offset is {list(offsets.shape)} but input_ids is {list(ids.shape)}",
                where="media_offset",
                fix="media_offset must be [B, L, 2] for input_ids [B, L]",
            )
        return offsets

    def derive_media_offset(self, ids: np.ndarray, count: int) -> np.ndarray:
        """media_offset [B, L, 2] from ``<|image|>`` tokens, which must number ``count`` (the images given)."""
        placeholders = int((ids == self.image_token_id).sum())
        if placeholders != count:
            raise PromptError(
                f"{placeholders} <|image|> placeholders in input_ids but {count} images in pixel_values",
                where="input_ids / pixel_values",
                fix="give one image (crop, frame) per placeholder",
            )
        return media_offset_from_ids(ids, self.image_token_id)
