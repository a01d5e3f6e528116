"""Shared infrastructure for diffalign: configs, CLI, launch, models, rewards, metrics, training utilities and the shapes world."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("diffalign-core")
except PackageNotFoundError:  # pragma: no cover - source checkout without install
    __version__ = "0.0.0"
