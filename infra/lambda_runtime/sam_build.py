"""Reading ``sam build``'s output: each function's code directory, handler, layers and environment.

``.aws-sam/build/template.yaml`` is the template with every ``CodeUri``/``ContentUri`` pointing at a
built directory. Environment values may hold intrinsic functions (``Ref``, ``Fn::If``, ``Fn::Sub``,
...); :meth:`BuiltApp.environment` resolves the few the template uses, from parameter values and from
stand-ins for resources (a bucket name, a layer ARN) that the caller supplies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BUILD_DIR = REPO / ".aws-sam" / "build"
MiB = 1024 * 1024
LAMBDA_UNZIPPED_LIMIT = 262_144_000  # 250 MiB: a function's code plus all its layers, unzipped

_NO_VALUE = object()
PSEUDO_PARAMETERS = {"AWS::Region": "us-east-1", "AWS::AccountId": "123456789012", "AWS::Partition": "aws",
                     "AWS::URLSuffix": "amazonaws.com", "AWS::StackName": "clip-serverless-local"}


def tree_bytes(root: Path) -> int:
    """Sum of file sizes under ``root``: what Lambda counts against its unzipped limit."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def layer_arn(logical_id: str, version: int = 1) -> str:
    """The stand-in ARN the local runs give a layer (``Ref`` of a LayerVersion is its version ARN)."""
    return f"arn:aws:lambda:us-east-1:123456789012:layer:{logical_id}:{version}"


def function_arn(logical_id: str, qualifier: str | None = None) -> str:
    """The stand-in ARN of a function (``Ref`` of ``Fn.Alias`` is the alias ARN, qualifier ``live``)."""
    arn = f"arn:aws:lambda:us-east-1:123456789012:function:{logical_id}"
    return f"{arn}:{qualifier}" if qualifier else arn


def function_name_of(name_or_arn: str) -> str:
    """``Invoke``'s FunctionName (a name, a partial or full ARN, with or without qualifier) -> the name."""
    parts = name_or_arn.split(":")
    if len(parts) >= 7 and parts[0] == "arn":  # arn:aws:lambda:region:account:function:name[:qualifier]
        return parts[6]
    if len(parts) >= 3 and parts[1] == "function":  # account:function:name[:qualifier]
        return parts[2]
    return parts[0]


@dataclass(frozen=True)
class BuiltLayer:
    name: str
    path: Path


@dataclass(frozen=True)
class BuiltFunction:
    name: str
    code: Path
    handler: str
    runtime: str
    layers: tuple[BuiltLayer, ...]
    raw_environment: Mapping[str, Any]
    raw_memory: Any
    raw_timeout: Any

    def unzipped_bytes(self) -> int:
        return tree_bytes(self.code) + sum(tree_bytes(layer.path) for layer in self.layers)


