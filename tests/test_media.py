"""owl3.media: untrusted images (bounds, truncation, one mode rule), frame sampling, video loading."""

from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from owl3.errors import EnvironmentProblem, MediaError, UsageError
from owl3.media import (
    load_image,
    load_video_frames,
    sample_frames_middle,
    sample_frames_readme,
)

# ---- fixtures built in code ----------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR (with a valid CRC) declares width x height but holds one pixel of data."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def noise(width: int = 48, height: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_video(path: Path, levels: list[int], fps: int = 10, size: int = 32) -> Path:
    """An mpeg4 video whose frame i is a flat grey of brightness levels[i]."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for level in levels:
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), level, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 frames at 10 fps; frame i has brightness 8 * i."""
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", [8 * i for i in range(30)])


def brightness(frames: list[Image.Image]) -> list[int]:
    return [round(float(np.asarray(f).mean()) / 8) for f in frames]  # back to the frame index (lossy codec)


# ---- sources -------------------------------------------------------------------------------------------


def test_every_source_kind_gives_the_same_rgb_image(tmp_path: Path) -> None:
    pixels = noise()
    png = encode(Image.fromarray(pixels), "PNG")
    (tmp_path / "a.png").write_bytes(png)
    sources = [tmp_path / "a.png", str(tmp_path / "a.png"), png, bytearray(png), Image.fromarray(pixels), pixels]
    for source in sources:
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (48, 32)
        np.testing.assert_array_equal(np.asarray(image), pixels)


def test_pil_input_is_not_modified_and_a_new_image_is_returned() -> None:
    original = Image.fromarray(noise()).convert("RGBA")
    before = original.tobytes()
    result = load_image(original)
    assert result is not original and original.mode == "RGBA" and original.tobytes() == before


def test_numpy_greyscale_and_rgba() -> None:
    grey = np.full((4, 5), 77, np.uint8)
    assert np.asarray(load_image(grey))[0, 0].tolist() == [77, 77, 77]
    rgba = np.zeros((2, 2, 4), np.uint8)  # fully transparent black -> white
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize(
    "array", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((2, 4, 4, 3), np.uint8)]
)
def test_bad_numpy_arrays_are_rejected(array: np.ndarray) -> None:
    with pytest.raises(MediaError, match=r"expected a uint8 array of shape") as info:
        load_image(array)
    assert str(array.shape).replace(" ", "") in str(info.value).replace(" ", "")


def test_unsupported_source_type() -> None:
    with pytest.raises(MediaError, match="expected a path, bytes, a PIL image"):
        load_image(12345)  # type: ignore[arg-type]


def test_tiny_images_are_accepted_and_empty_ones_rejected() -> None:
    assert load_image(Image.new("RGB", (1, 1), "red")).size == (1, 1)
    with pytest.raises(MediaError, match="at least 1x1"):
        load_image(np.zeros((0, 5, 3), np.uint8))


# ---- broken files --------------------------------------------------------------------------------------


def test_zero_byte_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty \(0 bytes\)") as info:
        load_image(path)
    assert "empty.jpg" in str(info.value)
    with pytest.raises(MediaError, match="0 bytes"):
        load_image(b"")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="found none") as info:
        load_image(tmp_path / "nope.png")
    assert "nope.png" in str(info.value)


@pytest.mark.parametrize(
    ("fmt", "keep"),
    [("JPEG", 0.5), ("JPEG", -20), ("PNG", 0.5), ("PNG", -12), ("GIF", 0.5), ("WEBP", 0.5), ("BMP", 0.9)],
)
def test_truncated_files_are_rejected(tmp_path: Path, fmt: str, keep: float) -> None:
    data = encode(Image.fromarray(noise(64, 64)), fmt)
    cut = int(len(data) * keep) if keep > 0 else len(data) + int(keep)  # PNG -12: only IEND missing
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[:cut])
    with pytest.raises(MediaError, match=r"truncated or corrupt|not a readable image") as info:
        load_image(path)
    assert "cut." in str(info.value)


def test_lazily_opened_truncated_pil_image_is_rejected(tmp_path: Path) -> None:
    data = encode(Image.fromarray(noise(64, 64)), "JPEG")
    path = tmp_path / "lazy.jpg"
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as lazy, pytest.raises(MediaError, match="truncated or corrupt") as info:
        load_image(lazy)
    assert "lazy.jpg" in str(info.value)


def test_non_images_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 10)
    with pytest.raises(MediaError, match="not a readable image") as info:
        load_image(path)
    assert "notes.png" in str(info.value)


def test_formats_outside_the_allow_list_are_rejected() -> None:
    data = encode(Image.fromarray(noise()), "TGA")
    with pytest.raises(MediaError, match="supported formats: JPEG, PNG"):
        load_image(data)


def test_load_truncated_images_must_stay_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(EnvironmentProblem, match="LOAD_TRUNCATED_IMAGES is True"):
        load_image(encode(Image.new("RGB", (2, 2)), "PNG"))


