"""Typed recipe configs: pydantic models loaded from YAML or TOML with dotted overrides.

A recipe file is the single source of truth of a run. ``load_config`` reads it, applies ``a.b=1``
overrides, validates it against a pydantic model whose sections forbid unknown keys, and raises one
``ConfigError`` whose message names the offending key or file and the allowed values. Nothing is
written to disk until validation passed; ``save_config`` then writes the resolved config into the run
directory.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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
    "Component",
    "check_components",
    "list_recipes",
    "recipe_dirs",
    "resolve_recipe",
]

T = TypeVar("T", bound=BaseModel)


class Config(BaseModel):
    """Base class of every config section: unknown keys are an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ConfigError(ValueError):
    """A config could not be read or validated. The message is meant for the user, verbatim."""


class _Yaml11Bool(str):
    """A YAML 1.1 boolean spelled ``yes``/``no``/``on``/``off``: text or bool, decided by the field's type."""

    value: bool


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that ``yes``/``no``/``on``/``off`` stay undecided (:class:`_Yaml11Bool`)."""


def _construct_bool(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    text = loader.construct_scalar(node)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    marker = _Yaml11Bool(text)
    marker.value = text.lower() in ("yes", "on", "y")
    return marker


_RecipeLoader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)


def _accepts(annotation: Any, value: Any, *, strict: bool) -> bool:
    """Whether pydantic validates ``value`` as ``annotation`` (``strict``: without type coercion)."""
    from pydantic import TypeAdapter

    try:
        TypeAdapter(annotation).validate_python(value, strict=strict)
    except Exception:  # a validation error, or an annotation pydantic cannot build an adapter for
        return False
    return True


def _decide_yaml11_bools(annotation: Any, node: Any) -> Any:
    """Replace each :class:`_Yaml11Bool` in ``node`` by its text where the field takes that string and
    not a bool (``mixed_precision: no`` on a string field), else by the boolean (YAML 1.1's reading)."""
    if isinstance(node, _Yaml11Bool):
        if (
            annotation is not Any
            and _accepts(annotation, str(node), strict=True)
            and not _accepts(annotation, node.value, strict=True)
        ):
            return str(node)
        return node.value
    model = _unwrap_model(annotation)
    if isinstance(node, dict):
        fields = getattr(model, "model_fields", None) or {}
        args = typing.get_args(annotation)
        value_type = args[1] if typing.get_origin(annotation) in (dict, Mapping) and len(args) == 2 else Any
        return {  # a key spelled on/off/yes/no stays text
            (str(key) if isinstance(key, _Yaml11Bool) else key): _decide_yaml11_bools(
                fields[key].annotation if key in fields else value_type, value
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        args = typing.get_args(annotation)
        item_type = args[0] if typing.get_origin(annotation) in (list, tuple, set) and args else Any
        return [_decide_yaml11_bools(item_type, item) for item in node]
    return node


def _read_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"config path is a directory, expected a .yaml/.yml/.toml/.json file: {path}")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
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
        data.update(_decide_yaml11_bools(cls, _read_file(path)))
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


# --------------------------------------------------------------------------- built-in recipes

RECIPE_SUFFIXES = (".yaml", ".yml", ".toml", ".json")


def _method_package(method: str) -> str:
    """Import name of a method's package (``mlcm`` -> ``diffalign.mlcm``), from its config entry point."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="diffalign.configs"):
        if ep.name == method:
            return ep.module.rsplit(".", 1)[0]
    return "diffalign." + method.replace("-", "_")


def recipe_dirs(method: str) -> list[Path]:
    """Folders holding ``method``'s built-in recipes: the installed package data (``diffalign/<m>/recipes``
    inside the wheel), then the source checkout's ``packages/<m>/recipes`` (editable installs)."""
    import importlib.util

    spec = importlib.util.find_spec(_method_package(method))
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for location in spec.submodule_search_locations:
        package_dir = Path(location)
        for candidate in (package_dir / "recipes", package_dir.parents[2] / "recipes"):
            if candidate.is_dir() and candidate not in dirs:
                dirs.append(candidate)
    return dirs


def list_recipes(method: str) -> dict[str, Path]:
    """Built-in recipe names of ``method`` (file stem) -> file; the installed copy wins over the checkout's."""
    found: dict[str, Path] = {}
    for folder in recipe_dirs(method):
        for path in sorted(folder.iterdir()):
            if path.suffix in RECIPE_SUFFIXES and path.is_file():
                found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def resolve_recipe(method: str, recipe: str | Path) -> Path:
    """A recipe file path, or the name of one of ``method``'s built-in recipes (``shapes_unet``)."""
    path = Path(recipe).expanduser()
    if path.is_file():
        return path
    text = str(recipe)
    if path.is_dir():
        raise ConfigError(f"recipe path is a directory, expected a .yaml/.yml/.toml/.json file: {path}")
    builtin = list_recipes(method)
    if "/" not in text and os.sep not in text:
        stem = text
        if Path(text).suffix in RECIPE_SUFFIXES:
            stem = Path(text).stem
        if stem in builtin:
            return builtin[stem]
    names = ", ".join(builtin) or "none found"
    raise ConfigError(
        f"recipe {text!r} is neither a file nor a built-in {method} recipe (built-in: {names}; "
        f"`diffalign {method} recipes` lists them)"
    )


# --------------------------------------------------------------------------- named components


@dataclass(frozen=True)
class Component:
    """A model or reward that a recipe names, checked before anything is loaded.

    ``key`` is the recipe key holding the name (``reward.name``); ``kwargs_key`` the key of the keyword
    arguments passed to a reward factory (``reward.kwargs``); ``hint`` says where to get the model.
    """

    kind: str  # "reward" or "model"
    key: str
    name: str
    kwargs: Mapping[str, Any] | None = None
    kwargs_key: str | None = None
    hint: str = ""


def _is_local_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.count("/") != 1 or Path(text).expanduser().exists()


def _reward_factory(name: str) -> Any:
    """The factory a reward name resolves to, without calling it (so no model is loaded)."""
    if ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"reward factory {name!r} cannot be imported: {err}") from None
    from importlib.metadata import entry_points

    from . import rewards

    factory = rewards._REGISTRY.get(name)
    if factory is not None:
        return factory
    for ep in entry_points(group=rewards.ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    available = ", ".join(rewards.list_rewards()) or "none"
    raise ConfigError(f"unknown reward {name!r}; available rewards: {available}")


def _path_parameters(factory: Any) -> list[str]:
    """Parameters of ``factory`` annotated as file-system paths (``str | os.PathLike``)."""
    return [
        p.name
        for p in inspect.signature(factory).parameters.values()
        if "PathLike" in str(p.annotation) or "Path" == str(p.annotation)
    ]


def check_components(components: Iterable[Component], *, files: bool = True) -> list[str]:
    """One line per problem with the named models and rewards; empty when every one can be built.

    Always checked: each reward is known and its factory's signature binds the recipe's keyword arguments
    (missing or unknown arguments). With ``files``, also that every local path argument and local model
    folder exists (and, with ``HF_HUB_OFFLINE=1``, that hub ids are in the local cache). Nothing is loaded.
    """
    problems = []
    for comp in components:
        if comp.kind == "reward":
            problems += _check_reward(comp, files)
        elif comp.kind == "model" and files:
            problems += _check_model(comp)
    return problems


def _check_reward(comp: Component, files: bool) -> list[str]:
    kwargs = dict(comp.kwargs or {})
    where = comp.kwargs_key or f"{comp.key} arguments"
    try:
        factory = _reward_factory(comp.name)
    except ConfigError as err:
        return [f"{comp.key}: {err}"]
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return []
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        text = str(err)
        missing = [
            p.name
            for p in signature.parameters.values()
            if p.default is p.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in kwargs
        ]
        if missing:
            arg = missing[0]
            return [
                f"{comp.key}: reward {comp.name!r} needs the argument {arg!r}; give it in the recipe under "
                f"{where}.{arg} or with --set {where}.{arg}=VALUE" + (f" ({comp.hint})" if comp.hint else "")
            ]
        return [f"{comp.key}: reward {comp.name!r} does not take these arguments ({where}): {text}"]
    if not files:
        return []
    problems = []
    for arg in _path_parameters(factory):
        value = kwargs.get(arg)
        if isinstance(value, (str, os.PathLike)) and not Path(value).expanduser().exists():
            problems.append(
                f"{where}.{arg}: {comp.name} path not found: {value}; weights are never downloaded at run "
                f"time, so copy them to a local folder and give it with --set {where}.{arg}=PATH"
                + (f" ({comp.hint})" if comp.hint else "")
            )
    return problems


def _check_model(comp: Component) -> list[str]:
    text = str(comp.name)
    if text.startswith("shapes/"):
        return []
    if _is_local_path(text):
        if not Path(text).expanduser().is_dir():
            return [
                f"{comp.key}: model folder not found: {text}; give a local diffusers/transformers folder with "
                f"--set {comp.key}=DIR" + (f" ({comp.hint})" if comp.hint else "")
            ]
        return []
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if not offline:
        return []
    root = os.environ.get("DIFFALIGN_MODEL_ROOT")
    if root and (Path(root) / text).is_dir():
        return []
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(text, local_files_only=True)
    except Exception:
        return [
            f"{comp.key}: model {text!r} is not in the local cache and HF_HUB_OFFLINE=1; download it "
            f"(`hf download {text} --local-dir DIR`) and give it with --set {comp.key}=DIR"
        ]
    return []
