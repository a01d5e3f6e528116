"""Multistep latent consistency distillation, MLCM/TLCM (arXiv 2406.05768)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("diffalign-mlcm")
except PackageNotFoundError:  # pragma: no cover - source checkout without install
    __version__ = "0.0.0"
