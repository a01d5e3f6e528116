"""T8: the direct one-step generator call equals the standard pipeline with LCMScheduler."""

from __future__ import annotations

import pytest
import torch

from diffalign.core import testing
from diffalign.di_star import modeling as M
from diffalign.di_star.inference import sample_one_step, to_one_step_pipeline

PROMPTS = ["a red circle", "two blue squares"]


def _pipe(kind):
    if kind == "sd-eps":
        return testing.tiny_sd_pipeline(seed=0)
    if kind == "sd-v":
        return testing.tiny_sd_pipeline(seed=0, prediction_type="v_prediction")
    return testing.tiny_sdxl_pipeline(seed=0)


@pytest.mark.parametrize("kind", ["sd-eps", "sd-v", "sdxl"])
def test_t8_direct_one_step_equals_lcm_pipeline(kind):
    pipe = _pipe(kind)
    schedule = M.NoiseSchedule(pipe.scheduler)
    shape = M.latent_shape(pipe)
    noise = torch.randn(len(PROMPTS), *shape, generator=torch.Generator().manual_seed(0))
    cond, _ = M.encode_prompts(pipe, PROMPTS)
    with torch.no_grad():
        direct = M.generate_x0(pipe.unet, noise, cond, schedule, 399)
        direct_other_t = M.generate_x0(pipe.unet, noise, cond, schedule, 499)
    to_one_step_pipeline(pipe)
    via_pipe = sample_one_step(pipe, PROMPTS, 399, latents=noise.clone(), output_type="latent")
    assert via_pipe.shape == direct.shape
    torch.testing.assert_close(via_pipe, direct, atol=1e-4, rtol=1e-4)
    # negative control: the wrong timestep does not match
    assert (via_pipe - direct_other_t).abs().max() > 1e-3
    # decoded images come back in [0, 1]
    images = sample_one_step(pipe, PROMPTS, 399, latents=noise.clone(), output_type="pt")
    assert images.shape[:2] == (2, 3) and images.min() >= 0 and images.max() <= 1


def test_v_prediction_handled_as_v():
    """With a v-prediction teacher, treating the output as epsilon would give a different x0."""
    pipe = _pipe("sd-v")
    schedule = M.NoiseSchedule(pipe.scheduler)
    assert schedule.prediction_type == "v_prediction"
    noise = torch.randn(2, *M.latent_shape(pipe), generator=torch.Generator().manual_seed(1))
    cond, _ = M.encode_prompts(pipe, PROMPTS)
    with torch.no_grad():
        as_v = M.generate_x0(pipe.unet, noise, cond, schedule, 399)
        as_eps = M.generate_x0(pipe.unet, noise, cond, schedule, 399, prediction_type="epsilon")
    assert (as_v - as_eps).abs().max() > 1e-2


def test_sample_rejects_bad_input():
    pipe = to_one_step_pipeline(_pipe("sd-eps"))
    with pytest.raises(ValueError, match="t_star"):
        sample_one_step(pipe, PROMPTS, 1000)
    with pytest.raises(ValueError, match="at least one prompt"):
        sample_one_step(pipe, [], 399)
    with pytest.raises(ValueError, match="LCMScheduler"):
        sample_one_step(_pipe("sd-eps"), PROMPTS, 399)
