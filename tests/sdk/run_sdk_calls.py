"""Runs Roboflow's own client (inference-sdk) against a server; prints one JSON summary.

Runs in the SDK's own venv (.venv-sdk), not ours: it sees nothing of this project but a URL and image
files. Usage: run_sdk_calls.py URL RED_CIRCLE.png BLUE_SQUARE.png [API_KEY]
"""

import asyncio
import json
import sys
from typing import Any

import cv2
from inference_sdk import InferenceHTTPClient
from inference_sdk.http.errors import HTTPCallErrorError
from PIL import Image


def shape(result: Any) -> tuple[list[int], list[int]]:
    """Rows of embeddings in an SDK result (a dict, or a list of dicts for several images)."""
    items = result if isinstance(result, list) else [result]
    return [len(item["embeddings"]) for item in items], [len(item["embeddings"][0]) for item in items]


def main() -> None:
    url, red_path, blue_path = sys.argv[1:4]
    api_key = sys.argv[4] if len(sys.argv) > 4 else None
    client = InferenceHTTPClient(api_url=url, api_key=api_key)
    red_np = cv2.imread(red_path)  # BGR, as the SDK assumes for arrays
    blue_pil = Image.open(blue_path).convert("RGB")
    captions = ["a photo of a red circle.", "a photo of a blue square.", "a photo of a green star."]
    out: dict[str, Any] = {}

    out["image_path"] = shape(client.get_clip_image_embeddings(inference_input=red_path))
    out["image_numpy"] = shape(client.get_clip_image_embeddings(inference_input=red_np))
    out["image_pil"] = shape(client.get_clip_image_embeddings(inference_input=blue_pil))
    out["image_list"] = shape(client.get_clip_image_embeddings(inference_input=[red_path, red_np, blue_pil]))
    single = client.get_clip_image_embeddings(inference_input=red_path)
    out["image_keys"] = sorted(single)
    out["text_str"] = shape(client.get_clip_text_embeddings(text="a red circle"))
    text_list = client.get_clip_text_embeddings(text=captions)
    out["text_list"] = shape(text_list)
    out["text_keys"] = sorted(text_list)
    out["compare_image_text"] = client.clip_compare(subject=red_path, prompt=captions)["similarity"]
    out["compare_text_images"] = client.clip_compare(
        subject="a photo of a blue square.", prompt=[red_path, blue_path], subject_type="text",
        prompt_type="image")["similarity"]
    out["compare_image_dict"] = client.clip_compare(
        subject=blue_pil, prompt={"circle": captions[0], "square": captions[1]})["similarity"]
    out["compare_text_text"] = client.clip_compare(
        subject="a red circle", prompt=["a red circle", "a blue square"], subject_type="text",
        prompt_type="text")["similarity"]
    compare_full = client.clip_compare(subject=red_np, prompt=captions)
    out["compare_keys"] = sorted(compare_full)

    async def run_async() -> dict[str, Any]:
        image = await client.get_clip_image_embeddings_async(inference_input=red_path)
        images = await client.get_clip_image_embeddings_async(inference_input=[red_path, blue_pil])
        text = await client.get_clip_text_embeddings_async(text=captions)
        cmp = await client.clip_compare_async(subject=red_path, prompt=captions)
        return {"async_image": shape(image), "async_images": shape(images), "async_text": shape(text),
                "async_compare": cmp["similarity"]}

    out.update(asyncio.run(run_async()))

    try:
        client.get_clip_text_embeddings(text="x", clip_version="ViT-L-14")
        out["unknown_version"] = "no error"
    except HTTPCallErrorError as exc:
        out["unknown_version"] = [exc.status_code, exc.api_message]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
