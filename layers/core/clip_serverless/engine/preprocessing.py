"""Image bytes -> CLIP input tensor, matching OpenAI CLIP's ``preprocess`` exactly.

OpenAI's transform (``clip/clip.py: _transform``) is torchvision's ``Resize(n_px, BICUBIC) ->
CenterCrop(n_px) -> convert("RGB") -> ToTensor() -> Normalize(mean, std)`` on a PIL image. This module
reproduces it with Pillow and numpy only, bit for bit on RGB input:

* ``Resize``: short side to ``size``, long side ``int(size * long / short)``, ``Image.resize(.., BICUBIC)``;
  when the short side already equals ``size`` the image is left untouched.
* ``CenterCrop``: offsets ``int(round((dim - size) / 2.0))`` (Python's round: half to even); zero padding
  first if the image were smaller than the crop (not reachable after ``Resize``, kept for parity).
* ``ToTensor`` + ``Normalize``: ``(float32(x) / 255 - mean) / std`` in float32. Each output value depends
  only on (channel, byte), so a (3, 256) table computed with those float32 operations gives identical
  results with no arithmetic per pixel.

Where we differ from OpenAI's order, on purpose: we convert to RGB *before* resizing, like Roboflow (decode
to RGB with OpenCV, then the CLIP transform). For RGB input, the norm, both orders are identical. For other
modes OpenAI resizes the original mode: Pillow resizes palette ("P") and 1-bit images with nearest-neighbour
whatever filter is asked for, and RGBA with premultiplied alpha; converting first resizes the colours
bicubically. Alpha is dropped, not composited (OpenAI's ``convert("RGB")`` and OpenCV's ``IMREAD_COLOR`` both
drop it; transformers' ``CLIPImageProcessor`` composites on white instead).

Degenerate aspect ratios (a 1x60000 strip is a 60 KB PNG) would make ``Resize`` allocate billions of pixels.
Above ``MAX_RESIZED_PIXELS`` only the cropped window is resized, with Pillow's own bicubic coefficients and
fixed-point arithmetic on the long axis, so the result stays bit-identical (tested against the full resize).

This module imports Pillow; text-only code must not import it.
"""

from __future__ import annotations

import io
import itertools
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from ..types import Float32Array
from . import DEFAULT_MAX_IMAGE_PIXELS
from . import ImageDecodeError as ImageDecodeError  # raised here; defined beside the defaults (no Pillow import)

UInt8Array = npt.NDArray[np.uint8]

CLIP_INPUT_SIZE = 224
# https://github.com/openai/CLIP/blob/main/clip/clip.py (_transform: Normalize(...))
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# Above this many pixels after Resize (16 MiB in Pillow's 4-byte RGB layout; aspect ratio > 83:1 at 224), only
# the cropped window is resized.
MAX_RESIZED_PIXELS = 1 << 22

# Formats that OpenCV's imdecode (Roboflow's decoder) also reads. Pillow would otherwise try every plugin it
# has on untrusted bytes (EPS even runs Ghostscript when installed).
DECODABLE_FORMATS: tuple[str, ...] = (
    "JPEG",  # also MPO (multi-picture JPEG from phone cameras): Pillow's JPEG opener returns it
    "PNG",
    "WEBP",
    "GIF",
    "BMP",
    "TIFF",
    "PPM",
    "JPEG2000",
    "AVIF",
    "SUN",
)

_16BIT_GRAY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_PRECISION_BITS = 32 - 8 - 2  # Pillow's Resample.c fixed-point precision for 8-bit images


# ------------------------------------------------------------------------------------------------ decoding


