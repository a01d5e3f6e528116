"""Issue 20, item 2: the self-generation CFG, the teacher's loss weighting and caption dropout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diffalign.core.config import load_config
from diffalign.core.shapes import teachers
from diffalign.selma import stages
from diffalign.selma.config import SelmaConfig, TrainConfig
from diffalign.selma.losses import diffusion_loss, drop_captions, loss_weights

RECIPES = Path(__file__).parents[1] / "recipes"
SHAPES_RECIPES = ["shapes_unet.yaml", "shapes_dit.yaml", "shapes_unet_web.yaml"]


@pytest.mark.parametrize("name", SHAPES_RECIPES)
def test_shapes_recipes_turn_the_measured_settings_on(name):
    cfg = load_config(SelmaConfig, RECIPES / name)
    assert cfg.images.guidance_scale == 2.0
    assert cfg.train.loss_weighting == "teacher"
    assert cfg.train.caption_dropout == 0.1
    # the paper's defaults stay the package's defaults
    assert TrainConfig().loss_weighting == "none" and TrainConfig().caption_dropout == 0.0


def test_web_caption_recipe_names_the_web_base():
    assert load_config(SelmaConfig, RECIPES / "shapes_unet_web.yaml").model == "shapes/unet-web"


def test_configured_cfg_reaches_the_pipeline_call(tmp_path, monkeypatch):
    from diffalign.core.testing import tiny_sd_pipeline

    cfg = load_config(
        SelmaConfig,
        RECIPES / "shapes_unet.yaml",
        [
            f"run_dir={tmp_path}",
            "images.num_inference_steps=2",
            "images.images_per_prompt=1",
            "images.batch_size=2",
        ],
    )
    cfg = cfg.model_copy(update={"skills": cfg.skills[:1]})
    prompts = cfg.path("prompts", f"{cfg.skills[0].name}.jsonl")
    prompts.parent.mkdir(parents=True)
    recs = [{"skill": cfg.skills[0].name, "text": t} for t in ("a red circle", "a blue square")]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in recs))
    pipe = tiny_sd_pipeline()
    seen = []
    original = type(pipe).__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("guidance_scale"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    stages.stage_images(cfg, pipe=pipe, log=lambda *_: None)
    assert seen and all(g == 2.0 for g in seen)


# ---------------------------------------------------------------------------------- caption dropout

N = 20_000


def _rate_consistent(k: int, n: int, p: float, z: float = 5.0) -> bool:
    return abs(k - n * p) <= z * math.sqrt(n * p * (1 - p))


def test_caption_dropout_replaces_the_stated_fraction_by_the_empty_prompt():
    prompts = [f"prompt {i}" for i in range(N)]
    out = drop_captions(prompts, 0.1, torch.Generator().manual_seed(3))
    k = sum(o == "" for o in out)
    assert _rate_consistent(k, N, 0.1)
    assert all(o in ("", p) for o, p in zip(out, prompts))  # kept prompts are unchanged
    assert drop_captions(prompts[:50], 0.0, torch.Generator()) == prompts[:50]
    # negative controls: the same check rejects dropout at a wrong rate
    for wrong in (0.05, 0.15):
        k_wrong = sum(o == "" for o in drop_captions(prompts, wrong, torch.Generator().manual_seed(3)))
        assert not _rate_consistent(k_wrong, N, 0.1)


def test_training_applies_caption_dropout_and_the_teachers_weighting(tmp_path, monkeypatch):
    """The trainer feeds the denoiser the dropped captions and the loss the teacher's weights."""
    from diffalign.core.testing import tiny_sd_pipeline
    from diffalign.selma import images as I
    from diffalign.selma import train as T

    recs = [{"skill": "count", "text": t} for t in ("two blue squares", "one red circle")]
    I.generate_images(
        tiny_sd_pipeline(),
        recs,
        tmp_path / "imgs",
        seed=1,
        batch_size=2,
        call_kwargs={"num_inference_steps": 1},
        process_index=0,
        num_processes=1,
    )
    records = I.read_imagefolder(tmp_path / "imgs")
    seen: list[str] = []
    original = T.denoise

    def spy(den, model, latents, timesteps, prompts, crops=None):
        seen.extend(prompts)
        return original(den, model, latents, timesteps, prompts, crops)

    weights_seen = []
    original_loss = T.diffusion_loss

    def loss_spy(pred, target, weights=None):
        weights_seen.append(weights)
        return original_loss(pred, target, weights)

    monkeypatch.setattr(T, "denoise", spy)
    monkeypatch.setattr(T, "diffusion_loss", loss_spy)
    pipe = tiny_sd_pipeline()
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="v_prediction")
    tcfg = TrainConfig(
        rank=2,
        alpha=2,
        steps=8,
        checkpoint_every=8,
        batch_size=4,
        caption_dropout=0.5,
        loss_weighting="teacher",
    )
    T.train_lora(pipe, records, tmp_path / "lora", tcfg, seed=0, log=lambda *_: None)
    empty = sum(p == "" for p in seen)
    assert len(seen) == 32 and _rate_consistent(empty, 32, 0.5, z=4.0) and empty > 0
    assert len(weights_seen) == 8 and all(w is not None and w.shape == (4,) for w in weights_seen)
    assert all(bool(((w > 0) & (w <= 1)).all()) for w in weights_seen)


