"""The SAM templates, transformed to CloudFormation by AWS's own translator, as `sam deploy` would.

Asserts what the deployment promises: routes, layers per function, environment, least-privilege
policies, and the cache bucket's settings; and that the container-image flavour deploys the same API.
The functions, their routes, the towers they carry and the functions they invoke are read from the endpoint
registry (clip_serverless/api/endpoints.py), which the templates, being YAML, cannot import: these tests
are what keeps both templates in step with it.
"""

from __future__ import annotations

import copy
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from clip_serverless.api.endpoints import REGISTRY, SITE_ROUTES, EndpointSpec, endpoint
from clip_serverless.types import Tower

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = {"zip": REPO / "template.yaml", "image": REPO / "template.image.yaml"}
FUNCTIONS = tuple(spec.function for spec in REGISTRY)
# Beside the endpoints' functions, the zip flavour deploys bulk embedding's (behind BulkSourceBucket; their
# roles, layers and state machine: tests/test_bulk_template.py).
BULK_FUNCTIONS = {"zip": ("BulkJobFunction", "BulkEmbedImageFunction", "BulkEmbedTextFunction"), "image": ()}
SPEC_OF = {spec.function: spec for spec in REGISTRY}
ROUTES = {(path, method.lower()): spec.function for spec in REGISTRY for method, path in spec.gateway_routes}
# The template parameter each invoked tower's timeout comes from.
TIMEOUT_PARAMETER: dict[Tower, str] = {"textual": "TextFunctionTimeout", "visual": "ImageFunctionTimeout"}


class _NoManagedPolicies:
    """The translator asks IAM for AWS managed policy ARNs; the templates use none by name."""

    def load(self) -> dict[str, str]:
        return {}


@cache
def _transform(flavour: str) -> dict[str, Any]:
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    from samtranslator.translator.transform import transform
    from samtranslator.yaml_helper import yaml_parse

    template = yaml_parse(TEMPLATES[flavour].read_text())
    for name, resource in template["Resources"].items():
        props = resource.get("Properties", {})
        for key in ("CodeUri", "ContentUri"):  # `sam package` replaces local paths with S3 URIs
            if key in props:
                props[key] = f"s3://artifacts/{name}.zip"
        if "ImageUri" in props or props.get("PackageType") == "Image":
            props["ImageUri"] = f"123456789012.dkr.ecr.us-east-1.amazonaws.com/clip:{name}"
    result: dict[str, Any] = transform(template, {}, _NoManagedPolicies())
    return result


@pytest.fixture(params=sorted(TEMPLATES))
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def cfn(flavour: str) -> dict[str, Any]:
    return copy.deepcopy(_transform(flavour))


def resources(template: dict[str, Any], kind: str) -> dict[str, Any]:
    return {name: res for name, res in template["Resources"].items() if res["Type"] == kind}


def layer_names(template: dict[str, Any], function: str) -> list[str]:
    """Logical ids of a function's layers, without the hash suffix SAM appends to LayerVersions."""
    return [re.sub(r"[0-9a-f]{10}$", "", ref["Ref"])
            for ref in template["Resources"][function]["Properties"].get("Layers", [])]


def routes(template: dict[str, Any]) -> dict[tuple[str, str], str]:
    (api,) = resources(template, "AWS::ApiGatewayV2::Api").values()
    found = {}
    for path, methods in api["Properties"]["Body"]["paths"].items():
        for method, spec in methods.items():
            uri = spec["x-amazon-apigateway-integration"]["uri"]["Fn::Sub"]
            target = re.search(r"functions/\$\{(\w+?)(Aliaslive)?(\.Arn)?\}/invocations", uri)
            assert target, uri
            found[(path, method)] = target.group(1)
    return found


def test_routes_send_each_endpoint_to_its_function(flavour: str) -> None:
    assert routes(cfn(flavour)) == ROUTES


def test_the_clip_routes_stay_where_they_were(flavour: str) -> None:
    """The registry moved them into one place; Roboflow's routes and the site routes did not move."""
    assert {
        ("/clip/embed_text", "post"): "EmbedTextFunction",
        ("/clip/embed_image", "post"): "EmbedImageFunction",
        ("/clip/compare", "post"): "CompareFunction",
        ("/healthz", "get"): "EmbedTextFunction",
        ("/info", "get"): "EmbedTextFunction",
        ("/", "get"): "EmbedTextFunction",
    }.items() <= routes(cfn(flavour)).items()