def decode_image(
    data: bytes | bytearray | memoryview,
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    draft: bool = False,
    draft_size: int = CLIP_INPUT_SIZE,
) -> Image.Image:
    """Decode encoded image bytes into an upright RGB image.

    Refuses images whose header declares more than ``max_pixels`` pixels before any pixel is decoded,
    decodes fully (a truncated file fails here, not later), applies the EXIF orientation and converts to RGB
    (see ``to_rgb``). Multi-frame files give their first frame. Only ``DECODABLE_FORMATS`` are tried.

    ``draft=True`` lets Pillow's JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding, keeping both sides at
    least ``draft_size``: about twice as fast end to end on photos, but not bit-identical to the full decode.
    Other formats ignore it.

    Raises ImageDecodeError with a short public message.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ImageDecodeError(f"Image data must be bytes, got {type(data).__name__}.")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if draft and (isinstance(draft_size, bool) or not isinstance(draft_size, int) or draft_size < 1):
        raise ValueError(f"draft_size must be a positive int, got {draft_size!r}")
    if len(data) == 0:
        raise ImageDecodeError("Image data is empty.")

    try:
        image = Image.open(io.BytesIO(data), formats=DECODABLE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's global guard fired
        raise _too_large(max_pixels) from None  # (the warning, if warnings are errors in this process)
    except UnidentifiedImageError:
        raise ImageDecodeError("Data is not an image.") from None
    except MemoryError:
        raise
    except Exception as exc:  # a recognised header that fails to parse: Pillow raises many types here
        raise ImageDecodeError("Truncated or corrupt image data.") from exc

    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError("Image has no pixels.")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"Image is too large: {width}x{height} ({width * height} pixels) exceeds the limit of "
            f"{max_pixels} pixels."
        )

    try:
        if draft:
            image.draft("RGB", (draft_size, draft_size))  # returns None and does nothing for non-JPEG
        image.load()
    except Image.DecompressionBombError:  # a later frame or tile declaring a bigger size
        raise _too_large(max_pixels) from None
    except MemoryError:
        raise
    except Exception as exc:  # OSError("image file is truncated"), SyntaxError, EOFError, zlib/struct errors
        raise ImageDecodeError("Truncated or corrupt image data.") from exc

    _apply_exif_orientation(image)
    return to_rgb(image)


def _too_large(max_pixels: int) -> ImageDecodeError:
    limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels))
    return ImageDecodeError(f"Image is too large: it exceeds the limit of {limit} pixels.")


def _apply_exif_orientation(image: Image.Image) -> None:
    """Rotate/flip in place so that an EXIF-rotated photo is upright, as Roboflow's decoder (OpenCV) does."""
    try:
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when there is nothing to do
    except MemoryError:
        raise
    except Exception:  # noqa: S110 - unreadable EXIF: keep the pixels as stored, as OpenCV does
        pass


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (the same object if it already is RGB).

    * 16-bit grayscale (``I;16*``) keeps the high byte (``value >> 8``), as OpenCV's ``IMREAD_COLOR`` does.
      Pillow's ``convert`` would clip to 255 and turn most 16-bit photos white.
    * ``I`` (32-bit int, what older Pillow and some TIFFs give for 16-bit data) is read as 16-bit samples:
      clipped to 0..65535, then ``>> 8``.
    * ``F`` (float) follows Pillow's ``convert``: values are taken as 0..255, clipped and truncated.
    * Alpha (RGBA, LA, PA, palette transparency) is dropped, not composited; palette images take their
      palette colours; CMYK, YCbCr, LAB, HSV and 1-bit use Pillow's conversions.

    Raises ImageDecodeError for a mode Pillow cannot convert.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _16BIT_GRAY_MODES or image.mode == "I":
        samples = np.asarray(image)
        if image.mode == "I":
            samples = np.clip(samples, 0, 0xFFFF)
        high = (samples >> 8).astype(np.uint8)
        return Image.fromarray(high).convert("RGB")  # fromarray of uint8 2-D is mode L
    try:
        return image.convert("RGB")
    except ValueError:
        raise ImageDecodeError(f"Unsupported image mode: {image.mode}.") from None


# ------------------------------------------------------------------------------------------- preprocessing