# ---- pixel bounds --------------------------------------------------------------------------------------


def test_pixel_bound_is_checked_from_the_header_before_decoding() -> None:
    # 9000 x 9000 = 81M pixels: above our default limit, below PIL's own hard limit. The file holds no
    # pixel data for that size, so a decode attempt would report truncation instead of the size.
    with pytest.raises(MediaError, match="9000x9000 = 81000000 pixels, more than the limit"):
        load_image(png_header_claiming(9000, 9000))


def test_pil_decompression_bomb_error_becomes_a_media_error() -> None:
    with pytest.raises(MediaError, match="more pixels than PIL's hard limit"):
        load_image(png_header_claiming(100_000, 100_000), max_pixels=10**12)


def test_max_pixels_applies_to_every_source_kind() -> None:
    image = Image.fromarray(noise(20, 20))
    for source in (image, np.asarray(image), encode(image, "PNG")):
        with pytest.raises(MediaError, match="20x20 = 400 pixels, more than the limit of 399"):
            load_image(source, max_pixels=399)
        assert load_image(source, max_pixels=400).size == (20, 20)


# ---- the mode rule -------------------------------------------------------------------------------------


def test_sixteen_bit_greyscale_is_shifted_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 255, 300, 0x1234], [0x8000, 0xFF00, 0xFFFF, 1]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)  # a 16-bit greyscale PNG
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path))[..., 0]
    np.testing.assert_array_equal(out, values >> 8)  # 300 -> 1, where PIL's convert("L") would clip to 255


def test_thirty_two_bit_greyscale_is_clipped_to_sixteen_bits_then_shifted() -> None:
    image = Image.fromarray(np.array([[-5, 70_000, 0x4400]], dtype=np.int32))
    assert image.mode == "I"
    assert np.asarray(load_image(image))[0, :, 0].tolist() == [0, 255, 0x44]


def test_alpha_is_composited_over_white() -> None:
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    out = np.asarray(load_image(Image.fromarray(rgba, "RGBA")))[0]
    assert out[0].tolist() == [255, 255, 255]  # transparent -> background
    assert out[1].tolist() == [0, 0, 255]  # opaque -> itself
    assert all(126 <= v <= 128 for v in out[2])  # half-transparent black -> mid grey
    la = np.asarray(load_image(Image.fromarray(rgba[..., [0, 3]], "LA")))[0]
    assert la[0].tolist() == [255, 255, 255] and la[1].tolist() == [0, 0, 0]


def test_palette_with_transparency_is_composited_over_white() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    out = np.asarray(load_image(encode(palette, "PNG")))[0]
    assert out.tolist() == [[255, 255, 255], [10, 200, 30]]


@pytest.mark.parametrize("mode", ["CMYK", "YCbCr", "L", "1", "RGBX", "LAB", "HSV"])
def test_other_modes_use_pil_rgb_conversion(mode: str) -> None:
    image = Image.fromarray(noise(8, 8)).convert(mode) if mode != "LAB" else Image.new("LAB", (8, 8), (50, 20, 30))
    out = load_image(image)
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(image.convert("RGB")))


def test_cmyk_jpeg_file_loads_as_rgb() -> None:
    data = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100)
    red = np.asarray(load_image(data))[4, 4]
    assert red[0] > 240 and red[1] < 20 and red[2] < 20


