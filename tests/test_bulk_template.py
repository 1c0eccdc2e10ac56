"""Bulk embedding in template.yaml, as AWS's SAM translator turns it into CloudFormation: optional behind
BulkSourceBucket, the image and text towers' layers, least-privilege roles (asserted statement by
statement as generated), and the state machine that tests/test_bulk_job.py runs in moto."""

from __future__ import annotations

import json
from typing import Any

import pytest
from bulk_cli.definition import FUNCTIONS, load_template

from tests.test_template import cfn, layer_names

BULK = ("BulkJobFunction", "BulkEmbedImageFunction", "BulkEmbedTextFunction")
SRC = "arn:${AWS::Partition}:s3:::${BulkSourceBucket}"
SRC_OBJECTS = "arn:${AWS::Partition}:s3:::${BulkSourceBucket}/${BulkSourcePrefix}*"
DST = "arn:${AWS::Partition}:s3:::${BulkDestinationBucket}"
DST_OBJECTS = "arn:${AWS::Partition}:s3:::${BulkDestinationBucket}/${BulkDestinationPrefix}*"
LIST_SRC = ("s3:ListBucket", SRC, {"StringLike": {"s3:prefix": {"Fn::Sub": "${BulkSourcePrefix}*"}}})
LIST_DST = ("s3:ListBucket", DST, {"StringLike": {"s3:prefix": {"Fn::Sub": "${BulkDestinationPrefix}*"}}})


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return cfn("zip")


def statements(template: dict[str, Any], role: str) -> list[dict[str, Any]]:
    props = template["Resources"][role]["Properties"]
    assert [str(a) for a in props.get("ManagedPolicyArns", [])] in (
        [], ["arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole"]), props.get("ManagedPolicyArns")
    return [s for policy in props["Policies"] for s in policy["PolicyDocument"]["Statement"]]


def grants(statement: dict[str, Any]) -> tuple[Any, ...]:
    actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
    resource = statement["Resource"]
    resource = resource["Fn::Sub"] if isinstance(resource, dict) and "Fn::Sub" in resource else resource
    assert statement["Effect"] == "Allow"
    grant: tuple[Any, ...] = (", ".join(sorted(actions)), resource)
    return grant + ((statement["Condition"],) if "Condition" in statement else ())


def test_bulk_embedding_is_off_unless_a_source_bucket_is_given(template: dict[str, Any]) -> None:
    params = template["Parameters"]
    assert params["BulkSourceBucket"]["Default"] == "" and params["BulkDestinationBucket"]["Default"] == ""
    assert template["Conditions"]["Bulk"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "BulkSourceBucket"}, ""]}]}
    names = [*BULK, "BulkStateMachine", "BulkJobLogs", "BulkEmbedImageLogs", "BulkEmbedTextLogs",
             *(f"{f}Role" for f in BULK), "BulkStateMachineRole"]
    for name in names:
        assert template["Resources"][name]["Condition"] == "Bulk", name
    generated = [name for name in template["Resources"] if name.startswith("Bulk")]  # versions, aliases too
    assert len(generated) > len(names)
    for name in generated:
        assert template["Resources"][name].get("Condition") == "Bulk", name
    for name in ("BulkStateMachineArn", "BulkSource", "BulkDestination"):
        assert template["Outputs"][name]["Condition"] == "Bulk"
    rule = load_template()["Rules"]["BulkDestinationGiven"]
    assert rule["Assertions"][0]["Assert"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "BulkDestinationBucket"}, ""]}]}
    assert (params["BulkBatchSize"]["MinValue"], params["BulkBatchSize"]["MaxValue"]) == (1, 10000)
    assert params["BulkMaxConcurrency"]["MaxValue"] == 10000  # Distributed Map's most children at once


def test_the_embed_functions_run_the_api_towers_layers_and_the_job_function_the_core_alone(
        template: dict[str, Any]) -> None:
    assert layer_names(template, "BulkEmbedImageFunction") == layer_names(template, "EmbedImageFunction")
    assert layer_names(template, "BulkEmbedTextFunction") == layer_names(template, "EmbedTextFunction")
    assert layer_names(template, "BulkJobFunction") == ["CoreLayer"]
    for name in BULK:
        props = template["Resources"][name]["Properties"]
        assert props["Timeout"] == 900  # Lambda's most; a 1000-photo shard takes 44-150 s at 1769 MB
        assert "SnapStart" not in props or props["SnapStart"] == {"ApplyOn": "None"}
        env = props["Environment"]["Variables"]
        for key in ("CLIP_API_KEY_SECRET_ID", "CLIP_API_KEY_SSM_PARAMETER"):  # the Globals' key store, removed
            assert env[key] == {"Ref": "AWS::NoValue"}
        assert env["CLIP_BULK_SOURCE"] == {"Fn::Sub": "s3://${BulkSourceBucket}/${BulkSourcePrefix}"}
        assert env["CLIP_BULK_DESTINATION"] == {"Fn::Sub": "s3://${BulkDestinationBucket}/${BulkDestinationPrefix}"}
    assert template["Resources"]["BulkEmbedImageFunction"]["Properties"]["MemorySize"] == {"Ref": "BulkMemorySize"}


