"""Apply a caching schedule to a diffusers pipeline through ``diffusers.hooks.ModelHook``.

Three kinds of hooks, no forward rewrites:

* a step counter on the transformer. With a pipeline it is driven entirely on the host: the
  scheduler's ``set_timesteps`` starts a generation and its ``step`` ends a denoising step, so the hooks
  never read a device tensor (no host synchronisation per call). Several transformer calls inside one
  step (separate conditional and unconditional passes) are numbered and cached separately. With a bare
  transformer (no scheduler to watch) the counter falls back to reading the ``timestep`` argument.
* a cache hook on every scheduled sub-module (``attn1``/``attn2``/``ff`` of a PixArt block, ...). On a
  recompute bit it runs the sub-module and stores its raw output; on a reuse bit it returns the stored
  output. The caller (the unchanged block ``forward``) then applies the *current* step's adaLN gate and
  residual to that output, exactly as it does to a freshly computed one. The schedule is held as nested
  Python lists, so a lookup is a list index, not a tensor index.
* step-invariant memo hooks (on by default) on projections whose input is the caption alone: PixArt's
  ``caption_projection`` and the cross-attention key/value projections ``attn2.to_k``/``attn2.to_v``,
  FLUX's ``context_embedder``. They return the output computed earlier for the very same input memory
  (unmodified since), so the result is bit-for-bit the recomputed one; in practice the caption's
  keys and values are computed once per generation instead of once per step.

With an all-recompute schedule every sub-module runs as usual, so the output is bit-for-bit the
output of the unhooked pipeline (with or without the memo hooks).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .schedule import Schedule, ScheduleError, block_layout, detect_architecture

__all__ = [
    "apply_schedule",
    "remove_schedule",
    "reset_schedule_state",
    "get_schedule_state",
    "ScheduleState",
    "apply_step_invariant_cache",
    "remove_step_invariant_cache",
    "step_invariant_modules",
]

STEP_HOOK = "diffalign_ecad_step_counter"
CACHE_HOOK = "diffalign_ecad_component_cache"
MEMO_HOOK = "diffalign_ecad_step_invariant"

# sub-modules whose only input is the (step-independent) caption, per architecture: transformer-level
# attribute paths, and paths inside each scheduled block component
_INVARIANT_TOP = {"pixart": ("caption_projection",), "flux": ("context_embedder",), "dit": ()}
_INVARIANT_IN_COMPONENT = {"pixart": {"attn2": ("to_k", "to_v")}, "flux": {}, "dit": {}}


@dataclass
class ScheduleState:
    """Run-time state shared by the step counter and the cache hooks of one transformer."""

    schedule: Schedule
    effective: torch.Tensor  # bool [steps, blocks, components]
    scheduler: Any = None
    pipe: Any = None
    step: int = -1
    call_in_step: int = 0
    step_done: bool = False  # the scheduler finished a step since the last transformer call
    last_timestep: float | None = None  # only used without a scheduler
    num_calls: int = 0
    computed: int = 0  # sub-module evaluations actually run (for inspection and tests)
    reused: int = 0
    hooks: list = field(default_factory=list)
    memo_hooks: list = field(default_factory=list)
    bits: list = field(default_factory=list)  # effective schedule as nested Python lists

    def __post_init__(self) -> None:
        self.bits = self.effective.tolist()

    def reset(self) -> None:
        self.step = -1
        self.call_in_step = 0
        self.step_done = False
        self.last_timestep = None
        self.num_calls = 0
        self.computed = 0
        self.reused = 0
        for h in self.hooks:
            h.cache.clear()
        for h in self.memo_hooks:
            h.entries.clear()


def _timestep_value(timestep) -> float | None:
    """Host value of the timestep argument (a synchronisation on accelerators: fallback path only)."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            return None
        return float(timestep.detach().flatten()[0].float().cpu())
    return float(timestep)


