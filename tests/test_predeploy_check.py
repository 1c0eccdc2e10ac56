"""infra/predeploy_check.py: the deploy is refused when its Architecture differs from the build's.

Built templates here are written the way `sam build` writes them (long-form intrinsics, Metadata with
SamResourceId and the resolved BuildArchitecture, code paths relative to the template), with the records
infra/build_layer.py puts into each layer. The override parser is compared with the SAM CLI's own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.handlers import load_module
from tests.sam_cli import sam_python

REPO = Path(__file__).resolve().parents[1]
SAMCONFIG = """\
version = 0.1
[default.global.parameters]
stack_name = "clip-serverless"
[default.deploy.parameters]
capabilities = "CAPABILITY_IAM"
{default_overrides}
[image.global.parameters]
stack_name = "clip-serverless-image"
{image_global}
[image.deploy.parameters]
{image_template}
"""


pc = load_module("predeploy_check", REPO / "infra" / "predeploy_check.py")


# The stack's Model output, as the check passes it for the demo model the fake builds hold.
BUILT_DEMO = 'BuiltModel="clip/tiny-shapes (DEMO model, trained, not OpenAI CLIP)"'


def write_samconfig(root: Path, default_overrides: str = 'parameter_overrides = "ApiKeySource=none"',
                    image_template: str = 'template_file = ".aws-sam/build-image/template.yaml"',
                    image_global: str = "") -> Path:
    path = root / "samconfig.toml"
    path.write_text(SAMCONFIG.format(default_overrides=default_overrides, image_template=image_template,
                                     image_global=image_global))
    return path


def zip_build(root: Path, arch: str = "x86_64", deps_arch: dict[str, str] | None = None,
              provenance: dict[str, Any] | None = None) -> Path:
    """.aws-sam/build as `sam build` leaves it: the template and each layer's folder with its records."""
    build = root / ".aws-sam" / "build"
    layers = {"CoreLayer": "core", "DepsTextLayer": "deps", "DepsAllLayer": "deps", "ModelTextLayer": "model"}
    resources: dict[str, Any] = {}
    for name, kind in layers.items():
        folder = build / name / "clip-build"
        folder.mkdir(parents=True)
        fields: dict[str, Any] = {"kind": kind}
        if kind == "deps":
            fields["architecture"] = (deps_arch or {}).get(name, arch)
        if kind == "model":
            fields.update(model_id="clip/tiny-shapes", demo=True,
                          provenance=provenance or {"source": "trained", "note": "demo model: shapes only"})
        (folder / f"{kind}.json").write_text(json.dumps(fields))
        resources[name] = {"Type": "AWS::Serverless::LayerVersion",
                           "Properties": {"ContentUri": name, "CompatibleArchitectures": [{"Ref": "Architecture"}]},
                           "Metadata": {"BuildMethod": "makefile", "BuildArchitecture": arch, "SamResourceId": name}}
    resources["EmbedTextFunction"] = {
        "Type": "AWS::Serverless::Function",
        "Properties": {"CodeUri": "EmbedTextFunction", "Architectures": [{"Ref": "Architecture"}],
                       "Layers": [{"Ref": name} for name in layers]},
        "Metadata": {"SamResourceId": "EmbedTextFunction"}}
    template = {"Parameters": {"Architecture": {"Type": "String", "Default": "x86_64"}}, "Resources": resources}
    (build / "template.yaml").write_text(yaml.safe_dump(template))
    return build


def image_build(root: Path, arch: str = "x86_64", model_dir: str = "models/clip-tiny") -> Path:
    build = root / ".aws-sam" / "build-image"
    build.mkdir(parents=True)
    resources = {name: {"Type": "AWS::Serverless::Function",
                        "Properties": {"PackageType": "Image", "ImageUri": "clip-serverless:python3.12",
                                       "Architectures": [{"Ref": "Architecture"}]},
                        "Metadata": {"DockerImage": "clip-serverless", "BuildArchitecture": arch,
                                     "DockerBuildArgs": {"MODEL_DIR": model_dir}, "SamResourceId": name}}
                 for name in ("EmbedTextFunction", "EmbedImageFunction", "CompareFunction")}
    (build / "template.yaml").write_text(yaml.safe_dump({"Resources": resources}))
    shutil.copytree(REPO / "models" / "clip-tiny", root / "models" / "clip-tiny",
                    ignore=shutil.ignore_patterns("*.onnx", "tokenizer.json"))
    return build


