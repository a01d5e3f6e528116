"""Evolutionary caching schedules for diffusion transformers (arXiv 2506.15682)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("diffalign-ecad")
except PackageNotFoundError:  # pragma: no cover - source checkout without install
    __version__ = "0.0.0"