def test_every_function_runs_python312_on_the_chosen_architecture_below_the_gateway_timeout(flavour: str) -> None:
    template = cfn(flavour)
    timeout = template["Parameters"]["FunctionTimeout"]
    assert timeout["MaxValue"] < 30 and timeout["Default"] <= timeout["MaxValue"]
    for name in FUNCTIONS:
        props = template["Resources"][name]["Properties"]
        assert props["Timeout"] == {"Ref": "FunctionTimeout"}
        if flavour == "zip":  # MemorySize=recommended (the default): each function's size from bench_cost.py
            recommended = {"EmbedImageFunction": 1536, "CompareFunction": 1536}.get(name, 1024)
            assert props["MemorySize"] == {"Fn::If": ["RecommendedMemory", recommended, {"Ref": "MemorySize"}]}
        else:
            assert props["MemorySize"] == {"Ref": "MemorySize"}
        assert props["Architectures"] == [{"Ref": "Architecture"}]
        if flavour == "zip":
            assert props["Runtime"] == "python3.12" and props["Handler"] == "app.handler"
        else:
            assert props["PackageType"] == "Image" and "Layers" not in props
            assert props["ImageConfig"]["Command"] == [f"functions/{_endpoint(name)}/app.handler"]
    assert set(template["Parameters"]["Architecture"]["AllowedValues"]) == {"x86_64", "arm64"}


def _endpoint(function: str) -> str:
    return SPEC_OF[function].name


def test_zip_functions_carry_only_the_layers_they_need() -> None:
    template = cfn("zip")
    assert layer_names(template, "EmbedTextFunction") == ["CoreLayer", "DepsTextLayer", "ModelTextLayer"]
    assert layer_names(template, "EmbedImageFunction") == ["CoreLayer", "DepsImageLayer", "ModelVisualLayer"]
    # compare: one tower, like the others; its text vectors come from EmbedTextFunction (Invoke).
    assert layer_names(template, "CompareFunction") == ["CoreLayer", "DepsAllLayer", "ModelVisualLayer"]
    for spec in REGISTRY:
        assert layer_names(template, spec.function) == expected_layers(spec), spec.name
    for layer in resources(template, "AWS::Lambda::LayerVersion").values():
        runtimes = layer["Properties"].get("CompatibleRuntimes")
        assert runtimes in (None, ["python3.12"])


def expected_layers(spec: EndpointSpec) -> list[str]:
    """What a function needs by its registry entry, and nothing more: the tokenizer wherever text is
    tokenized (its own text tower, or another's), Pillow where images are decoded (its image tower), and
    the model layer of the one tower it runs (the image tower's carries the tokenizer too)."""
    tokenizes, decodes = "textual" in spec.preload, "visual" in spec.towers
    deps = {(True, False): "DepsTextLayer", (False, True): "DepsImageLayer", (True, True): "DepsAllLayer"}
    assert len(spec.towers) == 1, f"{spec.name}: one tower per function (250 MiB)"
    return ["CoreLayer", deps[(tokenizes, decodes)], "ModelVisualLayer" if decodes else "ModelTextLayer"]


