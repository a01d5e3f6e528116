"""Listener-shaped GRPO for VLM image-preference judges (arXiv 2506.22832)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("diffalign-listener-reward")
except PackageNotFoundError:  # pragma: no cover - source checkout without install
    __version__ = "0.0.0"