# ---- architecture ------------------------------------------------------------------------------------
def test_without_an_architecture_the_builds_is_passed_explicitly(tmp_path: Path) -> None:
    zip_build(tmp_path, "arm64")
    plan = pc.check(write_samconfig(tmp_path), "default")
    assert plan.architecture == "arm64" and plan.template == tmp_path / ".aws-sam" / "build" / "template.yaml"
    # samconfig's overrides kept (a command-line --parameter-overrides replaces them), Architecture last
    # and the model the build holds, for the stack's Model output
    assert plan.overrides == ["ApiKeySource=none", "Architecture=arm64", BUILT_DEMO]
    assert plan.stack_name == "clip-serverless"


def test_make_arch_that_differs_from_the_build_is_refused(tmp_path: Path) -> None:
    zip_build(tmp_path, "x86_64")
    with pytest.raises(pc.CheckFailed, match="ARCHITECTURE MISMATCH") as failed:
        pc.check(write_samconfig(tmp_path), "default", arch="arm64")
    message = str(failed.value)
    assert "Architecture=arm64 (from ARCH" in message and "built for x86_64" in message
    assert "make sam-build ARCH=arm64" in message


def test_samconfig_architecture_that_differs_from_the_build_is_refused(tmp_path: Path) -> None:
    zip_build(tmp_path, "x86_64")
    config = write_samconfig(tmp_path, default_overrides='parameter_overrides = "ApiKeySource=none Architecture=arm64"')
    with pytest.raises(pc.CheckFailed, match=r"from parameter_overrides in samconfig.toml \[default.deploy"):
        pc.check(config, "default")
    # ARCH wins over samconfig, and is passed last so that it wins in sam deploy too.
    plan = pc.check(config, "default", arch="x86_64")
    assert plan.overrides == ["ApiKeySource=none Architecture=arm64", "Architecture=x86_64", BUILT_DEMO]


def test_samconfig_overrides_as_a_list_or_a_table(tmp_path: Path) -> None:
    zip_build(tmp_path, "arm64")
    listed = write_samconfig(
        tmp_path, default_overrides='parameter_overrides = ["ApiKeySource=none", "Architecture=arm64"]')
    assert pc.check(listed, "default").overrides == ["ApiKeySource=none", "Architecture=arm64", "Architecture=arm64",
                                                     BUILT_DEMO]
    table = write_samconfig(tmp_path, default_overrides='parameter_overrides = {Architecture = "x86_64"}')
    with pytest.raises(pc.CheckFailed, match="MISMATCH"):
        pc.check(table, "default")


def test_layers_of_mixed_architectures_are_refused(tmp_path: Path) -> None:
    zip_build(tmp_path, "x86_64", deps_arch={"DepsAllLayer": "arm64"})
    with pytest.raises(pc.CheckFailed, match="mixes architectures"):
        pc.check(write_samconfig(tmp_path), "default")


def test_a_build_without_records_cannot_be_checked(tmp_path: Path) -> None:
    build = zip_build(tmp_path)
    for record in build.glob("*/clip-build/deps.json"):
        record.unlink()
    with pytest.raises(pc.CheckFailed, match="cannot tell which architecture"):
        pc.check(write_samconfig(tmp_path), "default")


def test_image_flavour_reads_the_resolved_build_architecture(tmp_path: Path) -> None:
    image_build(tmp_path, "arm64")
    config = write_samconfig(tmp_path)
    assert pc.check(config, "image").architecture == "arm64"
    with pytest.raises(pc.CheckFailed, match=r"(?s)the image was built for arm64.*make sam-build-image ARCH=x86_64"):
        pc.check(config, "image", arch="x86_64")


# ---- which template ----------------------------------------------------------------------------------
def test_nothing_built_is_refused(tmp_path: Path) -> None:
    with pytest.raises(pc.CheckFailed, match="does not exist: nothing is built"):
        pc.check(write_samconfig(tmp_path), "default")


def test_deploying_the_source_template_is_refused(tmp_path: Path) -> None:
    """The layout issue 8 reported: template_file in [image.global.parameters] applies to deploy too."""
    image_build(tmp_path)
    shutil.copy(REPO / "template.image.yaml", tmp_path / "template.image.yaml")
    config = write_samconfig(tmp_path, image_template="", image_global='template_file = "template.image.yaml"')
    with pytest.raises(pc.CheckFailed, match=r"read the source template template\.image\.yaml"):
        pc.check(config, "image")


def test_a_template_that_sam_build_did_not_write_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    shutil.copy(REPO / "template.image.yaml", tmp_path / "out" / "template.yaml")  # short tags: !Ref, !If
    config = write_samconfig(tmp_path, image_template='template_file = "out/template.yaml"')
    with pytest.raises(pc.CheckFailed, match="not the output of `sam build`"):
        pc.check(config, "image")