def test_exif_orientation_is_applied() -> None:
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red
    pixels[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = load_image(encode(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40)
    top, bottom = np.asarray(out)[5, 10], np.asarray(out)[35, 10]
    assert top[0] > 200 and top[2] < 60  # the left edge is now at the top
    assert bottom[2] > 200 and bottom[0] < 60


# ---- frame sampling ------------------------------------------------------------------------------------


def test_readme_sampling_one_frame_per_second() -> None:
    assert sample_frames_readme(30, 10.0) == [0, 10, 20]
    assert sample_frames_readme(7, 1.0) == list(range(7))
    assert sample_frames_readme(10, 2.5) == [0, 2, 4, 6, 8]  # Python round: 2.5 -> 2
    assert sample_frames_readme(5, 0.2) == [0, 1, 2, 3, 4]  # at least one frame per step
    assert sample_frames_readme(0, 30.0) == []


def test_readme_sampling_caps_uniformly() -> None:
    assert sample_frames_readme(100, 1.0, max_frames=4) == [12, 37, 62, 87]  # gap 25: int(25 i + 12.5)
    kept = list(range(0, 1000, 30))  # 34 one-per-second frames of a 30 fps video
    gap = len(kept) / 16
    assert sample_frames_readme(1000, 29.97) == [kept[int(i * gap + gap / 2)] for i in range(16)]


def test_readme_sampling_rejects_bad_rates() -> None:
    with pytest.raises(MediaError, match="frame rate of 0"):
        sample_frames_readme(10, 0.0)
    with pytest.raises(MediaError, match="frame rate of nan"):
        sample_frames_readme(10, float("nan"))
    with pytest.raises(UsageError, match="max_frames must be at least 1"):
        sample_frames_readme(10, 1.0, max_frames=0)


def test_middle_sampling_takes_bin_middles() -> None:
    assert sample_frames_middle(30, 4) == [3, 10, 18, 25]  # edges 0 7 15 22 30
    assert sample_frames_middle(100, 8) == [5, 18, 30, 43, 55, 68, 80, 93]
    assert sample_frames_middle(8, 8) == list(range(8))
    assert sample_frames_middle(1, 1) == [0]


def test_middle_sampling_pads_short_videos_with_the_last_frame() -> None:
    assert sample_frames_middle(3, 5) == [0, 1, 2, 2, 2]
    assert sample_frames_middle(0, 4) == []
    with pytest.raises(UsageError, match="num_frames must be at least 1"):
        sample_frames_middle(10, 0)


# ---- videos: directories of frames ---------------------------------------------------------------------


@pytest.fixture()
def frame_dir(tmp_path: Path) -> Path:
    """f1.png .. f12.png (not zero-padded); frame i has brightness 8 * i."""
    for i in range(12):
        Image.new("RGB", (6, 4), (8 * i,) * 3).save(tmp_path / f"f{i + 1}.png")
    (tmp_path / ".DS_Store").write_bytes(b"hidden files are skipped")
    return tmp_path


def test_directory_frames_in_natural_order(frame_dir: Path) -> None:
    assert brightness(load_video_frames(frame_dir)) == list(range(12))  # 1 fps: every frame


def test_directory_frames_with_fps_and_middle_sampling(frame_dir: Path) -> None:
    assert brightness(load_video_frames(frame_dir, fps=4)) == [0, 4, 8]
    assert brightness(load_video_frames(frame_dir, sampling="middle", num_frames=3)) == [1, 5, 9]
    assert brightness(load_video_frames(frame_dir, sampling="middle", num_frames=14))[-3:] == [11, 11, 11]


def test_directory_with_a_broken_frame_names_it(frame_dir: Path) -> None:
    (frame_dir / "f5.png").write_bytes(b"")
    with pytest.raises(MediaError, match="0 bytes") as info:
        load_video_frames(frame_dir)
    assert "f5.png" in str(info.value)


def test_empty_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="holds no files"):
        load_video_frames(tmp_path)


def test_sampling_arguments_are_checked(frame_dir: Path) -> None:
    with pytest.raises(UsageError, match="'middle' sampling needs num_frames"):
        load_video_frames(frame_dir, sampling="middle")
    with pytest.raises(UsageError, match="unknown frame sampling 'random'"):
        load_video_frames(frame_dir, sampling="random")  # type: ignore[arg-type]


# ---- videos: files -------------------------------------------------------------------------------------


def test_video_file_readme_sampling(video: Path) -> None:
    frames = load_video_frames(video)
    assert [f.size for f in frames] == [(32, 32)] * 3 and all(f.mode == "RGB" for f in frames)
    assert brightness(frames) == [0, 10, 20]


def test_video_file_middle_sampling(video: Path) -> None:
    assert brightness(load_video_frames(video, sampling="middle", num_frames=4)) == [3, 10, 18, 25]
    padded = load_video_frames(video, sampling="middle", num_frames=32)
    assert len(padded) == 32 and brightness(padded)[-3:] == [29, 29, 29]


def test_video_frames_are_bounded(video: Path) -> None:
    with pytest.raises(MediaError, match="32x32 = 1024 pixels, more than the limit of 1000"):
        load_video_frames(video, max_pixels=1000)


def test_missing_pyav_is_an_environment_problem(video: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    with pytest.raises(EnvironmentProblem, match=r"pip install 'owl3-export\[video\]'"):
        load_video_frames(video)


def test_truncated_video_is_rejected(video: Path, tmp_path: Path) -> None:
    data = video.read_bytes()
    path = tmp_path / "half.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="could not be decoded") as info:
        load_video_frames(path)
    assert "half.mp4" in str(info.value)


def test_non_video_and_empty_files_are_rejected(tmp_path: Path) -> None:
    text = tmp_path / "clip.mp4"
    text.write_text("not a video at all\n" * 20)
    with pytest.raises(MediaError, match="could not be decoded") as info:
        load_video_frames(text)
    assert "clip.mp4" in str(info.value)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty \(0 bytes\)"):
        load_video_frames(empty)
    with pytest.raises(MediaError, match="found none"):
        load_video_frames(tmp_path / "missing.mp4")


def test_video_without_frames_is_rejected(tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    path = tmp_path / "header_only.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 32
        container.start_encoding()  # header, no frames
    with pytest.raises(MediaError, match=r"no \(non-empty\) video stream|no frames"):
        load_video_frames(path)