# ---------------------------------------------------------------------------------- loss weighting


def test_loss_weights_equal_the_teachers_on_known_timesteps():
    alphas = teachers.make_scheduler().alphas_cumprod
    t = torch.tensor([0, 1, 100, 400, 700, 999])
    w = loss_weights(alphas, t, "teacher")
    a = alphas.double()[t]
    snr = a / (1 - a).clamp(min=1e-12)
    expected = torch.clamp(snr, 1.0, 5.0) / (snr + 1)  # the teacher's min(max(SNR, 1), 5) / (SNR + 1)
    torch.testing.assert_close(w.double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w, teachers.snr_weight(a).float())
    assert float(w[-1]) == pytest.approx(1.0)  # zero-terminal-SNR step keeps weight 1
    assert loss_weights(alphas, t, "none") is None
    # negative control: weighting by alpha (not alpha_bar) is not the teacher's
    wrong = teachers.snr_weight(a.sqrt())
    assert not torch.allclose(w.double(), wrong, rtol=1e-3)


def test_weighted_loss_equals_the_teachers_loss():
    """Same draws, same model: SELMA's weighted loss reproduces core's teacher loss exactly."""
    alphas = teachers.make_scheduler().alphas_cumprod.float()
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    proj = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))

    def model(x, t):
        return torch.einsum("bchw,cd->bdhw", x, proj) * (1 + t.view(-1, 1, 1, 1) / 1000)

    ref = teachers.diffusion_loss(model, x0, alphas, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    t = torch.randint(0, alphas.shape[0], (6,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    a = alphas[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * x0
    ours = diffusion_loss(model(x_t, t), target, loss_weights(alphas, t, "teacher"))
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-7)
    # negative control: the unweighted MSE is a different loss
    assert not torch.allclose(diffusion_loss(model(x_t, t), target), ref.float(), rtol=1e-3)


def test_teacher_weighting_refuses_an_epsilon_model(tmp_path):
    from diffalign.core.testing import tiny_sd_pipeline
    from diffalign.selma.train import train_lora

    pipe = tiny_sd_pipeline()
    if pipe.scheduler.config.prediction_type != "epsilon":
        pytest.skip("the tiny pipeline is not an epsilon model")
    recs = [{"path": str(tmp_path / "x.png"), "text": "a"}]
    tcfg = TrainConfig(rank=2, alpha=2, steps=1, loss_weighting="teacher")
    with pytest.raises(ValueError, match="v-prediction"):
        train_lora(pipe, recs, tmp_path / "lora", tcfg, log=lambda *_: None)
