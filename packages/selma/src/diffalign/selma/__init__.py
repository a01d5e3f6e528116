"""SELMA: skill-specific LoRA experts learned from auto-generated data, then merged (arXiv 2403.06952)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("diffalign-selma")
except PackageNotFoundError:  # pragma: no cover - source checkout without install
    __version__ = "0.0.0"
