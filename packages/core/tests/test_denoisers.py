"""core.denoisers: prediction types, schedules, and each family's wrapper against its own pipeline."""

from __future__ import annotations

import pytest
import torch

from diffalign.core import testing
from diffalign.core.denoisers import (
    DENOISERS,
    FlowSchedule,
    NoiseSchedule,
    PromptConditioning,
    denoiser_for,
    prediction_target,
    to_x0_eps,
)
from diffalign.core.models import ARCHITECTURES, detect_family

PROMPTS = ["a red circle", "two blue squares"]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "flow"])
def test_prediction_type_round_trip_is_exact(prediction_type):
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([10, 500, 990])
    schedule = FlowSchedule() if prediction_type == "flow" else NoiseSchedule.scaled_linear()
    a, s = schedule.alpha_sigma(t, x0)
    z = a * x0 + s * eps
    # analytic outputs of a perfect network of each type
    out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0, "flow": eps - x0}[prediction_type]
    torch.testing.assert_close(prediction_target(x0, eps, a, s, prediction_type), out)
    x0_hat, eps_hat = to_x0_eps(out, z, a, s, prediction_type)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, eps, atol=1e-4, rtol=1e-4)
    # negative control: reading the output as another type does not recover x0
    wrong = {
        "epsilon": "v_prediction",
        "v_prediction": "epsilon",
        "sample": "epsilon",
        "flow": "v_prediction",
    }
    assert (to_x0_eps(out, z, a, s, wrong[prediction_type])[0] - x0).abs().max() > 0.1


def test_unknown_prediction_type_is_refused():
    z = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="prediction_type"):
        to_x0_eps(z, z, z + 1, z + 1, "score")
    with pytest.raises(ValueError, match="prediction_type"):
        prediction_target(z, z, z + 1, z + 1, "score")


def test_schedule_matches_diffusers_and_checks_bounds():
    from diffusers import DDIMScheduler, DDPMScheduler

    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    schedule = NoiseSchedule.from_scheduler(ddim)
    reference = NoiseSchedule.scaled_linear().alphas_cumprod  # diffusers computes in float32
    torch.testing.assert_close(schedule.alphas_cumprod, reference, atol=1e-6, rtol=1e-5)
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), ddpm.add_noise(x0, noise, t))
    alpha, sigma = schedule.alpha_sigma(t, x0)
    torch.testing.assert_close(
        prediction_target(x0, noise, alpha, sigma, "v_prediction"), ddpm.get_velocity(x0, noise, t)
    )
    flat_alpha, flat_sigma = schedule.alpha_sigma(t)
    assert flat_alpha.shape == (4,) and flat_alpha.dtype == torch.float32
    torch.testing.assert_close(flat_alpha**2 + flat_sigma**2, torch.ones(4))
    with pytest.raises(ValueError, match="timesteps"):
        schedule.alpha_sigma(torch.tensor([1000]))
    with pytest.raises(ValueError, match="alphas_cumprod"):
        NoiseSchedule.from_scheduler(object())
    draws = schedule.sample_timesteps(1000, 100, 200, generator=torch.Generator().manual_seed(0))
    assert int(draws.min()) == 100 and int(draws.max()) == 200
    flow_alpha, flow_sigma = FlowSchedule(1000).alpha_sigma(torch.tensor([0, 250, 1000]))
    torch.testing.assert_close(flow_sigma, torch.tensor([0.0, 0.25, 1.0]))
    torch.testing.assert_close(flow_alpha + flow_sigma, torch.ones(3))


def _with_scheduler(factory, **overrides):
    from diffusers import DDIMScheduler

    pipe = factory()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **overrides)
    return pipe


