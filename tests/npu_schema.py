"""torch_npu dispatcher schemas, read from the torch-npu wheel without installing or importing torch_npu.

`torch_npu.<op>` is `torch.ops.npu.<op>`, so a call binds against the op's dispatcher schema: keyword names must
match it exactly and arguments after `*` are keyword-only. The wheel ships every schema in
`torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml`; this module downloads the wheel once with pip into
`REPO/.cache/torch_npu_wheel/` (later runs need no network), parses the `func:` entries with
`torch._C.parse_schema` and checks (args, kwargs) against them with `inspect.Signature.bind` plus a type check.
"""

from __future__ import annotations

import functools
import inspect
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
import yaml

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "torch_npu_wheel"
SCHEMA_FILE = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
# 2.13.0 ships manylinux_2_28 wheels, 2.5.1 manylinux_2_17 (= manylinux2014); the schema file is the same for every
# Python version, so one cp311 wheel serves any interpreter.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


class WheelUnavailable(RuntimeError):
    """The wheel is not cached and pip could not download it (e.g. no network)."""


def wheel_path(version: str) -> Path:
    """The cached torch-npu wheel for `version`, downloading it on first use."""
    cached = sorted(CACHE.glob(f"torch_npu-{version}-*.whl"))
    if cached:
        return cached[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    # Download into a temporary folder and move the wheel in whole, so an interrupted run leaves no partial file.
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", f"torch-npu=={version}", "--no-deps", "--only-binary=:all:",
            "--python-version", "3.11", *platforms, "--retries", "1", "--timeout", "15",
            "--disable-pip-version-check", "--quiet", "-d", tmp,
        ]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise WheelUnavailable(f"pip download torch-npu=={version} timed out") from None
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise WheelUnavailable(f"pip download torch-npu=={version} failed: {' | '.join(tail)}")
        return wheels[0].replace(CACHE / wheels[0].name)


@functools.cache
def schema_strings(version: str) -> dict[str, str]:
    """Op name (with overload, e.g. "npu_format_cast.Tensor") -> its `func:` schema string."""
    with zipfile.ZipFile(wheel_path(version)) as wheel:
        data = yaml.load(wheel.read(SCHEMA_FILE), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    funcs = {}
    for section in data.values():
        for entry in section if isinstance(section, list) else ():
            if isinstance(entry, dict) and "func" in entry:
                name = entry["func"].split("(", 1)[0]
                # Some ops are listed in two sections; they must agree or the file is ambiguous.
                assert funcs.setdefault(name, entry["func"]) == entry["func"], f"conflicting schemas for {name}"
    return funcs


def schema(version: str, op: str) -> torch._C.FunctionSchema:
    return torch._C.parse_schema(schema_strings(version)[op])


def signature(fn_schema: torch._C.FunctionSchema) -> inspect.Signature:
    """A Python signature with the schema's names, keyword-only markers and defaults."""
    params = [
        inspect.Parameter(
            arg.name,
            inspect.Parameter.KEYWORD_ONLY if arg.kwarg_only else inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=arg.default_value if arg.has_default_value() else inspect.Parameter.empty,
        )
        for arg in fn_schema.arguments
    ]
    return inspect.Signature(params)


def matches(value, jit_type) -> bool:
    """Whether a Python value is accepted for a schema argument type (as the dispatcher converts them)."""
    kind = jit_type.kind()
    if kind == "OptionalType":
        return value is None or matches(value, jit_type.getElementType())
    if kind == "TensorType":
        return isinstance(value, torch.Tensor)
    if kind in ("IntType", "SymIntType"):
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "FloatType":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "BoolType":
        return isinstance(value, bool)
    if kind == "StringType":
        return isinstance(value, str)
    if kind == "ListType":
        return isinstance(value, (list, tuple)) and all(matches(v, jit_type.getElementType()) for v in value)
    raise NotImplementedError(f"no type check for schema type {jit_type}")


def check_call(fn_schema: torch._C.FunctionSchema, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """Bind a call site's (args, kwargs) to the schema; TypeError on a bad name, arity or argument type."""
    bound = signature(fn_schema).bind(*args, **kwargs)
    types = {arg.name: arg.type for arg in fn_schema.arguments}
    for name, value in bound.arguments.items():
        if not matches(value, types[name]):
            raise TypeError(f"{fn_schema.name}: {name}={value!r} does not match schema type {types[name]}")
    return bound


class FakeTorchNpu:
    """Stands in for the torch_npu module on CPU: each op call is bound and type-checked against the schema,
    recorded, run through a CPU implementation of the documented semantics, and its result is checked against
    the schema's number of returns."""

    def __init__(self, version: str, impls: dict):
        self.version, self.impls, self.calls = version, impls, []

    def __getattr__(self, op: str):
        if op not in self.impls:
            raise AttributeError(op)
        fn_schema = schema(self.version, op)

        def call(*args, **kwargs):
            bound = check_call(fn_schema, args, kwargs)
            self.calls.append((op, dict(bound.arguments)))
            bound.apply_defaults()
            result = self.impls[op](**bound.arguments)
            n = len(fn_schema.returns)
            assert (isinstance(result, tuple) and len(result) == n) if n > 1 else isinstance(result, torch.Tensor)
            return result

        return call
