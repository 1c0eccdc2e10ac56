"""`sam local invoke` without Docker: built functions run under AWS's runtime client against a stand-in.

- :mod:`.runtime_api`: the Runtime API stand-in, an HTTP server.
- :mod:`.invoke_api`: Lambda's Invoke API for built functions (compare calls embed_text through it).
- :mod:`.sam_build`: reading ``.aws-sam/build``: code, layers, environment per function.
- :mod:`.runner`: :class:`~.runner.LocalLambda`, one execution environment in a fresh python3.12 process.

    PYTHONPATH=infra .venv/bin/python -m lambda_runtime invoke EmbedTextFunction -e events/embed_text.http-api.json
"""

from .invoke_api import Faults, LambdaService
from .runner import (
    FunctionSpec,
    LocalLambda,
    LocalLambdaError,
    built_function,
    cold_start,
    ensure_runtime,
    find_python,
    plain_cold_start,
)
from .runtime_api import InitError, InvocationResult, RuntimeApi
from .sam_build import LAMBDA_UNZIPPED_LIMIT, BuiltApp, BuiltFunction, function_arn, layer_arn, tree_bytes

__all__ = [
    "LAMBDA_UNZIPPED_LIMIT",
    "BuiltApp",
    "BuiltFunction",
    "Faults",
    "FunctionSpec",
    "InitError",
    "InvocationResult",
    "LambdaService",
    "LocalLambda",
    "LocalLambdaError",
    "RuntimeApi",
    "built_function",
    "cold_start",
    "ensure_runtime",
    "find_python",
    "function_arn",
    "layer_arn",
    "plain_cold_start",
    "tree_bytes",
]
