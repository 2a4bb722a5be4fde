"""Robust image reading: every input becomes an RGB uint8 array or a clear per-file error."""

from __future__ import annotations

import io
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DefectlensError, UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Line-scan and stitched inspection images can be very large; PIL's default bomb guard
# (about 89 Mpx) would reject them. PIL's own guard is moved out of the way (1 Gpx) and
# read_image applies MAX_IMAGE_PIXELS itself, with a message that says what to do.
Image.MAX_IMAGE_PIXELS = 1_000_000_000

#: Images with more pixels than this are refused before decoding. PNG, TIFF and BMP files can
#: only be decoded whole, so this bounds the memory one input can take: about 5 bytes a pixel for
#: 8-bit RGB (PIL holds 4, plus the reduced copy), 0.75 GB at the limit; a 1 MB PNG of one colour
#: can hold 400 Mpx. Measured by benchmarks/huge_images.py.
MAX_IMAGE_PIXELS = 150_000_000

#: Batch prediction decodes larger images reduced so that their longer side is at most this
#: (JPEG at decode time, other formats right after): scores are unchanged in practice because
#: every detector works at a few hundred pixels, and the anomaly map and overlay are written at
#: this reduced size instead of full size (a 20000² float32 map alone would be 1.6 GB).
MAX_SCORING_SIDE = 4096


class ImageReadError(DefectlensError, ValueError):
    """An input file could not be read as an image. The message names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def printable(text: str | os.PathLike) -> str:
    """Text that can always be written as UTF-8: file names that are not valid UTF-8 reach Python
    with their raw bytes as lone surrogates, which would make a CSV or print() fail halfway. Those
    bytes become ``\\xNN`` escapes; every other character is kept as is."""
    return os.fspath(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class InputScan:
    """The images to score from the files and folders a user named, and what was left out.

    ``paths`` holds every file named directly (even a non-image, so that it gets its own error
    row) and every file with an image suffix inside the folders, including broken links, which
    then fail with a reason. ``skipped`` counts what the folders held that is not an image
    input, by reason; ``duplicates`` counts files named more than once (scored once)."""

    paths: list[Path] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    duplicates: int = 0

    def skipped_summary(self) -> str:
        """One line such as "skipped 3 items in the input folders: 2 hidden files, 1 ..."; "" if none."""
        if not self.skipped:
            return ""
        parts = ", ".join(f"{count} {reason}" for reason, count in self.skipped.most_common())
        return f"skipped {sum(self.skipped.values())} items in the input folders: {parts}"


def scan_inputs(inputs: Sequence[str | os.PathLike]) -> InputScan:
    """Expand folders recursively (sorted, symlinked folders not followed) into image files."""
    scan, seen = InputScan(), set()

    def add(path: Path) -> None:
        key = os.path.abspath(path)
        if key in seen:
            scan.duplicates += 1
        else:
            seen.add(key)
            scan.paths.append(path)

    def unlistable(error: OSError) -> None:
        add(Path(error.filename))  # read_image then names the problem (e.g. permission denied)

    for item in map(Path, inputs):
        if not item.is_dir():
            add(item)
            continue
        for root, folders, files in os.walk(item, onerror=unlistable):
            folders.sort()
            for name in [f for f in folders if f.startswith(".") or os.path.islink(os.path.join(root, f))]:
                folders.remove(name)
                scan.skipped["hidden folders" if name.startswith(".") else "linked folders (not followed)"] += 1
            for name in sorted(files):
                if name.startswith("."):
                    scan.skipped["hidden files"] += 1
                elif not is_image_file(name):
                    scan.skipped[f"without an image suffix ({', '.join(IMAGE_SUFFIXES)})"] += 1
                else:
                    add(Path(root) / name)
    return scan


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
        # Floats in [0, 1] are the usual convention (skimage, torch); floats in [0, 255] are
        # uint8 images converted; anything else is stretched to its own range.
        finite = np.nan_to_num(array.astype(np.float64))
        lo, hi = float(finite.min()), float(finite.max())
        if lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
        elif lo >= 0.0 and hi <= 255.0:
            lo, hi = 0.0, 255.0
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


def read_image(path: str | os.PathLike, max_side: int | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as an H×W×3 RGB uint8 array.

    Handles grayscale, 16-bit, float, RGBA, palette and CMYK files and applies the EXIF
    orientation. ``max_side`` downsizes very large images while decoding (JPEG draft mode),
    keeping memory bounded. Images with more than ``max_pixels`` pixels (default
    :data:`MAX_IMAGE_PIXELS`) are refused before decoding. Raises :class:`ImageReadError`
    naming the file and the problem.
    """
    path = Path(path)
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if not path.exists():
        if path.is_symlink():
            raise ImageReadError(path, f"broken symbolic link (points to {os.readlink(path)}, which does not exist)")
        raise ImageReadError(path, "file does not exist")
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not an image file")
    if not path.is_file():
        raise ImageReadError(path, "is not a regular file (a device, pipe or socket)")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    if not os.access(path, os.R_OK):
        raise ImageReadError(path, "permission denied: the file is not readable")
    return _decode(path, path, max_side, max_pixels)