def preprocess(
    image: Image.Image,
    size: int = CLIP_INPUT_SIZE,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Float32Array:
    """CLIP's transform of one image: returns float32 (3, size, size), channels RGB."""
    table = _normalisation_table(*_check_args(size, mean, std))
    out = np.empty((3, size, size), dtype=np.float32)
    _normalise_into(out, resize_center_crop(_checked_image(image), size), table)
    return out


def preprocess_batch(
    images: Sequence[Image.Image],
    size: int = CLIP_INPUT_SIZE,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    *,
    workers: int = 1,
) -> Float32Array:
    """CLIP's transform of N images into one float32 (N, 3, size, size) array (N may be 0).

    ``workers`` > 1: several images at once, or one image in bands (``resize_center_crop``); same bytes."""
    table = _normalisation_table(*_check_args(size, mean, std))
    checked = [_checked_image(image) for image in images]
    out = np.empty((len(checked), 3, size, size), dtype=np.float32)

    def one(row: int) -> None:
        _normalise_into(out[row], resize_center_crop(checked[row], size, workers=band_workers), table)

    band_workers = workers if len(checked) == 1 else 1
    _each(one, len(checked), workers)
    return out


def decode_and_preprocess(
    blobs: Sequence[bytes | bytearray | memoryview],
    size: int = CLIP_INPUT_SIZE,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    workers: int = 1,
    draft: bool = False,
) -> Float32Array:
    """``decode_image`` then CLIP's transform of each blob: float32 (N, 3, size, size). ``draft``: JPEGs
    decode at a reduced scale that keeps both sides at least ``size`` (``decode_image``).

    With ``workers`` > 1, a batch decodes and resizes several images at once (Pillow and numpy release the
    GIL), a single image resizes in bands. The first bad blob in input order raises its ImageDecodeError.
    """
    table = _normalisation_table(*_check_args(size, mean, std))
    out = np.empty((len(blobs), 3, size, size), dtype=np.float32)
    band_workers = workers if len(blobs) == 1 else 1

    def one(row: int) -> None:
        image = decode_image(blobs[row], max_pixels=max_pixels, draft=draft, draft_size=size)
        _normalise_into(out[row], resize_center_crop(image, size, workers=band_workers), table)

    _each(one, len(blobs), workers)
    return out


def _each(work: Callable[[int], None], count: int, workers: int) -> None:
    """``work(i)`` for i in range(count), up to ``workers`` at once; the first failure in input order is raised."""
    if workers <= 1 or count <= 1:
        for i in range(count):
            work(i)
        return
    pool = _band_pool()
    rest = [pool.submit(_stride, work, start, count, workers) for start in range(1, min(workers, count))]
    outcomes = [_stride(work, 0, count, workers), *(future.result() for future in rest)]
    failures = [outcome for outcome in outcomes if outcome is not None]
    if failures:
        raise min(failures, key=lambda failure: failure[0])[1]


def _stride(work: Callable[[int], None], start: int, count: int, step: int) -> tuple[int, Exception] | None:
    """``work`` on rows start, start + step, ... up to the first failure: (its row, its exception)."""
    for i in range(start, count, step):
        try:
            work(i)
        except Exception as exc:
            return i, exc
    return None


def resize_center_crop(
    image: Image.Image, size: int = CLIP_INPUT_SIZE, *, max_resized_pixels: int = MAX_RESIZED_PIXELS,
    workers: int = 1,
) -> UInt8Array:
    """torchvision ``Resize(size, BICUBIC)`` then ``CenterCrop(size)``: uint8 (size, size, 3), RGB.

    The image is converted to RGB first (``to_rgb``). If the resized image would have more than
    ``max_resized_pixels`` pixels, only the cropped window is computed (same result, bounded memory).
    ``workers`` > 1 resizes the output in that many bands at once (``_bands``), bit for bit
    the same; Pillow releases the GIL while it resamples.
    """
    _check_size(size)
    image = to_rgb(image)
    width, height = image.size
    new_w, new_h = resized_size(width, height, size)
    if (new_w, new_h) == (width, height):  # torchvision returns the image itself: no resampling at all
        return center_crop(image, size)
    if new_w * new_h <= max_resized_pixels or new_w == new_h:
        bands = _bands(width, height, size, workers) if workers > 1 else None
        if bands is not None:
            return _resize_bands(image, size, bands)
        return center_crop(image.resize((new_w, new_h), Image.Resampling.BICUBIC), size)
    return _resize_window(image, new_w, new_h, size)


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision ``Resize(size)``: short side ``size``, long side truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def crop_offsets(width: int, height: int, size: int) -> tuple[int, int]:
    """(left, top) of torchvision's ``CenterCrop(size)`` on an image at least ``size`` on both sides."""
    return round((width - size) / 2.0), round((height - size) / 2.0)  # round() of a float is an int


def center_crop(image: Image.Image, size: int) -> UInt8Array:
    """torchvision ``CenterCrop(size)`` on an RGB image: uint8 (size, size, 3), zero-padded if smaller."""
    width, height = image.size
    if width >= size and height >= size:
        left, top = crop_offsets(width, height, size)
        return np.asarray(image.crop((left, top, left + size, top + size)))
    # torchvision pads with black, left/top (size - dim) // 2 and right/bottom (size - dim + 1) // 2, then
    # crops the padded image.
    pixels = np.asarray(image)
    pad_w, pad_h = max(size - width, 0), max(size - height, 0)
    padded = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
    left, top = crop_offsets(padded.shape[1], padded.shape[0], size)
    return padded[top : top + size, left : left + size]


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")


def _check_args(size: int, mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], ...]:
    _check_size(size)
    mean_t, std_t = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean_t) != 3 or len(std_t) != 3:
        raise ValueError(f"mean and std need 3 values (R, G, B), got {len(mean_t)} and {len(std_t)}")
    if not all(math.isfinite(v) for v in mean_t + std_t) or not all(v != 0 for v in std_t):
        raise ValueError(f"mean and std must be finite and std non-zero, got {mean_t} and {std_t}")
    return mean_t, std_t


