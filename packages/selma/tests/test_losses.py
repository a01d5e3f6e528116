import pytest
import torch

from diffalign.core.denoisers import NoiseSchedule, prediction_target
from diffalign.selma.losses import diffusion_loss


def noisy_latents(x0, noise, alphas_cumprod, t):
    return NoiseSchedule(alphas_cumprod).add_noise(x0, noise, t)


def diffusion_target(x0, noise, alphas_cumprod, t, prediction_type):
    alpha, sigma = NoiseSchedule(alphas_cumprod).alpha_sigma(t, x0)
    return prediction_target(x0, noise, alpha, sigma, prediction_type)


def _setup(n=200_000, sigma=0.7, abar_value=0.4):
    g = torch.Generator().manual_seed(0)
    x0 = sigma * torch.randn(n, 1, generator=g)
    noise = torch.randn(n, 1, generator=g)
    abar = torch.tensor([abar_value, 0.1])
    t = torch.zeros(n, dtype=torch.long)
    return x0, noise, abar, t, sigma, abar_value


def test_matches_diffusers_scheduler_reference():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    ac = sched.alphas_cumprod
    torch.testing.assert_close(noisy_latents(x0, noise, ac, t), sched.add_noise(x0, noise, t))
    torch.testing.assert_close(
        diffusion_target(x0, noise, ac, t, "v_prediction"), sched.get_velocity(x0, noise, t)
    )
    # negative control: the wrong sign convention for v is rejected
    wrong = ac[t].sqrt().view(-1, 1, 1, 1) * x0 - (1 - ac[t]).sqrt().view(-1, 1, 1, 1) * noise
    assert not torch.allclose(wrong, sched.get_velocity(x0, noise, t), atol=1e-3)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_loss_of_bayes_optimal_predictor_equals_analytic_variance(kind):
    # x0 ~ N(0, s^2): E[eps | x_t] = sqrt(1-a) x_t / (a s^2 + 1 - a), residual variance a s^2 / (a s^2 + 1 - a).
    x0, noise, ac, t, s2, a = _setup()
    s2 = s2**2
    xt = noisy_latents(x0, noise, ac, t)
    denom = a * s2 + 1 - a
    eps_hat = (1 - a) ** 0.5 * xt / denom
    x0_hat = a**0.5 * s2 * xt / denom
    if kind == "epsilon":
        pred, analytic = eps_hat, a * s2 / denom
    else:
        pred = a**0.5 * eps_hat - (1 - a) ** 0.5 * x0_hat
        # v = sqrt(a) eps - sqrt(1-a) x0 ; posterior variance of v given x_t
        analytic = s2 / denom
    target = diffusion_target(x0, noise, ac, t, kind)
    loss = diffusion_loss(pred, target)
    assert float(loss) == pytest.approx(analytic, rel=0.02)
    # negative control: predicting the other parameterisation costs clearly more
    other = diffusion_target(x0, noise, ac, t, "v_prediction" if kind == "epsilon" else "epsilon")
    wrong = eps_hat if kind == "v_prediction" else a**0.5 * eps_hat - (1 - a) ** 0.5 * x0_hat
    assert float(diffusion_loss(wrong, target)) > 1.2 * analytic
    assert float(diffusion_loss(other, target)) > 0  # targets differ


def test_bad_inputs():
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_target(
            torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(2), torch.zeros(1, dtype=torch.long), "score"
        )
    with pytest.raises(ValueError, match="shape"):
        diffusion_loss(torch.zeros(2, 3), torch.zeros(3, 2))