def test_environment_points_each_function_at_its_model_and_the_cache(flavour: str) -> None:
    template = cfn(flavour)
    for name in FUNCTIONS:
        env = template["Resources"][name]["Properties"]["Environment"]["Variables"]
        assert env["CLIP_CACHE_BUCKET"] == {"Ref": "CacheBucket"}
        assert env["CLIP_CACHE_PREFIX"] == {"Ref": "CachePrefix"}
        assert env["CLIP_MAX_BATCH_SIZE"] == {"Ref": "MaxBatchSize"}
        assert env["CLIP_IMAGE_DECODE"] == {"Ref": "ImageDecode"}
        assert env["CLIP_API_KEY_SSM_PARAMETER"]["Fn::If"][0] == "ApiKeyFromSsm"
        assert env["CLIP_API_KEY_SECRET_ID"]["Fn::If"][0] == "ApiKeyFromSecretsManager"
        assert "CLIP_API_KEY" not in env  # the key itself never sits in the function configuration
        assert env["CLIP_MODEL_DIR"] == "/opt/model"
        assert "AWS_LAMBDA_EXEC_WRAPPER" not in env  # nothing runs before the runtime (no model fetch)
        # Only compare asks another function (embed_text's live alias) for text vectors.
        assert ("CLIP_TEXT_FUNCTION" in env) == (name == "CompareFunction")
    env = template["Resources"]["CompareFunction"]["Properties"]["Environment"]["Variables"]
    assert env["CLIP_TEXT_FUNCTION"] == {"Ref": "EmbedTextFunctionAliaslive"}
    assert env["CLIP_TEXT_FUNCTION_TIMEOUT"] == {"Ref": "TextFunctionTimeout"}
    for spec in REGISTRY:  # each function that invokes another is told which (its live alias), and nothing else
        env = template["Resources"][spec.function]["Properties"]["Environment"]["Variables"]
        named = {key for key in env if key in ("CLIP_TEXT_FUNCTION", "CLIP_IMAGE_FUNCTION")}
        assert named == ({spec.invokes.env} if spec.invokes else set()), spec.name
        if spec.invokes is not None:
            assert env[spec.invokes.env] == {"Ref": f"{endpoint(spec.invokes.endpoint).function}Aliaslive"}
            assert env[f"{spec.invokes.env}_TIMEOUT"] == {"Ref": TIMEOUT_PARAMETER[spec.invokes.tower]}


