"""``"package.module:factory"`` specs: the one place a recipe's importable component is resolved.

Rewards (``get_reward``), feature hooks and other pluggable parts a recipe names as a string go
through ``load_factory``, so every caller accepts the same syntax and fails with the same messages.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_factory_spec(spec: str) -> bool:
    """Whether ``spec`` is written ``package.module:attribute`` (not a registry name)."""
    return isinstance(spec, str) and ":" in spec


def load_factory(spec: str, what: str = "factory") -> Callable[..., Any]:
    """The callable named by ``"package.module:attribute"`` (``attribute`` may be dotted, e.g. a
    classmethod ``module:Class.build``). ``what`` names the component in error messages."""
    if not isinstance(spec, str) or not _SPEC.match(spec.strip()):
        raise ValueError(f"{what} must look like 'package.module:factory', got {spec!r}")
    module_name, attr = spec.strip().split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import {what} {spec!r}: {err}") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"cannot import {what} {spec!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


__all__ = ["is_factory_spec", "load_factory"]
