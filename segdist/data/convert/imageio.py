"""Reading source images and masks for conversion, and encoding images for a shard.

Every converter reads through here so one set of rules holds for all datasets:
- images always come out as 8-bit RGB: grayscale, palette, RGBA (alpha dropped), CMYK and
  16-bit (scaled to 8 bits) sources are converted, because the shard contract says RGB;
- masks come out as class indices, never colours: a palette PNG gives its indices, a gray mask its
  values, a colour mask is accepted only when its three channels are equal (a gray mask saved as
  RGB) — anything else would silently train on colour codes;
- a file that does not decode is a one-line `UserError` naming it, not a PIL traceback.

`--image-format keep` stores the source file's bytes untouched when they already satisfy the
contract (an 8-bit RGB PNG, or an RGB JPEG); any other source (BMP, grayscale, RGBA, palette,
16-bit, CMYK, ...) is converted to RGB and stored as PNG, which is lossless and so adds no second
generation of JPEG loss. `raw` stores the uncompressed pixels (`.npy`): no decode when training reads
them, at the cost of disk (what suits small, pre-resized frames).

`--max-size N` (`fit_longest`) stores frames whose longest side is at most N: the image shrunk with
INTER_AREA, the mask with nearest (the grid INTER_LINEAR uses), to the size albumentations'
LongestMaxSize gives, so a tier stored at a recipe's training size holds what that preset would
have made of the full frame.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from segdist.data.sample import to_uint8
from segdist.data.shards import encode_jpeg, encode_png, encode_raw
from segdist.errors import UserError

IMAGE_FORMATS = ("keep", "jpeg", "png", "raw")

# PIL modes that PIL itself converts to RGB without losing anything we keep (alpha is dropped).
_DIRECT_TO_RGB = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass
class SourceImage:
    """A decoded source image: its RGB pixels plus what `keep` needs to know about the file."""

    rgb: np.ndarray
    data: bytes
    format: str | None
    mode: str
    keepable: bool
    """The file's bytes already are an 8-bit RGB PNG or an RGB JPEG."""


def _open(path: Path, what: str) -> tuple[bytes, Image.Image]:
    """Read and fully decode a file; any failure is a `UserError` naming it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now: a truncated file fails here, not later in a worker of training
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).split(" <_io.BytesIO")[0]  # PIL names its buffer, not the file
        raise UserError(f"{what} {path} is corrupt or not an image ({reason}): replace or remove it") from None
    return data, img


def _png_is_rgb8(data: bytes) -> bool:
    # IHDR is always the first chunk: byte 24 is the bit depth, byte 25 the colour type (2 = RGB).
    # PIL opens a 16-bit RGB PNG as mode "RGB" (truncated), so the mode alone cannot tell.
    return len(data) > 25 and data[12:16] == b"IHDR" and data[24] == 8 and data[25] == 2


def to_rgb(img: Image.Image, path: Path) -> np.ndarray:
    """8-bit RGB array of any PIL image (gray, palette, RGBA, CMYK, 16-bit); `path` names it in errors."""
    if img.mode in _SIXTEEN_BIT:
        gray = to_uint8(np.asarray(img))  # 16-bit gray
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode not in _DIRECT_TO_RGB:
        raise UserError(f"image {path} has pixel mode {img.mode!r}, which cannot be converted to RGB: convert it to PNG/JPEG first")
    return np.asarray(img.convert("RGB"))


def load_image(path: str | Path) -> SourceImage:
    """Decode an image file into 8-bit RGB pixels (see the module docstring for the rules)."""
    path = Path(path)
    data, img = _open(path, "image")
    keepable = (img.format == "PNG" and _png_is_rgb8(data)) or (img.format == "JPEG" and img.mode == "RGB")
    return SourceImage(to_rgb(img, path), data, img.format, img.mode, keepable)


def fit_longest(image: np.ndarray, mask: np.ndarray, max_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Image and mask shrunk so the longest side is at most `max_size` (None: as they are)."""
    h, w = mask.shape[:2]
    if max_size is None or max(h, w) <= max_size:
        return image, mask
    scale = max_size / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # cv2 takes (width, height)
    # INTER_NEAREST_EXACT samples the pixel centres INTER_AREA / INTER_LINEAR average around.
    # Any integer labels as they are (cv2 keeps int32 under nearest): the writer checks them after.
    small_mask = cv2.resize(mask if mask.dtype in (np.uint8, np.uint16, np.int32) else mask.astype(np.int32), size,
                            interpolation=cv2.INTER_NEAREST_EXACT)
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), small_mask