def _statements(template: dict[str, Any], role: str) -> list[dict[str, Any]]:
    props = template["Resources"][role]["Properties"]
    statements = [s for policy in props.get("Policies", []) for s in policy["PolicyDocument"]["Statement"]]
    for arn in props.get("ManagedPolicyArns", []):
        if "AWSLambdaBasicExecutionRole" in str(arn):  # CloudWatch Logs only, added by SAM
            continue
        assert arn == {"Ref": "FunctionPolicy"}, f"{role}: unexpected managed policy {arn}"
        statements += template["Resources"]["FunctionPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    return statements


def test_functions_may_touch_only_the_cache_prefix_and_their_key(flavour: str) -> None:
    template = cfn(flavour)
    for name in FUNCTIONS:
        statements = _statements(template, f"{name}Role")
        plain = [s for s in statements if "Fn::If" not in s]
        conditional = [s["Fn::If"] for s in statements if "Fn::If" in s]
        s3 = [s for s in plain if any(str(a).startswith("s3:") for a in _list(s["Action"]))]
        assert {a for s in s3 for a in _list(s["Action"])} == {"s3:GetObject", "s3:PutObject", "s3:ListBucket"}
        for statement in s3:
            assert statement["Effect"] == "Allow"
            if "s3:ListBucket" in _list(statement["Action"]):
                assert statement["Resource"] == {"Fn::GetAtt": ["CacheBucket", "Arn"]}
                assert statement["Condition"] == {"StringLike": {"s3:prefix": {"Fn::Sub": "${CachePrefix}*"}}}
            else:
                assert statement["Resource"] == {"Fn::Sub": "${CacheBucket.Arn}/${CachePrefix}*"}
        assert sorted(c[0] for c in conditional) == ["ApiKeyFromSecretsManager", "ApiKeyFromSsm"]
        for condition, statement, otherwise in conditional:
            assert otherwise == {"Ref": "AWS::NoValue"}
            if condition == "ApiKeyFromSsm":
                assert _list(statement["Action"]) == ["ssm:GetParameter"]
                resource = statement["Resource"]["Fn::Sub"]
            else:  # the named secret, or the one the stack generated
                assert _list(statement["Action"]) == ["secretsmanager:GetSecretValue"]
                generate, generated, named = statement["Resource"]["Fn::If"]
                assert generate == "GenerateApiKey" and generated == {"Ref": "ApiKeySecret"}
                resource = named["Fn::Sub"]
            assert "${ApiKeyName}" in resource and "*" not in resource
        others = [s for s in plain if s not in s3 and not _is_sam_basic_execution(s)]
        invokes = SPEC_OF[name].invokes
        if name == "CompareFunction":  # and invoke embed_text's live alias, nothing else
            assert invokes is not None and endpoint(invokes.endpoint).function == "EmbedTextFunction"
        if invokes is not None:  # and invoke the live alias of the function its entry names, nothing else
            (invoke,) = others
            assert _list(invoke["Action"]) == ["lambda:InvokeFunction"]
            assert invoke["Resource"] == {"Ref": f"{endpoint(invokes.endpoint).function}Aliaslive"}
        else:
            assert others == []
        for statement in statements:
            actions = [str(a) for a in _list(statement.get("Action", []))]
            assert not any(a.endswith(":*") or a == "*" for a in actions), statement


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _is_sam_basic_execution(statement: dict[str, Any]) -> bool:
    return statement.get("Action") == "sts:AssumeRole"


def test_cache_bucket_is_private_encrypted_tls_only_and_expires(flavour: str) -> None:
    template = cfn(flavour)
    bucket = template["Resources"]["CacheBucket"]["Properties"]
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"][
        "SSEAlgorithm"] in ("AES256", "aws:kms")
    assert all(bucket["PublicAccessBlockConfiguration"][k] is True for k in
               ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"))
    (rule,) = bucket["LifecycleConfiguration"]["Rules"]
    assert rule["Status"] == "Enabled"
    assert rule["ExpirationInDays"] == {"Ref": "CacheExpirationDays"}
    assert rule["Prefix"] == {"Ref": "CachePrefix"}
    (policy,) = resources(template, "AWS::S3::BucketPolicy").values()
    (deny,) = policy["Properties"]["PolicyDocument"]["Statement"]
    assert deny["Effect"] == "Deny" and deny["Action"] == "s3:*" and deny["Principal"] == "*"
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert {"Fn::Sub": "${CacheBucket.Arn}/*"} in deny["Resource"]


def test_logs_are_kept_for_the_chosen_days_and_the_url_is_an_output(flavour: str) -> None:
    template = cfn(flavour)
    groups = resources(template, "AWS::Logs::LogGroup")
    assert {g["Properties"]["LogGroupName"]["Fn::Sub"] for g in groups.values()} == {
        f"/aws/lambda/${{{name}}}" for name in FUNCTIONS + BULK_FUNCTIONS[flavour]}
    assert all(g["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"} for g in groups.values())
    assert "execute-api" in template["Outputs"]["ApiUrl"]["Value"]["Fn::Sub"]


def test_api_key_parameters_select_the_store(flavour: str) -> None:
    template = cfn(flavour)
    assert set(template["Parameters"]["ApiKeySource"]["AllowedValues"]) == {"none", "ssm", "secretsmanager"}
    # Secrets Manager by default (10,000 reads/s, against SSM's 40/s standard throughput for a burst of
    # cold starts), with a key the stack generates when no secret is named.
    assert template["Parameters"]["ApiKeySource"]["Default"] == "secretsmanager"
    assert template["Parameters"]["ApiKeyName"]["Default"] == ""
    assert template["Conditions"]["ApiKeyFromSsm"] == {"Fn::Equals": [{"Ref": "ApiKeySource"}, "ssm"]}
    secret = template["Resources"]["ApiKeySecret"]
    assert secret["Type"] == "AWS::SecretsManager::Secret" and secret["Condition"] == "GenerateApiKey"
    assert secret["Properties"]["GenerateSecretString"]["PasswordLength"] >= 32
    assert template["Outputs"]["ApiKeyCommand"]["Condition"] == "GenerateApiKey"


def test_both_flavours_deploy_the_same_bucket_policy_and_api() -> None:
    zip_cfn, image_cfn = cfn("zip"), cfn("image")
    for name in ("CacheBucket", "CacheBucketPolicy", "FunctionPolicy"):
        assert zip_cfn["Resources"][name] == image_cfn["Resources"][name], name
    assert routes(zip_cfn) == routes(image_cfn)
    shared = set(zip_cfn["Parameters"]) & set(image_cfn["Parameters"])
    for name in shared:
        assert zip_cfn["Parameters"][name] == image_cfn["Parameters"][name] or name == "MemorySize", name


def test_a_broken_template_is_rejected_by_the_translator(tmp_path: Path) -> None:
    """The transform above can fail: an event pointing at an API that does not exist is an error."""
    from samtranslator.model.exceptions import InvalidDocumentException
    from samtranslator.translator.transform import transform
    from samtranslator.yaml_helper import yaml_parse

    text = TEMPLATES["zip"].read_text().replace("ApiId: !Ref HttpApi, Method: POST, Path: /clip/compare",
                                                "ApiId: !Ref NoSuchApi, Method: POST, Path: /clip/compare")
    template = yaml_parse(text)
    for name, resource in template["Resources"].items():
        for key in ("CodeUri", "ContentUri"):
            if key in resource.get("Properties", {}):
                resource["Properties"][key] = f"s3://artifacts/{name}.zip"
    with pytest.raises(InvalidDocumentException):
        transform(template, {}, _NoManagedPolicies())


def test_an_open_api_has_bounded_traffic_and_no_cors_by_default(flavour: str) -> None:
    template = cfn(flavour)
    (stage,) = resources(template, "AWS::ApiGatewayV2::Stage").values()
    assert stage["Properties"]["DefaultRouteSettings"] == {
        "ThrottlingRateLimit": {"Ref": "ThrottlingRateLimit"}, "ThrottlingBurstLimit": {"Ref": "ThrottlingBurstLimit"}}
    params = template["Parameters"]
    assert 0 < params["ThrottlingRateLimit"]["Default"] <= params["ThrottlingBurstLimit"]["Default"] <= 1000
    assert params["CorsOrigins"]["Default"] == ""
    (api,) = resources(template, "AWS::ApiGatewayV2::Api").values()
    cors = api["Properties"]["Body"]["x-amazon-apigateway-cors"]["Fn::If"]
    assert cors[0] == "AllowCors" and cors[2] == {"Ref": "AWS::NoValue"}
    assert template["Conditions"]["AllowCors"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "CorsOrigins"}, ""]}]}
    for name in FUNCTIONS:
        reserved = template["Resources"][name]["Properties"]["ReservedConcurrentExecutions"]
        assert reserved == {"Fn::If": ["ReserveConcurrency", {"Ref": "ReservedConcurrency"}, {"Ref": "AWS::NoValue"}]}


