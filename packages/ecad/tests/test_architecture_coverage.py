"""One search generation and one cached sampling pass on each architecture class the recipes name."""

import numpy as np
import pytest
import torch
from ecad_test_support import make_reward, tiny_recipe

from diffalign.ecad.hooks import apply_schedule, remove_schedule
from diffalign.ecad.sampling import generate
from diffalign.ecad.schedule import fora, no_cache
from diffalign.ecad.search import run_search

CASES = {
    "pixart_pipe": (["a red circle", "two blue squares"], 4.5),
    "dit_pipe": (["1", "2"], 1.0),
    "flux_pipe": (["a red circle", "two blue squares"], 3.5),
}


@pytest.mark.parametrize("which", list(CASES))
def test_search_step_and_cached_sampling(request, tmp_path, which):
    pipe = request.getfixturevalue(which)
    prompts, guidance = CASES[which]
    cfg = tiny_recipe(tmp_path, population_size=3, generations=1)
    cfg.sampling.num_inference_steps = 2
    cfg.sampling.guidance_scale = guidance
    cfg.calibration.prompts = prompts
    if which == "dit_pipe":  # class-conditional: validation "prompts" are class labels too
        cfg.validation.prompts = ["3", "4"]
    result = run_search(cfg, pipe=pipe, reward=make_reward(), show_progress=False)
    # the population grows beyond population_size to hold every heuristic seed
    assert len(result.X) > 3 and np.isfinite(result.F).all()
    assert (
        result.template.architecture
        == {"pixart_pipe": "pixart", "dit_pipe": "dit", "flux_pipe": "flux"}[which]
    )

    ref = generate(pipe, prompts, [0, 1], 2, guidance, 16, 16)
    state = apply_schedule(pipe, no_cache(pipe.transformer, 2))
    try:
        assert torch.equal(generate(pipe, prompts, [0, 1], 2, guidance, 16, 16), ref)
    finally:
        remove_schedule(pipe)
    state = apply_schedule(pipe, fora(pipe.transformer, 2, 2))
    try:
        cached = generate(pipe, prompts, [0, 1], 2, guidance, 16, 16)
        assert state.reused > 0
    finally:
        remove_schedule(pipe)
    assert cached.shape == ref.shape and torch.isfinite(cached).all() and not torch.equal(cached, ref)
