"""A second `sam deploy` reaches the API: whatever changes what a function runs publishes a new version.

The API calls each function's `live` alias, which points at a published `AWS::Lambda::Version`. SAM
names that version resource with a hash of what it considers the function's content; CloudFormation
publishes a new version (and moves the alias) only when that logical id changes. Each test translates
a template twice with SAM's own translator, as two `sam deploy` runs would, with new artifact URIs for
one thing at a time, and compares the version logical ids.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = {"zip": REPO / "template.yaml", "image": REPO / "template.image.yaml"}


class _NoManagedPolicies:
    def load(self) -> dict[str, str]:
        return {}


def translate(flavour: str, uris: dict[str, str] | None = None) -> dict[str, Any]:
    """The template as CloudFormation receives it, each artifact at ``uris.get(name)`` or a fixed URI."""
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    from samtranslator.translator.transform import transform
    from samtranslator.yaml_helper import yaml_parse

    uris = uris or {}
    template = yaml_parse(TEMPLATES[flavour].read_text())
    for name, resource in template["Resources"].items():
        props = resource.get("Properties", {})
        for key in ("CodeUri", "ContentUri"):
            if key in props:
                props[key] = uris.get(name, f"s3://artifacts/{name}-1.zip")
        if props.get("PackageType") == "Image":
            props["ImageUri"] = uris.get(name, f"123456789012.dkr.ecr.us-east-1.amazonaws.com/clip@sha256:{'1' * 64}")
    result: dict[str, Any] = transform(template, {}, _NoManagedPolicies())
    return result


def source(flavour: str) -> dict[str, Any]:
    from samtranslator.yaml_helper import yaml_parse

    parsed: dict[str, Any] = yaml_parse(TEMPLATES[flavour].read_text())
    return parsed


def functions_and_layers(flavour: str) -> dict[str, list[str]]:
    """Each function's logical id and the logical ids of the layers it lists (source template)."""
    out = {}
    for name, res in source(flavour)["Resources"].items():
        if res["Type"] == "AWS::Serverless::Function":
            out[name] = [ref["Ref"] for ref in res["Properties"].get("Layers", [])]
    return out


def version_ids(template: dict[str, Any]) -> dict[str, str]:
    """Function logical id -> the logical id of its published version (what the `live` alias points at)."""
    out = {}
    for res in template["Resources"].values():
        if res["Type"] == "AWS::Lambda::Alias":
            function = res["Properties"]["FunctionName"]["Ref"]
            out[function] = res["Properties"]["FunctionVersion"]["Fn::GetAtt"][0]
    return out


def alias_names(template: dict[str, Any]) -> dict[str, str]:
    return {res["Properties"]["FunctionName"]["Ref"]: res["Properties"]["Name"]
            for res in template["Resources"].values() if res["Type"] == "AWS::Lambda::Alias"}


def test_the_functions_are_the_registrys(flavour: str) -> None:
    """What the tests below cover is every endpoint's function (clip_serverless/api/endpoints.py), and in the
    zip flavour bulk embedding's."""
    from clip_serverless.api.endpoints import REGISTRY

    bulk = {"BulkJobFunction", "BulkEmbedImageFunction", "BulkEmbedTextFunction"} if flavour == "zip" else set()
    assert set(functions_and_layers(flavour)) == {spec.function for spec in REGISTRY} | bulk


def test_every_function_has_a_live_alias(flavour: str) -> None:
    template = translate(flavour)
    assert alias_names(template) == {name: "live" for name in functions_and_layers(flavour)}
    for name, version in version_ids(template).items():
        assert re.fullmatch(rf"{name}Version[0-9a-f]{{10}}", version), version


@pytest.fixture(params=sorted(TEMPLATES))
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _layer_pairs() -> list[tuple[str, str]]:
    return [(layer, fn) for fn, layers in functions_and_layers("zip").items() for layer in layers]


@pytest.mark.parametrize(("layer", "function"), _layer_pairs(), ids=lambda v: str(v))
def test_new_layer_content_publishes_a_new_version_of_every_function_that_lists_it(layer: str,
                                                                                   function: str) -> None:
    before = version_ids(translate("zip"))
    after = version_ids(translate("zip", {layer: f"s3://artifacts/{layer}-2.zip"}))
    assert after[function] != before[function], f"{layer} changed but {function} keeps its version"
    users = {fn for fn, layers in functions_and_layers("zip").items() if layer in layers}
    for other in set(before) - users:  # and nothing else is republished
        assert after[other] == before[other], f"{layer} changed and {other}, which does not use it, republished"


def test_every_layer_is_used_and_publishes_versions() -> None:
    layers = {name for name, res in source("zip")["Resources"].items()
              if res["Type"] == "AWS::Serverless::LayerVersion"}
    assert layers == {layer for layer, _ in _layer_pairs()}
    for name in layers:
        assert source("zip")["Resources"][name]["Properties"].get("PublishLambdaVersion") is True, name


def test_new_function_code_publishes_only_that_function(flavour: str) -> None:
    before = version_ids(translate(flavour))
    for function in functions_and_layers(flavour):
        new = (f"s3://artifacts/{function}-2.zip" if flavour == "zip"
               else f"123456789012.dkr.ecr.us-east-1.amazonaws.com/clip@sha256:{'2' * 64}")
        after = version_ids(translate(flavour, {function: new}))
        assert {f for f in before if after[f] != before[f]} == {function}


def test_identical_artifacts_publish_nothing(flavour: str) -> None:
    """A redeploy of the same build must not churn versions (or SnapStart snapshots)."""
    assert version_ids(translate(flavour)) == version_ids(translate(flavour))


def test_old_versions_are_deleted_once_replaced(flavour: str) -> None:
    template = translate(flavour)
    for version in version_ids(template).values():
        assert template["Resources"][version]["DeletionPolicy"] == "Delete"
