"""Apply a caching schedule to a diffusers pipeline through ``diffusers.hooks.ModelHook``.

Two kinds of hooks, no forward rewrites:

* a step-counter hook on the transformer itself: it reads the ``timestep`` argument of every call and
  advances the step when the timestep changes (timesteps decrease during sampling, so a larger one
  starts a new generation). Several calls at the same timestep (e.g. separate conditional and
  unconditional passes) are numbered and cached separately.
* a cache hook on every scheduled sub-module (``attn1``/``attn2``/``ff`` of a PixArt block, ...). On a
  recompute bit it runs the sub-module and stores its raw output; on a reuse bit it returns the stored
  output. The caller (the unchanged block ``forward``) then applies the *current* step's adaLN gate and
  residual to that output, exactly as it does to a freshly computed one.

With an all-recompute schedule every sub-module runs as usual, so the output is bit-for-bit the
output of the unhooked pipeline.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .schedule import Schedule, ScheduleError, block_layout

__all__ = ["apply_schedule", "remove_schedule", "reset_schedule_state", "get_schedule_state", "ScheduleState"]

STEP_HOOK = "diffalign_ecad_step_counter"
CACHE_HOOK = "diffalign_ecad_component_cache"


@dataclass
class ScheduleState:
    """Run-time state shared by the step counter and the cache hooks of one transformer."""

    schedule: Schedule
    effective: torch.Tensor  # bool [steps, blocks, components]
    scheduler: Any = None
    step: int = -1
    call_in_step: int = 0
    last_timestep: float | None = None
    num_calls: int = 0
    computed: int = 0  # sub-module evaluations actually run (for inspection and tests)
    reused: int = 0
    hooks: list = field(default_factory=list)

    def reset(self) -> None:
        self.step = -1
        self.call_in_step = 0
        self.last_timestep = None
        self.num_calls = 0
        self.computed = 0
        self.reused = 0
        for h in self.hooks:
            h.cache.clear()


def _timestep_value(timestep) -> float | None:
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            return None
        return float(timestep.detach().flatten()[0].float().cpu())
    return float(timestep)


class StepCounterHook(ModelHook):
    """Advances the schedule step from the transformer's ``timestep`` argument."""

    def __init__(self, state: ScheduleState, signature: inspect.Signature):
        super().__init__()
        self.state = state
        self.signature = signature

    def _timestep(self, module, args, kwargs):
        if "timestep" in kwargs:
            return kwargs["timestep"]
        try:
            bound = self.signature.bind_partial(module, *args, **kwargs)
        except TypeError:
            return None
        return bound.arguments.get("timestep")

    def pre_forward(self, module, *args, **kwargs):
        st = self.state
        t = _timestep_value(self._timestep(module, args, kwargs))
        new_run = st.step < 0 or t is None or st.last_timestep is None or t > st.last_timestep
        if new_run:
            st.reset()
            st.step = 0
            steps = getattr(st.scheduler, "num_inference_steps", None)
            if isinstance(steps, int) and steps != st.schedule.num_steps:
                raise ScheduleError(
                    f"schedule {st.schedule.name!r} has {st.schedule.num_steps} steps but the pipeline runs "
                    f"num_inference_steps={steps}"
                )
        elif t == st.last_timestep:
            st.call_in_step += 1
        else:
            st.step += 1
            st.call_in_step = 0
            if st.step >= st.schedule.num_steps:
                raise ScheduleError(
                    f"schedule {st.schedule.name!r} has {st.schedule.num_steps} steps but the transformer was "
                    f"called for step {st.step + 1}; use a schedule with the pipeline's num_inference_steps "
                    "(or call reset_schedule_state between generations)"
                )
        st.last_timestep = t
        st.num_calls += 1
        return args, kwargs


