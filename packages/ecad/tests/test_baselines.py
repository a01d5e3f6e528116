import pytest
import torch

from diffalign.ecad.baselines import BUILTIN_CACHES, BuiltinCache, count_builtin_hooks, record_schedule
from diffalign.ecad.cost import measure_cost_model
from diffalign.ecad.hooks import apply_schedule, remove_schedule
from diffalign.ecad.sampling import generate, pipeline_call_kwargs

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow square"]
STEPS = 6


def _gen(pipe, prompts, seeds, steps=STEPS):
    return generate(pipe, prompts, seeds, steps, 4.5, 16, 16)


@pytest.fixture
def fresh(pixart_pipe):
    import copy

    original = pixart_pipe.transformer
    pixart_pipe.transformer = copy.deepcopy(original)
    yield pixart_pipe
    pixart_pipe.transformer = original


@pytest.mark.parametrize("name", BUILTIN_CACHES)
def test_every_builtin_hooks_the_model(fresh, name):
    cache = BuiltinCache(name, fresh.transformer).apply()
    assert count_builtin_hooks(fresh.transformer) > 0
    cache.remove()
    assert count_builtin_hooks(fresh.transformer) == 0


def test_builtin_state_is_reset_between_generations(fresh):
    """Batch B after batch A gives the images of batch B alone (PixArt has no CacheMixin to do it)."""
    cache = BuiltinCache("pyramid_attention_broadcast@3", fresh.transformer).apply()

    def run(prompts, seeds, reset=True):  # 5 steps: PAB's counter ends out of phase with its period 3
        if reset:
            with cache.context():
                return _gen(fresh, prompts, seeds, 5)
        from diffusers.models.cache_utils import CacheMixin

        with CacheMixin.cache_context(fresh.transformer, "cond"):
            return _gen(fresh, prompts, seeds, 5)

    alone = run(PROMPTS[2:], [5, 6])
    run(PROMPTS[:2], [0, 1])
    assert torch.equal(run(PROMPTS[2:], [5, 6]), alone)
    # negative control: without the reset the state of the previous generation leaks into this one
    cache.reset()
    run(PROMPTS[:2], [0, 1], reset=False)
    assert not torch.equal(run(PROMPTS[2:], [5, 6], reset=False), alone)


def test_recorded_pab_schedule_replays_its_decisions(fresh):
    """PAB@2 skips attention (never feed-forward) on every other step; the recording says exactly that,
    and replaying it through the ECAD hooks reuses as many evaluations as PAB skipped."""
    cache = BuiltinCache("pyramid_attention_broadcast@2", fresh.transformer).apply()

    def run():
        with cache.context():
            _gen(fresh, PROMPTS[:2], [0, 1])

    sched = record_schedule(fresh, run, STEPS, "rec")
    assert sched.recompute[:, :, 2].all()  # ff always ran
    assert not sched.recompute[1:, :, :2].all()  # some attention was skipped
    assert sched.recompute[0].all()
    cache.remove()
    state = apply_schedule(fresh, sched)
    try:
        _gen(fresh, PROMPTS[:2], [0, 1])
        assert state.reused == sched.num_cached() > 0
    finally:
        remove_schedule(fresh)
    cm = measure_cost_model(fresh, pipeline_call_kwargs(fresh, PROMPTS[:2], [0, 1], STEPS, 4.5, 16, 16))
    assert cm.with_step_invariant(False).flop_ratio(sched) < 1
