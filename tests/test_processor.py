"""owl3.processor: anchors, crops, normalisation, cut prompts, ChatML chunks, media_offset (spec §7)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

from owl3.config import Owl3Config
from owl3.demo import packaged_model_dir
from owl3.errors import ConfigError, PromptError, TokenizerError, UsageError
from owl3.processor import (
    CUT_ANCHORS,
    IMAGE_TOKEN,
    NO_MEDIA_OFFSET,
    CutPromptMismatchWarning,
    MissingConfigWarning,
    Owl3Inputs,
    Owl3Processor,
    build_chunks,
    cut_prompt,
    replace_placeholders,
    resize_bicubic,
    select_anchor,
    to_pixels,
)
from owl3.tokenizer import build_demo_tokenizer, write_tokenizer

SPEC_EXAMPLE = (  # spec §7.4: one 500x500 image, "Describe."
    "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nCut to 2 rows 2 columns with a global view\n"
    "subimg(0,0)<|image|> subimg(0,1)<|image|>\nsubimg(1,0)<|image|> subimg(1,1)<|image|>\n"
    "global_view<|image|>\nDescribe.<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return build_demo_tokenizer()


@pytest.fixture(scope="module")
def proc(tokenizer: Tokenizer) -> Owl3Processor:
    return Owl3Processor(tokenizer, 384)


@pytest.fixture(scope="module")
def tiny(tokenizer: Tokenizer) -> Owl3Processor:
    return Owl3Processor(tokenizer, 30)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def chat(content: str, *, answer: str = "") -> list[dict[str, str]]:
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


def text_of(proc: Owl3Processor, inputs: Owl3Inputs) -> str:
    return proc.tokenizer.decode(np.asarray(inputs["input_ids"]).reshape(-1).tolist(), skip_special_tokens=False)


def n_image_tokens(proc: Owl3Processor, inputs: Owl3Inputs) -> int:
    return int((np.asarray(inputs["input_ids"]) == proc.image_token_id).sum())


# ---- anchors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "rows_cols"), [(500, 300, (2, 3)), (300, 500, (3, 2)), (500, 500, (2, 2)), (1000, 250, (1, 4))]
)
def test_spec_anchor_examples(width: int, height: int, rows_cols: tuple[int, int]) -> None:
    assert select_anchor(width, height, 384) == rows_cols


def official_anchor(width: int, height: int, size: int) -> tuple[int, int]:
    """The docowl rule as the official torch code computes it (int64 boxes, float32 IoU, argmax)."""
    anchors = torch.tensor([[0, 0, c * size, r * size] for r, c in CUT_ANCHORS])  # int64 xyxy
    areas = anchors[:, 2] * anchors[:, 3]

    def iou(boxes: torch.Tensor) -> torch.Tensor:
        inter = torch.minimum(anchors[:, 2], boxes[:, 2]) * torch.minimum(anchors[:, 3], boxes[:, 3])
        return inter / (areas + boxes[:, 2] * boxes[:, 3] - inter + 1e-5)

    shape_boxes = anchors.clone()
    shape_boxes[:, 3] = height / width * anchors[:, 2]  # float into int64: truncated, as upstream
    image_box = torch.tensor([[0, 0, width, height]]).expand(len(CUT_ANCHORS), 4)
    return CUT_ANCHORS[int(torch.argmax(iou(shape_boxes) * 100 + iou(image_box)))]


def test_anchor_choice_matches_the_torch_arithmetic_on_many_sizes() -> None:
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in s) for s in rng.integers(1, 5000, (300, 2))] + [(1, 1), (384, 1152), (7, 3)]
    for image_size in (384, 30):
        for width, height in sizes:
            assert select_anchor(width, height, image_size) == official_anchor(width, height, image_size)


# ---- pixels --------------------------------------------------------------------------------------------


def test_normalisation_matches_to_tensor_and_normalize_exactly() -> None:
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray(np.stack([levels, levels[::-1], levels.T], axis=-1))
    ours = to_pixels(image)
    reference = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous().float().div(255)
    half = torch.tensor([0.5, 0.5, 0.5])[:, None, None]
    reference = reference.sub_(half).div_(half)
    assert ours.dtype == np.float32 and ours.shape == (3, 16, 16)
    np.testing.assert_array_equal(ours, reference.numpy())


def test_known_pixel_value_and_range(tiny: Owl3Processor) -> None:
    colour = Image.new("RGB", (40, 40), (10, 128, 255))
    inputs = tiny(chat("<|image|>hi"), images=[colour], cut_enable=False, return_tensors="np")
    pixel = inputs.pixel_values[0, :, 7, 7]
    expected = (np.array([10, 128, 255], np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_array_equal(pixel, expected)
    assert pixel[2] == 1.0
    noisy = tiny(chat("<|image|>"), images=[picture(90, 70)], return_tensors="np").pixel_values
    assert noisy.min() >= -1.0 and noisy.max() <= 1.0


def test_crops_are_row_major_then_the_global_view(tiny: Owl3Processor) -> None:
    image = picture(500, 300)  # 2 rows x 3 cols
    pixels = tiny(chat("<|image|>"), images=[image], return_tensors="np").pixel_values
    assert pixels.shape == (7, 3, 30, 30)
    big = to_pixels(resize_bicubic(image, 90, 60))
    for k in range(6):
        r, c = divmod(k, 3)
        np.testing.assert_array_equal(pixels[k], big[:, 30 * r : 30 * (r + 1), 30 * c : 30 * (c + 1)])
    np.testing.assert_array_equal(pixels[6], to_pixels(image.resize((30, 30), Image.Resampling.BICUBIC)))


def test_no_cut_mode_gives_one_view_per_image(proc: Owl3Processor) -> None:
    images = [picture(500, 300), picture(64, 64, seed=1)]
    inputs = proc(chat("<|image|> and <|image|>"), images=images, cut_enable=False, return_tensors="np")
    assert inputs.pixel_values.shape == (2, 3, 384, 384)
    assert n_image_tokens(proc, inputs) == 2
    assert "Cut to" not in text_of(proc, inputs)


# ---- prompt text and tokens ----------------------------------------------------------------------------


def test_spec_example_prompt_text_and_chunkwise_ids(proc: Owl3Processor, tokenizer: Tokenizer) -> None:
    messages = chat("<|image|>\nDescribe.")
    chunks = build_chunks(replace_placeholders(messages, IMAGE_TOKEN, [cut_prompt(2, 2)]))
    assert "".join(chunks) == SPEC_EXAMPLE
    assert chunks.count(IMAGE_TOKEN) == 5
    inputs = proc(messages, images=[picture(500, 500)], return_tensors="np")
    expected = [i for chunk in chunks for i in tokenizer.encode(chunk, add_special_tokens=False).ids]
    assert inputs.input_ids.tolist() == [expected]
    assert text_of(proc, inputs) == SPEC_EXAMPLE
    assert inputs.pixel_values.shape == (5, 3, 384, 384)
    assert messages == chat("<|image|>\nDescribe.")  # the caller's messages are not modified


def test_chunk_boundaries_are_kept() -> None:
    chunks = build_chunks(chat("hello<|image|> world"))
    system, user, assistant = "<|im_start|>system\n<|im_end|>", "\n<|im_start|>user\nhello", "\n<|im_start|>assistant\n"
    assert chunks == [system, user, IMAGE_TOKEN, " world<|im_end|>", assistant]
    chunks = build_chunks([*chat("hello<|image|> world"), {"role": "user", "content": "x"}])
    assert chunks[-3:] == ["<|im_end|>", "<|endoftext|>", "\n<|im_start|>user\nx<|im_end|>"]  # earlier turn kept;
    # nothing is appended after a final user turn


def test_system_prompt_and_earlier_assistant_turns(tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Colour?"},
        {"role": "assistant", "content": "None"},  # the eval's trailing assistant content is dropped
    ]
    assert "".join(build_chunks(messages)) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello<|im_end|><|endoftext|>\n<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_media_offset_counts_placeholders_strictly_before(proc: Owl3Processor) -> None:
    inputs = proc(chat("A <|image|> B <|image|> C"), images=[picture(20, 20), picture(30, 20)], cut_enable=False)
    ids, offset = inputs.input_ids[0].numpy(), inputs.media_offset[0].numpy()
    first, second = np.flatnonzero(ids == proc.image_token_id).tolist()
    assert offset.shape == (len(ids), 2) and offset.dtype == np.int64
    assert (offset[:, 0] == 0).all()
    assert (offset[: first + 1, 1] == 0).all()  # the placeholder itself is not before itself
    assert (offset[first + 1 : second + 1, 1] == 1).all()
    assert (offset[second + 1 :, 1] == 2).all()


def test_media_offset_without_images(proc: Owl3Processor) -> None:
    inputs = proc(chat("Just text."), return_tensors="np")
    assert inputs.pixel_values is None
    assert inputs.media_offset.shape == (1, inputs.input_ids.shape[1], 2)
    assert (inputs.media_offset[..., 0] == 0).all() and (inputs.media_offset[..., 1] == NO_MEDIA_OFFSET).all()


# ---- the 240728 multi-image cut quirk ------------------------------------------------------------------


def test_official_multi_image_cut_reproduces_the_bug(proc: Owl3Processor) -> None:
    images = [picture(500, 300), picture(500, 500, seed=1)]  # (2, 3): 7 crops, (2, 2): 5 crops
    with pytest.warns(CutPromptMismatchWarning, match="9 <\\|image\\|> placeholders for 12 crops") as record:
        inputs = proc(chat("<|image|> vs <|image|>"), images=images, return_tensors="np")
    assert "multi_image_cut='exact'" in str(record[0].message) and "cut_enable=False" in str(record[0].message)
    assert inputs.pixel_values.shape[0] == 12
    assert n_image_tokens(proc, inputs) == 9
    text = text_of(proc, inputs)
    assert "Cut to 2 rows 3 columns" in text and "Cut to 1 rows 1 columns with a global view" in text
    assert "Cut to 2 rows 2 columns" not in text


def test_official_quirk_with_three_images_steps_through_the_shape_list(proc: Owl3Processor) -> None:
    images = [picture(500, 300), picture(1000, 250, seed=1), picture(300, 500, seed=2)]
    with pytest.warns(CutPromptMismatchWarning, match="14 <\\|image\\|> placeholders for 19 crops"):
        inputs = proc(chat("<|image|><|image|><|image|>"), images=images, return_tensors="np")
    text = text_of(proc, inputs)  # shapes list (2,3) (1,1) (1,4) (1,1) (3,2) (1,1): placeholders use the first 3
    assert re.findall(r"Cut to \d rows \d columns", text) == [
        "Cut to 2 rows 3 columns",
        "Cut to 1 rows 1 columns",
        "Cut to 1 rows 4 columns",
    ]


def test_exact_multi_image_cut_keeps_counts_equal(tokenizer: Tokenizer) -> None:
    exact = Owl3Processor(tokenizer, 384, multi_image_cut="exact")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inputs = exact(chat("<|image|> vs <|image|>"), images=[picture(500, 300), picture(500, 500)])
    assert inputs.pixel_values.shape[0] == 12 == n_image_tokens(exact, inputs)
    assert "Cut to 2 rows 2 columns" in text_of(exact, inputs)


def test_a_single_cut_image_does_not_warn(proc: Owl3Processor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inputs = proc(chat("<|image|>"), images=picture(1000, 250))  # a single image is wrapped in a list
    assert inputs.pixel_values.shape[0] == 5 == n_image_tokens(proc, inputs)


# ---- videos --------------------------------------------------------------------------------------------


def test_video_placeholders_expand_to_one_per_frame(tiny: Owl3Processor) -> None:
    frames = [picture(64, 48, seed=i) for i in range(3)]
    inputs = tiny(chat("<|video|>\nWhat happens?"), videos=[frames], return_tensors="np")
    assert inputs.pixel_values.shape == (3, 3, 30, 30)
    text = text_of(tiny, inputs)
    assert "user\n<|image|><|image|><|image|>\nWhat happens?" in text and "Cut to" not in text
    np.testing.assert_array_equal(inputs.pixel_values[1], to_pixels(resize_bicubic(frames[1], 30, 30)))


def test_two_videos_in_order(tiny: Owl3Processor) -> None:
    videos = [[picture(8, 8)] * 2, [np.zeros((8, 8, 3), np.uint8)] * 4]
    inputs = tiny(chat("A<|video|>B<|video|>"), videos=videos, return_tensors="np")
    assert "A" + IMAGE_TOKEN * 2 + "B" + IMAGE_TOKEN * 4 in text_of(tiny, inputs)
    assert inputs.pixel_values.shape[0] == 6 and (inputs.pixel_values[2:] == -1).all()


# ---- counts and limits (checked before decoding) -------------------------------------------------------


def test_more_images_than_placeholders(proc: Owl3Processor) -> None:
    with pytest.raises(PromptError, match="hold 1 <\\|image\\|> placeholders but 2 images were given"):
        proc(chat("<|image|>"), images=["/nonexistent/a.png", "/nonexistent/b.png"])  # never opened


def test_fewer_images_than_placeholders(proc: Owl3Processor) -> None:
    with pytest.raises(PromptError, match="hold 3 <\\|image\\|> placeholders but 1 images were given"):
        proc(chat("<|image|><|image|><|image|>"), images=["/nonexistent/a.png"])
    with pytest.raises(PromptError, match="hold 1 <\\|image\\|> placeholders but 0 images"):
        proc(chat("<|image|>"))


def test_video_count_mismatch(proc: Owl3Processor) -> None:
    with pytest.raises(PromptError, match="hold 2 <\\|video\\|> placeholders but 1 videos were given"):
        proc(chat("<|video|><|video|>"), videos=[["/nonexistent/f.png"]])


def test_videos_must_be_frame_lists(tiny: Owl3Processor) -> None:
    with pytest.raises(PromptError, match="videos must be a list of frame lists"):
        tiny(chat("<|video|>"), videos=[picture(8, 8), picture(8, 8)])


def test_images_and_videos_together(proc: Owl3Processor) -> None:
    with pytest.raises(PromptError, match="got 1 images and 1 videos; mixing them is not supported"):
        proc(chat("<|image|><|video|>"), images=[picture(8, 8)], videos=[[picture(8, 8)]])


def test_max_images_is_checked_before_decoding(tokenizer: Tokenizer) -> None:
    small = Owl3Processor(tokenizer, 30, max_images=6)
    paths = ["/nonexistent/a.png", "/nonexistent/b.png"]
    with pytest.raises(PromptError, match="at least 8 crops/frames, more than max_images=6"):
        small(chat("<|image|><|image|>"), images=paths)  # 2 cut images need at least 4 crops each
    with pytest.raises(PromptError, match="at least 7 crops/frames"):
        small(chat("<|video|>"), videos=[paths * 3 + paths[:1]])
    with pytest.raises(PromptError, match="exactly 7 crops/frames, more than max_images=6"):
        small(chat("<|image|>"), images=[picture(500, 300)])  # a 2x3 cut plus the global view
    assert small(chat("<|image|>"), images=[picture(500, 300)], cut_enable=False).pixel_values.shape[0] == 1


def test_bad_messages_are_rejected(proc: Owl3Processor) -> None:
    with pytest.raises(PromptError, match="non-empty list"):
        proc([])
    with pytest.raises(PromptError, match="message 0 must have a role in"):
        proc([{"role": "tool", "content": "x"}])
    with pytest.raises(PromptError, match="message 1 must have a role in"):
        proc([{"role": "user", "content": "x"}, {"role": "assistant", "content": None}])
    with pytest.raises(PromptError, match="message 0 \\(system\\) holds a media placeholder"):
        proc([{"role": "system", "content": "<|image|>"}], images=[picture(8, 8)])


def test_bad_arguments_are_usage_errors(tokenizer: Tokenizer, proc: Owl3Processor) -> None:
    with pytest.raises(UsageError, match="multi_image_cut must be 'official' or 'exact'"):
        Owl3Processor(tokenizer, multi_image_cut="fixed")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="image_size must be a positive integer"):
        Owl3Processor(tokenizer, 0)
    with pytest.raises(UsageError, match="return_tensors must be 'pt' or 'np'"):
        proc(chat("x"), return_tensors="tf")  # type: ignore[arg-type]


# ---- outputs, ids, loading -----------------------------------------------------------------------------


def test_return_tensors_np_and_pt_agree(tiny: Owl3Processor) -> None:
    messages, images = chat("<|image|>Describe."), [picture(60, 45)]
    as_np = tiny(messages, images=images, return_tensors="np")
    as_pt = tiny(messages, images=images)
    assert isinstance(as_np.input_ids, np.ndarray) and isinstance(as_pt.input_ids, torch.Tensor)
    assert as_pt.input_ids.dtype == torch.int64 and as_pt.media_offset.dtype == torch.int64
    assert as_pt.pixel_values.dtype == torch.float32 and as_np.pixel_values.dtype == np.float32
    for key in ("input_ids", "media_offset", "pixel_values"):
        np.testing.assert_array_equal(as_pt[key].numpy(), as_np[key])
    assert as_pt.to("cpu").input_ids.device.type == "cpu"
    with pytest.raises(AttributeError, match="no field 'attention_mask'"):
        _ = as_pt.attention_mask


def test_token_ids_and_decode(proc: Owl3Processor, tokenizer: Tokenizer) -> None:
    assert proc.image_token_id == tokenizer.token_to_id("<|image|>")
    assert proc.eos_token_ids == (tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>"))
    ids = tokenizer.encode("<|im_start|> A red circle. <|im_end|><|endoftext|>", add_special_tokens=False).ids
    assert proc.decode(ids) == "A red circle."
    assert proc.decode(torch.tensor([ids])) == "A red circle." == proc.decode(np.asarray(ids))


def test_from_pretrained_scales_with_the_config_image_size(tmp_path: Path, tokenizer: Tokenizer) -> None:
    (tmp_path / "config.json").write_text(json.dumps(Owl3Config.tiny().to_hf_dict()))
    write_tokenizer(tokenizer, tmp_path)
    loaded = Owl3Processor.from_pretrained(tmp_path, multi_image_cut="exact")
    assert loaded.image_size == 30 and loaded.multi_image_cut == "exact"
    inputs = loaded(chat("<|image|>"), images=[picture(500, 300)])
    assert tuple(inputs.pixel_values.shape) == (7, 3, 30, 30)


def test_from_pretrained_rejects_a_tokenizer_larger_than_the_vocab(tmp_path: Path, tokenizer: Tokenizer) -> None:
    config = Owl3Config.tiny().to_hf_dict()
    config["vocab_size"] = 400
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_tokenizer(tokenizer, tmp_path)
    with pytest.raises(TokenizerError, match="ids up to 511 but the model's vocab_size is 400"):
        Owl3Processor.from_pretrained(tmp_path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_only_dir(target: Path) -> Path:
    """The packaged demo model's tokenizer files, without its config.json (image_size 64)."""
    for name in TOKENIZER_FILES:
        shutil.copy(packaged_model_dir() / name, target / name)
    return target


