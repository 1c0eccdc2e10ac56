"""Writes the JSON events in this folder, for `sam local invoke -e events/<name>.json <Function>`.

One pair per endpoint of the registry (layers/core/clip_serverless/api/endpoints.py), `<endpoint>.http-api.json`
and `<endpoint>.rest-api.json`, each a request to the endpoint's first POST route with the body below (an
endpoint without one here stops this script), and `healthz.http-api.json`. They are API Gateway events in
the shapes `sam local generate-event apigateway http-api-proxy|aws-proxy` produces, with one difference that
matters: a `content-type: application/json` header (sam's own events have none, and FastAPI answers such a
body with 422). It also writes infra/sam-local-env.json: each function that asks another for vectors reaches
it through `sam local start-lambda`.

    python events/make_events.py        # rewrite the files (tests check that they still work)
"""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "infra"))

from clip_export.shapes import render_shape  # noqa: E402
from clip_serverless.api.endpoints import REGISTRY, endpoint  # noqa: E402

from tests.lambda_events import http_api_event, rest_api_event  # noqa: E402


def small_png(shape: str, color: str) -> str:
    buffer = io.BytesIO()
    render_shape(shape, color, seed=1_000_000_123, size=96).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


def main() -> None:
    red = {"type": "base64", "value": small_png("circle", "red")}
    bodies = {
        "embed_text": {"text": ["a photo of a red circle.", "a photo of a blue square."], "api_key": None},
        "embed_image": {"image": red, "api_key": None},
        "compare": {"subject": red, "subject_type": "image", "prompt_type": "text",
                    "prompt": ["a photo of a red circle.", "a photo of a blue square.", "a photo of a green star."],
                    "api_key": None},
        # OpenAI's shape; no "model": the deployed one answers, whichever it is.
        "embeddings": {"input": ["a photo of a red circle.", "a photo of a blue square."], "encoding_format": "float"},
    }
    for spec in REGISTRY:
        if spec.name not in bodies:
            raise SystemExit(f"events/make_events.py: no example body for the endpoint {spec.name!r}; add one")
        path = next(route.path for route in spec.routes if route.method == "POST")
        for suffix, factory in (("http-api", http_api_event), ("rest-api", rest_api_event)):
            event = factory("POST", path, bodies[spec.name])
            (HERE / f"{spec.name}.{suffix}.json").write_text(json.dumps(event, indent=2) + "\n")
    health = http_api_event("GET", "/healthz")
    (HERE / "healthz.http-api.json").write_text(json.dumps(health, indent=2) + "\n")
    # `sam local start-api --env-vars infra/sam-local-env.json` (with `sam local start-lambda` on port 3001):
    # compare asks embed_text for text vectors, embeddings asks embed_image for image vectors, through
    # Lambda's Invoke API, which start-lambda serves.
    local_env = {spec.function: {spec.invokes.env: endpoint(spec.invokes.endpoint).function,
                                 "AWS_ENDPOINT_URL_LAMBDA": "http://host.docker.internal:3001"}
                 for spec in REGISTRY if spec.invokes is not None}
    (HERE.parent / "infra" / "sam-local-env.json").write_text(json.dumps(local_env, indent=2) + "\n")


if __name__ == "__main__":
    main()