class StepCounterHook(ModelHook):
    """Advances the schedule step: from the scheduler's calls when there is one, else from ``timestep``."""

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

    def _too_many_steps(self) -> ScheduleError:
        st = self.state
        return ScheduleError(
            f"schedule {st.schedule.name!r} has {st.schedule.num_steps} steps but the transformer was "
            f"called for step {st.step + 1}; use a schedule with the pipeline's num_inference_steps "
            "(or call reset_schedule_state between generations)"
        )

    def pre_forward(self, module, *args, **kwargs):
        st = self.state
        if st.scheduler is not None:
            if st.pipe is not None and getattr(st.pipe, "scheduler", st.scheduler) is not st.scheduler:
                raise ScheduleError(
                    "pipe.scheduler was replaced after apply_schedule; call remove_schedule(pipe) and apply "
                    "the schedule again"
                )
            if st.step < 0:
                st.reset()
                st.step = 0
            elif st.step_done:
                st.step += 1
                st.call_in_step = 0
                st.step_done = False
                if st.step >= st.schedule.num_steps:
                    raise self._too_many_steps()
            else:
                st.call_in_step += 1
            st.num_calls += 1
            return args, kwargs
        # bare transformer: the timestep argument is the only signal (decreasing within a generation)
        t = _timestep_value(self._timestep(module, args, kwargs))
        new_run = st.step < 0 or t is None or st.last_timestep is None or t > st.last_timestep
        if new_run:
            st.reset()
            st.step = 0
        elif t == st.last_timestep:
            st.call_in_step += 1
        else:
            st.step += 1
            st.call_in_step = 0
            if st.step >= st.schedule.num_steps:
                raise self._too_many_steps()
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
        if not st.bits[st.step][self.block][self.slot]:
            cached = self.cache.get(key)
            if cached is not None and cached[1] == sig:
                st.reused += 1
                return cached[0]
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.cache[key] = (out, sig)
        st.computed += 1
        return out