def encode_image(src: SourceImage, image_format: str, jpeg_quality: int,
                 rgb: np.ndarray | None = None) -> tuple[bytes, str]:
    """The bytes and extension (`png`/`jpg`/`npy`) stored for an image under `--image-format`.
    `rgb`: the pixels to store when they are not the source's (a frame shrunk by `--max-size`);
    `keep` then keeps the source's kind, JPEG at `jpeg_quality` or PNG."""
    pixels = src.rgb if rgb is None else rgb
    if image_format == "keep":
        if src.keepable and rgb is None:
            return src.data, "jpg" if src.format == "JPEG" else "png"
        image_format = "jpeg" if src.keepable and src.format == "JPEG" else "png"
    if image_format == "jpeg":
        return encode_jpeg(pixels, jpeg_quality), "jpg"
    if image_format == "png":
        return encode_png(pixels), "png"
    if image_format == "raw":
        return encode_raw(pixels), "npy"
    raise ValueError(f"unknown image format {image_format!r}")


def load_mask(path: str | Path) -> np.ndarray:
    """Decode a mask file into an HxW integer array of its stored indices/values."""
    path = Path(path)
    _, img = _open(path, "mask")
    if img.mode == "1":
        img = img.convert("L")  # bilevel: 0/255 like a gray binary mask, not False/True
    if img.mode in ("L", "P") or img.mode in _SIXTEEN_BIT:
        return np.asarray(img)  # a palette image gives its indices, not the palette's colours
    if img.mode in ("LA", "PA"):
        return np.asarray(img)[:, :, 0]
    if img.mode in ("RGB", "RGBA"):
        arr = np.asarray(img)
        if (arr[:, :, 0] == arr[:, :, 1]).all() and (arr[:, :, 0] == arr[:, :, 2]).all():
            return arr[:, :, 0]  # a gray mask that was saved as RGB
        raise UserError(
            f"mask {path} is a colour image (mode {img.mode}): masks must hold class indices "
            "(a palette or grayscale PNG), not colours"
        )
    raise UserError(f"mask {path} has pixel mode {img.mode!r}: masks must be 8- or 16-bit grayscale or palette images")


def remap(mask: np.ndarray, lut: np.ndarray, key: str, path: Path, valid: str) -> np.ndarray:
    """Map raw mask values through a 256-entry lookup table (-1 = a value the dataset never uses).

    One fancy-indexing pass, no per-pixel Python. A value outside the table is a `UserError`
    naming the sample and the raw value, since the train id alone would not tell what was wrong.
    """
    if mask.size and int(mask.max()) >= lut.size:
        raise UserError(f"sample {key}: mask {path} holds value {int(mask.max())}; expected {valid}")
    out = lut[mask]
    if out.size and int(out.min()) < 0:
        bad = int(mask[out < 0][0])
        raise UserError(f"sample {key}: mask {path} holds value {bad}; expected {valid}")
    return out.astype(np.uint8 if int(lut.max()) <= 255 else np.uint16)


def voc_palette(n: int) -> list[list[int]]:
    """The PASCAL VOC colour map (VOCdevkit's `VOClabelcolormap`): bits of the index spread over RGB.

    Computed rather than typed so it extends to any class count (used for folder datasets too).
    """
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append([r, g, b])
    return palette
