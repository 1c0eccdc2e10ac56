"""Turning request image declarations into raw image bytes (I/O at the edge; no decoding here).

The bytes, not pixels, are what the embedding cache keys on, so a cache hit never decodes.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import re
from collections.abc import Sequence

from ..settings import UrlSettings
from .errors import ImageLoadError
from .schemas import ImageInput
from .url_fetch import UrlFetchError, fetch_image_url

_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
# Types Roboflow knows but this service refuses: `numpy` is a pickle (remote code execution), the
# others name server-side files or Python objects that cannot arrive over JSON.
_REFUSED_TYPES = {
    "numpy": "NumPy image type is not supported: it is a pickle, which this service never loads.",
    "numpy_object": "The numpy_object image type is not supported over HTTP; send base64 image bytes.",
    "file": "The file image type (a path on the server) is not supported; send base64 image bytes or a URL.",
    "multipart": "The multipart image type is not supported; send base64 image bytes or a URL.",
    "pil": "The pil image type is not supported over HTTP; send base64 image bytes.",
}


def decode_base64_image(value: object) -> bytes:
    if not isinstance(value, str):
        raise ImageLoadError("Malformed base64 input image.")
    payload = _DATA_URL.sub("", value.strip(), count=1)
    try:
        # Roboflow decodes non-strictly too; validate=False also accepts line breaks from `base64` tools.
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=False)
    except (binascii.Error, ValueError):
        raise ImageLoadError("Malformed base64 input image.") from None
    if not data:
        raise ImageLoadError("Empty image payload.")
    return data


class ImageLoader:
    """Loads image bytes from ``{"type", "value"}`` declarations (and bare strings, as Roboflow's compare does)."""

    def __init__(self, settings: UrlSettings) -> None:
        self.settings = settings
        self.policy = settings.policy

    def load(self, image: ImageInput | str) -> bytes:
        if isinstance(image, str):
            # An untyped string (compare subject/prompt): a URL if it looks like one, else base64.
            kind = "url" if image.lower().startswith(("http://", "https://")) else "base64"
            return self._load(kind, image)
        return self._load(image.type.lower(), image.value)

    def load_many(self, images: Sequence[ImageInput | str]) -> list[bytes]:
        """Load in input order; URL downloads run concurrently so N slow hosts cost one timeout, not N."""
        if len(images) <= 1 or not any(self._is_url(i) for i in images):
            return [self.load(i) for i in images]
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(images))) as pool:
            return list(pool.map(self.load, images))

    @staticmethod
    def _is_url(image: ImageInput | str) -> bool:
        return (image.type.lower() == "url") if isinstance(image, ImageInput) else image.lower().startswith("http")

    def _load(self, kind: str, value: object) -> bytes:
        if kind == "base64":
            return decode_base64_image(value)
        if kind == "url":
            if not self.settings.enabled:
                raise ImageLoadError("Providing images via URL is not supported in this configuration.")
            if not isinstance(value, str) or not value:
                raise ImageLoadError("Provided image URL is invalid")
            try:
                data = fetch_image_url(value, self.policy)
            except UrlFetchError as exc:
                raise ImageLoadError(str(exc)) from None
            if not data:
                raise ImageLoadError("Empty image payload.")
            return data
        if kind in _REFUSED_TYPES:
            raise ImageLoadError(_REFUSED_TYPES[kind])
        raise ImageLoadError("Image declaration contains not recognised image type.")
