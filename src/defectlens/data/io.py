"""Robust image reading: every input becomes an RGB uint8 array or a clear per-file error."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Line-scan and stitched inspection images can be very large; PIL's default bomb guard
# (about 89 Mpx) would reject them. We allow up to 1 Gpx and downscale on decode instead.
Image.MAX_IMAGE_PIXELS = 1_000_000_000


class ImageReadError(ValueError):
    """An input file could not be read as an image. The message names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale integer or float images of any bit depth to 0..255 without clipping their range."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        # 16-bit sensors often use only 10-12 bits: scale by the type's range, which keeps
        # brightness comparable between images of one line (per-image stretching would not).
        info = np.iinfo(array.dtype)
        lo, hi = float(info.min), float(info.max)
        if info.bits > 16 and array.size:
            # Wide integers are containers, not bit depths: PIL's "I" mode holds 16-bit data and
            # numpy's default int64 arrays hold 8-bit values. Their full range would give flat grey.
            lo, hi = float(array.min()), float(array.max())
            if lo >= 0 and hi <= 65535:
                lo, hi = 0.0, 255.0 if hi <= 255 else 65535.0
        scaled = (array.astype(np.float64) - lo) / (hi - lo) if hi > lo else np.zeros(array.shape)
    else:
        finite = np.nan_to_num(array.astype(np.float64))
        lo, hi = float(finite.min()), float(finite.max())
        scaled = (finite - lo) / (hi - lo) if hi > lo else np.zeros_like(finite)
    return np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)


def _pil_to_rgb_array(image: Image.Image) -> np.ndarray:
    if image.mode in ("RGB",):
        return np.asarray(image, dtype=np.uint8)
    if image.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "1", "L", "RGBX", "RGBa"):
        if image.mode in ("RGBA", "LA", "PA", "RGBa") or (image.mode == "P" and "transparency" in image.info):
            # Composite transparent pixels onto black, so the alpha channel never leaks colour noise.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    # High bit depth modes: I;16*, I (int32), F (float32).
    gray = _to_uint8(np.asarray(image))
    if gray.ndim == 3:
        gray = gray[..., 0]
    return np.repeat(gray[..., None], 3, axis=2)


def read_image(path: str | os.PathLike, max_side: int | None = None) -> np.ndarray:
    """Read an image file as an H×W×3 RGB uint8 array.

    Handles grayscale, 16-bit, float, RGBA, palette and CMYK files and applies the EXIF
    orientation. ``max_side`` downsizes very large images while decoding (JPEG draft mode),
    keeping memory bounded. Raises :class:`ImageReadError` naming the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file does not exist")
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    return _decode(path, path, max_side, max_pixels=None)


def decode_image(data: bytes, name: str = "upload", max_side: int | None = None,
                 max_pixels: int | None = None) -> np.ndarray:
    """Decode an image held in memory (an upload) as an H×W×3 RGB uint8 array, with the same
    guards and conversions as :func:`read_image`.

    ``max_pixels`` rejects images whose header declares more pixels before any pixel is
    decoded, so an untrusted upload cannot make the caller allocate gigabytes. ``name`` is used
    in error messages. Raises :class:`ImageReadError`.
    """
    if not data:
        raise ImageReadError(name, "file is empty (0 bytes)")
    return _decode(io.BytesIO(data), name, max_side, max_pixels)


def _decode(source, name, max_side: int | None, max_pixels: int | None) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                if max_pixels is not None and image.width * image.height > max_pixels:
                    raise ImageReadError(name, f"image is {image.width}×{image.height} = {image.width * image.height} "
                                               f"pixels, over the limit of {max_pixels}")
                if max_side is not None and image.format == "JPEG":
                    image.draft("RGB", (max_side, max_side))
                image.load()
                image = ImageOps.exif_transpose(image)
                if max_side is not None and max(image.size) > max_side:
                    image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
                array = _pil_to_rgb_array(image)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(name, "not a recognised image format (is it really an image?)") from None
    except (OSError, SyntaxError, ValueError) as error:
        problem = str(error) or type(error).__name__
        if "truncated" in problem.lower() or "image file is truncated" in problem:
            problem = f"image data is truncated or corrupt ({problem})"
        raise ImageReadError(name, f"cannot decode image: {problem}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageReadError(name, f"image is too large to decode safely: {error}") from None
    if array.size == 0:
        raise ImageReadError(name, "image has zero width or height")
    return np.ascontiguousarray(array)


def read_mask(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as a bool H×W array (any non-zero pixel is anomalous).

    ``shape`` resizes the mask (nearest neighbour) to an image's (height, width) when the
    files disagree, which happens in some public datasets.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            mask = np.asarray(image)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise ImageReadError(path, f"cannot read mask: {error}") from None
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    mask = mask > 0
    if shape is not None and mask.shape != tuple(shape):
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
        mask = np.asarray(resized) > 0
    return mask


def as_image(item) -> np.ndarray:
    """Accept a path or an array wherever a user passes an image; return RGB uint8."""
    if isinstance(item, (str, os.PathLike)):
        return read_image(item)
    array = np.asarray(item)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an H×W×3 RGB image array, got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.shape[2] == 4:
        array = array[..., :3]
    return _to_uint8(array)
