"""T9 (2-D): the full alternating algorithm with a linear generator, a DSM-trained linear fake score per
timestep and an analytic Gaussian reference. Reward off: the generator's moments match the reference.
Reward on: the mean moves toward the reward's optimum and the covariance does not collapse; with the
regulariser removed (negative control) it collapses."""

from __future__ import annotations

import pytest
import torch

from diffalign.di_star import losses as L

REF_MEAN = torch.tensor([0.5, -0.3])
REF_COV = torch.tensor([[1.0, 0.3], [0.3, 0.6]])
TARGET = torch.tensor([2.0, 2.0])
ABAR = torch.linspace(0.95, 0.1, 8)
# 200 alternating iterations (2 fake-score updates each) with a decaying generator step: ~1 s per run
ITERS, LR_G, LR_F, FAKE_UPDATES = 200, 2.5e-2, 5e-2, 2


def run_toy(
    alpha_rew: float,
    regulariser: str = "score",
    iters: int = ITERS,
    batch: int = 256,
    seed: int = 0,
    lr_g: float = LR_G,
    lr_f: float = LR_F,
    fake_updates: int = FAKE_UPDATES,
):
    torch.manual_seed(seed)
    k_count = len(ABAR)
    eye = torch.eye(2)
    ref_cov_t = ABAR[:, None, None] * REF_COV + (1 - ABAR)[:, None, None] * eye
    ref_prec_t = torch.linalg.inv(ref_cov_t)
    mu = torch.zeros(2, requires_grad=True)
    mat = (0.5 * eye).requires_grad_(True)
    fake_w = (-eye).repeat(k_count, 1, 1).requires_grad_(True)
    fake_b = torch.zeros(k_count, 2, requires_grad=True)
    opt_g = torch.optim.Adam([mu, mat], lr=lr_g)
    opt_f = torch.optim.Adam([fake_w, fake_b], lr=lr_f)
    # generator step size decays linearly to a tenth, so the end point is not dominated by step noise
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda i: 1.0 - 0.9 * i / iters)

    def draw(x0):
        k = torch.randint(k_count, (x0.shape[0],))
        eps = torch.randn_like(x0)
        a, s = ABAR[k].sqrt(), (1 - ABAR[k]).sqrt()
        return k, eps, a, s, a[:, None] * x0 + s[:, None] * eps

    for _ in range(iters):
        for _ in range(fake_updates):  # (a) fake-score DSM on detached generator samples
            x0 = (mu + torch.randn(batch, 2) @ mat.T).detach()
            k, eps, a, s, x_t = draw(x0)
            score = torch.einsum("bij,bj->bi", fake_w[k], x_t) + fake_b[k]
            loss = L.fake_score_dsm_loss(-s[:, None] * score, x0, eps, a, s).mean()
            opt_f.zero_grad()
            loss.backward()
            opt_f.step()
        x0 = mu + torch.randn(batch, 2) @ mat.T  # (b) generator
        k, eps, a, s, x_t = draw(x0)
        eps_fake = -s[:, None] * (torch.einsum("bij,bj->bi", fake_w[k].detach(), x_t) + fake_b[k].detach())
        eps_ref = s[:, None] * torch.einsum("bij,bj->bi", ref_prec_t[k], x_t - a[:, None] * REF_MEAN)
        if regulariser == "score":
            div = L.di_star_generator_loss(
                eps_fake, eps_ref, eps, s, L.timestep_weight(a, s, "sigma"), "pseudo_huber", 1.0
            )
        elif regulariser == "kl":
            div = L.kl_generator_loss(eps_fake, eps_ref, x_t, s, L.timestep_weight(a, s, "sigma"))
        else:
            div = torch.zeros(batch)
        reward = -((x0 - TARGET) ** 2).sum(1)
        loss = (L.reward_loss(reward, alpha_rew) + div).mean()
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        sched_g.step()
    return mu.detach(), (mat @ mat.T).detach()


@pytest.mark.parametrize("regulariser", ["score", "kl"])
def test_t9_reward_off_matches_reference_moments(regulariser):
    mean, cov = run_toy(0.0, regulariser)
    torch.testing.assert_close(mean, REF_MEAN, atol=0.1, rtol=0)
    torch.testing.assert_close(cov, REF_COV, atol=0.15, rtol=0)


def test_t9_reward_moves_mean_without_collapse_and_control_collapses():
    mean0, _ = run_toy(0.0)
    mean, cov = run_toy(0.05)
    assert torch.norm(mean - TARGET) < torch.norm(mean0 - TARGET) - 0.3
    assert torch.det(cov) > 0.25 * torch.det(REF_COV)
    # negative control: reward alone (no regulariser) collapses the covariance onto the optimum
    mean_r, cov_r = run_toy(0.05, "none")
    assert torch.det(cov_r) < 0.05 * torch.det(REF_COV)
    assert torch.norm(mean_r - TARGET) < torch.norm(mean - TARGET)
