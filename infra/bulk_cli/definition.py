"""The bulk state machine's definition, read from ``template.yaml`` (the one ``sam deploy`` deploys)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "template.yaml"
STATE_MACHINE = "BulkStateMachine"
# DefinitionSubstitutions of the template -> the function each names.
FUNCTIONS = {"BulkJobFunctionArn": "BulkJobFunction", "BulkEmbedImageFunctionArn": "BulkEmbedImageFunction",
             "BulkEmbedTextFunctionArn": "BulkEmbedTextFunction"}


class _CfnLoader(yaml.SafeLoader):
    """PyYAML with CloudFormation's short-form tags (``!Ref``, ``!Sub``...) read as ``{"Fn::...": ...}``."""


def _tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {name: value}


_CfnLoader.add_multi_constructor("!", _tag)


def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        template: dict[str, Any] = yaml.load(fh, Loader=_CfnLoader)  # a SafeLoader, plus the tags
    return template


def definition(arns: dict[str, str], results: tuple[str, str] = ("bulk-results", "_sfn-results"),
               path: Path = TEMPLATE) -> str:
    """The definition as Step Functions receives it, ``${...}`` substituted: ``arns`` maps each function's
    logical id (BulkJobFunction, ...) to the ARN the state machine invokes; ``results`` is the ResultWriter's
    (bucket, prefix)."""
    props = load_template(path)["Resources"][STATE_MACHINE]["Properties"]
    values = {**{placeholder: arns[name] for placeholder, name in FUNCTIONS.items()},
              "ResultsBucket": results[0], "ResultsPrefix": results[1]}
    text = json.dumps(props["Definition"])
    for placeholder in props["DefinitionSubstitutions"]:
        text = text.replace("${" + placeholder + "}", values[placeholder])
    if "${" in text:
        raise ValueError(f"{STATE_MACHINE}: an unsubstituted ${{...}} is left in the definition")
    return text
