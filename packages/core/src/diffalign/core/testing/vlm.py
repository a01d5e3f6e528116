"""Tests' name for the tiny Qwen2.5-VL models; they live in ``diffalign.core.tiny_vlm``."""

from diffalign.core import tiny_vlm as _tiny_vlm
from diffalign.core.tiny_vlm import *  # noqa: F403 (the same public names, re-exported)

__all__ = list(_tiny_vlm.__all__)
