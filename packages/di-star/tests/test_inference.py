"""T8: the direct one-step generator call equals the standard pipeline with LCMScheduler."""

from __future__ import annotations

import pytest
import torch

from diffalign.core import testing
from diffalign.core.denoisers import denoiser_for, to_x0_eps
from diffalign.di_star.inference import sample_one_step, to_one_step_pipeline
from diffalign.di_star.train import generate_x0

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
    den = denoiser_for(pipe)
    noise = torch.randn(den.latent_shape(len(PROMPTS)), generator=torch.Generator().manual_seed(0))
    cond = den.encode(PROMPTS).cond
    with torch.no_grad():
        direct = generate_x0(den, pipe.unet, noise, cond, 399)
        direct_other_t = generate_x0(den, pipe.unet, noise, cond, 499)
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
    den = denoiser_for(pipe)
    assert den.prediction_type == "v_prediction"
    noise = torch.randn(den.latent_shape(2), generator=torch.Generator().manual_seed(1))
    cond = den.encode(PROMPTS).cond
    t = torch.full((2,), 399)
    with torch.no_grad():
        as_v = generate_x0(den, pipe.unet, noise, cond, 399)
        alpha, sigma = den.schedule.alpha_sigma(t, noise)
        as_eps = to_x0_eps(den.forward(None, noise, t, cond), noise, alpha, sigma, "epsilon")[0]
    assert (as_v - as_eps).abs().max() > 1e-2


def test_sample_rejects_bad_input():
    pipe = to_one_step_pipeline(_pipe("sd-eps"))
    with pytest.raises(ValueError, match="t_star"):
        sample_one_step(pipe, PROMPTS, 1000)
    with pytest.raises(ValueError, match="at least one prompt"):
        sample_one_step(pipe, [], 399)
    with pytest.raises(ValueError, match="LCMScheduler"):
        sample_one_step(_pipe("sd-eps"), PROMPTS, 399)