def test_each_bulk_role_reads_only_the_source_and_writes_only_the_destination(template: dict[str, Any]) -> None:
    job = statements(template, "BulkJobFunctionRole")
    inventory = [s["Fn::If"] for s in job if "Fn::If" in s]
    assert [grants(s) for s in job if "Fn::If" not in s] == [
        LIST_SRC, ("s3:GetObject", SRC_OBJECTS), LIST_DST, ("s3:GetObject, s3:PutObject", DST_OBJECTS)]
    ((condition, statement, otherwise),) = inventory
    assert condition == "BulkInventory" and otherwise == {"Ref": "AWS::NoValue"}
    assert grants(statement) == ("s3:GetObject", "arn:${AWS::Partition}:s3:::${BulkInventoryBucket}/"
                                                 "${BulkInventoryPrefix}*")
    assert [grants(s) for s in statements(template, "BulkEmbedImageFunctionRole")] == [
        LIST_SRC, ("s3:GetObject", SRC_OBJECTS), LIST_DST,
        ("s3:DeleteObject, s3:GetObject, s3:PutObject", DST_OBJECTS),
        ("s3:PutObject", "${CacheBucket.Arn}/${CachePrefix}*")]  # a job's "cache": true
    assert [grants(s) for s in statements(template, "BulkEmbedTextFunctionRole")] == [
        LIST_DST, ("s3:DeleteObject, s3:GetObject, s3:PutObject", DST_OBJECTS)]


def test_the_state_machine_role_invokes_the_bulk_aliases_and_runs_its_own_children(template: dict[str, Any]) -> None:
    assert [grants(s) for s in statements(template, "BulkStateMachineRole")] == [
        ("lambda:InvokeFunction", [{"Ref": f"{name}Aliaslive"} for name in BULK]),
        ("s3:AbortMultipartUpload, s3:GetObject, s3:ListMultipartUploadParts, s3:PutObject", DST_OBJECTS),
        ("states:StartExecution",
         "arn:${AWS::Partition}:states:${AWS::Region}:${AWS::AccountId}:stateMachine:${AWS::StackName}-bulk-embed"),
        ("states:DescribeExecution, states:StopExecution",
         "arn:${AWS::Partition}:states:${AWS::Region}:${AWS::AccountId}:execution:${AWS::StackName}-bulk-embed/*")]
    props = template["Resources"]["BulkStateMachine"]["Properties"]
    assert props["StateMachineName"] == {"Fn::Sub": "${AWS::StackName}-bulk-embed"}
    assert props["StateMachineType"] == "STANDARD"
    assert props["DefinitionSubstitutions"] == {
        **{placeholder: {"Ref": f"{name}Aliaslive"} for placeholder, name in FUNCTIONS.items()},
        "ResultsBucket": {"Ref": "BulkDestinationBucket"},
        "ResultsPrefix": {"Fn::Sub": "${BulkDestinationPrefix}_sfn-results"}}


def deployed_definition(template: dict[str, Any]) -> dict[str, Any]:
    text = template["Resources"]["BulkStateMachine"]["Properties"]["DefinitionString"]
    if isinstance(text, dict):
        separator, parts = text["Fn::Join"]
        text = separator.join(parts)
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def test_the_deployed_definition_is_the_one_the_local_run_interprets(template: dict[str, Any]) -> None:
    source = load_template()["Resources"]["BulkStateMachine"]["Properties"]["Definition"]
    deployed = deployed_definition(template)
    assert deployed == json.loads(json.dumps(source))
    states = deployed["States"]
    embed = states["EmbedShards"]
    assert embed["ItemReader"]["Resource"] == "arn:aws:states:::s3:getObject"  # a pre-built plan, not a listing
    assert "ItemBatcher" not in embed  # batches are pre-built by the planner
    assert embed["ItemProcessor"]["ProcessorConfig"] == {"Mode": "DISTRIBUTED", "ExecutionType": "STANDARD"}
    assert embed["MaxConcurrencyPath"] == "$.max_concurrency"
    assert embed["ToleratedFailurePercentagePath"] == "$.tolerated_failure_percentage"
    assert embed["Catch"][0]["Next"] == "Finish" and embed["ResultPath"] == "$.map"
    tasks = [states["Plan"], states["Finish"], *(s for s in embed["ItemProcessor"]["States"].values()
                                                  if s["Type"] == "Task")]
    assert len(tasks) == 4
    for task in tasks:
        (retry,) = task["Retry"]
        assert {"Lambda.TooManyRequestsException", "Lambda.ServiceException", "TransientS3Error",
                "Sandbox.Timedout"} <= set(retry["ErrorEquals"])
        assert "JobError" not in retry["ErrorEquals"] and "States.ALL" not in retry["ErrorEquals"]
        assert retry["BackoffRate"] >= 2 and retry["JitterStrategy"] == "FULL" and retry["MaxAttempts"] >= 3
    assert states["Planned"]["Choices"][0]["Next"] == "Plan"  # a planner out of time is invoked again
    assert states["Incomplete"] == {"Type": "Fail", "Error": "JobIncomplete", "Cause": states["Incomplete"]["Cause"]}
