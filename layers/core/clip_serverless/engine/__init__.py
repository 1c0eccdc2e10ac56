"""The CLIP engine: model directory, tokenizer, preprocessing, ONNX Runtime sessions. No HTTP, no AWS.

This module holds what a caller needs without importing the heavy modules (Pillow, ONNX Runtime): the
engine's tunables with their defaults, and the error a bad image raises. The engine reads no environment:
a library caller uses the defaults below; the services get them from ``clip_serverless.settings``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

# The one default for the image size limit (CLIP_MAX_IMAGE_PIXELS): larger images are refused from their
# header, before any pixel is decoded. 64 MP is more than any phone camera's default output (12-50 MP), and
# a 6 MB Lambda payload holds nothing larger in practice, yet small enough that the decoded image (244 MiB:
# Pillow keeps RGB in 4 bytes a pixel; about twice that at peak with an EXIF rotation) fits a 2 GB function
# beside the model. Pillow's own guard (a warning above 89 MP, an error above 179 MP) is process-global
# state, so the engine checks the header size itself.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000

# How JPEGs are decoded (CLIP_IMAGE_DECODE). "exact": every pixel, then the bicubic resize: bit for bit the
# reference preprocessing. "draft": libjpeg scales by 1/2, 1/4 or 1/8 while decoding (both sides kept at
# least the model's input size), then the same resize; a 12 MP photo decodes and resizes in 15 ms instead of
# 120, and on real photos the embedding moves by 1 - cosine <= 2.4e-6 (fp32; int8 1.1e-4, about half what int8
# itself moves it): bench/bench_draft_decode.py. Other formats, and JPEGs under twice the input size, decode
# exactly either way.
IMAGE_DECODES = ("exact", "draft")


@dataclass(frozen=True)
class SessionTuning:
    """How ONNX Runtime runs a session: threads, spin-waiting, memory planning.

    ``None`` leaves a knob to whoever knows the deployment better (:meth:`EngineSettings.with_defaults`: a
    Lambda function's registry entry); what is still ``None`` when a session is made gets the engine's own
    default: every vCPU this process may run on, no spinning, arena and memory patterns on (ONNX Runtime's).
    """

    threads: int | None = None  # intra-op threads per session
    # Intra-op workers spin-wait between the ops of a run instead of sleeping: faster alone, but they burn
    # CPU that other threads (a second session, a request's decoding) and Lambda's CPU quota need.
    spinning: bool | None = None
    cpu_mem_arena: bool | None = None  # ORT's arena allocator: memory kept between runs
    mem_pattern: bool | None = None  # ORT plans each input shape's allocations once, then reuses the plan


@dataclass(frozen=True)
class EngineSettings(SessionTuning):
    """How the engine runs: its sessions' :class:`SessionTuning`, the largest image it decodes, and how it
    decodes JPEGs (one of :data:`IMAGE_DECODES`)."""

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    image_decode: str = "exact"

    def __post_init__(self) -> None:
        if self.image_decode not in IMAGE_DECODES:
            raise ValueError(f"image_decode must be one of {IMAGE_DECODES}, got {self.image_decode!r}")

    def with_defaults(self, defaults: SessionTuning) -> EngineSettings:
        """These settings, with each knob that is ``None`` here taken from ``defaults``."""
        return replace(self, **{name: getattr(defaults, name) for name in TUNING_FIELDS
                                if getattr(self, name) is None})

    @property
    def tuning(self) -> SessionTuning:
        return SessionTuning(**{name: getattr(self, name) for name in TUNING_FIELDS})


TUNING_FIELDS = tuple(f.name for f in fields(SessionTuning))


class ImageDecodeError(ValueError):
    """The bytes are not an image we can use. ``str(error)`` is a short reason fit for an API caller."""
