"""Architecture coverage: one training step and one sampling pass per architecture class the recipes name."""

import pytest
import torch

from diffalign.core.testing import tiny_pixart_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline
from diffalign.mlcm.inference import apply_student, sample_images
from diffalign.mlcm.train import train

from .helpers import tiny_recipe


def _with_prediction(factory, prediction_type):
    def make():
        from diffusers import DDIMScheduler

        pipe = factory()
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
        return pipe

    return make


CASES = {
    "sd15-v": _with_prediction(tiny_sd_pipeline, "v_prediction"),
    "sdxl-eps": _with_prediction(tiny_sdxl_pipeline, "epsilon"),
    "pixart-eps": tiny_pixart_pipeline,
    "pixart-sample": _with_prediction(tiny_pixart_pipeline, "sample"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_step_and_sampling(case, tmp_path):
    make = CASES[case]
    cfg = tiny_recipe(tmp_path / case, stage1={"iterations": 1}, stage2={"iterations": 1})
    pipe = make()
    result = train(cfg, pipe=pipe)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.losses)
    fresh = apply_student(make(), result.student_dir, sampler="deterministic")
    images = sample_images(fresh, ["a red circle", "two blue squares"], 2, resolution=16)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    # the student differs from the teacher after loading (the adapter / weights were applied)
    model = getattr(fresh, "unet", None) or fresh.transformer
    assert any("lora_" in n for n, _ in model.named_parameters())