CASES = {
    "sd-eps": (testing.tiny_sd_pipeline, "sd"),
    "sd-v": (lambda: _with_scheduler(testing.tiny_sd_pipeline, prediction_type="v_prediction"), "sd"),
    "sdxl": (lambda: _with_scheduler(testing.tiny_sdxl_pipeline), "sdxl"),
    "pixart": (testing.tiny_pixart_pipeline, "pixart"),
    "pixart-sized": (testing.tiny_pixart_sized_pipeline, "pixart"),
    "flux": (testing.tiny_flux_pipeline, "flux"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_family_is_read_from_the_config(case):
    factory, family = CASES[case]
    pipe = factory()
    assert detect_family(pipe) == family
    assert detect_family(getattr(pipe, "unet", None) or pipe.transformer) == family
    assert type(denoiser_for(pipe)) is DENOISERS[family]


def test_detection_ignores_class_names():
    """A renamed SDXL pipeline class (no "XL" in its name) is still SDXL; an unknown network is refused."""
    from diffusers import StableDiffusionXLPipeline

    class TurboPipeline(StableDiffusionXLPipeline):
        pass

    pipe = testing.tiny_sdxl_pipeline()
    renamed = TurboPipeline(**pipe.components)
    assert detect_family(renamed) == "sdxl"
    with pytest.raises(ValueError, match="not a supported"):
        detect_family(testing.tiny_dit_transformer())
    assert all(spec.family in DENOISERS for spec in ARCHITECTURES.values() if spec.kind == "t2i")


def _one_step_pipeline_x0(pipe, z, t, guidance, **extra):
    """x0 from the pipeline's own loop: LCMScheduler, one step at t, returns (almost exactly) the
    guided prediction's x0 (its boundary scaling c_skip is ~1e-8 at t = 399)."""
    from diffusers import LCMScheduler

    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return pipe(
        prompt=PROMPTS,
        timesteps=[t],
        guidance_scale=guidance,
        latents=z.clone(),
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **extra,
    ).images


@pytest.mark.parametrize("case", ["sd-eps", "sd-v", "sdxl", "pixart", "pixart-sized"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_guided_x0_equals_the_pipeline_step(case, guidance):
    factory, _ = CASES[case]
    pipe = factory()
    den = denoiser_for(pipe, resolution=16)
    z = torch.randn(den.latent_shape(2), generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 399)
    cond = den.encode(PROMPTS)
    with torch.no_grad():
        out = den.guided_fn(None, cond, guidance)(z, t)
        alpha, sigma = den.schedule.alpha_sigma(t, z)
        x0 = to_x0_eps(out, z, alpha, sigma, den.prediction_type)[0]
        extra = {"height": 16, "width": 16}
        if case.startswith("pixart"):
            extra.update(use_resolution_binning=False, max_sequence_length=den.max_sequence_length)
        reference = _one_step_pipeline_x0(pipe, z, 399, guidance, **extra)
    torch.testing.assert_close(x0, reference, atol=1e-4, rtol=1e-4)
    if guidance != 1.0:  # negative control: swapped guidance branches do not match the pipeline
        swapped = den.guided_fn(None, PromptConditioning(cond.uncond, cond.cond), guidance)(z, t)
        x0_swapped = to_x0_eps(swapped, z, alpha, sigma, den.prediction_type)[0]
        assert (x0_swapped - reference).abs().max() > 1e-3


def test_pixart_size_conditioning_is_passed_only_where_used():
    sized = denoiser_for(testing.tiny_pixart_sized_pipeline(), resolution=16)
    plain = denoiser_for(testing.tiny_pixart_pipeline(), resolution=16)
    z = torch.zeros(plain.latent_shape(2))
    assert plain.added_cond_kwargs(z) == {"resolution": None, "aspect_ratio": None}
    added = sized.added_cond_kwargs(z)
    assert (
        added["resolution"].tolist() == [[16.0, 16.0]] * 2 and added["aspect_ratio"].tolist() == [[1.0]] * 2
    )
    # the old behaviour (always None) breaks a size-conditioned model
    cond = sized.encode(PROMPTS, guidance=False).cond
    with pytest.raises((AttributeError, TypeError, ValueError)):
        sized.model(
            z,
            timestep=torch.tensor([10, 10]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            **cond,
        )


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_flux_flow_prediction_equals_the_pipeline_euler_step(guidance_embeds):
    """FLUX: one Euler step from sigma = 1 to 0 is z - v = x0; packing, ids, timestep scaling and (for
    guidance-distilled models, FLUX.1-dev) the guidance embedding agree with the pipeline."""
    pipe = testing.tiny_flux_pipeline()
    if guidance_embeds:
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
        config["guidance_embeds"] = True
        pipe.transformer = FluxTransformer2DModel.from_config(config).eval()
    den = denoiser_for(pipe, resolution=16)
    assert den.prediction_type == "flow" and den.latent_channels == 4
    assert den.guidance_embedded == guidance_embeds
    z = torch.randn(den.latent_shape(2), generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), den.schedule.num_train_timesteps)
    cond = den.encode(PROMPTS)
    with torch.no_grad():
        if guidance_embeds:
            alpha, sigma = den.schedule.alpha_sigma(t, z)
            x0 = to_x0_eps(den.guided_fn(None, cond, 3.5)(z, t), z, alpha, sigma, "flow")[0]
            other = to_x0_eps(den.guided_fn(None, cond, 1.0)(z, t), z, alpha, sigma, "flow")[0]
        else:
            x0 = den.predict_x0_eps(None, z, t, cond.cond)[0]
        b, c, h, w = z.shape
        packed = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        reference = pipe(
            prompt=PROMPTS,
            latents=packed,
            num_inference_steps=1,
            height=16,
            width=16,
            output_type="latent",
            max_sequence_length=den.max_sequence_length,
            guidance_scale=3.5,
        ).images
    ours = x0.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    if guidance_embeds:  # negative control: the guidance scale reaches the network
        assert (other - x0).abs().max() > 1e-4
    # negative control: the timestep unscaled (t instead of t/T) gives another output
    wrong = den.model(
        hidden_states=packed,
        timestep=t.float(),
        guidance=torch.full((2,), 3.5) if guidance_embeds else None,
        img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, z.device, z.dtype),
        return_dict=False,
        **cond.cond,
    )[0]
    assert (packed - wrong - reference).abs().max() > 1e-3


def test_latents_vae_scaling_round_trip_and_resolution_checks():
    pipe = testing.tiny_flux_pipeline()  # a VAE with shift and scale factors
    den = denoiser_for(pipe, resolution=16)
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    latents = den.encode_images(pixels, torch.Generator().manual_seed(0))
    vae = pipe.vae
    raw = vae.encode(pixels).latent_dist
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    assert (latents / scale + shift - raw.mean).abs().max() <= 6 * float(raw.std.max())
    torch.testing.assert_close(
        den.decode(latents, clamp=False), vae.decode(latents / scale + shift, return_dict=False)[0]
    )
    with pytest.raises(ValueError, match="multiple of the VAE factor"):
        denoiser_for(testing.tiny_sd_pipeline(), resolution=15)
    assert denoiser_for(testing.tiny_sd_pipeline()).latent_shape(3) == (3, 4, 8, 8)


def test_wrapper_refuses_another_family():
    from diffalign.core.denoisers import SDDenoiser

    with pytest.raises(ValueError, match="wraps sd pipelines"):
        SDDenoiser(testing.tiny_pixart_pipeline())
