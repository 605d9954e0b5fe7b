"""The mPLUG-Owl3 (240728) processor: images to pixel tensors, messages to ids and media_offset (spec §7).

``Owl3Processor(messages, images=..., videos=...)`` reproduces the official ``mPLUGOwl3Processor`` with
``mPLUGOwl3ImageProcessor(image_size)``, in numpy + PIL + tokenizers only (torch is imported lazily, just to
wrap the outputs when ``return_tensors="pt"``):

- Cut mode (default for images): docowl anchor choice, PIL bicubic resize to (rows*S, cols*S), row-major
  S x S crops, then the global view (the whole image resized to S x S); normalised as (x/255 - 0.5)/0.5.
  Each ``<|image|>`` becomes the "v2_global" cut prompt. No-cut mode (``cut_enable=False``, and always
  for video frames): one S x S resize per image, one placeholder per image.
- Multi-image cut quirk of 240728 (``multi_image_cut``):
  ``"official"`` (default) reproduces it: the official code keeps two cut shapes per image, (R, C) then
  (1, 1) for the global view, and steps through that list one entry per ``<|image|>``; with two or more
  images the second placeholder gets "Cut to 1 rows 1 columns..." (2 placeholders), so the prompt holds
  fewer ``<|image|>`` tokens than ``pixel_values`` holds crops (e.g. 9 vs 12) and the model silently uses
  only the first ones. A ``CutPromptMismatchWarning`` says so. ``"exact"`` gives every image its own
  correct cut prompt, so placeholders and crops always agree (the model was not trained on it).
  The official evaluation avoids the issue by running multi-image tasks with ``cut_enable=False``.
- Text: ChatML chunks, each tokenised separately with no special tokens added; an empty system prompt
  when the first message is not a system one; the trailing assistant turn's content is dropped
  (inference mode), so pass ``{"role": "assistant", "content": ""}`` last to get the generation header.
  As in the official code, nothing is appended when the messages end with a user turn.
- ``media_offset[0, t] = [0, number of image placeholders strictly before t]``; ``[0, -1000000]`` everywhere
  when there are no images. There is no attention mask (all ones).

Counts are checked before any image is decoded: placeholders against images/videos (both counts in the
message) and the number of crops/frames against ``max_images``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from owl3.config import Owl3Config
from owl3.errors import PromptError, TokenizerError, UsageError
from owl3.media import DEFAULT_MAX_PIXELS, load_image
from owl3.tokenizer import check_special_tokens, load_tokenizer, token_id

IMAGE_TOKEN = "<|image|>"
VIDEO_TOKEN = "<|video|>"
# Cut anchors of "grid_squ_6" as (rows, cols), in the official order (ties go to the first).
CUT_ANCHORS: tuple[tuple[int, int], ...] = ((2, 2), (1, 3), (1, 4), (3, 1), (4, 1), (2, 3), (3, 2))
NO_MEDIA_OFFSET = -1_000_000
DEFAULT_MAX_IMAGES = 128  # crops + frames per request; the largest official eval uses 128 video frames
_MIN_CUT_CROPS = 1 + min(r * c for r, c in CUT_ANCHORS)  # smallest cut (3 crops) plus the global view
_ROLES = ("system", "user", "assistant")
FALLBACK_PRESET = "7b-240728"  # the config preset whose image size is assumed when config.json is absent


class MissingConfigWarning(UserWarning):
    """``from_pretrained`` found no config.json and assumed the 7B-240728 image size."""


class CutPromptMismatchWarning(UserWarning):
    """The official multi-image cut prompt holds fewer ``<|image|>`` tokens than there are crops."""


class Owl3Inputs(dict):
    """``input_ids`` [1, L] int64, ``media_offset`` [1, L, 2] int64, ``pixel_values`` [N, 3, S, S] float32
    or None; numpy arrays or torch tensors. Keys are also attributes (``inputs.input_ids``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"Owl3Inputs has no field {name!r}") from None

    def to(self, device: Any) -> Owl3Inputs:
        """Move torch tensors to ``device`` (numpy arrays and None are kept)."""
        return Owl3Inputs({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


# ---- image math (pure) --------------------------------------------------------------------------------


def select_anchor(
    width: int, height: int, image_size: int, anchors: Sequence[tuple[int, int]] = CUT_ANCHORS
) -> tuple[int, int]:
    """The docowl anchor (rows, cols) for a width x height image (spec §7.1).

    Anchor i is the box [0, 0, cols*S, rows*S]. Score = 100 * IoU(anchor, [0, 0, cols*S, (H/W)*cols*S])
    + IoU(anchor, [0, 0, W, H]) with IoU = inter / (union + 1e-5); argmax, ties to the first. Arithmetic
    follows the official torch code: int64 boxes (the aspect-scaled height truncated to an integer),
    float32 ratios.
    """
    grid = np.asarray(anchors, dtype=np.int64)  # [K, 2] (rows, cols)
    ax2, ay2 = grid[:, 1] * image_size, grid[:, 0] * image_size  # [K] anchor box corners
    shape_y2 = (np.float32(height / width) * ax2.astype(np.float32)).astype(np.int64)  # [K]
    iou = _origin_iou(ax2, ay2, np.int64(width), np.int64(height))
    shape_iou = _origin_iou(ax2, ay2, ax2, shape_y2)
    score = shape_iou * np.float32(100) + iou  # [K] float32
    rows, cols = anchors[int(np.argmax(score))]
    return int(rows), int(cols)


def _origin_iou(ax2: np.ndarray, ay2: np.ndarray, bx2: Any, by2: Any) -> np.ndarray:
    """IoU of int64 boxes [0, 0, x2, y2] in float32, as torch divides int64 areas by (union + 1e-5)."""
    inter = np.minimum(ax2, bx2) * np.minimum(ay2, by2)
    union = ax2 * ay2 + bx2 * by2 - inter
    return inter.astype(np.float32) / (union.astype(np.float32) + np.float32(1e-5))


def resize_bicubic(image: Image.Image, width: int, height: int) -> Image.Image:
    """PIL bicubic (antialiased) resize: what torchvision ``F.resize(..., BICUBIC)`` does on PIL input."""
    return image.resize((width, height), Image.Resampling.BICUBIC)


def to_pixels(image: Image.Image) -> np.ndarray:
    """RGB image [H, W] -> float32 [3, H, W] in [-1, 1]: ToTensor then Normalize(0.5, 0.5), op for op."""
    x = np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
    return (x / np.float32(255) - np.float32(0.5)) / np.float32(0.5)


def cut_image(image: Image.Image, rows: int, cols: int, image_size: int) -> np.ndarray:
    """[rows*cols + 1, 3, S, S]: the row-major crops of the anchor-sized resize, then the global view."""
    s = image_size
    big = to_pixels(resize_bicubic(image, cols * s, rows * s))  # [3, rows*S, cols*S]
    crops = big.reshape(3, rows, s, cols, s).transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, s, s)
    return np.concatenate([crops, global_view(image, s)[None]])


def global_view(image: Image.Image, image_size: int) -> np.ndarray:
    """[3, S, S]: the whole image resized to S x S (also the no-cut and video-frame path)."""
    return to_pixels(resize_bicubic(image, image_size, image_size))


# ---- text (pure) --------------------------------------------------------------------------------------


def cut_prompt(rows: int, cols: int, token: str = IMAGE_TOKEN) -> str:
    """The "v2_global" cut prompt (spec §7.2), with rows*cols + 1 placeholders."""
    grid = "\n".join(" ".join(f"subimg({r},{c}){token}" for c in range(cols)) for r in range(rows))
    return f"Cut to {rows} rows {cols} columns with a global view\n{grid}\nglobal_view{token}"


def prompt_cut_shapes(shapes: Sequence[tuple[int, int]], mode: Literal["official", "exact"]) -> list[tuple[int, int]]:
    """The cut shape used by each ``<|image|>`` in turn: (R, C) per image, or the official interleaving."""
    if mode == "exact":
        return list(shapes)
    interleaved = [shape for rc in shapes for shape in (rc, (1, 1))]  # official cut_shape list
    return interleaved[: len(shapes)]


def replace_placeholders(
    messages: Sequence[Mapping[str, str]], token: str, replacements: Sequence[str]
) -> list[dict[str, str]]:
    """New messages with the k-th ``token`` (counted across messages) replaced by ``replacements[k]``."""
    pending = iter(replacements)
    return [
        {**message, "content": re.sub(re.escape(token), lambda _: next(pending), message["content"])}
        for message in messages
    ]


def build_chunks(messages: Sequence[Mapping[str, str]]) -> list[str]:
    """ChatML text chunks in inference mode (spec §7.4); each ``<|image|>`` is a chunk of its own."""
    chunks: list[tuple[str, int]] = []  # (text, label); label 1 = assistant content, dropped at the end
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if i == 0 and role != "system":
            chunks.append(("<|im_start|>system\n<|im_end|>", 0))
        if role == "system":
            chunks.append((f"<|im_start|>system\n{content}<|im_end|>", 0))
        elif role == "user":
            parts = re.split(f"({re.escape(IMAGE_TOKEN)})", f"\n<|im_start|>user\n{content}<|im_end|>")
            chunks += [(part, 0) for part in parts if part]
        else:
            chunks += [("\n<|im_start|>assistant\n", 0), (f"{content}<|im_end|>", 1), ("<|endoftext|>", 1)]
    while chunks and chunks[-1][1] == 1:
        chunks.pop()
    return [text for text, _ in chunks]


def tokenize_chunks(tokenizer: Tokenizer, chunks: Sequence[str]) -> tuple[list[int], list[int]]:
    """(ids, image starts): every chunk encoded on its own, no special tokens added."""
    ids: list[int] = []
    starts: list[int] = []
    for chunk, encoding in zip(chunks, tokenizer.encode_batch(list(chunks), add_special_tokens=False), strict=True):
        if chunk == IMAGE_TOKEN:
            starts.append(len(ids))
        ids.extend(encoding.ids)
    return ids, starts


def media_offset(length: int, starts: Sequence[int]) -> np.ndarray:
    """[1, L, 2] int64: [0, #starts < t] per position t, or [0, -1000000] everywhere without images."""
    out = np.zeros((1, length, 2), dtype=np.int64)
    if not starts:
        out[0, :, 1] = NO_MEDIA_OFFSET
    else:
        positions = np.arange(length, dtype=np.int64)[:, None]  # [L, 1]
        out[0, :, 1] = (positions > np.asarray(starts, dtype=np.int64)[None, :]).sum(axis=1)
    return out


# ---- the processor ------------------------------------------------------------------------------------


class Owl3Processor:
    """Messages + images or videos -> ``Owl3Inputs`` for the 240728 model (see the module docstring)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_size: int = 384,
        *,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        max_images: int = DEFAULT_MAX_IMAGES,
        multi_image_cut: Literal["official", "exact"] = "official",
    ) -> None:
        if multi_image_cut not in ("official", "exact"):
            raise UsageError(
                f"multi_image_cut must be 'official' or 'exact', found {multi_image_cut!r}",
                where="Owl3Processor",
                fix="use 'official' to match the released model or 'exact' for per-image cut prompts",
            )
        for name, value in (("image_size", image_size), ("max_images", max_images)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive integer, found {value!r}", where="Owl3Processor")
        check_special_tokens(tokenizer)
        self._tokenizer = tokenizer
        self.image_size = image_size
        self.max_image_pixels = max_image_pixels
        self.max_images = max_images
        self.multi_image_cut = multi_image_cut

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs: Any) -> Owl3Processor:
        """Read tokenizer.json and config.json (``vision_config.image_size``) of a checkpoint directory.

        Like the official processor, a directory with the tokenizer but no config.json is accepted: the
        image size of the ``FALLBACK_PRESET`` (mPLUG-Owl3-7B-240728) is assumed, a ``MissingConfigWarning``
        says so, and the tokenizer-vs-vocab_size check is skipped (there is no model config to check
        against). A config.json that exists but is invalid is still refused (ConfigError).
        """
        tokenizer = load_tokenizer(model_dir)
        config_path = Path(model_dir) / "config.json"
        if Path(model_dir).is_dir() and not config_path.exists() and not config_path.is_symlink():
            image_size = Owl3Config.preset(FALLBACK_PRESET).vision.image_size
            warnings.warn(
                f"config.json is absent from {model_dir}; assuming the mPLUG-Owl3-7B-240728 image size of "
                f"{image_size} px; add the checkpoint's config.json if the model is another revision",
                MissingConfigWarning,
                stacklevel=2,
            )
            return cls(tokenizer, image_size, **kwargs)
        config = Owl3Config.from_hf_json(model_dir)
        largest = max(tokenizer.get_vocab(with_added_tokens=True).values())
        if largest >= config.text.vocab_size:
            raise TokenizerError(
                f"the tokenizer has ids up to {largest} but the model's vocab_size is {config.text.vocab_size}",
                where=str(Path(model_dir) / "tokenizer.json"),
                fix="use the tokenizer that belongs to this checkpoint",
            )
        return cls(tokenizer, config.vision.image_size, **kwargs)

    # ---- token ids ----------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def image_token_id(self) -> int:
        return token_id(self._tokenizer, IMAGE_TOKEN)

    @property
    def eos_token_ids(self) -> tuple[int, int]:
        """The generation terminators: (``<|im_end|>``, ``<|endoftext|>``)."""
        return token_id(self._tokenizer, "<|im_end|>"), token_id(self._tokenizer, "<|endoftext|>")

    def decode(self, ids: Any) -> str:
        """Text of a 1-D (or [1, L]) id sequence, special tokens skipped, whitespace stripped."""
        flat = np.asarray(ids.tolist() if hasattr(ids, "tolist") else list(ids), dtype=np.int64).reshape(-1)
        return self._tokenizer.decode(flat.tolist(), skip_special_tokens=True).strip()

    # ---- call ---------------------------------------------------------------------------------------
    def __call__(
        self,
        messages: Sequence[Mapping[str, str]],
        images: Any = None,
        videos: Sequence[Sequence[Any]] | None = None,
        cut_enable: bool = True,
        return_tensors: Literal["pt", "np"] = "pt",
    ) -> Owl3Inputs:
        """Build model inputs. ``images``: a list of anything ``load_image`` accepts (a single image is
        wrapped); ``videos``: a list of frame lists. Raises PromptError on count mismatches or limits."""
        if return_tensors not in ("pt", "np"):
            raise UsageError(f"return_tensors must be 'pt' or 'np', found {return_tensors!r}", where="Owl3Processor")
        _check_messages(messages)
        image_list = _as_list(images)
        video_list = _as_videos(videos)
        self._check_counts(messages, image_list, video_list, cut_enable)
        if video_list:
            frame_counts = [len(v) for v in video_list]
            pixels = [self._frame_pixels(frame) for video in video_list for frame in video]
            messages = replace_placeholders(messages, VIDEO_TOKEN, [IMAGE_TOKEN * n for n in frame_counts])
        elif image_list and cut_enable:
            messages, pixels = self._cut_images(messages, image_list)
        else:
            pixels = [self._frame_pixels(image) for image in image_list]
        ids, starts = tokenize_chunks(self._tokenizer, build_chunks(messages))
        arrays = {
            "input_ids": np.asarray(ids, dtype=np.int64).reshape(1, -1),
            "media_offset": media_offset(len(ids), starts),
            "pixel_values": np.concatenate(pixels) if pixels else None,  # float32 [N, 3, S, S]
        }
        return _pack(arrays, return_tensors)

    def _check_counts(
        self, messages: Sequence[Mapping[str, str]], images: list[Any], videos: list[list[Any]], cut: bool
    ) -> None:
        """Placeholders against media and the crop/frame bound, before anything is decoded."""
        if images and videos:
            raise PromptError(
                f"got {len(images)} images and {len(videos)} videos; mixing them is not supported",
                where="processor inputs",
                fix="pass either images or videos",
            )
        for token, given, kind in ((IMAGE_TOKEN, len(images), "images"), (VIDEO_TOKEN, len(videos), "videos")):
            found = sum(m["content"].count(token) for m in messages)
            if found != given:
                raise PromptError(
                    f"the messages hold {found} {token} placeholders but {given} {kind} were given",
                    where="processor inputs",
                    fix=f"put exactly one {token} in the user text per item of {kind}",
                )
        empty = [i for i, v in enumerate(videos) if not v]
        if empty:
            raise PromptError(f"videos {empty} have no frames", where="processor inputs", fix="drop empty videos")
        least = sum(len(v) for v in videos) + len(images) * (_MIN_CUT_CROPS if cut else 1)
        self._check_budget(least, "at least")

    def _check_budget(self, count: int, qualifier: str) -> None:
        if count > self.max_images:
            raise PromptError(
                f"the request needs {qualifier} {count} crops/frames, more than max_images={self.max_images}",
                where="processor inputs",
                fix="send fewer images or frames, use cut_enable=False, or raise max_images",
            )

    def _frame_pixels(self, source: Any) -> np.ndarray:
        """[1, 3, S, S]: one image or video frame without cut."""
        return global_view(load_image(source, max_pixels=self.max_image_pixels), self.image_size)[None]

    def _cut_images(
        self, messages: Sequence[Mapping[str, str]], sources: list[Any]
    ) -> tuple[list[dict[str, str]], list[np.ndarray]]:
        """Decode, choose anchors, check the exact crop count, cut; expand each placeholder's prompt."""
        images = [load_image(source, max_pixels=self.max_image_pixels) for source in sources]
        shapes = [select_anchor(im.width, im.height, self.image_size) for im in images]
        n_crops = sum(r * c + 1 for r, c in shapes)
        self._check_budget(n_crops, "exactly")
        prompts = [cut_prompt(r, c) for r, c in prompt_cut_shapes(shapes, self.multi_image_cut)]
        n_tokens = sum(p.count(IMAGE_TOKEN) for p in prompts)
        if n_tokens != n_crops:
            warnings.warn(
                f"multi_image_cut='official' reproduces the 240728 multi-image cut bug: the prompt holds "
                f"{n_tokens} <|image|> placeholders for {n_crops} crops of {len(images)} images, and the model "
                f"uses only the first {n_tokens} crops; pass cut_enable=False (as the official eval does for "
                f"multi-image tasks) or multi_image_cut='exact' to avoid it",
                CutPromptMismatchWarning,
                stacklevel=3,
            )
        pixels = [cut_image(im, r, c, self.image_size) for im, (r, c) in zip(images, shapes, strict=True)]
        return replace_placeholders(messages, IMAGE_TOKEN, prompts), pixels


def _check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise PromptError(
            "messages must be a non-empty list of {'role': ..., 'content': ...} dicts",
            where="processor inputs",
            fix='pass e.g. [{"role": "user", "content": "<|image|>Describe."}, {"role": "assistant", "content": ""}]',
        )
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        content = message.get("content") if isinstance(message, Mapping) else None
        if role not in _ROLES or not isinstance(content, str):
            raise PromptError(
                f"message {i} must have a role in {list(_ROLES)} and a string content, found {message!r:.80}",
                where="processor inputs",
                fix="fix the message list",
            )
        if role != "user" and (IMAGE_TOKEN in content or VIDEO_TOKEN in content):
            raise PromptError(
                f"message {i} ({role}) holds a media placeholder; only user messages may",
                where="processor inputs",
                fix="move <|image|> / <|video|> into a user message",
            )


def _as_list(images: Any) -> list[Any]:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _as_videos(videos: Any) -> list[list[Any]]:
    if not videos:
        return []
    if not isinstance(videos, (list, tuple)) or not all(isinstance(v, (list, tuple)) for v in videos):
        raise PromptError(
            "videos must be a list of frame lists, one list per <|video|>",
            where="processor inputs",
            fix="pass videos=[frames] for one video, e.g. videos=[load_video_frames(path)]",
        )
    return [list(v) for v in videos]


def _pack(arrays: dict[str, np.ndarray | None], return_tensors: str) -> Owl3Inputs:
    if return_tensors == "np":
        return Owl3Inputs(arrays)
    import torch  # lazily: the edge runtime uses return_tensors="np" without torch installed

    return Owl3Inputs({k: None if v is None else torch.from_numpy(v) for k, v in arrays.items()})
