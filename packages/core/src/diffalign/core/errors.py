"""Errors raised during training that the recipe runner maps to exit code 1, kept free of heavy imports so
that a method's command line can name them without loading torch."""

from __future__ import annotations

__all__ = ["CheckpointError", "NonFiniteError"]


class CheckpointError(RuntimeError):
    """A checkpoint could not be read: truncated, corrupt, or not a checkpoint."""


class NonFiniteError(FloatingPointError):
    """A loss, gradient or parameter became NaN or infinite; the last good checkpoint is kept."""
