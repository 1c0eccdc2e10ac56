"""API Gateway event factories in the shapes `sam local generate-event` produces.

``http_api_event`` is an HTTP API (payload 2.0) event, ``rest_api_event`` a REST API (1.0,
``aws-proxy``) event. Like sam's, bodies are base64-encoded by default; unlike sam's, a JSON body
carries ``content-type: application/json`` (without it FastAPI answers 422).
"""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import parse_qs, urlencode

JSON = "application/json"


def _body(body: Any, base64_encoded: bool) -> tuple[str | None, bool]:
    if body is None:
        return None, False
    raw = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
    if base64_encoded:
        return base64.b64encode(raw).decode(), True
    return raw.decode(), False


def http_api_event(method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None,
                   query: dict[str, str] | None = None, base64_encoded: bool = True,
                   content_type: str | None = JSON) -> dict[str, Any]:
    hdrs = {"host": "abcdef1234.execute-api.us-east-1.amazonaws.com", "user-agent": "curl/8.5.0"}
    if body is not None and content_type:
        hdrs["content-type"] = content_type
    hdrs.update({k.lower(): v for k, v in (headers or {}).items()})
    encoded, is_b64 = _body(body, base64_encoded)
    raw_query = urlencode(query or {})
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": f"{method} {path}",
        "rawPath": path,
        "rawQueryString": raw_query,
        "headers": hdrs,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "abcdef1234",
            "domainName": "abcdef1234.execute-api.us-east-1.amazonaws.com",
            "domainPrefix": "abcdef1234",
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "203.0.113.7",
                     "userAgent": "curl/8.5.0"},
            "requestId": "id",
            "routeKey": f"{method} {path}",
            "stage": "$default",
            "time": "27/Nov/2026:12:00:00 +0000",
            "timeEpoch": 1795780800000,
        },
        "isBase64Encoded": is_b64,
    }
    if query:
        event["queryStringParameters"] = {k: ",".join(v) for k, v in parse_qs(raw_query).items()}
    if encoded is not None:
        event["body"] = encoded
    return event


def rest_api_event(method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None,
                   query: dict[str, str] | None = None, base64_encoded: bool = True,
                   content_type: str | None = JSON, stage: str = "prod") -> dict[str, Any]:
    hdrs = {"Host": "1234567890.execute-api.us-east-1.amazonaws.com", "User-Agent": "curl/8.5.0",
            "X-Forwarded-Proto": "https", "X-Forwarded-Port": "443"}
    if body is not None and content_type:
        hdrs["Content-Type"] = content_type
    hdrs.update(headers or {})
    encoded, is_b64 = _body(body, base64_encoded)
    return {
        "body": encoded,
        "resource": path,
        "path": path,
        "httpMethod": method,
        "isBase64Encoded": is_b64,
        "queryStringParameters": dict(query) if query else None,
        "multiValueQueryStringParameters": {k: [v] for k, v in query.items()} if query else None,
        "pathParameters": None,
        "stageVariables": None,
        "headers": hdrs,
        "multiValueHeaders": {k: [v] for k, v in hdrs.items()},
        "requestContext": {
            "accountId": "123456789012",
            "resourceId": "123456",
            "stage": stage,
            "requestId": "c6af9ac6-7b61-11e6-9a41-93e8deadbeef",
            "requestTimeEpoch": 1795780800000,
            "identity": {"sourceIp": "203.0.113.7", "userAgent": "curl/8.5.0"},
            "path": f"/{stage}{path}",
            "resourcePath": path,
            "httpMethod": method,
            "apiId": "1234567890",
            "protocol": "HTTP/1.1",
        },
    }


class FakeContext:
    """The parts of Lambda's context object that Mangum and the runtime read."""

    function_name = "clip-test"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:clip-test"
    memory_limit_in_mb = 3008
    aws_request_id = "00000000-0000-0000-0000-000000000000"
    log_group_name = "/aws/lambda/clip-test"
    log_stream_name = "stream"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


def response_json(response: dict[str, Any]) -> Any:
    body = response["body"]
    if response.get("isBase64Encoded"):
        body = base64.b64decode(body).decode()
    return json.loads(body)


def response_headers(response: dict[str, Any]) -> dict[str, str]:
    headers = {k.lower(): v for k, v in (response.get("headers") or {}).items()}
    for key, values in (response.get("multiValueHeaders") or {}).items():
        headers[key.lower()] = ",".join(values)
    return headers


def invoke_payload(data: dict[str, Any]) -> Any:
    """What boto3's ``invoke`` returns as ``Payload``: a streaming body holding ``data`` as JSON."""
    import io

    from botocore.response import StreamingBody

    raw = json.dumps(data).encode()
    return StreamingBody(io.BytesIO(raw), len(raw))
