"""Before ``sam deploy``: is what will be deployed what was built? And the teardown's bucket emptying.

    python infra/predeploy_check.py check [--config-env ENV] [--arch ARCH] [-- sam deploy ...]
    python infra/predeploy_check.py empty-cache-bucket [--config-env ENV]

``check`` reads samconfig.toml the way the SAM CLI does (``[ENV.deploy.parameters]`` over
``[ENV.global.parameters]``), then the built template that ``sam deploy`` would read, and fails with a
message saying what to do when:

- the template is not a build (``sam deploy`` would upload the source template: no ImageUri, raw folders);
- the ``Architecture`` parameter that will be deployed (``--arch``, the make variable ARCH; else the
  ``parameter_overrides`` of samconfig.toml; else the build's) differs from the architecture the build
  produced: the deps layers' record (``<layer>/clip-build/deps.json``, written by infra/build_layer.py with
  the wheels it installed) for the zip flavour, the image's ``Metadata.BuildArchitecture`` (resolved by
  ``sam build`` into the built template) for the container flavour. An arm64 function with x86_64 shared
  objects fails at init.

It prints a loud warning when the model that will be deployed is not OpenAI's weights (a demo or seeded
model: its provenance source is not ``pretrained``).

After ``--``, a command to run when the check passes, with ``--parameter-overrides`` appended: samconfig's
overrides followed by ``Architecture=<arch>`` and ``BuiltModel=<model id>`` (the stack's Model output).
Always explicit, because on an existing stack ``sam deploy``
keeps the previous value of every parameter it is not given (samcli/commands/deploy/deploy_context.py,
merge_parameters: UsePreviousValue), and a command-line ``--parameter-overrides`` replaces samconfig's.

``empty-cache-bucket`` empties the stack's embedding cache bucket (its output CacheBucketName) so that
``sam delete`` can delete it: CloudFormation does not delete a bucket that holds objects.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ARCHITECTURES = ("x86_64", "arm64")
RECORD_DIR = "clip-build"  # infra/build_layer.py: <layer>/clip-build/<kind>.json
# `sam deploy` without a template_file: the default build's template (samcli/commands/_utils/constants.py).
DEFAULT_BUILT_TEMPLATE = Path(".aws-sam") / "build" / "template.yaml"
SOURCE_TEMPLATES = ("template.yaml", "template.yml", "template.json", "template.image.yaml")
LAYER_TYPES = ("AWS::Serverless::LayerVersion", "AWS::Lambda::LayerVersion")
FUNCTION_TYPES = ("AWS::Serverless::Function", "AWS::Lambda::Function")

# SAM's own parsing of a parameter_overrides string (samcli/cli/types.py, CfnParameterOverridesType):
# `ParameterKey=K,ParameterValue=V ...` or `K=V K2="a b" ...`, values quoted or with escaped spaces.
_KEY = r"""([A-Za-z0-9"']+)"""
_VALUE = r"""("(?:\\.|[^"\\]+)*"|'(?:\\.|[^'\\]+)*'|(?:\\.|[^ "\\]+)+)"""
_OVERRIDE_PATTERNS = (rf"(?:ParameterKey={_KEY},ParameterValue={_VALUE})", rf"(?:(?: ){_KEY}={_VALUE})")


class CheckFailed(Exception):
    """What will be deployed does not match the build; the message says what to do."""


# ---- samconfig.toml --------------------------------------------------------------------------------
def command_parameters(config: Mapping[str, Any], env: str, command: str) -> dict[str, Any]:
    """``[env.command.parameters]`` over ``[env.global.parameters]`` (samcli/lib/config/samconfig.py, get_all)."""
    section = config.get(env, {})
    params = dict(section.get("global", {}).get("parameters", {}))
    params.update(section.get(command, {}).get("parameters", {}))
    return params


def _unquote(value: str) -> str:
    if value and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return value.replace("\\ ", " ").replace('\\"', '"').replace("\\'", "'")


def _flatten(values: Any) -> list[Any]:
    if isinstance(values, (list, tuple)):
        return [item for value in values for item in _flatten(value)]
    return [values]


def parse_overrides(values: Any) -> dict[str, str]:
    """``parameter_overrides`` as samconfig.toml may write it (string, list of strings, table) -> dict."""
    parameters: dict[str, str] = {}
    for value in _flatten(values):
        if value is None or value == "":
            continue
        if isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(item, list):
                    item = ",".join(str(x).strip() for x in item if x not in (None, ""))
                parameters[str(key)] = "" if item is None else str(item)
            continue
        if not isinstance(value, str):
            raise CheckFailed(f"parameter_overrides: cannot read {value!r}")
        if value.startswith("file://"):
            raise CheckFailed(f"parameter_overrides {value}: read from a file, which this check does not "
                              "follow; give the architecture explicitly (make ... ARCH=x86_64|arm64)")
        normalized = " " + value.strip()
        for pattern in _OVERRIDE_PATTERNS:
            found = re.findall(pattern, normalized)
            if found:
                parameters.update(found)
                break
        else:
            raise CheckFailed(f"parameter_overrides: {value!r} is not Key=Value pairs")
    return {_unquote(key): _unquote(item) for key, item in parameters.items()}


def override_arguments(values: Any) -> list[str]:
    """samconfig's overrides as command-line values, in order (a later value for a key wins)."""
    arguments: list[str] = []
    for value in _flatten(values):
        if value is None or value == "":
            continue
        if isinstance(value, Mapping):
            arguments += [f"{key}={_quote(item)}" for key, item in parse_overrides(value).items()]
        else:
            arguments.append(str(value))
    return arguments


def _quote(value: str) -> str:
    return value if value and not re.search(r"[\s\"']", value) else json.dumps(value)


# ---- the built template -----------------------------------------------------------------------------
class _TemplateLoader(yaml.SafeLoader):
    """CloudFormation YAML: short intrinsic tags (!Ref, !If, ...) become ``{"Fn::X": ...}``-like dicts."""


def _intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        assert isinstance(node, yaml.MappingNode), node
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


_TemplateLoader.add_multi_constructor("!", _intrinsic)


def load_template(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckFailed(f"{path} does not exist: nothing is built to deploy (make sam-build first)") from None
    data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_TemplateLoader)
    if not isinstance(data, dict) or not isinstance(data.get("Resources"), dict):
        raise CheckFailed(f"{path} is not a CloudFormation template")
    return data


def resources(template: Mapping[str, Any], types: Iterable[str]) -> dict[str, dict[str, Any]]:
    wanted = set(types)
    return {name: res for name, res in template["Resources"].items()
            if isinstance(res, dict) and res.get("Type") in wanted}


def is_built(template: Mapping[str, Any]) -> bool:
    """``sam build`` writes Metadata.SamResourceId on what it built and points code at its output."""
    built = resources(template, (*LAYER_TYPES, *FUNCTION_TYPES))
    return bool(built) and all(isinstance(res.get("Metadata"), dict) and "SamResourceId" in res["Metadata"]
                               for res in built.values())


@dataclass
class Build:
    """What a built template says about itself."""

    template: Path
    flavour: str  # "zip" or "image"
    architectures: dict[str, str] = field(default_factory=dict)  # resource -> architecture it was built for
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # model_id -> provenance
    notes: list[str] = field(default_factory=list)


def read_build(template_path: Path, project_root: Path) -> Build:
    template = load_template(template_path)
    if not is_built(template):
        raise CheckFailed(f"{template_path} is not the output of `sam build` (no Metadata.SamResourceId): "
                          "sam deploy would upload source folders as they are. Point the env's "
                          "[<env>.deploy.parameters] template_file in samconfig.toml at the built template")
    functions = resources(template, FUNCTION_TYPES)
    images = {name: res for name, res in functions.items()
              if res.get("Properties", {}).get("PackageType") == "Image"}
    build = Build(template=template_path, flavour="image" if images else "zip")
    base = template_path.parent
    if images:
        for name, res in images.items():
            meta = res.get("Metadata", {})
            arch = meta.get("BuildArchitecture")
            if isinstance(arch, str):
                build.architectures[name] = arch
            model_dir = meta.get("DockerBuildArgs", {}).get("MODEL_DIR")
            if isinstance(model_dir, str):
                _read_model_dir(build, project_root / model_dir)
        if not build.architectures:
            build.notes.append("the image functions' Metadata has no BuildArchitecture (template.image.yaml)")
        return build
    for name, res in resources(template, LAYER_TYPES).items():
        content = res.get("Properties", {}).get("ContentUri") or res.get("Properties", {}).get("Content")
        if not isinstance(content, str):
            continue
        records = base / content / RECORD_DIR
        deps, model = records / "deps.json", records / "model.json"
        if deps.is_file():
            build.architectures[name] = json.loads(deps.read_text(encoding="utf-8"))["architecture"]
        if model.is_file():
            data = json.loads(model.read_text(encoding="utf-8"))
            build.models[data["model_id"]] = data.get("provenance", {})
    if not build.architectures:
        build.notes.append(f"no dependency layer in {template_path} carries {RECORD_DIR}/deps.json "
                           "(built before infra/build_layer.py recorded it?)")
    return build


def _read_model_dir(build: Build, model_dir: Path) -> None:
    try:
        manifest = json.loads((model_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        build.notes.append(f"the image's model directory {model_dir} has no readable manifest.json here")
        return
    build.models[manifest.get("model_id", str(model_dir))] = manifest.get("provenance", {})


# ---- the check ---------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What ``check`` decided: the template, the stack, the architecture and the overrides to pass."""

    template: Path
    stack_name: str | None
    architecture: str
    architecture_from: str
    overrides: list[str]
    build: Build
    warnings: list[str] = field(default_factory=list)


def check(config_file: Path, env: str = "default", arch: str | None = None) -> Plan:
    try:
        config = tomllib.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckFailed(f"{config_file} does not exist") from None
    project_root = config_file.parent
    if env not in config:
        raise CheckFailed(f"{config_file} has no [{env}.*] sections (envs: {', '.join(sorted(config)) or 'none'})")
    params = command_parameters(config, env, "deploy")
    raw_template = params.get("template_file")
    template_path = project_root / (raw_template or DEFAULT_BUILT_TEMPLATE)
    if template_path.name in SOURCE_TEMPLATES and template_path.parent == project_root:
        raise CheckFailed(f"samconfig.toml [{env}] makes `sam deploy` read the source template {template_path.name}: "
                          f"template_file must be the built one (e.g. .aws-sam/build-image/template.yaml), "
                          "in [<env>.deploy.parameters], never in [<env>.global.parameters]")
    build = read_build(template_path, project_root)

    raw_overrides = params.get("parameter_overrides")
    try:
        configured = parse_overrides(raw_overrides).get("Architecture")
    except CheckFailed:
        if not arch:  # e.g. file:// overrides: ARCH decides, and SAM reads the file itself
            raise
        configured = None
    built = sorted(set(build.architectures.values()))
    if len(built) > 1:
        detail = ", ".join(f"{name}: {a}" for name, a in sorted(build.architectures.items()))
        raise CheckFailed(f"{template_path.parent} mixes architectures ({detail}): rebuild (make sam-build ARCH=...)")
    if not built:
        raise CheckFailed(f"cannot tell which architecture {template_path.parent} was built for: "
                          + "; ".join(build.notes) + ". Rebuild with make sam-build (or sam-build-image)")
    (built_arch,) = built
    if arch:
        wanted, source = arch, "ARCH (the make variable)"
    elif configured:
        wanted, source = configured, f"parameter_overrides in {config_file.name} [{env}.deploy.parameters]"
    else:
        wanted, source = built_arch, "the build: neither ARCH nor samconfig names one"
    if wanted not in ARCHITECTURES:
        raise CheckFailed(f"Architecture={wanted} (from {source}) is not one of {', '.join(ARCHITECTURES)}")
    if wanted != built_arch:
        target = "sam-build-image" if build.flavour == "image" else "sam-build"
        what = ("the image was built" if build.flavour == "image"
                else f"the dependency layers ({', '.join(sorted(build.architectures))}) were built")
        raise CheckFailed(
            f"ARCHITECTURE MISMATCH: the stack would be deployed with Architecture={wanted} (from {source}), "
            f"but {what} for {built_arch} ({template_path.parent}). Lambda would load {built_arch} shared "
            f"objects on {wanted} and every function would fail at init.\n"
            f"Rebuild for {wanted}: make {target} ARCH={wanted}   "
            f"(or deploy what was built: ARCH={built_arch})")

    plan = Plan(template=template_path, stack_name=params.get("stack_name"), architecture=wanted,
                architecture_from=source, overrides=[*override_arguments(raw_overrides), f"Architecture={wanted}"],
                build=build)
    for model_id, provenance in sorted(build.models.items()):
        if provenance.get("source") != "pretrained":
            plan.warnings.append(demo_warning(model_id, provenance))
    if len(build.models) == 1:  # the stack's Model output names what the layers carry
        plan.overrides.append(f"BuiltModel={_quote(model_description(*next(iter(build.models.items()))))}")
    if not build.models:
        plan.warnings.append(f"predeploy_check: which model {template_path.parent} holds is unknown "
                             f"({'; '.join(build.notes) or 'no model record'})")
    return plan


def model_description(model_id: str, provenance: Mapping[str, Any]) -> str:
    """The value of the template's BuiltModel parameter (its Model output): id, and DEMO when not OpenAI's."""
    source = provenance.get("source")
    return model_id if source == "pretrained" else f"{model_id} (DEMO model, {source}, not OpenAI CLIP)"


def demo_warning(model_id: str, provenance: Mapping[str, Any]) -> str:
    rule = "!" * 100
    return "\n".join([
        rule,
        f"!! WARNING: about to deploy {model_id}, a model that is NOT OpenAI's CLIP "
        f"(provenance: {provenance.get('source')}).",
        f"!! {provenance.get('note', 'It exists for tests and demos only.')}",
        "!! Every embedding the deployed API returns will be meaningless for real images and text.",
        "!! Export the real weights (python -m clip_export pretrained ..., see README: Models) and rebuild:",
        "!!   CLIP_MODEL_SRC=build/models/ViT-B-32-int8 make sam-build",
        rule,
    ])


def report(plan: Plan) -> str:
    lines = [f"predeploy_check: {plan.build.flavour} build {plan.template} -> stack {plan.stack_name or '?'}",
             f"predeploy_check: Architecture={plan.architecture} (from {plan.architecture_from}) matches the build"]
    return "\n".join(lines)


# ---- teardown --------------------------------------------------------------------------------------
def cache_bucket_name(cloudformation: Any, stack_name: str) -> str | None:
    """The stack's CacheBucketName output, or None when the stack (or the output) does not exist."""
    from botocore.exceptions import ClientError

    try:
        stacks = cloudformation.describe_stacks(StackName=stack_name)["Stacks"]
    except ClientError as exc:
        if "does not exist" in str(exc):
            return None
        raise
    for output in stacks[0].get("Outputs", []) if stacks else []:
        if output.get("OutputKey") == "CacheBucketName":
            return str(output["OutputValue"])
    return None


def empty_bucket(s3: Any, bucket: str) -> int:
    """Delete every object (every version, every delete marker) in ``bucket``; return how many."""
    deleted = 0
    paginator = s3.get_paginator("list_object_versions")
    for page in paginator.paginate(Bucket=bucket):
        keys = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
        for start in range(0, len(keys), 1000):
            chunk = keys[start:start + 1000]
            s3.delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
            deleted += len(chunk)
    return deleted


def empty_cache_bucket(config_file: Path, env: str, session: Any = None) -> str:
    import boto3

    config = tomllib.loads(config_file.read_text(encoding="utf-8"))
    params = command_parameters(config, env, "delete")
    stack_name = params.get("stack_name")
    if not stack_name:
        raise CheckFailed(f"{config_file} names no stack_name for [{env}]")
    session = session or boto3.session.Session(region_name=params.get("region"))
    bucket = cache_bucket_name(session.client("cloudformation"), stack_name)
    if bucket is None:
        return f"predeploy_check: stack {stack_name} has no CacheBucketName output (not deployed?): nothing to empty"
    count = empty_bucket(session.client("s3"), bucket)
    return f"predeploy_check: emptied {bucket} (stack {stack_name}): {count} objects and versions deleted"


# ---- command line ------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in args_in:
        split = args_in.index("--")
        args_in, command = args_in[:split], args_in[split + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    checker = sub.add_parser("check", help="fail when the deploy would not match the build; then run the command")
    checker.add_argument("--arch", choices=ARCHITECTURES,
                         help="the Architecture to deploy (default: samconfig's parameter_overrides, else the build's)")
    bucket = sub.add_parser("empty-cache-bucket", help="empty the stack's CacheBucketName bucket (before sam delete)")
    for p in (checker, bucket):
        p.add_argument("--config-env", default="default")
        p.add_argument("--config-file", type=Path, default=Path("samconfig.toml"))
    args = parser.parse_args(args_in)
    try:
        if args.action == "empty-cache-bucket":
            print(empty_cache_bucket(args.config_file.resolve(), args.config_env))
            return 0
        plan = check(args.config_file.resolve(), args.config_env, args.arch)
    except CheckFailed as exc:
        print(f"predeploy_check: FAILED\n{exc}", file=sys.stderr)
        return 1
    for warning in plan.warnings:
        print(warning, file=sys.stderr)
    print(report(plan))
    if command:
        full = [*command, "--parameter-overrides", *plan.overrides]
        print("predeploy_check: " + " ".join(full), flush=True)
        sys.stderr.flush()
        os.execvp(full[0], full)
    return 0


if __name__ == "__main__":
    sys.exit(main())
