"""Qwen3-VL image preprocessing, matching HF transformers' PIL-backend `Qwen2VLImageProcessorPil` with the
Qwen3-VL-2B-Instruct `preprocessor_config.json` (patch 16, merge 2, temporal patch 2, mean = std = 0.5).

smart_resize to multiples of patch * merge (32) inside [min_pixels, max_pixels]; PIL bicubic resampling; x / 255;
(x - mean) / std; the image repeated as 2 frames; rows of [C * T * P * P] = 1536 in the processor's block-major
order (2 x 2 merge blocks in raster order, row-major inside each block).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Images larger than this are refused before decoding: PIL's own decompression-bomb threshold.
MAX_INPUT_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class ImageError(ValueError):
    """An image that cannot be used; the message says why and what to do."""


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 65536,
                 max_pixels: int = 16777216) -> tuple[int, int]:
    """(h, w) divisible by `factor`, pixel count within [min_pixels, max_pixels], aspect ratio kept (HF's rule,
    banker's rounding included)."""
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over 200 ({width}x{height}): crop it first")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def load_image(image, *, min_side: int = 16) -> Image.Image:
    """An RGB PIL image from a PIL image, a path or an array ([H, W], [H, W, 3|4], uint8 or float in [0, 1]).

    Applies EXIF orientation; converts RGBA (onto white), LA, L, P and CMYK to RGB. Refuses unreadable files,
    images smaller than `min_side` pixels on a side and images over MAX_INPUT_PIXELS (before decoding them)."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        try:
            with warnings.catch_warnings():  # sizes between PIL's warning and error thresholds: _check_size refuses
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(path)
            _check_size(img.size, str(path))
            img.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ImageError(f"{path}: not a readable image ({e}); check the file is a complete PNG/JPEG/WebP") from e
        except Image.DecompressionBombError as e:
            raise ImageError(f"{path}: {e} Refused before decoding: downscale it before passing it in") from e
    elif isinstance(image, Image.Image):
        img = image
        _check_size(img.size, "image")
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            raise ImageError(f"an image array must be [H, W] or [H, W, 1|3|4], got shape {arr.shape}")
        if arr.dtype != np.uint8:
            if not np.issubdtype(arr.dtype, np.floating) or arr.size and (arr.min() < 0 or arr.max() > 1):
                raise ImageError(f"an image array must be uint8, or float in [0, 1]; got {arr.dtype}")
            arr = np.round(arr * 255).astype(np.uint8)
        _check_size((arr.shape[1], arr.shape[0]), "image array")
        img = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    else:
        raise ImageError(f"expected a PIL image, a path or a numpy array, got {type(image).__name__}")
    img = ImageOps.exif_transpose(img)
    w, h = img.size
    if min(w, h) < min_side:
        raise ImageError(f"image is {w}x{h}: each side needs at least {min_side} pixels (one vision patch)")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _check_size(size, what):
    w, h = size
    if w * h > MAX_INPUT_PIXELS:
        raise ImageError(f"{what} is {w}x{h} = {w * h / 1e6:.0f} M pixels, over the {MAX_INPUT_PIXELS / 1e6:.0f} M-pixel "
                         "limit that guards against decompression bombs: downscale it before passing it in")


def preprocess_image(image, *, min_pixels: int = 65536, max_pixels: int = 16777216, patch_size: int = 16,
                     merge_size: int = 2, temporal_patch_size: int = 2, mean=(0.5, 0.5, 0.5),
                     std=(0.5, 0.5, 0.5)) -> tuple[np.ndarray, tuple[int, int, int]]:
    """-> (pixel_values [N, C * T * P * P] float32, grid_thw (1, h, w)) with N = h * w patches of P pixels."""
    img = load_image(image)
    w, h = img.size
    factor = patch_size * merge_size
    rh, rw = smart_resize(h, w, factor, min_pixels, max_pixels)
    if (rh, rw) != (h, w):
        img = img.resize((rw, rh), resample=Image.BICUBIC)
    x = np.asarray(img, dtype=np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    x = x.transpose(2, 0, 1)  # [C, H, W]
    c = x.shape[0]
    gh, gw = rh // patch_size, rw // patch_size
    x = x.reshape(c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, mh, mw, C, P, P]
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, *x.shape[5:]))
    return np.ascontiguousarray(x.reshape(gh * gw, c * temporal_patch_size * patch_size * patch_size)), (1, gh, gw)