def test_from_pretrained_without_config_assumes_the_240728_image_size(tmp_path: Path) -> None:
    assert json.loads((packaged_model_dir() / "config.json").read_text())["vision_config"]["image_size"] == 64
    assumed = Owl3Config.preset("7b-240728").vision.image_size
    assert assumed == 384
    with pytest.warns(MissingConfigWarning, match=rf"config\.json is absent from .*240728 image size of {assumed} px"):
        loaded = Owl3Processor.from_pretrained(tokenizer_only_dir(tmp_path), multi_image_cut="exact")
    assert loaded.image_size == assumed and loaded.multi_image_cut == "exact"
    inputs = loaded(chat("<|image|>Describe."), images=[picture(500, 500)])
    assert tuple(inputs.pixel_values.shape) == (5, 3, assumed, assumed)  # 2x2 crops + global view
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the full directory reads its config.json and does not warn
        full = Owl3Processor.from_pretrained(packaged_model_dir())
    assert full.image_size == 64
    text = chat("A red circle.")
    assert loaded(text).input_ids.tolist() == full(text).input_ids.tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(TOKENIZER_FILES)  # nothing written


@pytest.mark.parametrize("subdir", ["", "absent"], ids=["empty", "nonexistent"])
def test_from_pretrained_without_a_tokenizer_names_it(tmp_path: Path, subdir: str) -> None:
    model_dir = tmp_path / subdir  # an empty directory (neither config.json nor tokenizer), or none at all
    with pytest.raises(TokenizerError, match=r"expected a tokenizer\.json file, found none") as info:
        Owl3Processor.from_pretrained(model_dir)
    assert str(model_dir) in info.value.where and "tokenizer.json" in info.value.fix


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"model_type": "mplugowl3", ', "config.json is not valid JSON"),
        ("[1, 2]", "config.json must hold a JSON object, found list"),
        ('{"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}', "unsupported architecture"),
    ],
    ids=["truncated", "not-an-object", "other-architecture"],
)
def test_from_pretrained_still_refuses_an_invalid_config(tmp_path: Path, content: str, message: str) -> None:
    (tokenizer_only_dir(tmp_path) / "config.json").write_text(content)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingConfigWarning)  # no silent fall-back to the preset
        with pytest.raises(ConfigError, match=message) as info:
            Owl3Processor.from_pretrained(tmp_path)
    assert info.value.where == str(tmp_path / "config.json")


def test_from_pretrained_refuses_a_dangling_config_link(tmp_path: Path) -> None:
    (tokenizer_only_dir(tmp_path) / "config.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(ConfigError, match=r"expected a config\.json file, found none"):
        Owl3Processor.from_pretrained(tmp_path)


def test_importing_the_preprocessing_modules_does_not_import_torch() -> None:
    code = "import owl3.processor, owl3.media, owl3.tokenizer, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