class ComponentCacheHook(ModelHook):
    """Recompute-or-reuse one sub-module according to the schedule bit of the current step."""

    def __init__(self, state: ScheduleState, block: int, slot: int, name: str):
        super().__init__()
        self.state = state
        self.block = block
        self.slot = slot
        self.name = name
        self.cache: dict[int, tuple[Any, tuple]] = {}

    @staticmethod
    def _input_signature(args, kwargs) -> tuple:
        first = args[0] if args else next(iter(kwargs.values()), None)
        return tuple(first.shape) if isinstance(first, torch.Tensor) else ()

    def new_forward(self, module, *args, **kwargs):
        st = self.state
        if st.step < 0:  # called outside a hooked transformer call
            return self.fn_ref.original_forward(*args, **kwargs)
        key = st.call_in_step
        sig = self._input_signature(args, kwargs)
        cached = self.cache.get(key)
        reuse = (
            not bool(st.effective[st.step, self.block, self.slot]) and cached is not None and cached[1] == sig
        )
        if reuse:
            st.reused += 1
            return cached[0]
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.cache[key] = (out, sig)
        st.computed += 1
        return out


def _transformer_of(pipe_or_transformer) -> tuple[torch.nn.Module, Any]:
    if isinstance(pipe_or_transformer, torch.nn.Module):
        return pipe_or_transformer, None
    transformer = getattr(pipe_or_transformer, "transformer", None)
    if transformer is None:
        raise ScheduleError(
            f"{type(pipe_or_transformer).__name__} has no `transformer`; ECAD schedules apply to diffusion "
            "transformer pipelines (PixArt, DiT, FLUX)"
        )
    return transformer, getattr(pipe_or_transformer, "scheduler", None)


def apply_schedule(pipe, schedule: Schedule) -> ScheduleState:
    """Attach ``schedule`` to ``pipe.transformer`` (or to a transformer passed directly).

    Raises :class:`ScheduleError` if the schedule was built for another architecture or block count, or
    if a schedule is already applied (call :func:`remove_schedule` first). The step count is checked
    against ``pipe.scheduler.num_inference_steps`` when a generation starts.
    """
    transformer, scheduler = _transformer_of(pipe)
    schedule.validate(transformer)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(STEP_HOOK) is not None:
        raise ScheduleError("a caching schedule is already applied; call remove_schedule(pipe) first")
    state = ScheduleState(schedule=schedule, effective=schedule.effective(), scheduler=scheduler)
    for b, (group, index) in enumerate(block_layout(transformer, schedule.architecture)):
        block = getattr(transformer, group.attr)[index]
        for slot, comp in enumerate(group.components):
            module = getattr(block, comp, None)
            if module is None:
                raise ScheduleError(f"{group.attr}.{index} has no sub-module {comp!r}")
            hook = ComponentCacheHook(state, b, slot, f"{group.attr}.{index}.{comp}")
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, CACHE_HOOK)
            state.hooks.append(hook)
    signature = inspect.signature(type(transformer).forward)
    registry.register_hook(StepCounterHook(state, signature), STEP_HOOK)
    transformer._diffalign_ecad_state = state
    return state


def get_schedule_state(pipe) -> ScheduleState | None:
    transformer, _ = _transformer_of(pipe)
    return getattr(transformer, "_diffalign_ecad_state", None)


def reset_schedule_state(pipe) -> None:
    """Forget cached outputs and restart the step counter (the hooks also do this on a new generation)."""
    state = get_schedule_state(pipe)
    if state is not None:
        state.reset()


def remove_schedule(pipe) -> None:
    """Remove every hook :func:`apply_schedule` attached; the model is then exactly as before."""
    transformer, _ = _transformer_of(pipe)
    state = getattr(transformer, "_diffalign_ecad_state", None)
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None:
        registry.remove_hook(STEP_HOOK, recurse=False)
        registry.remove_hook(CACHE_HOOK, recurse=True)
    if state is not None:
        state.reset()
        state.hooks.clear()
        del transformer._diffalign_ecad_state
