"""vllm-ascend's msModelSlim loader, read from its release source without installing or importing it.

vllm-ascend is published on PyPI as an sdist only, and `pip download` cannot fetch it without building it (its build
needs CANN), so the tarball is fetched through PyPI's JSON API once into `REPO/.cache/vllm_ascend_sdist/` (later runs
need no network). Functions are taken out of its modules with `ast` and run on their own: the parameter-declaring
methods of the W8A8 / W8A16 linear schemes (`get_weight`, `get_pertensor_param`, `get_perchannel_param`, which only
build `torch.empty` tensors) and `get_linear_quant_type`, the description lookup.
"""

from __future__ import annotations

import ast
import functools
import json
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "vllm_ascend_sdist"
VERSION = "0.23.0.post1"
SCHEMES = {  # (chip, scheme) -> the modules whose classes declare its parameters, base class first
    ("a2", "W8A8"): ["vllm_ascend/quantization/methods/w8a8_static.py"],
    ("a2", "W8A16"): ["vllm_ascend/quantization/methods/w8a16.py"],
    ("310p", "W8A8"): ["vllm_ascend/_310p/quantization/methods/w8a8_base.py",
                       "vllm_ascend/_310p/quantization/methods/w8a8_static.py"],
}
CONFIG_MODULE = "vllm_ascend/quantization/modelslim_config.py"


class SourceUnavailable(RuntimeError):
    """The sdist is not cached and could not be downloaded."""


def sdist_path() -> Path:
    cached = CACHE / f"vllm_ascend-{VERSION}.tar.gz"
    if cached.is_file():
        return cached
    CACHE.mkdir(parents=True, exist_ok=True)
    api = "https://pypi.org/pypi/vllm-ascend/json"
    try:
        releases = json.load(urllib.request.urlopen(api, timeout=30))["releases"]
        files = [f for f in releases.get(VERSION, []) if f["filename"].endswith(".tar.gz")]
        if not files:
            raise SourceUnavailable(f"PyPI lists no sdist of vllm-ascend {VERSION}")
        with tempfile.NamedTemporaryFile(dir=CACHE, delete=False) as tmp:
            with urllib.request.urlopen(urllib.parse.urljoin(api, files[0]["url"]), timeout=300) as response:
                tmp.write(response.read())
        return Path(tmp.name).replace(cached)
    except (OSError, KeyError, ValueError) as error:
        raise SourceUnavailable(f"vllm-ascend {VERSION} sdist not cached and not downloadable: {error}") from None


@functools.cache
def source(module: str) -> str:
    with tarfile.open(sdist_path()) as tar:
        return tar.extractfile(f"vllm_ascend-{VERSION}/{module}").read().decode()


def _function(module: str, name: str, inside_class_registered_as: tuple | None = None):
    tree = ast.parse(source(module))
    nodes = tree.body
    if inside_class_registered_as:  # the methods of the class registered under that name, else of every class
        classes = [c for c in tree.body if isinstance(c, ast.ClassDef)]
        registered = [c for c in classes if any(isinstance(d, ast.Call) and [ast.literal_eval(a) for a in d.args]
                                                == list(inside_class_registered_as) for d in c.decorator_list)]
        nodes = [n for c in registered or classes for n in c.body]
    for node in nodes:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            namespace = {"torch": torch, "Any": Any, "logger": None}
            exec(compile(ast.Module([node], []), module, "exec"), namespace)
            return namespace[name]
    return None


def declared_parameters(chip: str, scheme: str, input_size: int, output_size: int,
                        params_dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple]]:
    """{name: (dtype, shape)} the scheme creates on one linear layer, as its methods declare them."""
    declared = {}
    for method in ("get_weight", "get_pertensor_param", "get_perchannel_param"):
        function = None
        for module in SCHEMES[(chip, scheme)]:  # the subclass's own method wins
            function = _function(module, method, (scheme, "linear")) or function
        if function is None:
            continue
        if method == "get_weight":
            params = function(None, input_size, output_size, params_dtype)
        elif method == "get_pertensor_param":
            params = function(None, params_dtype)
        else:
            params = function(None, output_size, params_dtype)
        declared.update({name: (t.dtype, tuple(t.shape)) for name, t in params.items()})
    return declared


def linear_quant_type(description: dict, prefix: str, packed_modules_mapping: dict) -> str:
    """vllm-ascend's own lookup of a linear layer's scheme in quant_model_description.json."""
    lookup = _function(CONFIG_MODULE, "get_linear_quant_type")
    lookup.__globals__["_is_missing_v_shard"] = _function(CONFIG_MODULE, "_is_missing_v_shard")
    return lookup(description, prefix, packed_modules_mapping)
