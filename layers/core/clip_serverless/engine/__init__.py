"""The CLIP engine: model directory, tokenizer, preprocessing, ONNX Runtime sessions. No HTTP, no AWS.

This module holds what a caller needs without importing the heavy modules (Pillow, ONNX Runtime): the
engine's tunables with their defaults, and the error a bad image raises. The engine reads no environment:
a library caller uses the defaults below; the services get them from ``clip_serverless.settings``.
"""

from __future__ import annotations

from dataclasses import dataclass

# The one default for the image size limit (CLIP_MAX_IMAGE_PIXELS): larger images are refused from their
# header, before any pixel is decoded. 64 MP is more than any phone camera's default output (12-50 MP), and
# a 6 MB Lambda payload holds nothing larger in practice, yet small enough that the decoded image (244 MiB:
# Pillow keeps RGB in 4 bytes a pixel; about twice that at peak with an EXIF rotation) fits a 2 GB function
# beside the model. Pillow's own guard (a warning above 89 MP, an error above 179 MP) is process-global
# state, so the engine checks the header size itself.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


@dataclass(frozen=True)
class EngineSettings:
    """How the engine runs: ONNX Runtime threads per session, and the largest image it decodes."""

    threads: int | None = None  # intra-op threads per session; None: the vCPUs this process may run on
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


class ImageDecodeError(ValueError):
    """The bytes are not an image we can use. ``str(error)`` is a short reason fit for an API caller."""
