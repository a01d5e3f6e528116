"""The reward protocol shared by every method, and a registry that finds rewards by name.

A reward scores a batch of images against their prompts, higher is better. Methods ask for a reward by
name (``get_reward("shapes-reward")``); packages contribute rewards through the entry-point group
``diffalign.rewards`` whose values are factories ``(**kwargs) -> RewardModel``. Rewards registered in the
running process with ``register_reward`` take precedence over entry points.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
    "RewardModel",
    "RewardFactory",
    "register_reward",
    "unregister_reward",
    "get_reward",
    "list_rewards",
    "check_pixel_images",
    "UnknownRewardError",
    "ENTRY_POINT_GROUP",
]

ENTRY_POINT_GROUP = "diffalign.rewards"
PIXEL_RANGE = "[-1,1]"
PIL_RANGE = "pil"


@runtime_checkable
class RewardModel(Protocol):
    """Scores images against prompts.

    ``input_range`` is ``"[-1,1]"`` (float tensors ``[B, 3, H, W]`` in [-1, 1]) or ``"pil"`` (a list of
    PIL images). ``differentiable`` says whether gradients flow from the score to tensor pixels.
    """

    name: str
    differentiable: bool
    input_range: str

    def score(self, images: Any, prompts: Sequence[str]) -> torch.Tensor: ...


RewardFactory = Callable[..., RewardModel]

_REGISTRY: dict[str, RewardFactory] = {}


class UnknownRewardError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register_reward(name: str, factory: RewardFactory, *, overwrite: bool = False) -> None:
    """Register ``factory`` under ``name`` in this process."""
    if not callable(factory):
        raise TypeError(f"reward factory for {name!r} must be callable, got {type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"a reward named {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def unregister_reward(name: str) -> None:
    _REGISTRY.pop(name, None)


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def list_rewards() -> list[str]:
    """Names of every reward available in this environment (process registry and entry points)."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def get_reward(name: str, **kwargs: Any) -> RewardModel:
    """Instantiate the reward called ``name`` (a registered name, or ``package.module:factory``) with
    ``kwargs`` passed to its factory."""
    from diffalign.core.factory import is_factory_spec, load_factory

    factory = _REGISTRY.get(name)
    if factory is None and is_factory_spec(name):
        factory = load_factory(name, "reward")
    if factory is None:
        ep = _entry_points().get(name)
        if ep is None:
            available = ", ".join(list_rewards()) or "none"
            raise UnknownRewardError(
                f"unknown reward {name!r}; available rewards: {available}. "
                f"Install the package that provides it or call register_reward()."
            )
        factory = ep.load()
    reward = factory(**kwargs)
    missing = [
        attr for attr in ("name", "differentiable", "input_range", "score") if not hasattr(reward, attr)
    ]
    if missing:
        raise TypeError(f"reward {name!r} does not implement the RewardModel protocol; missing {missing}")
    return reward


def check_pixel_images(images: Any, prompts: Sequence[str] | None = None, *, size: int | None = None) -> None:
    """Validate a ``[-1, 1]`` image batch: a clear error instead of a silently wrong score."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a float tensor [B, 3, H, W] in [-1, 1], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected floating-point pixels in [-1, 1], got dtype {images.dtype}")
    if size is not None and tuple(images.shape[-2:]) != (size, size):
        raise ValueError(f"expected {size}x{size} images, got {images.shape[-2]}x{images.shape[-1]}")
    if images.numel():
        lo, hi = float(images.detach().min()), float(images.detach().max())
        if lo < -1.05 or hi > 1.05:
            raise ValueError(
                f"pixel values must lie in [-1, 1], got range [{lo:.3f}, {hi:.3f}] "
                "(did you pass [0, 1] or [0, 255] images? map them with x * 2 - 1 or x / 127.5 - 1)"
            )
    if prompts is not None:
        if len(prompts) == 0:
            raise ValueError("empty prompt list")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
