import pytest
import torch

from diffalign.core.denoisers import NoiseSchedule
from diffalign.core.testing import tiny_sd_pipeline
from diffalign.mlcm.distill import student_sample
from diffalign.mlcm.scheduler import MLCMScheduler


def test_set_timesteps_official_grid_and_validation():
    s = MLCMScheduler()
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [999, 749, 499, 124]
    s.set_timesteps(timesteps=[499, 999])
    assert s.timesteps.tolist() == [999, 499]
    with pytest.raises(ValueError, match="not milestones"):
        s.set_timesteps(timesteps=[998])
    with pytest.raises(ValueError):
        MLCMScheduler(sampler="euler")


@pytest.mark.parametrize("sampler", ["deterministic", "renoise"])
def test_scheduler_steps_match_reference_sampler(sampler):
    torch.manual_seed(0)
    sched = MLCMScheduler(sampler=sampler, prediction_type="v_prediction")
    ns = NoiseSchedule.from_scheduler(sched)
    weight = torch.randn(4, 4) * 0.3

    def model(z, t):
        return torch.einsum("ij,bjhw->bihw", weight, z) * (1 + t.float().reshape(-1, 1, 1, 1) / 1000)

    noise = torch.randn(2, 4, 3, 3)
    ref = student_sample(
        model, noise, [999, 749, 499, 124], ns, "v_prediction", sampler, torch.Generator().manual_seed(5)
    )
    sched.set_timesteps(4)
    z, gen = noise, torch.Generator().manual_seed(5)
    for t in sched.timesteps:
        z = sched.step(model(z, t.expand(2)), t, z, generator=gen).prev_sample
    torch.testing.assert_close(z, ref, atol=1e-5, rtol=1e-5)


def test_save_load_and_from_config_keep_teacher_schedule(tmp_path):
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(
        beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", rescale_betas_zero_snr=True
    )
    s = MLCMScheduler.from_config(ddim.config, sampler="deterministic")
    assert s.config.prediction_type == "v_prediction"
    torch.testing.assert_close(s.alphas_cumprod, ddim.alphas_cumprod)
    s.save_pretrained(tmp_path)
    loaded = MLCMScheduler.from_pretrained(tmp_path)
    assert loaded.config.sampler == "deterministic" and loaded.config.num_segments == 8
    torch.testing.assert_close(loaded.alphas_cumprod, ddim.alphas_cumprod)


def test_pipeline_swap_calls_model_at_milestones():
    pipe = tiny_sd_pipeline()
    pipe.scheduler = MLCMScheduler.from_config(pipe.scheduler.config)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(int(args[1].flatten()[0])))
    out = pipe(
        ["a red circle"],
        num_inference_steps=2,
        guidance_scale=0.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        height=16,
        width=16,
    ).images
    hook.remove()
    assert seen == [999, 499]
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()


def test_lcm_scheduler_at_guidance_zero_runs():
    from diffusers import LCMScheduler

    pipe = tiny_sd_pipeline()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(int(args[1].flatten()[0])))
    out = pipe(
        ["a red circle"],
        num_inference_steps=4,
        guidance_scale=0.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        height=16,
        width=16,
    ).images
    hook.remove()
    assert seen == [999, 759, 499, 259]
    assert torch.isfinite(out).all()