class StepInvariantHook(ModelHook):
    """Return the stored output when called again on the very same, unmodified input memory.

    Only used on modules whose input is the caption alone (see :func:`step_invariant_modules`). A hit
    needs the same memory (data pointer, shape, strides, dtype, device; the stored entry keeps that
    memory alive, so no other tensor can take its place) and an unchanged version counter (shared by
    a tensor and its views, bumped by every in-place write), so a hit is exactly the output a
    recomputation would give. Active only without autograd and in eval mode; keeps the last
    ``max_entries`` inputs (one per distinct caption batch, e.g. separate conditional and
    unconditional passes).
    """

    max_entries = 4

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.entries: list[tuple[torch.Tensor, tuple, int, Any, int]] = []
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _layout(x: torch.Tensor) -> tuple:
        return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device)

    def new_forward(self, module, *args, **kwargs):
        x = args[0] if args else None
        if kwargs or len(args) != 1 or not isinstance(x, torch.Tensor) or module.training:
            return self.fn_ref.original_forward(*args, **kwargs)
        if torch.is_grad_enabled():
            return self.fn_ref.original_forward(*args, **kwargs)
        layout = self._layout(x)
        for _, lay, version, out, out_version in self.entries:
            if lay == layout and version == x._version and out._version == out_version:
                self.hits += 1
                return out
        out = self.fn_ref.original_forward(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            self.entries.append((x, layout, x._version, out, out._version))
            del self.entries[: -self.max_entries]
        self.misses += 1
        return out


def step_invariant_modules(transformer: torch.nn.Module, arch: str | None = None):
    """``[(path, module, block, slot)]`` of the caption-only projections; block/slot are ``None`` for
    modules outside the scheduled components (their FLOPs belong to the per-call overhead)."""
    arch = arch or detect_architecture(transformer)
    out = []
    for path in _INVARIANT_TOP.get(arch, ()):
        module = getattr(transformer, path, None)
        if isinstance(module, torch.nn.Module):
            out.append((path, module, None, None))
    inner = _INVARIANT_IN_COMPONENT.get(arch, {})
    for b, (group, index) in enumerate(block_layout(transformer, arch)):
        block = getattr(transformer, group.attr)[index]
        for slot, comp in enumerate(group.components):
            for name in inner.get(comp, ()):
                module = getattr(getattr(block, comp, None), name, None)
                if isinstance(module, torch.nn.Module):
                    out.append((f"{group.attr}.{index}.{comp}.{name}", module, b, slot))
    return out


def apply_step_invariant_cache(pipe_or_transformer) -> list[StepInvariantHook]:
    """Compute caption-only projections once per generation (bit-exact); works beside any other hook."""
    transformer, _ = _transformer_of(pipe_or_transformer)
    hooks = []
    for path, module, _, _ in step_invariant_modules(transformer):
        registry = HookRegistry.check_if_exists_or_initialize(module)
        if registry.get_hook(MEMO_HOOK) is not None:
            raise ScheduleError(f"step-invariant cache already applied on {path}")
        hook = StepInvariantHook(path)
        registry.register_hook(hook, MEMO_HOOK)
        hooks.append(hook)
    return hooks


def remove_step_invariant_cache(pipe_or_transformer) -> None:
    transformer, _ = _transformer_of(pipe_or_transformer)
    for _, module, _, _ in step_invariant_modules(transformer):
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(MEMO_HOOK) is not None:
            registry.remove_hook(MEMO_HOOK, recurse=False)


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


def _watch_scheduler(state: ScheduleState, scheduler) -> None:
    """Shadow ``scheduler.set_timesteps``/``step`` on the instance to drive the step counter on the host."""
    set_timesteps, step = scheduler.set_timesteps, scheduler.step

    @functools.wraps(set_timesteps)  # keeps the signature pipelines inspect (e.g. for custom sigmas)
    def watched_set_timesteps(*args, **kwargs):
        out = set_timesteps(*args, **kwargs)
        state.reset()
        steps = getattr(scheduler, "num_inference_steps", None)
        if isinstance(steps, int) and steps != state.schedule.num_steps:
            raise ScheduleError(
                f"schedule {state.schedule.name!r} has {state.schedule.num_steps} steps but the pipeline runs "
                f"num_inference_steps={steps}"
            )
        return out

    @functools.wraps(step)
    def watched_step(*args, **kwargs):
        state.step_done = True
        return step(*args, **kwargs)

    scheduler.set_timesteps = watched_set_timesteps
    scheduler.step = watched_step


def _unwatch_scheduler(scheduler) -> None:
    for name in ("set_timesteps", "step"):
        if name in vars(scheduler):
            delattr(scheduler, name)


def apply_schedule(pipe, schedule: Schedule, step_invariant: bool = True) -> ScheduleState:
    """Attach ``schedule`` to ``pipe.transformer`` (or to a transformer passed directly).

    ``step_invariant`` (default on) also computes the caption-only projections once per generation
    (bit-exact; see :func:`apply_step_invariant_cache`). Raises :class:`ScheduleError` if the schedule
    was built for another architecture or block count, or if a schedule is already applied (call
    :func:`remove_schedule` first). The step count is checked against the scheduler's
    ``num_inference_steps`` when a generation starts.
    """
    transformer, scheduler = _transformer_of(pipe)
    schedule.validate(transformer)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(STEP_HOOK) is not None:
        raise ScheduleError("a caching schedule is already applied; call remove_schedule(pipe) first")
    state = ScheduleState(
        schedule=schedule,
        effective=schedule.effective(),
        scheduler=scheduler,
        pipe=None if scheduler is None else pipe,
    )
    for b, (group, index) in enumerate(block_layout(transformer, schedule.architecture)):
        block = getattr(transformer, group.attr)[index]
        for slot, comp in enumerate(group.components):
            module = getattr(block, comp, None)
            if module is None:
                raise ScheduleError(f"{group.attr}.{index} has no sub-module {comp!r}")
            hook = ComponentCacheHook(state, b, slot, f"{group.attr}.{index}.{comp}")
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, CACHE_HOOK)
            state.hooks.append(hook)
    if step_invariant:
        state.memo_hooks = apply_step_invariant_cache(transformer)
    signature = inspect.signature(type(transformer).forward)
    registry.register_hook(StepCounterHook(state, signature), STEP_HOOK)
    if scheduler is not None:
        _watch_scheduler(state, scheduler)
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
        if state.memo_hooks:
            remove_step_invariant_cache(transformer)
        if state.scheduler is not None:
            _unwatch_scheduler(state.scheduler)
        state.reset()
        state.hooks.clear()
        state.memo_hooks = []
        del transformer._diffalign_ecad_state
