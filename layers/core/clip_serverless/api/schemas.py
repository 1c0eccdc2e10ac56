"""Request and response bodies, field for field those of Roboflow Inference's CLIP routes and of OpenAI's
embeddings API (``POST /v1/embeddings``, ``GET /v1/models``).

Unknown fields are ignored (pydantic's default), so any body Roboflow's server takes, this one takes.
Fields that only matter to Roboflow's platform (``usage_billable``, ``source``, ...) are accepted and
unused. Semantics that pydantic cannot express (batch limits, prompt shapes) live in the routes.
"""

from __future__ import annotations

from typing import Any, Literal

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


# -- OpenAI's embeddings API ------------------------------------------------------------------------------
class OpenAIEmbeddingRequest(BaseModel):
    """OpenAI's ``POST /v1/embeddings`` body, plus ``modality`` (michaelfeil/infinity's convention for images)."""

    model: str | None = Field(default=None, description="The served model id ('clip/ViT-B-32') or its version "
                              "('ViT-B-32'). Defaults to the deployed model.", examples=["clip/ViT-B-32"])
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string or a list of strings: texts, or with `modality` 'image' data: URIs or https URLs. "
                    "Token id lists (OpenAI's tokenizer) are refused: CLIP reads its own tokens.",
        examples=[["a photo of a cat", "a photo of a dog"]])
    encoding_format: Literal["float", "base64"] | None = Field(
        default=None, description="'float' (default) or 'base64': little-endian float32, as OpenAI sends it.")
    dimensions: int | None = Field(default=None, description="Only the model's own width is accepted.")
    user: str | None = Field(default=None, description="Accepted and ignored.")
    modality: Literal["text", "image"] = Field(default="text", description="What `input` holds.")


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="L2-normalised; base64 of little-endian float32 on request.")


class OpenAIUsage(BaseModel):
    prompt_tokens: int = Field(description="CLIP tokens the text tower read (start and end markers included); "
                                           "0 for images.")
    total_tokens: int


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail
