"""T7: one alternating DI* step on tiny SD / SDXL-style UNets, and architecture coverage."""

from __future__ import annotations

import pytest
import torch
from distar_fixtures import TinyPixelReward, tiny_config

import diffalign.di_star.train as T
from diffalign.core import testing
from diffalign.di_star.inference import sample_one_step, to_one_step_pipeline
from diffalign.di_star.train import DiStarTrainer

PROMPTS = ["a red circle", "two blue squares", "a green triangle to the left of a yellow square"]


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(module, snap):
    return any(not torch.equal(p.detach(), snap[n]) for n, p in module.named_parameters())


def _make(kind="sdxl", **overrides):
    pipe = (
        testing.tiny_sdxl_pipeline(seed=0)
        if kind == "sdxl"
        else testing.tiny_sd_pipeline(seed=0, prediction_type="v_prediction" if kind == "sd-v" else "epsilon")
    )
    reward = TinyPixelReward()
    return DiStarTrainer(tiny_config(**overrides), pipe, reward, PROMPTS), pipe, reward


def test_t7_one_alternating_step_tiny_sdxl():
    trainer, pipe, reward = _make("sdxl")
    frozen = {
        "reference": (pipe.unet, _snapshot(pipe.unet)),
        "vae": (pipe.vae, _snapshot(pipe.vae)),
        "text_encoder": (pipe.text_encoder, _snapshot(pipe.text_encoder)),
        "text_encoder_2": (pipe.text_encoder_2, _snapshot(pipe.text_encoder_2)),
        "reward": (reward, _snapshot(reward)),
    }
    gen_snap, fake_snap = _snapshot(trainer.generator), _snapshot(trainer.fake)

    # (a) fake step: only psi moves
    logs = trainer.fake_step(step=0)
    assert torch.isfinite(torch.tensor(logs["loss_fake"]))
    assert _changed(trainer.fake, fake_snap)
    assert not _changed(trainer.generator, gen_snap)
    fake_after_a = _snapshot(trainer.fake)
    fake_grads = {n: p.grad.clone() for n, p in trainer.fake.named_parameters() if p.grad is not None}

    # (b) generator step: only theta moves; the fake's gradients are not touched
    logs = trainer.generator_step(step=0)
    for key in ("loss_generator", "loss_reward", "loss_divergence", "reward"):
        assert torch.isfinite(torch.tensor(logs[key])), key
    assert _changed(trainer.generator, gen_snap)
    assert not _changed(trainer.fake, fake_after_a)
    for n, p in trainer.fake.named_parameters():
        if n in fake_grads:
            assert torch.equal(p.grad, fake_grads[n]), n

    for what, (module, snap) in frozen.items():
        assert not _changed(module, snap), f"{what} changed"
        assert all(p.grad is None for p in module.parameters()), f"{what} got a .grad"
        assert not any(p.requires_grad for p in module.parameters()), f"{what} is trainable"


def test_t7_both_terms_reach_generator():
    trainer, _, _ = _make("sdxl")
    rnd = trainer.randomness(0, "generator", 0, trainer.cfg.loss.timestep_range)
    terms = trainer.generator_losses(rnd)
    params = trainer.generator_params
    for key in ("loss_reward", "loss_divergence"):
        grads = torch.autograd.grad(terms[key], params, retain_graph=True, allow_unused=True)
        norm = sum(float(g.norm()) for g in grads if g is not None)
        assert norm > 0 and norm == norm, key
    # toggles: alpha_rew = 0 removes the reward term; divergence_scale = 0 removes the score term
    trainer.cfg.loss.alpha_rew = 0.0
    terms = trainer.generator_losses(rnd)
    assert terms["loss_reward"].requires_grad is False or float(terms["loss_reward"]) == 0.0
    assert "reward" not in terms
    trainer.cfg.loss.alpha_rew = 1.0
    trainer.cfg.loss.divergence_scale = 0.0
    terms = trainer.generator_losses(rnd)
    assert float(terms["loss_divergence"]) == 0.0


def test_divergence_gradient_flows_through_fake_output():
    """Negative control at network scale: detaching the fake score's output changes theta's gradient."""
    trainer, _, _ = _make("sd", loss={"alpha_rew": 0.0, "cfg_scale": 3.0, "huber_c": 0.1})
    rnd = trainer.randomness(0, "generator", 0, trainer.cfg.loss.timestep_range)
    terms = trainer.generator_losses(rnd)
    g_full = torch.autograd.grad(terms["loss_divergence"], trainer.generator_params)
    original = T.predict_epsilon

    def detached(den, unet, *args, **kwargs):
        out = original(den, unet, *args, **kwargs)
        return out.detach() if unet is trainer.fake else out

    T.predict_epsilon = detached
    try:
        terms = trainer.generator_losses(rnd)
        g_det = torch.autograd.grad(terms["loss_divergence"], trainer.generator_params)
    finally:
        T.predict_epsilon = original
    diff = sum(float((a - b).norm()) for a, b in zip(g_full, g_det))
    assert diff > 1e-6 * sum(float(a.norm()) for a in g_full)


@pytest.mark.parametrize("kind", ["sd", "sd-v", "sdxl"])
@pytest.mark.parametrize("variant", ["score-in", "kl-out"])
def test_architecture_coverage_train_step_and_sample(kind, variant):
    regulariser, mode = variant.split("-")
    trainer, pipe, _ = _make(kind, loss={"regulariser": regulariser, "cfg_mode": mode, "alpha_rew": 1.0})
    logs = trainer.train_step(0)
    assert all(v == v for v in logs.values())
    one_step = to_one_step_pipeline(pipe)
    one_step.unet = trainer.merged_generator()
    images = sample_one_step(one_step, PROMPTS[:2], 399, generator=torch.Generator().manual_seed(0))
    assert images.shape[:2] == (2, 3) and torch.isfinite(images).all()


