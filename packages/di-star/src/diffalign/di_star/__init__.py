"""Diff-Instruct*: reward post-training of one-step generators (arXiv 2410.20898)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("diffalign-di-star")
except PackageNotFoundError:  # pragma: no cover - source checkout without install
    __version__ = "0.0.0"