def _checked_image(image: object) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    return image


@lru_cache(maxsize=8)
def _normalisation_table(mean: tuple[float, ...], std: tuple[float, ...]) -> Float32Array:
    """(3, 256) float32 ``(float32(v) / 255 - mean[c]) / std[c]``, as ToTensor + Normalize compute it."""
    values = np.arange(256, dtype=np.float32) / np.float32(255)  # ToTensor: .to(float32).div(255)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    table: Float32Array = (values[None, :] - mean32) / std32  # Normalize: .sub_(mean).div_(std)
    table.flags.writeable = False
    return table


def _normalise_into(out: Float32Array, pixels: UInt8Array, table: Float32Array) -> None:
    """Write normalised (3, S, S) into ``out`` from uint8 (S, S, 3): one table gather per channel."""
    for channel in range(3):
        # mode="wrap" skips the bounds check's buffering; uint8 indices are always within the 256 entries.
        np.take(table[channel], pixels[:, :, channel], out=out[channel], mode="wrap")


# ---------------------------------------------------------------------------- bands resized in parallel

# Bands of the output along its short side (rows of a landscape image, columns of a portrait one): each band
# is ``(start, stop, in0, in1)``, output positions [start, stop) read from the source interval (in0, in1).
Band = tuple[int, int, float, float]

# Bands are at least this many output rows (or columns): below it a thread hand-off costs more than they do.
_MIN_BAND = 32
_BAND_POOL: list[ThreadPoolExecutor] = []
_BAND_POOL_LOCK = threading.Lock()