def test_lora_generator_trains_only_adapters_and_fuses():
    trainer, pipe, _ = _make("sd", generator={"t_star": 399, "lora": {"rank": 2}, "optimizer": {"lr": 1e-2}})
    names = [n for n, p in trainer.generator.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    base = {n: p.detach().clone() for n, p in trainer.generator.named_parameters() if not p.requires_grad}
    trainer.train_step(0)
    trainer.train_step(1)
    assert all(torch.equal(p, base[n]) for n, p in trainer.generator.named_parameters() if n in base)
    merged = trainer.merged_generator()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    noise = torch.randn(2, *trainer.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = trainer.den.encode(PROMPTS[:2]).cond
    with torch.no_grad():
        a = T.generate_x0(trainer.den, trainer.generator, noise, cond, 399)
        b = T.generate_x0(trainer.den, merged, noise, cond, 399)
        c = T.generate_x0(trainer.den, pipe.unet, noise, cond, 399)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (a - c).abs().max() > 1e-4  # the LoRA moved the generator away from the teacher


def test_trainer_rejects_non_differentiable_reward():
    class PilReward:
        name, differentiable, input_range = "pil", False, "pil"

    with pytest.raises(ValueError, match="differentiable"):
        DiStarTrainer(tiny_config(), testing.tiny_sd_pipeline(), PilReward(), PROMPTS)
    with pytest.raises(ValueError, match="t_star"):
        DiStarTrainer(
            tiny_config(generator={"t_star": 1000}), testing.tiny_sd_pipeline(), TinyPixelReward(), PROMPTS
        )


@pytest.mark.parametrize("kind", ["sd", "sd-v", "sdxl"])
def test_generator_losses_match_hand_computed_reference(kind):
    """The divergence term of ``generator_losses`` (value and gradient w.r.t. theta) against a reference
    computed here: separate conditional / unconditional reference calls, CFG by hand, alpha/sigma from the
    scheduler's alphas_cumprod, w(t) = sigma_t and the pseudo-Huber constant c in score units."""
    scale, c = 3.0, 4.0
    trainer, pipe, _ = _make(kind, loss={"alpha_rew": 0.0, "cfg_scale": scale, "huber_c": c})
    assert trainer.cfg.loss.weighting == "sigma" and trainer.cfg.loss.cfg_mode == "in"
    rnd = trainer.randomness(3, "generator", 0, trainer.cfg.loss.timestep_range)
    assert rnd.timesteps[0] != rnd.timesteps[1]  # two timesteps, so w(t) differs within the batch
    params = trainer.generator_params
    got = trainer.generator_losses(rnd)["loss_divergence"]
    g_got = torch.autograd.grad(got, params)

    enc = trainer.den.encode(rnd.prompts)
    cond, uncond = enc.cond, enc.uncond
    abar = pipe.scheduler.alphas_cumprod.double()[rnd.timesteps.cpu()]
    alpha, sigma = abar.sqrt().float(), (1 - abar).sqrt().float()
    a4, s4 = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    x0 = T.generate_x0(trainer.den, trainer.generator, rnd.noise, cond, trainer.cfg.generator.t_star)
    x_t = a4 * x0 + s4 * rnd.eps

    def eps_of(unet, kwargs):
        out = trainer.den.forward(unet, x_t, rnd.timesteps, kwargs)
        return a4 * out + s4 * x_t if kind == "sd-v" else out  # v = a eps - s x0  =>  eps = a v + s x_t

    eps_fake = eps_of(trainer.fake, cond)
    eps_c, eps_u = eps_of(pipe.unet, cond), eps_of(pipe.unet, uncond)
    # the test can tell the halves apart only if the reference's two scores differ
    rel = (eps_c - eps_u).flatten(1).norm(dim=1) / eps_c.flatten(1).norm(dim=1)
    assert (rel > 0.01).all(), rel  # a swap moves the CFG target by (2 * scale - 1) * rel
    eps_ref = eps_u + scale * (eps_c - eps_u)
    # score units: u = s_ref - s_fake = (eps_fake - eps_ref) / sigma, d'(u) = u / sqrt(|u|^2 + c^2),
    # s_fake - grad log q = (eps - eps_fake) / sigma
    u = (eps_fake - eps_ref) / s4
    u_norm2 = u.flatten(1).pow(2).sum(1)
    # c is comparable to |u|, so c in the wrong units changes the result
    assert ((u_norm2 / c**2 > 0.01) & (u_norm2 / c**2 < 100)).all(), u_norm2 / c**2
    d_prime = u / (u_norm2 + c**2).sqrt().view(-1, 1, 1, 1)
    per_sample = sigma * (d_prime * (rnd.eps - eps_fake) / s4).flatten(1).sum(1)
    want = per_sample.mean()
    g_want = torch.autograd.grad(want, params)

    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    g_got, g_want = torch.cat([g.flatten() for g in g_got]), torch.cat([g.flatten() for g in g_want])
    assert g_want.norm() > 0
    torch.testing.assert_close(g_got, g_want, rtol=1e-3, atol=1e-4 * float(g_want.abs().max()))


def test_reward_gradient_reaches_saturated_pixels():
    """The reward sees decoded pixels clamped to [-1, 1] but its gradient passes the clamp (straight
    through): on saturated pixels d loss / d pixel is the reward's own gradient, not zero."""
    trainer, pipe, reward = _make("sd", loss={"alpha_rew": 2.0, "divergence_scale": 0.0})
    with torch.no_grad():  # a decoder that overshoots: most pixels land outside [-1, 1]
        pipe.vae.decoder.conv_out.weight.mul_(200.0)
        pipe.vae.decoder.conv_out.bias.mul_(200.0)
    captured, seen = {}, {}

    def keep_raw(module, inputs, output):
        output.retain_grad()
        captured["raw"] = output

    original_score = reward.score

    def score(images, prompts):
        seen["images"] = images
        return original_score(images, prompts)

    reward.score = score
    handle = pipe.vae.decoder.register_forward_hook(keep_raw)
    try:
        rnd = trainer.randomness(0, "generator", 0, trainer.cfg.loss.timestep_range)
        trainer.generator_losses(rnd)["loss_reward"].backward()
    finally:
        handle.remove()
    raw = captured["raw"]
    saturated = raw.detach().abs() > 1
    assert saturated.float().mean() > 0.3 and (~saturated).any()
    # forward: the reward is evaluated on the displayed range
    torch.testing.assert_close(seen["images"].detach(), raw.detach().clamp(-1, 1))
    # backward: loss = -alpha_rew * mean_b mean_hw conv(x), so every pixel, saturated or not, gets
    # -alpha_rew * w_channel / (B * H * W)
    b, _, h, w = raw.shape
    per_channel = -2.0 * reward.conv.weight.detach().view(1, 3, 1, 1) / (b * h * w)
    torch.testing.assert_close(raw.grad, per_channel.expand_as(raw), rtol=1e-5, atol=1e-9)
    assert raw.grad[saturated].abs().min() > 0