# ---- the model -----------------------------------------------------------------------------------------
def test_a_demo_model_is_announced_loudly(tmp_path: Path) -> None:
    zip_build(tmp_path)
    (warning,) = pc.check(write_samconfig(tmp_path), "default").warnings
    assert "WARNING" in warning and "clip/tiny-shapes" in warning and "NOT OpenAI's CLIP" in warning
    assert warning.count("\n") >= 4


def test_a_pretrained_model_is_not(tmp_path: Path) -> None:
    zip_build(tmp_path, provenance={"source": "pretrained", "tag": "openai"})
    assert pc.check(write_samconfig(tmp_path), "default").warnings == []


def test_the_image_model_comes_from_its_docker_build_argument(tmp_path: Path) -> None:
    image_build(tmp_path)
    (warning,) = pc.check(write_samconfig(tmp_path), "image").warnings
    assert "clip/tiny-shapes" in warning
    image_build(tmp_path / "other", model_dir="build/models/ViT-B-32")  # not exported here
    (note,) = pc.check(write_samconfig(tmp_path / "other"), "image").warnings
    assert "unknown" in note and "build/models/ViT-B-32" in note


# ---- the command line ----------------------------------------------------------------------------------
def run_checker(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "infra" / "predeploy_check.py"), *args], cwd=root,
                          capture_output=True, text=True, timeout=60)


def test_the_command_runs_with_the_overrides_only_when_the_check_passes(tmp_path: Path) -> None:
    zip_build(tmp_path, "x86_64")
    write_samconfig(tmp_path)
    argv_printer = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", "deploy"]
    done = run_checker(tmp_path, "check", "--", *argv_printer)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [
        "deploy", "--parameter-overrides", "ApiKeySource=none", "Architecture=x86_64", BUILT_DEMO]
    assert "WARNING" not in done.stdout and "NOT OpenAI's CLIP" in done.stderr  # the banner goes to stderr
    refused = run_checker(tmp_path, "check", "--arch", "arm64", "--", *argv_printer)
    assert refused.returncode == 1 and "ARCHITECTURE MISMATCH" in refused.stderr
    assert "--parameter-overrides" not in refused.stdout  # the command did not run


OVERRIDE_CASES = [
    "ApiKeySource=none",
    "ApiKeySource=none Architecture=arm64",
    "ParameterKey=Architecture,ParameterValue=arm64 ParameterKey=MemorySize,ParameterValue=3008",
    'ApiKeyName="a b" Architecture=x86_64',
    "ApiKeyName='/x/y' CachePrefix=embeddings/",
    r"ApiKeyName=a\ b Architecture=arm64",
]


@pytest.mark.sam
def test_overrides_are_parsed_as_the_sam_cli_parses_them() -> None:
    python = sam_python()
    script = textwrap.dedent("""
        import json, sys
        from samcli.cli.types import CfnParameterOverridesType
        print(json.dumps([CfnParameterOverridesType().convert(v, None, None) for v in json.loads(sys.argv[1])]))
    """)
    done = subprocess.run([str(python), "-c", script, json.dumps(OVERRIDE_CASES)], capture_output=True, text=True,
                          timeout=120, check=True)
    assert [pc.parse_overrides(case) for case in OVERRIDE_CASES] == json.loads(done.stdout)


# ---- teardown ------------------------------------------------------------------------------------------
def test_empty_cache_bucket_empties_the_stacks_bucket(tmp_path: Path, aws: None) -> None:
    import boto3

    config = write_samconfig(tmp_path)
    stack = {"Resources": {"CacheBucket": {"Type": "AWS::S3::Bucket"}},
             "Outputs": {"CacheBucketName": {"Value": {"Ref": "CacheBucket"}}}}
    session = boto3.session.Session(region_name="us-east-1")
    assert "nothing to empty" in pc.empty_cache_bucket(config, "default", session=session)
    session.client("cloudformation").create_stack(StackName="clip-serverless", TemplateBody=json.dumps(stack))
    (output,) = session.client("cloudformation").describe_stacks(StackName="clip-serverless")["Stacks"][0][
        "Outputs"]
    s3 = session.client("s3")
    for i in range(3):
        s3.put_object(Bucket=output["OutputValue"], Key=f"embeddings/{i}", Body=b"x")
    message = pc.empty_cache_bucket(config, "default", session=session)
    assert f"emptied {output['OutputValue']}" in message and "3 objects" in message
    assert s3.list_objects_v2(Bucket=output["OutputValue"])["KeyCount"] == 0
