"""The backends announce themselves: each installed backend package declares an entry point in the
`telechat_ascend.backends` group naming a Backend, which the core reads without importing any framework. The core
names no backend module; importing a backend's framework happens only when one of its functions is called.

A backend's inference module offers load_model(folder, device, dtype) -> (model, tokenizer),
generate_text(model, tokenizer, prompt, **generation) and chat_session(model, tokenizer, questions,
**generation); its trainer is a `python -m` module taking the shared trainer arguments (telechat_ascend.training)."""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Callable

from telechat_ascend.errors import TeleChatError

GROUP = "telechat_ascend.backends"


@dataclass(frozen=True)
class Backend:
    name: str  # --backend NAME
    extra: str  # pip install 'telechat-ascend[EXTRA]' brings its framework
    inference: str  # module path of its inference functions
    trainer: tuple[str, ...]  # python arguments that start its trainer on the CPU, e.g. ("-m", "pkg.train")
    # name -> (one-line help, add(subparsers)): subcommands the backend adds to telechat-ascend; `add` must not
    # import the framework, so that --help stays fast and works without it.
    commands: dict[str, tuple[str, Callable]] = field(default_factory=dict)

    def load(self):
        """The inference module, with a clear error when the framework is not installed."""
        try:
            return importlib.import_module(self.inference)
        except ImportError as error:
            raise TeleChatError(f"--backend {self.name} needs pip install 'telechat-ascend[{self.extra}]': "
                                f"{error}") from None


def lazy_exports(package: str, exports: dict[str, str]):
    """A module __getattr__ (PEP 562) for a backend package: `name` is imported from module exports[name] on first
    use, so importing the package (as the CLI does for its backend.py) loads no framework."""
    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)
    return __getattr__


@functools.cache
def backends() -> dict[str, Backend]:
    """The installed backends by name, in the order their packages declare them."""
    found = {}
    for point in sorted(entry_points(group=GROUP), key=lambda p: p.name):
        backend = point.load()
        if not isinstance(backend, Backend) or backend.name != point.name:
            raise TeleChatError(f"entry point {point.name} = {point.value} in group {GROUP} is not a Backend "
                                f"named {point.name!r}")
        found[backend.name] = backend
    return found


def backend(name: str) -> Backend:
    known = backends()
    if name not in known:
        raise TeleChatError(f"unknown backend {name!r}; installed: {', '.join(known) or 'none'} (backends register "
                            f"through the {GROUP} entry points of an installed telechat-ascend)")
    return known[name]
