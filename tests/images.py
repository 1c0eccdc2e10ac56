"""Test images made in memory: photos shipped with scikit-image and the edge cases a decoder must survive.

Nothing here is stored on disk. Encoders that Pillow lacks (16-bit colour PNG) or that must not depend on the
code under test (EXIF orientation, crafted headers) are written out by hand.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

UInt8Array = npt.NDArray[np.uint8]

# Real photographs (RGB uint8) from skimage.data, all bundled with scikit-image (no download).
PHOTOS = (
    "astronaut",  # 512x512
    "coffee",  # 600x400
    "chelsea",  # 451x300
    "rocket",  # 640x427: after Resize 335x224, where floor and round-half-even crops differ
    "immunohistochemistry",  # 512x512
    "hubble_deep_field",  # 1000x872
    "colorwheel",  # 371x370
)


@cache
def photo(name: str) -> UInt8Array:
    """(H, W, 3) uint8 RGB photo from skimage.data (read-only)."""
    import skimage.data

    pixels = np.ascontiguousarray(getattr(skimage.data, name)(), dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"skimage.data.{name} is not an RGB photo: {pixels.shape}")
    pixels.flags.writeable = False
    return pixels


@cache
def gray_photo(name: str = "camera") -> UInt8Array:
    """(H, W) uint8 grayscale photo from skimage.data (read-only)."""
    import skimage.data

    pixels = np.ascontiguousarray(getattr(skimage.data, name)(), dtype=np.uint8)
    pixels.flags.writeable = False
    return pixels


def sized(width: int, height: int, name: str = "astronaut") -> Image.Image:
    """An RGB image of the given size with photographic content (a photo resized with BILINEAR)."""
    return Image.fromarray(photo(name)).resize((width, height), Image.Resampling.BILINEAR)


def encode(image: Image.Image | UInt8Array, fmt: str, **save_args: Any) -> bytes:
    """Encode with Pillow, e.g. ``encode(img, "JPEG", quality=95)``."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- EXIF orientation

EXIF_ORIENTATION = 0x0112

# Stored pixels -> how they are meant to be displayed, for EXIF orientations 1-8 (EXIF 2.32, tag 0x0112),
# written with numpy so that the test does not depend on Pillow's mapping. Arrays are (H, W, C), row 0 on top.
TO_UPRIGHT: dict[int, Callable[[UInt8Array], UInt8Array]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1, :],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored across the main diagonal
    6: lambda a: np.rot90(a, k=-1),  # stored rotated 90 anticlockwise: turn clockwise to view
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # mirrored across the anti-diagonal
    8: lambda a: np.rot90(a, k=1),  # stored rotated 90 clockwise: turn anticlockwise to view
}
FROM_UPRIGHT: dict[int, Callable[[UInt8Array], UInt8Array]] = {
    **{o: TO_UPRIGHT[o] for o in (1, 2, 3, 4, 5, 7)},  # self-inverse
    6: lambda a: np.rot90(a, k=1),
    8: lambda a: np.rot90(a, k=-1),
}


def exif_jpeg(upright: UInt8Array, orientation: int, quality: int = 95) -> bytes:
    """A JPEG whose stored pixels are ``upright`` turned as a camera stores them, with the EXIF tag."""
    stored = np.ascontiguousarray(FROM_UPRIGHT[orientation](upright))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return encode(stored, "JPEG", quality=quality, exif=exif)


# ------------------------------------------------------------------------------------------------ PNG by hand


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_bytes(pixels: npt.NDArray[np.uint8] | npt.NDArray[np.uint16]) -> bytes:
    """PNG of uint8 or uint16 samples: (H, W) gray, (H, W, 2) gray+alpha, (H, W, 3) RGB or (H, W, 4) RGBA.

    Written by hand because Pillow cannot write 16-bit colour PNGs.
    """
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    height, width, channels = pixels.shape
    samples: npt.NDArray[np.uint8]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    if pixels.dtype == np.uint16:
        bit_depth, samples = 16, pixels.astype(">u2").view(np.uint8)
    elif pixels.dtype == np.uint8:
        bit_depth, samples = 8, np.asarray(pixels, dtype=np.uint8)
    else:
        raise TypeError(f"uint8 or uint16 samples, got {pixels.dtype}")
    rows = np.ascontiguousarray(samples).reshape(height, -1)
    filtered = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1)  # filter type 0 per row
    return _png(width, height, bit_depth, colour_type, zlib.compress(filtered.tobytes(), 1))


def blank_png(width: int, height: int) -> bytes:
    """A valid, all-black 1-bit PNG of any size: a decompression bomb (9000x9000 is about 10 KB)."""
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return _png(width, height, 1, 0, body)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` RGB but whose pixel data is garbage.

    Refused as too large before decoding, it proves the size check reads the header only; decoded, it fails.
    """
    return _png(width, height, 8, 2, b"this is not a zlib stream")


# ----------------------------------------------------------------------------------------------- other modes


def rgba_with_transparency(name: str = "astronaut") -> UInt8Array:
    """(H, W, 4): a photo whose alpha runs from 0 (left, fully transparent) to 255, with transparent areas
    over non-white colour, so that compositing and dropping alpha give different RGB."""
    rgb = photo(name)
    height, width, _ = rgb.shape
    alpha = np.broadcast_to(np.linspace(0, 255, width).astype(np.uint8)[None, :], (height, width))
    return np.dstack([rgb, alpha])


def palette_image(transparent_index: int | None = 0) -> tuple[Image.Image, UInt8Array]:
    """A "P" image with a hand-made 16-colour palette over a photo, and the RGB each pixel should become."""
    indices = (gray_photo("camera") // 16).astype(np.uint8)  # 16 levels -> palette indices 0..15
    rng = np.random.default_rng(16)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.ravel().tolist())
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image, palette[indices]


def two_frame_gif() -> tuple[bytes, UInt8Array, UInt8Array]:
    """A 2-frame GIF (palette frames, lossless) and the RGB of each frame."""
    frames, expected = [], []
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        palette = rng.integers(0, 256, (8, 3), dtype=np.uint8)
        indices = ((gray_photo("camera")[::2, ::2] // 32 + seed) % 8).astype(np.uint8)
        frame = Image.fromarray(indices, mode="P")
        frame.putpalette(palette.ravel().tolist())
        frames.append(frame)
        expected.append(palette[indices])
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return data, expected[0], expected[1]