def test_cors_origins_parameter_accepts_origins_only() -> None:
    pattern = cfn("zip")["Parameters"]["CorsOrigins"]["AllowedPattern"]
    for good in ("", "*", "https://app.example.com", "https://a.example,http://localhost:3000"):
        assert re.fullmatch(pattern, good), good
    for bad in ("app.example.com", "https://a.example, https://b.example", "https://a.example,"):
        assert not re.fullmatch(pattern, bad), bad


# -- the registry itself: what the templates are checked against ------------------------------------------
def test_the_templates_deploy_exactly_the_registrys_functions(flavour: str) -> None:
    template = cfn(flavour)
    assert set(resources(template, "AWS::Lambda::Function")) == set(FUNCTIONS + BULK_FUNCTIONS[flavour])
    assert set(template["Outputs"]) >= {f"{name}Name" for name in FUNCTIONS}


def test_every_endpoint_has_its_function_module_and_events() -> None:
    for spec in REGISTRY:
        app = (REPO / "functions" / spec.name / "app.py").read_text()
        assert f'handler_for("{spec.name}")' in app, spec.name
        for payload in ("http-api", "rest-api"):
            assert (REPO / "events" / f"{spec.name}.{payload}.json").exists(), (spec.name, payload)


def test_the_registry_is_consistent() -> None:
    import typing

    from clip_serverless.api.openai_routes import OpenAIRoutes
    from clip_serverless.api.routes import ClipRoutes

    handlers = {"roboflow": ClipRoutes, "openai": OpenAIRoutes}
    assert len({spec.name for spec in REGISTRY}) == len(REGISTRY) == len(set(FUNCTIONS))
    assert [spec.name for spec in REGISTRY if spec.site] == ["embed_text"]
    assert len(ROUTES) == sum(len(spec.gateway_routes) for spec in REGISTRY)  # no route served twice
    for spec in REGISTRY:
        assert set(spec.towers) <= set(spec.preload)
        if spec.invokes is not None:  # the function it asks lends that tower, and it does not run it itself
            assert endpoint(spec.invokes.endpoint).lends == spec.invokes.tower
            assert spec.invokes.tower not in spec.towers
        if spec.lends is not None:
            assert spec.lends in spec.towers
        for route in spec.routes:
            assert (route.method, route.path) not in SITE_ROUTES
            handler = getattr(handlers[spec.api], route.handler)
            hints = typing.get_type_hints(handler)
            assert hints.get("body") == route.request, (spec.name, route.path)  # the body model it declares
