"""read_image turns every readable file into RGB uint8 and every unreadable one into a clear error."""

import os

import numpy as np
import pytest
from PIL import Image

from defectlens.data.io import (
    ImageReadError,
    as_image,
    is_image_file,
    printable,
    read_image,
    read_mask,
    scan_inputs,
)


def _noise(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_rgb_png_round_trips(tmp_path):
    pixels = _noise(12, 20)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    image = read_image(tmp_path / "rgb.png")
    assert image.dtype == np.uint8 and image.shape == (12, 20, 3)
    np.testing.assert_array_equal(image, pixels)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.arange(60, dtype=np.uint8).reshape(6, 10)
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    image = read_image(tmp_path / "gray.png")
    assert image.shape == (6, 10, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], gray)


def test_16bit_png_scales_by_type_range(tmp_path):
    values = np.array([[0, 65535], [257 * 128, 257 * 64]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    image = read_image(tmp_path / "deep.png")
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], [[0, 255], [128, 64]])


def test_32bit_integer_tiff_holding_16bit_data(tmp_path):
    # PIL opens such files in mode "I" (int32); scaling by the int32 range would give flat grey.
    values = np.array([[0, 65535], [257 * 128, 0]], dtype=np.int32)
    Image.fromarray(values).save(tmp_path / "deep.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "deep.tif")[..., 0], [[0, 255], [128, 0]])


def test_rgba_is_composited_onto_black(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [0, 255, 0, 255], [0, 0, 255, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    image = read_image(tmp_path / "alpha.png").astype(int)
    np.testing.assert_array_equal(image[0, 0], [0, 0, 0])  # fully transparent red -> black
    np.testing.assert_array_equal(image[0, 1], [0, 255, 0])  # opaque green stays
    assert image[0, 2, 0] == 0 and image[0, 2, 1] == 0 and abs(image[0, 2, 2] - 128) <= 1
    # The same RGBA given as an array (the Python API) is the same image, not its alpha dropped.
    noisy = np.random.default_rng(0).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    Image.fromarray(noisy, mode="RGBA").save(tmp_path / "noisy.png")
    np.testing.assert_array_equal(as_image(rgba), image)
    np.testing.assert_array_equal(as_image(noisy), read_image(tmp_path / "noisy.png"))


def test_palette_image_maps_to_its_colours(tmp_path):
    palette_image = Image.new("P", (4, 2))
    palette_image.putpalette([10, 20, 30, 200, 100, 50] + [0, 0, 0] * 254)
    palette_image.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    palette_image.save(tmp_path / "palette.png")
    image = read_image(tmp_path / "palette.png")
    assert image.shape == (2, 4, 3)
    np.testing.assert_array_equal(image[0, 0], [10, 20, 30])
    np.testing.assert_array_equal(image[0, 1], [200, 100, 50])


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(_noise(20, 40)).save(tmp_path / "rotated.jpg", exif=exif)
    assert read_image(tmp_path / "rotated.jpg").shape == (40, 20, 3)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file_names_the_file(tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    Image.fromarray(_noise(64, 64)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=f"cut\\{suffix}") as caught:
        read_image(path)
    assert caught.value.path == str(path)


def test_text_file_with_image_suffix(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageReadError, match="notes.png.*not a recognised image"):
        read_image(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.jpg.*empty"):
        read_image(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageReadError, match="missing.png.*does not exist"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="folder"):
        read_image(tmp_path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_max_side_downscales_keeping_aspect(tmp_path, suffix):
    path = tmp_path / f"large{suffix}"
    Image.new("RGB", (1600, 800), (90, 120, 150)).save(path)
    image = read_image(path, max_side=200)
    assert image.shape == (100, 200, 3)
    assert abs(int(image[50, 100, 2]) - 150) <= 3
    assert read_image(path).shape == (800, 1600, 3)


def test_read_mask_is_boolean_and_resizes(tmp_path):
    mask = np.zeros((4, 6), dtype=np.uint8)
    mask[1:3, 2:4] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert read_mask(tmp_path / "mask.png").sum() == 4
    resized = read_mask(tmp_path / "mask.png", shape=(8, 12))
    assert resized.dtype == bool and resized.shape == (8, 12) and resized.sum() == 16


def test_as_image_accepts_paths_and_arrays(tmp_path):
    Image.fromarray(_noise(5, 7)).save(tmp_path / "a.png")
    assert as_image(tmp_path / "a.png").shape == (5, 7, 3)
    assert as_image(str(tmp_path / "a.png")).shape == (5, 7, 3)
    assert as_image(np.zeros((5, 7), dtype=np.uint8)).shape == (5, 7, 3)
    assert as_image(np.ones((5, 7, 3), dtype=np.float32)).dtype == np.uint8
    # numpy's default int64 holding 8-bit values keeps them (not scaled by the int64 range)
    np.testing.assert_array_equal(as_image(np.array([[0, 128, 255]]))[0, :, 0], [0, 128, 255])
    with pytest.raises(ValueError, match="shape"):
        as_image(np.zeros((2, 5, 7, 3)))


def test_is_image_file():
    assert is_image_file("a/b/Photo.JPG") and is_image_file("x.tiff")
    assert not is_image_file("notes.txt") and not is_image_file("archive.png.zip")


def test_exif_orientation_is_applied_to_a_reduced_decode(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_noise(200, 400)).save(tmp_path / "rotated.jpg", exif=exif)
    assert read_image(tmp_path / "rotated.jpg", max_side=100).shape == (100, 50, 3)


def test_images_above_the_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch):
    Image.new("L", (300, 200)).save(tmp_path / "wide.png")
    with pytest.raises(ImageReadError, match="wide.png: image is 300×200 .*decoding limit"):
        read_image(tmp_path / "wide.png", max_pixels=59_999)
    assert read_image(tmp_path / "wide.png", max_pixels=60_000).shape == (200, 300, 3)
    monkeypatch.setattr("defectlens.data.io.MAX_IMAGE_PIXELS", 1000)  # the default limit is read at call time
    with pytest.raises(ImageReadError, match="0.001 Mpx"):
        read_image(tmp_path / "wide.png")


def test_broken_links_and_special_files_are_named(tmp_path):
    (tmp_path / "link.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(ImageReadError, match="link.png: broken symbolic link .*nowhere.png"):
        read_image(tmp_path / "link.png")
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image(tmp_path / "pipe.png")


def test_scan_inputs_accounts_for_every_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".cache").mkdir()
    for name in ("b.png", "sub/a.JPG", ".cache/c.png", ".hidden.png", "notes.txt", "sub/data.csv"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "linked").symlink_to(tmp_path / "sub")
    scan = scan_inputs([tmp_path, tmp_path / "b.png", tmp_path / "notes.txt"])
    names = [p.relative_to(tmp_path).as_posix() for p in scan.paths]
    # Folder contents sorted, broken links kept (they get an error row), a file named directly kept
    # even without an image suffix, the same file named twice scored once.
    assert names == ["b.png", "gone.png", "sub/a.JPG", "notes.txt"]
    assert scan.duplicates == 1
    assert scan.skipped == {"hidden folders": 1, "hidden files": 1, "linked folders (not followed)": 1,
                            "without an image suffix (.png, .jpg, .jpeg, .bmp, .tif, .tiff, .webp)": 2}
    assert scan.skipped_summary().startswith("skipped 5 items in the input folders: ")


def test_printable_keeps_text_and_escapes_undecodable_bytes():
    assert printable("défaut/001.png") == "défaut/001.png"
    assert printable(os.fsdecode(b"caf\xe9.png")) == "caf\\xe9.png"