class BuiltApp:
    """The functions and layers of a ``sam build`` output directory."""

    def __init__(self, build_dir: Path = DEFAULT_BUILD_DIR) -> None:
        self.build_dir = Path(build_dir)
        template_path = self.build_dir / "template.yaml"
        if not template_path.exists():
            raise FileNotFoundError(f"{template_path} is missing: run `sam build` first")
        self.template: dict[str, Any] = yaml.safe_load(template_path.read_text())
        self.resources: dict[str, Any] = self.template["Resources"]
        self.parameter_defaults = {name: str(spec.get("Default", ""))
                                   for name, spec in self.template.get("Parameters", {}).items()}
        globals_fn = self.template.get("Globals", {}).get("Function", {})
        self.layers = {name: BuiltLayer(name, self.build_dir / res["Properties"]["ContentUri"])
                       for name, res in self.resources.items() if res["Type"] == "AWS::Serverless::LayerVersion"}
        self.functions: dict[str, BuiltFunction] = {}
        for name, res in self.resources.items():
            if res["Type"] != "AWS::Serverless::Function":
                continue
            props = {**globals_fn, **res["Properties"]}
            env = {**globals_fn.get("Environment", {}).get("Variables", {}),
                   **res["Properties"].get("Environment", {}).get("Variables", {})}
            layers = tuple(self.layers[ref["Ref"]] for ref in props.get("Layers", []))
            self.functions[name] = BuiltFunction(
                name=name, code=self.build_dir / props["CodeUri"], handler=props["Handler"],
                runtime=props["Runtime"], layers=layers, raw_environment=env,
                raw_memory=props.get("MemorySize", 128), raw_timeout=props.get("Timeout", 3))

    def function(self, name: str) -> BuiltFunction:
        try:
            return self.functions[name]
        except KeyError:
            raise KeyError(f"no function {name!r} in the build (have {', '.join(self.functions)})") from None

    def resolver(self, parameters: Mapping[str, str] | None = None,
                 resources: Mapping[str, str] | None = None) -> Resolver:
        """``resources``: what ``Ref``/``GetAtt`` of a resource stands for (``{"CacheBucket": "b"}``).
        Layers resolve to :func:`layer_arn`, ``Fn.Alias`` to :func:`function_arn` unless given."""
        refs = {name: layer_arn(name) for name in self.layers}
        refs.update({f"{name}.Alias": function_arn(name, "live") for name in self.functions})
        refs.update(resources or {})
        return Resolver({**self.parameter_defaults, **(parameters or {})}, refs,
                        self.template.get("Conditions", {}))

    def environment(self, name: str, resolver: Resolver) -> dict[str, str]:
        """The function's environment variables as Lambda would set them (NoValue entries dropped)."""
        out: dict[str, str] = {}
        for key, raw in self.function(name).raw_environment.items():
            value = resolver.resolve(raw)
            if value is not _NO_VALUE:
                out[key] = str(value)
        return out


class Resolver:
    """Evaluates the intrinsic functions this project's template uses."""

    def __init__(self, parameters: Mapping[str, str], refs: Mapping[str, str], conditions: Mapping[str, Any]) -> None:
        self.parameters = parameters
        self.refs = refs
        self.conditions = conditions

    def ref(self, name: str) -> Any:
        if name == "AWS::NoValue":
            return _NO_VALUE
        if name in PSEUDO_PARAMETERS:
            return PSEUDO_PARAMETERS[name]
        if name in self.parameters:
            return self.parameters[name]
        if name in self.refs:
            return self.refs[name]
        raise KeyError(f"Ref {name!r}: not a parameter, and no stand-in was given for that resource")

    def condition(self, name: str) -> bool:
        return bool(self.resolve(self.conditions[name]))

    def resolve(self, node: Any) -> Any:
        if not isinstance(node, dict) or len(node) != 1:
            return node
        (fn, arg), = node.items()
        if fn == "Ref":
            return self.ref(arg)
        if fn == "Fn::If":
            cond, yes, no = arg
            return self.resolve(yes if self.condition(cond) else no)
        if fn == "Fn::Equals":
            return str(self.resolve(arg[0])) == str(self.resolve(arg[1]))
        if fn == "Fn::Not":
            return not self.resolve(arg[0])
        if fn == "Fn::And":
            return all(self.resolve(a) for a in arg)
        if fn == "Fn::Or":
            return any(self.resolve(a) for a in arg)
        if fn == "Condition":
            return self.condition(arg)
        if fn == "Fn::GetAtt":
            target = ".".join(arg) if isinstance(arg, list) else arg
            return self.refs[target]
        if fn == "Fn::Sub":
            text = arg if isinstance(arg, str) else arg[0]
            return self._sub(text)
        raise ValueError(f"unsupported intrinsic function {fn}")

    def _sub(self, text: str) -> str:
        out, rest = [], text
        while "${" in rest:
            before, _, after = rest.partition("${")
            name, _, rest = after.partition("}")
            out.append(before)
            out.append(str(self.refs[name] if "." in name else self.ref(name)))
        return "".join(out) + rest