def decode_image(data: bytes, name: str = "upload", max_side: int | None = None,
                 max_pixels: int | None = None) -> np.ndarray:
    """Decode an image held in memory (an upload) as an H×W×3 RGB uint8 array, with the same
    guards and conversions as :func:`read_image`.

    Images whose header declares more than ``max_pixels`` pixels (default
    :data:`MAX_IMAGE_PIXELS`) are refused before any pixel is decoded, so an untrusted upload
    cannot make the caller allocate gigabytes. ``name`` is used in error messages. Raises
    :class:`ImageReadError`.
    """
    if not data:
        raise ImageReadError(name, "file is empty (0 bytes)")
    return _decode(io.BytesIO(data), name, max_side, MAX_IMAGE_PIXELS if max_pixels is None else max_pixels)


def _decode(source, name, max_side: int | None, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageReadError(name, f"image is {width}×{height} ({width * height / 1e6:.0f} Mpx), above the "
                                               f"{max_pixels / 1e6:g} Mpx decoding limit; tile or downscale it, or raise "
                                               "the limit (predict: --max-megapixels, serve: --max-pixels)")
                if max_side is not None and image.format == "JPEG":
                    image.draft("RGB", (max_side, max_side))
                image.load()
                if max_side is not None and max(image.size) > max_side:
                    image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
                # After shrinking: the transpose copies the image (its EXIF tag survives thumbnail()).
                image = ImageOps.exif_transpose(image)
                array = _pil_to_rgb_array(image)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(name, "not a recognised image format (is it really an image?)") from None
    except PermissionError:
        raise ImageReadError(name, "permission denied: the file is not readable") from None
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
    return as_mask(mask, shape)


def image_list(images, what: str = "images") -> list:
    """``images`` (a sequence of paths or arrays, or an (N, H, W[, C]) array) as a list; a single
    path or a single H×W[×C] image is refused by name, where iterating it would make a list of
    characters or of pixel rows."""
    if isinstance(images, (str, os.PathLike)):
        raise UsageError(f"{what}: expected a list of images, got one path ({printable(images)}); pass [path]")
    if isinstance(images, np.ndarray) and (images.ndim == 2 or (images.ndim == 3 and images.shape[2] in (3, 4))):
        raise UsageError(f"{what}: expected a list of images or an (N, H, W[, C]) array, got one image of shape "
                         f"{images.shape}; pass [image]")
    if isinstance(images, Image.Image):
        raise UsageError(f"{what}: expected a list of images, got one PIL image; pass [image]")
    return list(images)


def as_image(item) -> np.ndarray:
    """Accept a path or an array wherever a user passes an image; return RGB uint8."""
    if isinstance(item, (str, os.PathLike)):
        return read_image(item)
    array = np.asarray(item)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an H×W×3 RGB image array, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"an image array of shape {array.shape} holds no pixel")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.shape[2] == 4:  # onto black, as an RGBA file is read: the same image, the same score
        rgba = _to_uint8(array).astype(np.uint16)
        return ((rgba[..., :3] * rgba[..., 3:] + 127) // 255).astype(np.uint8)
    return _to_uint8(array)


def as_mask(item, shape: tuple[int, int] | None = None) -> np.ndarray | None:
    """Accept a ground-truth mask in any of the forms defectlens meets: None (no mask), a path, a
    list of paths (their union: LOCO keeps one file per defect), or an array (H×W, or H×W×C with
    any channel marking the defect). Returns a bool H×W array, resized to ``shape`` (height,
    width) by nearest neighbour when given."""
    if item is None:
        return None
    if isinstance(item, (str, os.PathLike)):
        return read_mask(item, shape)
    if isinstance(item, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in item):
        if not item:
            return None
        mask = read_mask(item[0], shape)
        for path in item[1:]:
            mask |= read_mask(path, mask.shape)
        return mask
    mask = np.asarray(item)
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    if mask.ndim != 2:
        raise ValueError(f"expected an H×W mask array, got shape {mask.shape}")
    mask = mask > 0
    if shape is not None and mask.shape != tuple(shape):
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
        mask = np.asarray(resized) > 0
    return mask
