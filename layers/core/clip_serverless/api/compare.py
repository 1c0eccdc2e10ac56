"""The compare endpoint's semantics, as Roboflow's ``Clip.compare`` defines them.

- ``prompt`` as a dict (other than a lone ``{"type", "value"}`` image object) gives a dict of
  similarities with the same keys, in the same order; anything else is a list in prompt order.
- ``similarity`` is the plain cosine of the raw embeddings, in [-1, 1]: no logit scale, no softmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..types import Float32Array
from .errors import BadRequest
from .schemas import ImageInput

Item = ImageInput | str
_TYPES = ("image", "text")


@dataclass(frozen=True)
class Prompts:
    items: list[Item]
    keys: list[str] | None  # dict mode: the prompt's keys, in order


def normalise_prompt(prompt: Any) -> Prompts:
    if isinstance(prompt, ImageInput):
        return Prompts([prompt], None)
    if isinstance(prompt, dict):
        if "type" in prompt and "value" in prompt:  # Roboflow's rule: that is one image, not a dict of prompts
            return Prompts([ImageInput(type=str(prompt["type"]), value=prompt["value"])], None)
        return Prompts(list(prompt.values()), [str(k) for k in prompt])
    if isinstance(prompt, list):
        return Prompts(list(prompt), None)
    return Prompts([prompt], None)


def check_type(name: str, value: str) -> str:
    if value not in _TYPES:
        raise BadRequest(f"{name} must be either 'image' or 'text', got {value!r}.")
    return value


def text_items(name: str, items: list[Item]) -> list[str]:
    if not all(isinstance(item, str) for item in items):
        raise BadRequest(f"{name} holds an image object but its type is 'text'; "
                         "send strings or set the type to 'image'.")
    return [item for item in items if isinstance(item, str)]


def cosine_similarities(subject: Float32Array, prompts: Float32Array) -> list[float]:
    """Cosine of one (D,) vector with each row of (N, D), in float64; a zero vector scores 0, never NaN."""
    a = subject.astype(np.float64)
    b = prompts.astype(np.float64)
    denom = np.linalg.norm(a) * np.linalg.norm(b, axis=1)
    safe = np.where(denom > 0, denom, 1.0)
    sims = np.where(denom > 0, (b @ a) / safe, 0.0)
    return [float(s) for s in np.clip(sims, -1.0, 1.0)]
