"""Expert training on every family core's denoisers cover, including the two cases the old private
wrapper got wrong: PixArt-alpha 1024 size conditioning and SDXL told apart by class name."""

from __future__ import annotations

import pytest
import torch

from diffalign.core import testing
from diffalign.selma.train import denoise, expert_denoiser

PROMPTS = ["a red circle", "two blue squares"]


def test_pixart_alpha_1024_gets_its_size_conditioning():
    """The old trainer always passed resolution=None, which a size-conditioned PixArt cannot take."""
    pipe = testing.tiny_pixart_sized_pipeline()
    den = expert_denoiser(pipe, 16)
    z = torch.randn(den.latent_shape(2), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        out = denoise(den, pipe.transformer, z, t, PROMPTS)
        emb, mask, _, _ = pipe.encode_prompt(
            PROMPTS, do_classifier_free_guidance=False, max_sequence_length=den.max_sequence_length
        )
        size = {"resolution": torch.tensor([[16.0, 16.0]] * 2), "aspect_ratio": torch.ones(2, 1)}
        reference = pipe.transformer(
            z, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t, added_cond_kwargs=size
        ).sample[:, :4]
        torch.testing.assert_close(out, reference)
        # negative control: the old call (no size conditioning) fails on this model
        with pytest.raises(AttributeError):
            pipe.transformer(
                z,
                encoder_hidden_states=emb,
                encoder_attention_mask=mask,
                timestep=t,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            )


def test_sdxl_is_recognised_whatever_the_pipeline_class_is_called():
    """The old trainer looked for "XL" in the class name; a renamed SDXL pipeline was treated as SD."""
    from diffusers import StableDiffusionXLPipeline

    class TurboPipeline(StableDiffusionXLPipeline):
        pass

    pipe = TurboPipeline(**testing.tiny_sdxl_pipeline().components)
    den = expert_denoiser(pipe)
    assert den.family == "sdxl"
    z = torch.randn(den.latent_shape(2), generator=torch.Generator().manual_seed(0))
    crops = torch.tensor([[20, 24, 2, 4], [16, 16, 0, 0]])
    with torch.no_grad():
        out = denoise(den, pipe.unet, z, torch.tensor([10, 700]), PROMPTS, crops)
        emb, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
        time_ids = torch.tensor([[20.0, 24, 2, 4, 16, 16], [16, 16, 0, 0, 16, 16]])
        reference = pipe.unet(
            z,
            torch.tensor([10, 700]),
            encoder_hidden_states=emb,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
        torch.testing.assert_close(out, reference)
        # negative control: the crop conditioning reaches the network
        plain = denoise(den, pipe.unet, z, torch.tensor([10, 700]), PROMPTS)
        assert (plain[0] - out[0]).abs().max() > 1e-5
        torch.testing.assert_close(plain[1], out[1])


def test_unsupported_family_is_refused():
    with pytest.raises(ValueError, match="SELMA expert training supports"):
        expert_denoiser(testing.tiny_flux_pipeline())