def _bands(width: int, height: int, size: int, workers: int) -> tuple[Band, ...] | None:
    """Split the output along the image's short side into bands that Pillow resizes alone, bit for bit as
    one resize of the whole image (None: resize it whole).

    A band of a landscape image is ``Image.resize((new_w, rows), BICUBIC, box=(0, in0, width, in1))`` (of a
    portrait one, the same with columns). Pillow rounds the box to float32 and computes its own centres from
    it, so a band reproduces the full resize only where its coefficients on that axis (first source pixel,
    fixed-point weights) equal those of the same positions of the full resize. That is checked here, exactly
    as Pillow computes them (``_bicubic_coefficients``), for split points near the even split; a split that
    does not reproduce them is never used. The short side is split because it is not cropped: its box edges
    (``position * source / size``) are exact in float32 at the even split. The other axis is the full
    resize's, cropped afterwards. Cached per geometry.
    """
    return _bands_cached(width, height, size, min(workers, size // _MIN_BAND))


@lru_cache(maxsize=256)
def _bands_cached(width: int, height: int, size: int, count: int) -> tuple[Band, ...] | None:
    if count < 2:
        return None
    new_w, new_h = resized_size(width, height, size)
    order = _pillow_resizes_vertically_first(width, height, new_w, new_h)
    rows = width > height  # landscape: split the rows (its short side); portrait or square: the columns
    source = height if rows else width
    if source == size:
        return None  # that axis is not resampled at all: nothing to split
    full = _bicubic_coefficients(source, size, 0, size)
    scale = source / size

    def edge(position: int) -> float:
        return float(np.float32(position * scale)) if 0 < position < size else float(source if position else 0)

    def reproduces(start: int, stop: int) -> bool:
        in0, in1 = edge(start), edge(stop)
        band = (new_w, stop - start) if rows else (stop - start, new_h)
        if _pillow_resizes_vertically_first(width, height, *band) != order:
            return False  # Pillow would run the two passes in the other order (they round differently)
        starts, weights = _bicubic_coefficients(source, stop - start, 0, stop - start, box=(in0, in1))
        return bool(np.array_equal(starts, full[0][start:stop]) and np.array_equal(weights, full[1][start:stop]))

    edges = [0]
    for i in range(1, count):
        even = round(size * i / count)
        # The even split first, then its neighbours: the first that reproduces the band it closes.
        for position in sorted(range(even - 8, even + 9), key=lambda p: abs(p - even)):
            if edges[-1] + _MIN_BAND // 2 <= position < size and reproduces(edges[-1], position):
                edges.append(position)
                break
        else:
            return None
    if not reproduces(edges[-1], size):
        return None
    edges.append(size)
    return tuple((a, b, edge(a), edge(b)) for a, b in itertools.pairwise(edges))


def _band_pool() -> ThreadPoolExecutor:
    if not _BAND_POOL:
        with _BAND_POOL_LOCK:
            if not _BAND_POOL:  # one small pool per process, created on first use (import stays cheap)
                _BAND_POOL.append(ThreadPoolExecutor(max_workers=4, thread_name_prefix="resize-band"))
    return _BAND_POOL[0]


def _resize_bands(image: Image.Image, size: int, bands: tuple[Band, ...]) -> UInt8Array:
    """The centre crop of the full resize, its bands resized at once (this thread does the first)."""
    width, height = image.size
    new_w, new_h = resized_size(width, height, size)
    left, top = crop_offsets(new_w, new_h, size)
    rows = width > height
    bicubic = Image.Resampling.BICUBIC

    def band(b: Band) -> UInt8Array:
        start, stop, in0, in1 = b
        if rows:
            part = image.resize((new_w, stop - start), bicubic, box=(0, in0, width, in1))
            return np.asarray(part.crop((left, 0, left + size, stop - start)))
        part = image.resize((stop - start, new_h), bicubic, box=(in0, 0, in1, height))
        return np.asarray(part.crop((0, top, stop - start, top + size)))

    pending = [_band_pool().submit(band, b) for b in bands[1:]]
    out = np.empty((size, size, 3), dtype=np.uint8)
    view = out if rows else out.transpose(1, 0, 2)  # bands along columns: write through a transposed view
    view[bands[0][0] : bands[0][1]] = band(bands[0]) if rows else band(bands[0]).transpose(1, 0, 2)
    for b, future in zip(bands[1:], pending, strict=True):
        part = future.result()
        view[b[0] : b[1]] = part if rows else part.transpose(1, 0, 2)
    return out


# --------------------------------------------------------------- windowed resize for extreme aspect ratios


def _resize_window(image: Image.Image, new_w: int, new_h: int, size: int) -> UInt8Array:
    """``image.resize((new_w, new_h), BICUBIC)`` followed by the centre crop, computing only the crop window.

    Pillow resizes in two separable passes, each rounding to 8 bits. Each output column of the horizontal pass
    depends only on its own coefficients, and each output row of the vertical pass likewise, so the window on
    the long axis can be computed alone with Pillow's coefficients (``_bicubic_coefficients``) while Pillow
    itself does the short-axis pass on the few source lines involved. Pass order and rounding are kept, so the
    bytes are identical to the full resize.
    """
    width, height = image.size
    left, top = crop_offsets(new_w, new_h, size)
    vertical_first = _pillow_resizes_vertically_first(width, height, new_w, new_h)
    bicubic = Image.Resampling.BICUBIC
    if new_w > new_h:  # wide: the window lies along x
        starts, weights = _bicubic_coefficients(width, new_w, left, left + size)
        first, last = int(starts[0]), min(int(starts[-1]) + weights.shape[1], width)
        strip = image.crop((first, 0, last, height))  # the source columns the window reads
        if vertical_first:  # Pillow's vertical pass alone (width unchanged), then ours
            rows = np.asarray(strip.resize((strip.width, size), bicubic))  # (size, columns, 3)
            return _resample_axis(rows, starts - first, weights, 1)
        columns = _resample_axis(np.asarray(strip), starts - first, weights, 1)  # (height, size, 3)
        return np.asarray(Image.fromarray(columns).resize((size, size), bicubic))
    # tall: the window lies along y
    starts, weights = _bicubic_coefficients(height, new_h, top, top + size)
    first, last = int(starts[0]), min(int(starts[-1]) + weights.shape[1], height)
    strip = image.crop((0, first, width, last))  # the source rows the window reads
    if vertical_first:
        rows = _resample_axis(np.asarray(strip), starts - first, weights, 0)  # (size, width, 3)
        return np.asarray(Image.fromarray(rows).resize((size, size), bicubic))
    # Pillow's horizontal pass alone (height unchanged), then ours
    return _resample_axis(np.asarray(strip.resize((size, strip.height), bicubic)), starts - first, weights, 0)


def _pillow_resizes_vertically_first(width: int, height: int, new_w: int, new_h: int) -> bool:
    """Which pass Pillow's ``resize`` runs first for this size change.

    Pillow always ran the horizontal pass first until Pillow 13, which runs the vertical pass first when the
    height shrinks by more than twice as many pixels as the width (python-pillow/Pillow#9549). The two orders
    round differently, so the rule is detected once on the installed Pillow.
    """
    if not _PILLOW_VERTICAL_FIRST_RULE.get():
        return False
    return new_h < height and new_w != width and (height - new_h) > 2 * (width - new_w)


class _LazyProbe:
    """Runs ``_probe_vertical_first_rule`` once, on first use (import stays free of work)."""

    def __init__(self) -> None:
        self._value: bool | None = None

    def get(self) -> bool:
        if self._value is None:
            self._value = _probe_vertical_first_rule()
        return self._value


def _probe_vertical_first_rule() -> bool:
    """True if the installed Pillow resizes 8x40 -> 7x9 (height shrinks far more) vertically first."""
    pattern = (np.arange(40 * 8 * 3, dtype=np.uint32) * 2654435761 >> 13).astype(np.uint8).reshape(40, 8, 3)
    source, bicubic = Image.fromarray(pattern), Image.Resampling.BICUBIC
    full = np.asarray(source.resize((7, 9), bicubic))
    vertical_first = np.asarray(source.resize((8, 9), bicubic).resize((7, 9), bicubic))
    horizontal_first = np.asarray(source.resize((7, 40), bicubic).resize((7, 9), bicubic))
    return bool(np.array_equal(full, vertical_first) and not np.array_equal(full, horizontal_first))


_PILLOW_VERTICAL_FIRST_RULE = _LazyProbe()


def _bicubic_filter(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Pillow's bicubic kernel (a = -0.5), same operation order as Resample.c."""
    x = np.abs(x)
    near = ((1.5 * x - 2.5) * x) * x + 1.0  # ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((((x - 5.0) * x) + 8.0) * x - 4.0) * -0.5  # (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bicubic_coefficients(
    in_size: int, out_size: int, start: int, stop: int, box: tuple[float, float] | None = None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for output positions ``start..stop-1``.

    ``box``: the source interval ``(in0, in1)`` of ``Image.resize(..., box=...)`` on this axis (default: the
    whole axis). Pillow passes the box as C floats, so it is rounded to float32 here too.

    Returns the first source index of each output position (n,) and fixed-point weights (n, ksize), zero past
    each position's window. Taps that would fall outside the image have zero weight.
    """
    in0, in1 = (np.float32(0.0), np.float32(in_size)) if box is None else (np.float32(box[0]), np.float32(box[1]))
    scale = float(np.float32(in1 - in0)) / out_size  # C: (double)(in1 - in0) / outSize, the difference in float
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = math.ceil(support) * 2 + 1
    ss = 1.0 / filterscale
    center = float(in0) + (np.arange(start, stop, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)  # C's (int) truncates
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size)
    taps = np.arange(ksize, dtype=np.int64)
    position = (xmin[:, None] + taps[None, :]).astype(np.float64)
    weights = _bicubic_filter((position - center[:, None] + 0.5) * ss)
    weights[taps[None, :] >= (xmax - xmin)[:, None]] = 0.0
    total = np.zeros_like(center)
    for k in range(ksize):  # summed tap by tap, in C's order (numpy's pairwise sum rounds differently)
        total += weights[:, k]
    weights = np.divide(weights, total[:, None], out=weights, where=total[:, None] != 0.0)
    scaled = weights * float(1 << _PRECISION_BITS)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)
    return xmin, fixed


def _resample_axis(
    pixels: UInt8Array, starts: npt.NDArray[np.int64], weights: npt.NDArray[np.int32], axis: int
) -> UInt8Array:
    """One Pillow 8-bit resampling pass along ``axis`` (0 rows, 1 columns) of uint8 (H, W, 3)."""
    n, ksize = weights.shape
    last = pixels.shape[axis] - 1
    shape = (n, pixels.shape[1], 3) if axis == 0 else (pixels.shape[0], n, 3)
    acc = np.full(shape, 1 << (_PRECISION_BITS - 1), dtype=np.int32)  # rounding offset
    for k in range(ksize):
        index = np.minimum(starts + k, last)  # clamped taps carry zero weight
        if axis == 0:
            acc += pixels[index, :, :] * weights[:, k][:, None, None]
        else:
            acc += pixels[:, index, :] * weights[:, k][None, :, None]
    acc >>= _PRECISION_BITS  # arithmetic shift, like C's on int
    return np.clip(acc, 0, 255).astype(np.uint8)
