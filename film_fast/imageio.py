"""Image files <-> ``[3, H, W]`` float tensors, with the official FILM conventions.

Reading matches the official ``util.read_image`` (``tf.io.decode_image(...,
channels=3) / 255``): 8-bit values divided by 255 in float32, alpha dropped
(not composited), grey replicated to RGB, EXIF orientation and ICC profiles
ignored. Writing matches ``util.write_image`` up to the rounding of exact
halves: clamp to [0, 1], times 255, round half to even, 8-bit RGB PNG.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Union

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from .errors import InputError

PathLike = Union[str, os.PathLike]

# The official sample frames (photos/one.png, two.png) carry a ~6 MB compressed
# text chunk that Pillow refuses by default ("Decompressed data too large for
# PngImagePlugin.MAX_TEXT_CHUNK"). We accept text chunks up to this size while
# reading; the limit is restored afterwards so other users of Pillow are unaffected.
_TEXT_CHUNK_LIMIT = 64 * 1024 * 1024

# Modes whose last band is alpha; the alpha band is dropped, like TF's decode_image(channels=3).
_ALPHA_MODES = {"RGBA": "RGB", "RGBa": "RGB", "LA": "L", "La": "L", "PA": "P"}


@contextlib.contextmanager
def _large_text_chunks() -> Iterator[None]:
    old_chunk = PngImagePlugin.MAX_TEXT_CHUNK
    old_memory = PngImagePlugin.MAX_TEXT_MEMORY
    PngImagePlugin.MAX_TEXT_CHUNK = max(old_chunk, _TEXT_CHUNK_LIMIT)
    PngImagePlugin.MAX_TEXT_MEMORY = max(old_memory, _TEXT_CHUNK_LIMIT)
    try:
        yield
    finally:
        PngImagePlugin.MAX_TEXT_CHUNK = old_chunk
        PngImagePlugin.MAX_TEXT_MEMORY = old_memory


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """Decoded Pillow image -> ``[H, W, 3]`` float32 in [0, 1]."""
    mode = img.mode
    if mode in _ALPHA_MODES:
        # Drop alpha without compositing: the colour values are kept as stored.
        img = img.convert("RGBA").convert("RGB") if mode == "PA" else img.convert(_ALPHA_MODES[mode])
        mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale PNGs decode to I;16 (or I in older Pillow); full 16-bit precision.
        grey = np.asarray(img).astype(np.float32) / np.float32(65535.0)
        grey = np.clip(grey, 0.0, 1.0)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        grey = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "L":
        grey = np.asarray(img).astype(np.float32) / np.float32(255.0)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode != "RGB":
        # P (palette), 1 (bilevel), CMYK / YCbCr (JPEG), ... : Pillow's own conversion.
        img = img.convert("RGB")
    return np.asarray(img).astype(np.float32) / np.float32(255.0)


def read_image(path: PathLike) -> torch.Tensor:
    """Reads an image file as RGB.

    Handles 8-bit RGB, RGBA / LA / PA (alpha dropped, not composited), grey L
    (replicated to 3 channels), palette P, 16-bit greyscale PNG (divided by
    65535), JPEG and anything else Pillow decodes. 16-bit RGB PNGs are read at
    the 8-bit precision Pillow decodes them to.

    Args:
        path: the image file.
    Returns:
        ``[3, H, W]`` float32 in [0, 1] (CPU).
    Raises:
        InputError: missing file, a directory, unreadable, not an image, or a
            truncated / corrupt image (one-line message naming the file).
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise InputError(f"{name}: no such file")
    if os.path.isdir(name):
        raise InputError(f"{name}: is a directory, expected an image file")
    try:
        with _large_text_chunks(), Image.open(name) as img:
            # Image.open only parses the header: load() decodes the pixels, so a
            # truncated or corrupt file fails here rather than later.
            img.load()
            array = _to_rgb_array(img)
    except PermissionError:
        raise InputError(f"{name}: permission denied") from None
    except Image.UnidentifiedImageError:
        raise InputError(f"{name}: not an image file (or a format Pillow cannot decode)") from None
    except MemoryError:
        raise
    except Exception as e:  # OSError (truncated), SyntaxError (bad PNG chunk), DecompressionBomb...
        raise InputError(f"{name}: unreadable or corrupt image ({_one_line(e)})") from None
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` or ``[1, 3, H, W]`` float in [0, 1] -> ``[H, W, 3]`` uint8 (clamp, x255, round)."""
    return uint8_pixels(image).to(device="cpu").numpy()


def uint8_pixels(image: torch.Tensor) -> torch.Tensor:
    """:func:`to_uint8` where the image is: ``[H, W, 3]`` uint8, contiguous, on its device.

    Computed where the image is and moved as uint8: on a GPU that is a quarter of the fp32
    transfer and no CPU pass over the frame (17 ms per 1080p frame on this 2-core CPU). The
    ops are exact (IEEE multiply, round half to even), so every device gives the same bytes.
    """
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor [3, H, W], got {type(image).__name__}")
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W] or [1, 3, H, W] (RGB), got {list(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"image must be a floating tensor with values in [0, 1], got {image.dtype}")
    x = image.detach().to(dtype=torch.float32)
    x = torch.nan_to_num(x, nan=0.0).clamp(0.0, 1.0) * 255.0
    # torch.round rounds exact halves to even; values are in [0, 255] so uint8 cannot overflow.
    return torch.round(x).to(torch.uint8).permute(1, 2, 0).contiguous()


def write_image(path: PathLike, image: torch.Tensor) -> None:
    """Writes ``image`` (``[3, H, W]`` or ``[1, 3, H, W]`` float, [0, 1]) as an 8-bit RGB PNG.

    The file is written under a temporary name in the same folder and renamed
    into place, so a reader never sees half a PNG and a failure leaves nothing.

    Raises:
        InputError: the name does not end in ``.png``.
        OSError: the folder is missing or not writable.
    """
    name = os.fspath(path)
    if not name.lower().endswith(".png"):
        raise InputError(f"{name}: write_image writes PNG files; the name must end in .png")
    pixels = to_uint8(image)
    folder, base = os.path.split(os.path.abspath(name))
    tmp = os.path.join(folder, f".{base}.tmp-{os.getpid()}")
    try:
        Image.fromarray(pixels).save(tmp, format="PNG")
        os.replace(tmp, name)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
