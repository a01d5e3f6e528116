"""The trainer's guided teacher against a reference built from the bare base UNet."""

import pytest
import torch

from diffalign.core.testing import tiny_sd_pipeline
from diffalign.mlcm.train import Distiller

from .helpers import tiny_recipe

PROMPTS = ["a red circle", "two blue squares"]
NEGATIVE = "a green triangle"


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_guided_teacher_is_eps_u_plus_w_times_difference(tmp_path, mode):
    w = 4.0
    cfg = tiny_recipe(
        tmp_path / "run",
        student={"mode": mode},
        data={"negative_prompt": NEGATIVE},
        distill={"guidance_scale": w},
    )
    distiller = Distiller(cfg, tiny_sd_pipeline(prediction_type="v_prediction"))
    with torch.no_grad():  # move the student away from the teacher: the teacher must not see this
        for name, p in distiller.model.named_parameters():
            if p.requires_grad and ("lora_B" in name or mode == "full"):
                p.add_(0.05 * torch.randn_like(p))
    cond = distiller.den.encode(PROMPTS, NEGATIVE)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([899, 301])
    with torch.no_grad():
        guided = distiller.teacher_fn(cond)(z, t)

    base = tiny_sd_pipeline(prediction_type="v_prediction")
    pe, npe = base.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=[NEGATIVE] * 2)
    with torch.no_grad():
        out_c = base.unet(z, t, encoder_hidden_states=pe).sample
        out_u = base.unet(z, t, encoder_hidden_states=npe).sample
    assert (out_c - out_u).abs().mean() > 1e-3 * out_u.abs().mean()  # the branches really differ
    reference = out_u + w * (out_c - out_u)
    torch.testing.assert_close(guided, reference, atol=1e-5, rtol=1e-4)
    swapped = out_c + w * (out_u - out_c)
    assert not torch.allclose(guided, swapped, atol=1e-5, rtol=1e-4)
