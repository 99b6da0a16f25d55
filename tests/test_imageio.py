"""film_fast.imageio: every common PNG/JPEG flavour reads to [3, H, W] RGB in [0, 1]; writes are atomic."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from conftest import PHOTOS
from film_fast.errors import InputError
from film_fast.imageio import read_image, to_uint8, write_image

RNG = np.random.default_rng(0)


def chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(2, 0, 1)


def no_temp_files(folder) -> bool:
    return not [n for n in os.listdir(folder) if ".tmp-" in n]


def test_official_sample_reads_despite_large_text_chunk():
    limit = PngImagePlugin.MAX_TEXT_CHUNK
    x = read_image(os.path.join(PHOTOS, "one.png"))
    assert x.shape == (3, 768, 1024) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert PngImagePlugin.MAX_TEXT_CHUNK == limit  # Pillow's global limit restored


def test_rgb_round_trip_is_exact(tmp_path):
    pixels = RNG.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    x = read_image(tmp_path / "a.png")
    torch.testing.assert_close(x, chw(pixels.astype(np.float32) / np.float32(255)), rtol=0, atol=0)
    write_image(tmp_path / "b.png", x)
    with Image.open(tmp_path / "b.png") as img:
        assert img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), pixels)
    assert no_temp_files(tmp_path)


def test_rgba_drops_alpha_without_compositing(tmp_path):
    pixels = RNG.integers(0, 256, (5, 6, 4), dtype=np.uint8)
    pixels[..., 3] = 0  # fully transparent: colours must still come back unchanged
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    x = read_image(tmp_path / "a.png")
    assert x.shape == (3, 5, 6)
    np.testing.assert_array_equal(to_uint8(x), pixels[..., :3])


@pytest.mark.parametrize("mode", ["L", "LA"])
def test_grey_is_replicated(tmp_path, mode):
    grey = RNG.integers(0, 256, (4, 5), dtype=np.uint8)
    img = Image.fromarray(grey, "L")
    if mode == "LA":
        img = img.convert("LA")
    img.save(tmp_path / "g.png")
    x = read_image(tmp_path / "g.png")
    assert x.shape == (3, 4, 5)
    for c in range(3):
        np.testing.assert_array_equal(to_uint8(x)[..., c], grey)


def test_palette(tmp_path):
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, (6, 4), dtype=np.uint8)
    img = Image.fromarray(index, "L").convert("P")
    img.putpalette(palette.reshape(-1).tolist())
    img.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as check:
        assert check.mode == "P"
    np.testing.assert_array_equal(to_uint8(read_image(tmp_path / "p.png")), palette[index])


def test_16_bit_grey_keeps_precision(tmp_path):
    values = np.array([[0, 1, 257, 32768], [65534, 65535, 12345, 40000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as check:
        assert check.mode in ("I;16", "I")
    x = read_image(tmp_path / "g16.png")
    expected = torch.from_numpy(values.astype(np.float32) / np.float32(65535))
    for c in range(3):
        torch.testing.assert_close(x[c], expected, rtol=0, atol=0)


def test_jpeg(tmp_path):
    pixels = np.full((16, 16, 3), (200, 30, 90), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    x = read_image(tmp_path / "a.jpg")
    assert x.shape == (3, 16, 16)
    assert np.abs(to_uint8(x).astype(int) - pixels).max() <= 3


def test_write_clamps_rounds_and_accepts_batch_of_one(tmp_path):
    x = torch.tensor([-0.5, 0.5, 2.0, float("nan")]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    write_image(tmp_path / "a.png", x)
    with Image.open(tmp_path / "a.png") as img:
        # 0.5 * 255 = 127.5 rounds half to even: 128; NaN is written as 0.
        np.testing.assert_array_equal(np.asarray(img)[0, :, 0], [0, 128, 255, 0])


def test_write_rejects_bad_shapes_and_names(tmp_path):
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        write_image(tmp_path / "a.png", torch.zeros(4, 2, 2))
    with pytest.raises(InputError, match=r"\.png"):
        write_image(tmp_path / "a.jpg", torch.zeros(3, 2, 2))
    with pytest.raises(OSError):
        write_image(tmp_path / "missing" / "a.png", torch.zeros(3, 2, 2))
    assert os.listdir(tmp_path) == []


def test_bad_files_raise_input_error_naming_the_file(tmp_path):
    (tmp_path / "text.png").write_text("not an image\n")
    whole = open(os.path.join(PHOTOS, "one.png"), "rb").read()
    (tmp_path / "half.png").write_bytes(whole[: len(whole) // 2])      # inside the text chunk
    (tmp_path / "cut.png").write_bytes(whole[: int(len(whole) * 0.9)])  # inside the pixel data
    cases = {"missing.png": "no such file", "text.png": "not an image",
             "half.png": "corrupt", "cut.png": "truncated", ".": "directory"}
    for name, problem in cases.items():
        path = str(tmp_path / name)
        with pytest.raises(InputError) as info:
            read_image(path)
        message = str(info.value)
        assert path in message and problem in message and "\n" not in message
