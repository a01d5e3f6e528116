"""diffusers' built-in caches, configured for a CFG diffusion transformer, and static recordings of them.

``BUILTIN_CACHES`` names every configuration the benchmark runs: FirstBlockCache (threshold),
PyramidAttentionBroadcast (attention skip range), FasterCache (spatial attention skip range, with the
unconditional batch approximated on later steps), TaylorSeer (full-compute interval; attention and
feed-forward of every block predicted to first order). :class:`BuiltinCache` applies one to a
transformer through the functional ``apply_*`` API (PixArt has no ``CacheMixin``), supplies the
current timestep (PixArt's pipeline has no ``current_timestep``), wraps each generation in a cache
context and resets every stateful hook before it, so one batch never sees another batch's cache.

:func:`record_schedule` runs a pipeline with a built-in cache and records, per step, which scheduled
sub-modules actually ran: the static schedule that imitates the built-in's decisions on that batch.
The search seeds its initial population with these recordings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .schedule import Schedule, block_layout, detect_architecture, no_cache

__all__ = ["BUILTIN_CACHES", "BuiltinCache", "record_schedule", "count_builtin_hooks"]

BUILTIN_CACHES = (
    "first_block_cache@0.1",
    "first_block_cache@0.2",
    "first_block_cache@0.3",
    "pyramid_attention_broadcast@2",
    "pyramid_attention_broadcast@3",
    "faster_cache@2",
    "faster_cache@3",
    "taylorseer@2",
    "taylorseer@3",
    "taylorseer@4",
)

_CACHE_HOOK_NAMES = (
    "fbc_leader_block_hook",
    "fbc_block_hook",
    "pyramid_attention_broadcast",
    "faster_cache_denoiser",
    "faster_cache_block",
    "taylorseer_cache",
)


def count_builtin_hooks(transformer: torch.nn.Module) -> int:
    """Number of diffusers cache hooks registered anywhere in ``transformer``."""
    n = 0
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            n += sum(1 for name in registry.hooks if any(name.startswith(h) for h in _CACHE_HOOK_NAMES))
    return n


@dataclass
class BuiltinCache:
    """One configured built-in cache on one transformer (apply once; call :meth:`context` per batch)."""

    name: str
    transformer: torch.nn.Module
    timestep: int = 999
    handles: list = field(default_factory=list)

    def _track(self, module, args, kwargs):
        t = kwargs.get("timestep")
        if t is not None:  # host read of the timestep: built-ins ask for it through a callback
            value = float(torch.as_tensor(t).flatten()[0].float())
            self.timestep = int(value * 1000) if value <= 1 else int(value)  # flow matching passes t/1000

    def apply(self) -> BuiltinCache:
        import diffusers.hooks as H

        self.handles.append(self.transformer.register_forward_pre_hook(self._track, with_kwargs=True))
        kind, _, arg = self.name.partition("@")
        cb: Callable[[], int] = lambda: self.timestep  # noqa: E731
        if kind == "first_block_cache":
            H.apply_first_block_cache(self.transformer, H.FirstBlockCacheConfig(threshold=float(arg)))
        elif kind == "pyramid_attention_broadcast":
            skip = int(arg)
            H.apply_pyramid_attention_broadcast(
                self.transformer,
                H.PyramidAttentionBroadcastConfig(
                    spatial_attention_block_skip_range=skip,
                    cross_attention_block_skip_range=skip,
                    spatial_attention_timestep_skip_range=(0, 1000),
                    cross_attention_timestep_skip_range=(0, 1000),
                    current_timestep_callback=cb,
                ),
            )
        elif kind == "faster_cache":
            H.apply_faster_cache(
                self.transformer,
                H.FasterCacheConfig(
                    spatial_attention_block_skip_range=int(arg),
                    spatial_attention_timestep_skip_range=(-1, 681),  # the first steps always compute
                    unconditional_batch_skip_range=5,
                    unconditional_batch_timestep_skip_range=(-1, 641),
                    current_timestep_callback=cb,
                    attention_weight_callback=lambda _: 0.5,
                    tensor_format="BCHW",
                    is_guidance_distilled=False,  # PixArt uses classifier-free guidance (batched)
                ),
            )
        elif kind == "taylorseer":
            arch = detect_architecture(self.transformer)
            pats = []
            for group, _ in (
                block_layout(self.transformer, arch)[:1] + block_layout(self.transformer, arch)[-1:]
            ):
                pats.append(rf"{group.attr}\.\d+\.({'|'.join(group.components)})")
            H.apply_taylorseer_cache(
                self.transformer,
                H.TaylorSeerCacheConfig(
                    cache_interval=int(arg),
                    disable_cache_before_step=3,
                    max_order=1,
                    taylor_factors_dtype=torch.float32,
                    cache_identifiers=sorted(set(pats)),
                ),
            )
        else:
            raise ValueError(f"unknown built-in cache {self.name!r}; known: {', '.join(BUILTIN_CACHES)}")
        if count_builtin_hooks(self.transformer) == 0:
            raise RuntimeError(f"{self.name} registered no hook on {type(self.transformer).__name__}")
        return self

    def reset(self) -> None:
        registry = getattr(self.transformer, "_diffusers_hook", None)
        if registry is not None:
            registry.reset_stateful_hooks(recurse=True)
        self.timestep = 999

    @contextlib.contextmanager
    def context(self):
        """Fresh state and a cache context around one generation."""
        from diffusers.models.cache_utils import CacheMixin

        self.reset()
        with CacheMixin.cache_context(self.transformer, "cond"):
            yield

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for module in self.transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
            for name in list(registry.hooks):
                if any(name.startswith(h) for h in _CACHE_HOOK_NAMES):
                    registry.remove_hook(name, recurse=False)


def _probe(module: torch.nn.Module) -> torch.nn.Module:
    """First descendant with parameters of its own: it runs exactly when ``module``'s computation runs
    (a built-in that skips ``module`` replaces its forward, so a hook on ``module`` itself would fire)."""
    for _, child in module.named_modules():
        if child is not module and any(True for _ in child.parameters(recurse=False)):
            return child
    return module


def record_schedule(
    pipe, run: Callable[[], Any], num_steps: int, name: str, calls_per_step: int = 1
) -> Schedule:
    """The static schedule of which sub-modules ran at which step during ``run()`` (one generation)."""
    transformer = pipe.transformer
    arch = detect_architecture(transformer)
    sched = no_cache(transformer, num_steps)
    ran = torch.zeros_like(sched.recompute)
    calls = [0]
    handles = [transformer.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))]
    for b, (group, index) in enumerate(block_layout(transformer, arch)):
        block = getattr(transformer, group.attr)[index]
        for slot, comp in enumerate(group.components):

            def hook(m, a, b=b, slot=slot):
                step = (calls[0] - 1) // calls_per_step
                if 0 <= step < num_steps:
                    ran[step, b, slot] = True

            handles.append(_probe(getattr(block, comp)).register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    if calls[0] != num_steps * calls_per_step:
        raise RuntimeError(f"recording saw {calls[0]} transformer calls for {num_steps} steps")
    return Schedule(arch, ran | ~sched.slot_mask, sched.group_sizes, name=name)
