"""Qwen3-VL preprocessing against HF's PIL-backend image processor, input kinds, and bad images."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from jaxlm.qwen3_vl import ImageError, preprocess_image, smart_resize


@pytest.fixture(scope="module")
def hf_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3, size={"shortest_edge": 65536, "longest_edge": 16777216})


@pytest.mark.parametrize("h,w", [(256, 256), (64, 96), (448, 640), (333, 517), (1080, 720), (20, 3000)])
def test_matches_hf_pil_processor(hf_processor, h, w):
    """Sizes that are multiples of 32 need no resize; the others exercise smart_resize + bicubic (same PIL call)."""
    arr = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    want = hf_processor(images=[Image.fromarray(arr)], return_tensors="np")
    got, grid = preprocess_image(arr)
    assert tuple(want["image_grid_thw"][0]) == grid and got.dtype == np.float32
    np.testing.assert_allclose(got, want["pixel_values"], atol=1e-5, rtol=0)


def test_smart_resize_known_sizes():
    cases = {(448, 448): (448, 448), (1080, 1920): (1088, 1920), (224, 224): (256, 256), (100, 100): (256, 256),
             (300, 1000): (288, 992), (4000, 3000): (4000, 3008), (5000, 5000): (4096, 4096)}
    for (h, w), want in cases.items():
        assert smart_resize(h, w) == want
    with pytest.raises(ImageError, match="aspect ratio"):
        smart_resize(16, 4000)


def test_input_kinds_agree(tmp_path):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    ref, grid = preprocess_image(arr)
    for source in (path, str(path), Image.fromarray(arr), arr.astype(np.float32) / 255):
        out, g = preprocess_image(source)
        assert g == grid
        np.testing.assert_allclose(out, ref, atol=1e-6)
    # every patch row holds its two identical temporal copies
    rows = ref.reshape(-1, 3, 2, 16 * 16)
    np.testing.assert_array_equal(rows[:, :, 0], rows[:, :, 1])


def test_modes_and_exif(tmp_path):
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (64, 96), dtype=np.uint8)
    out, _ = preprocess_image(Image.fromarray(gray))  # L -> RGB: three equal channels
    ch = out.reshape(-1, 3, 2 * 256)
    np.testing.assert_array_equal(ch[:, 0], ch[:, 1])
    rgba = np.dstack([rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), np.zeros((64, 96), np.uint8)])
    out, _ = preprocess_image(rgba)  # fully transparent -> white
    np.testing.assert_allclose(out, 1.0)
    pal = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).convert("P")
    np.testing.assert_allclose(preprocess_image(pal)[0], preprocess_image(pal.convert("RGB"))[0])
    # EXIF orientation 6 (rotate 270 to display): a 64x96 JPEG shows as 96x64
    arr = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    _, grid = preprocess_image(path)
    shown = np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270))
    assert shown.shape[:2] == (96, 64) and grid == preprocess_image(shown)[1] and grid[1] > grid[2]
    np.testing.assert_allclose(preprocess_image(path)[0], preprocess_image(shown)[0], atol=1e-6)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data): what a decompression bomb looks like at open."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_bad_images(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    png = tmp_path / "ok.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(png)
    corrupt.write_bytes(png.read_bytes()[:40])
    with pytest.raises(ImageError, match="not a readable image"):
        preprocess_image(corrupt)
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ImageError, match="not a readable image"):
        preprocess_image(tmp_path / "text.png")
    with pytest.raises(ImageError, match="no such image file"):
        preprocess_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="1x1"):
        preprocess_image(np.zeros((1, 1, 3), np.uint8))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(20000, 20000))
    with pytest.raises(ImageError, match="400000000 pixels.*decompression bomb"):
        preprocess_image(bomb)
    bomb.write_bytes(png_header_only(12000, 12000))  # over our limit, under PIL's hard one
    with pytest.raises(ImageError, match="12000x12000 = 144 M pixels"):
        preprocess_image(bomb)
    with pytest.raises(ImageError, match="uint8, or float"):
        preprocess_image(np.full((32, 32, 3), 2.0))
    with pytest.raises(ImageError, match="expected a PIL image"):
        preprocess_image(42)
