"""Request and response bodies, field for field those of Roboflow Inference's CLIP routes.

Unknown fields are ignored (pydantic's default), so any body Roboflow's server takes, this one takes.
Fields that only matter to Roboflow's platform (``usage_billable``, ``source``, ...) are accepted and
unused. Semantics that pydantic cannot express (batch limits, prompt shapes) live in the routes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ImageInput(BaseModel):
    """An image as Roboflow declares one: ``{"type": "base64" | "url", "value": ...}``."""

    type: str = Field(description="How `value` carries the image: 'base64' or 'url'.")
    value: Any | None = Field(default=None,
                              description="Base64 image data (a data: prefix is allowed) or an https URL.")


class BaseRequest(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str | None = None
    api_key: str | None = Field(default=None, description="API key, when the deployment requires one.")
    usage_billable: bool = True
    start: float | None = None
    source: str | None = None
    source_info: str | None = None
    disable_model_monitoring: bool | None = False


class ClipRequest(BaseRequest):
    clip_version_id: str | None = Field(
        default=None, description="The CLIP version, e.g. 'ViT-B-32'. Defaults to the deployed model.",
        examples=["ViT-B-32"])
    model_id: str | None = None


class ClipImageEmbeddingRequest(ClipRequest):
    image: list[ImageInput] | ImageInput


class ClipTextEmbeddingRequest(ClipRequest):
    text: list[str] | str = Field(examples=["The quick brown fox jumps over the lazy dog"])


class ClipCompareRequest(ClipRequest):
    subject: ImageInput | str
    subject_type: str = Field(default="image", description="'image' or 'text'.")
    prompt: list[ImageInput] | ImageInput | str | list[str] | dict[str, ImageInput | str]
    prompt_type: str = Field(default="text", description="'image' or 'text'.")


class InferenceResponse(BaseModel):
    inference_id: str | None = None
    frame_id: int | None = None
    time: float | None = Field(default=None, description="Seconds spent producing the result, decoding included.")


class ClipEmbeddingResponse(InferenceResponse):
    embeddings: list[list[float]] = Field(description="One raw (not normalised) embedding per input, in order.")


class ClipCompareResponse(InferenceResponse):
    similarity: list[float] | dict[str, float] = Field(
        description="Cosine similarity of the subject with each prompt (a dict for a dict prompt).")
    parent_id: str | None = None


class ErrorResponse(BaseModel):
    message: str
