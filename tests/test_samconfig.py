"""samconfig.toml as the real SAM CLI reads it: each flavour builds into its own directory and deploys that build.

Runs ``sam build``, ``sam deploy`` and ``sam validate`` with ``--debug`` in a temporary directory that holds a
copy of samconfig.toml and of both templates, without AWS credentials. SAM logs the arguments it resolved
from samconfig.toml and its defaults (samcli/cli/main.py, print_cmdline_args) and the template it reads
before it asks for credentials: the deploys stop there ("Unable to locate credentials"), the builds at their
first resource (no sources in the copy; no Docker). Nothing is written into the repository.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

from tests.sam_cli import sam_cli

pytestmark = pytest.mark.sam

REPO = Path(__file__).resolve().parents[1]
ENVS = {  # env: (source template, build directory)
    "default": ("template.yaml", ".aws-sam/build"),
    "image": ("template.image.yaml", ".aws-sam/build-image"),
}
TIMEOUT = 60


def copy_project(root: Path) -> Path:
    for name in ("samconfig.toml", "template.yaml", "template.image.yaml"):
        shutil.copy(REPO / name, root / name)
    (root / "aws").mkdir()
    for name in ("config", "credentials"):
        (root / "aws" / name).write_text("")
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """samconfig.toml and both templates, with a fake build of each flavour where its deploy should look."""
    root = copy_project(tmp_path_factory.mktemp("deploy"))
    for env, (template, build_dir) in ENVS.items():
        (root / build_dir).mkdir(parents=True)
        (root / build_dir / "template.yaml").write_text(f"# fake build of {env}\n" + (root / template).read_text())
    return root


@pytest.fixture(scope="module")
def build_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same files, for the builds (a build first empties its build directory)."""
    return copy_project(tmp_path_factory.mktemp("build"))


def no_credentials_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SAM_"))}
    env.update({"AWS_CONFIG_FILE": str(root / "aws" / "config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(root / "aws" / "credentials"),
                "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata credentials (nor its timeouts)
                "AWS_DEFAULT_REGION": "us-east-1", "SAM_CLI_TELEMETRY": "0", "HOME": str(root)})
    return env


@cache
def run(root: Path, *args: str) -> tuple[int, str]:
    done = subprocess.run([sam_cli(), *args, "--debug"], cwd=root, env=no_credentials_env(root),
                          capture_output=True, text=True, timeout=TIMEOUT)
    return done.returncode, done.stdout + done.stderr


def resolved_arguments(output: str) -> dict[str, str]:
    """The line SAM logs after "Expand command line arguments to:": ``--key=value --flag ...``."""
    lines = output.splitlines()
    index = next(i for i, line in enumerate(lines) if "Expand command line arguments to:" in line)
    line = lines[index + 1].split(" | ", 1)[-1]
    return {m.group(1): m.group(2) or "" for m in re.finditer(r"--(\w+)(?:=(\S+))?", line)}


@pytest.mark.parametrize("env", sorted(ENVS))
def test_deploy_reads_the_build_of_its_own_flavour_and_stops_at_credentials(project: Path, env: str) -> None:
    code, output = run(project, "deploy", "--config-env", env, "--no-confirm-changeset")
    _, build_dir = ENVS[env]
    expected = project / build_dir / "template.yaml"
    assert f"Using SAM Template at {expected}\n" in output, output[-3000:]
    assert resolved_arguments(output)["template_file"] == str(expected)
    # It got as far as AWS, and no further: the template and the config were accepted.
    assert code != 0 and "Unable to locate credentials" in output, output[-3000:]


@pytest.mark.parametrize("env", sorted(ENVS))
def test_build_reads_the_source_template_and_writes_where_deploy_reads(project: Path, build_project: Path,
                                                                      env: str) -> None:
    code, output = run(build_project, "build", "--config-env", env)
    template, build_dir = ENVS[env]
    args = resolved_arguments(output)
    assert args["template_file"] == str(build_project / template)
    built = Path(build_project, args["build_dir"]).resolve()
    assert built == (build_project / build_dir).resolve()
    assert built.is_dir()  # created before the first resource failed
    _, deployed = run(project, "deploy", "--config-env", env, "--no-confirm-changeset")
    read = Path(resolved_arguments(deployed)["template_file"])
    assert read.relative_to(project) == (built / "template.yaml").relative_to(build_project)
    assert code != 0  # nothing to build from in the copy: it fails after resolving its arguments


def test_the_flavours_build_into_different_directories(build_project: Path) -> None:
    dirs = {env: Path(build_project, resolved_arguments(run(build_project, "build", "--config-env", env)[1])
                      ["build_dir"]).resolve() for env in ENVS}
    assert dirs["default"] != dirs["image"]
    # `sam build` empties its build directory first: neither may hold the other
    assert not dirs["image"].is_relative_to(dirs["default"]) and not dirs["default"].is_relative_to(dirs["image"])


@pytest.mark.parametrize("env", sorted(ENVS))
def test_validate_checks_the_flavours_source_template(project: Path, env: str) -> None:
    code, output = run(project, "validate", "--config-env", env)
    template, _ = ENVS[env]
    assert code == 0, output[-3000:]
    assert f"{project / template} is a valid SAM Template" in output
