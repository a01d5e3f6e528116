"""Typed recipe configs: pydantic models loaded from YAML or TOML with dotted overrides.

A recipe file is the single source of truth of a run. ``load_config`` reads it, applies ``a.b=1``
overrides, validates it against a pydantic model whose sections forbid unknown keys, and raises one
``ConfigError`` whose message names the offending key or file and the allowed values. Nothing is
written to disk until validation passed; ``save_config`` then writes the resolved config into the run
directory.
"""

from __future__ import annotations

import json
import sys
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "save_config",
    "parse_overrides",
    "apply_overrides",
    "config_schema",
]

T = TypeVar("T", bound=BaseModel)


class Config(BaseModel):
    """Base class of every config section: unknown keys are an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ConfigError(ValueError):
    """A config could not be read or validated. The message is meant for the user, verbatim."""


def _read_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"config path is a directory, expected a .yaml/.yml/.toml/.json file: {path}")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(
                f"unsupported config format {suffix!r} for {path}; use .yaml, .yml, .toml or .json"
            )
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"could not parse {path}: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def _parse_value(text: str) -> Any:
    """Parse an override value as YAML (numbers, booleans, lists, null); fall back to the raw string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(overrides: Iterable[str]) -> list[tuple[list[str], Any]]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key part")
        parsed.append((key.split("."), _parse_value(value)))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted overrides applied (intermediate mappings are created)."""
    out = json.loads(json.dumps(data, default=str)) if data else {}
    for parts, value in parse_overrides(overrides):
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"override {'.'.join(parts)}: {'.'.join(parts[: depth + 1])} is a value, not a section"
                )
            node = child
        node[parts[-1]] = value
    return out


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Walk the model along a validation-error location and list the fields allowed at that level."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return None
        annotation = fields[part].annotation
        current = _unwrap_model(annotation)
        if current is None:
            return None
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else None


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def format_validation_error(model: type[BaseModel], err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for item in err.errors():
        loc = tuple(item.get("loc", ()))
        key = ".".join(str(p) for p in loc) or "<root>"
        kind = item.get("type", "")
        if kind == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  unknown key '{key}'{hint}")
        elif kind == "missing":
            lines.append(f"  missing required key '{key}'")
        else:
            ctx = item.get("ctx") or {}
            expected = ctx.get("expected")
            got = item.get("input")
            msg = item.get("msg", "invalid value")
            extra = f" (allowed: {expected})" if expected else ""
            lines.append(f"  key '{key}': {msg}{extra}; got {got!r}")
    return "\n".join(lines)


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> T:
    """Read ``path`` (YAML/TOML/JSON), apply dotted ``overrides`` and validate against ``cls``.

    Raises ``ConfigError`` naming the file, key and allowed values on any problem.
    """
    data: dict[str, Any] = dict(defaults or {})
    source = "overrides"
    if path is not None:
        path = Path(path)
        data.update(_read_file(path))
        source = str(path)
    data = apply_overrides(data, list(overrides))
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(cls, err, source)) from None


def save_config(cfg: BaseModel, run_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config into ``run_dir`` (created if needed) and return the file path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / name
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    tmp.replace(target)
    return target


def config_schema(cls: type[BaseModel]) -> dict[str, Any]:
    return cls.model_json_schema()
