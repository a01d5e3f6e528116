import pytest
import torch

from diffalign.core.shapes.teachers import (
    Teacher,
    TeacherConfig,
    diffusion_loss,
    lr_factor,
    make_pipeline,
    make_scheduler,
    sample_pipeline,
    snr_weight,
    teacher_ema,
    v_target,
)
from diffalign.core.shapes.tokenizer import build_tokenizer
from diffalign.core.shapes.vae import build_vae


def test_scheduler_has_zero_terminal_snr_and_v_prediction():
    s = make_scheduler()
    assert s.config.prediction_type == "v_prediction"
    assert float(s.alphas_cumprod[-1]) < 1e-6
    assert s.config.timestep_spacing == "trailing"


def test_v_target_recovers_x0_and_eps():
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    a = torch.tensor([0.9, 0.3, 0.0])
    v = v_target(x0, eps, a)
    ab = a.view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    assert torch.allclose(ab.sqrt() * xt - (1 - ab).sqrt() * v, x0, atol=1e-5)
    assert torch.allclose((1 - ab).sqrt() * xt + ab.sqrt() * v, eps, atol=1e-5)
    # negative control: epsilon is not v except at alpha_bar = 0
    assert not torch.allclose(v[:2], eps[:2], atol=1e-3)


def test_snr_weight_values_and_negative_control():
    a = torch.tensor([0.0, 0.5, 5 / 6, 0.99])  # SNR 0, 1, 5, 99
    w = snr_weight(a, 5.0)
    assert w.tolist() == pytest.approx([1.0, 0.5, 5 / 6, 5 / 100], rel=1e-5)
    # plain min-SNR-5 for v-prediction, min(SNR, 5) / (SNR + 1), gives the zero-SNR step weight 0
    snr = a / (1 - a)
    plain = snr.clamp(max=5.0) / (snr + 1)
    assert plain[0] == 0 and w[0] == 1


def test_schedules():
    cfg = TeacherConfig(steps=1000, warmup=100, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.01)
    assert lr_factor(99, cfg) == pytest.approx(1.0)
    assert lr_factor(1000, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_teacher_ema_is_cores_ema_with_the_ramped_decay_of_the_committed_teachers(kind):
    """The teachers were built with p_ema <- lerp(p_ema, p, 1 - min(max_decay, (1 + n) / (10 + n)))
    over the parameters; core's EMA averaging in place into the EMA teacher reproduces it exactly."""
    import copy

    from diffalign.core.training import EMA

    torch.manual_seed(0)
    model = Teacher(kind, build_tokenizer(), micro=True)
    ema = copy.deepcopy(model).requires_grad_(False)
    reference = copy.deepcopy(ema)
    averager = teacher_ema(model, ema, TeacherConfig(ema_max_decay=0.999))
    assert averager.current_decay() == pytest.approx(0.1)
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pr, pm in zip(reference.parameters(), model.parameters()):
                pr.lerp_(pm, 1 - decay)
        averager.update(model)
    for (name, a), b in zip(ema.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    # negative control: the same updates at the final decay from the start are a different average
    fixed = EMA(model, decay=0.999, warmup=False)
    assert fixed.current_decay() == 0.999
    averager.num_updates = 10**6
    assert averager.current_decay() == 0.999


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_micro_teacher_trains_one_step_and_samples_through_the_diffusers_pipeline(kind):
    torch.manual_seed(0)
    tok = build_tokenizer()
    teacher = Teacher(kind, tok, micro=True)
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-3)
    alphas = make_scheduler().alphas_cumprod.float()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8)
    prompts = ["a red circle", ""]
    loss = diffusion_loss(lambda x, t: teacher(x, t, prompts), x0, alphas, gen)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in teacher.text_encoder.parameters())
    opt.step()
    pipe = make_pipeline(kind, build_vae(micro=True), teacher)
    pipe.set_progress_bar_config(disable=True)
    images = sample_pipeline(pipe, ["two blue squares"], steps=2, guidance=3.0)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
