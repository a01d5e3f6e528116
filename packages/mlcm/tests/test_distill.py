import torch

from diffalign.core.denoisers import NoiseSchedule
from diffalign.mlcm.distill import (
    draw_segment_pairs,
    inter_segment_loss,
    mds_num_steps,
    mlcd_loss,
    student_sample,
    teacher_trajectory,
)
from diffalign.mlcm.schedule import milestone_grid, segment_map


def test_segment_pairs_stay_inside_their_segment():
    m = milestone_grid(8)
    gen = torch.Generator().manual_seed(0)
    p = draw_segment_pairs(4000, m, 20, gen)
    mt = torch.tensor(m)
    upper, lower = mt[p.segment], mt[p.segment + 1]
    assert torch.equal(p.boundary, lower)
    assert ((p.t_upper > lower) & (p.t_upper <= upper)).all()
    assert torch.equal(p.t_lower, torch.maximum(p.t_upper - 20, lower))
    # every segment and both the crossing and the interior case occur
    assert set(p.segment.tolist()) == set(range(8))
    assert (p.t_lower == p.boundary).any() and (p.t_lower > p.boundary).any()
    per_batch = draw_segment_pairs(16, m, 20, gen, per_sample=False)
    assert len(set(per_batch.segment.tolist())) == 1


def test_mds_steps_are_M_minus_s():
    m = milestone_grid(8)
    t = torch.tensor([998, 875, 874, 750, 500, 126, 1])
    # ascending segment index s (0 = lowest segment) -> L = M - s
    s_asc = torch.tensor([7, 7, 6, 6, 4, 1, 0])
    assert torch.equal(mds_num_steps(t, 1000, 8), 8 - s_asc)
    assert mds_num_steps(torch.tensor([999]), 1000, 8).item() == 1
    del m


def test_teacher_trajectory_takes_equal_steps_per_sample():
    sched = NoiseSchedule.scaled_linear()
    calls = []

    def fn(z, t):
        calls.append(t.clone())
        return torch.zeros_like(z)

    noise = torch.randn(2, 3)
    teacher_trajectory(fn, noise, torch.tensor([599, 199]), sched, "epsilon", torch.tensor([2, 4]))
    assert len(calls) == 4
    starts = torch.stack(calls)
    assert starts[:, 0].tolist() == [999, 799, 599, 599]  # two steps of 200, then idle
    assert starts[:, 1].tolist() == [999, 799, 599, 399]  # four steps of 200


def _point_mass_fn(sched, x_star):
    """Exact denoiser for data concentrated on x_star: eps = (z - alpha x*) / sigma."""

    def fn(z, t):
        a, s = sched.alpha_sigma(t, z)
        return (z - a * x_star) / s

    return fn


def test_exact_consistent_student_has_zero_mlcd_loss_and_detached_target():
    sched = NoiseSchedule.scaled_linear()
    x_star = torch.tensor([[1.5, -0.5]])
    exact = _point_mass_fn(sched, x_star)
    gen = torch.Generator().manual_seed(0)
    m = milestone_grid(8)
    pairs = draw_segment_pairs(64, m, 20, gen)
    noise = torch.randn(64, 2, generator=gen)
    a, s = sched.alpha_sigma(pairs.t_upper, noise)
    z_up = a * x_star + s * noise
    w = torch.zeros(1, requires_grad=True)

    def student(z, t):
        return exact(z, t) + w * 0.0

    out = mlcd_loss(student, exact, z_up, pairs, sched, "epsilon")
    assert out.loss.item() < 1e-8
    assert out.target.grad_fn is None and out.prediction.grad_fn is not None
    # negative control: a biased student is penalised
    biased = lambda z, t: exact(z, t) + 0.3  # noqa: E731
    assert mlcd_loss(biased, exact, z_up, pairs, sched, "epsilon").loss.item() > 1e-4


def test_student_sampler_exact_on_point_mass_and_inter_segment_zero():
    sched = NoiseSchedule.scaled_linear()
    x_star = torch.tensor([[0.7, 0.2]])
    exact = _point_mass_fn(sched, x_star)
    noise = torch.randn(8, 2)
    for sampler in ("deterministic", "renoise"):
        x0 = student_sample(exact, noise, [999, 499], sched, "epsilon", sampler)
        torch.testing.assert_close(x0, x_star.expand(8, 2), atol=1e-4, rtol=1e-4)
    out = inter_segment_loss(exact, exact, x_star.expand(8, 2), milestone_grid(8), sched, "epsilon", 3)
    assert out.loss.item() < 1e-8


def test_segment_map_of_point_mass_is_on_the_exact_trajectory():
    sched = NoiseSchedule.scaled_linear()
    x_star = torch.tensor([[1.0, 2.0]])
    exact = _point_mass_fn(sched, x_star)
    eps = torch.randn(5, 2)
    t, s = torch.full((5,), 800), torch.full((5,), 749)
    a_t, s_t = sched.alpha_sigma(t, eps)
    a_s, s_s = sched.alpha_sigma(s, eps)
    z_t = a_t * x_star + s_t * eps
    torch.testing.assert_close(
        segment_map(exact(z_t, t), z_t, t, s, sched, "epsilon"), a_s * x_star + s_s * eps
    )


def _scaled_linear_alpha_sigma(t):
    """SD's ``scaled_linear`` schedule in float64, written out independently of ``NoiseSchedule``."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t.long()].unsqueeze(-1)
    return abar.sqrt(), (1 - abar).sqrt()


def test_inter_segment_target_is_teacher_ode_endpoint_one_milestone_down():
    """Stage 2 against a reference on the Gaussian-mixture toy: the guided teacher (w = 3) is the exact
    posterior mean, the student its conditional (unguided) posterior mean, so the target depends on where
    and how the teacher ODE ends. Reference: p DDIM sub-steps from t_m to the next milestone t_n."""
    from diffalign.mlcm import toy

    setup = toy.make_toy(guidance=3.0)
    gmm, sched = setup.teacher, setup.schedule
    n, num_segments, p = 96, 4, 3
    m = milestone_grid(num_segments)
    cls = toy.sample_classes(n)
    null = torch.full_like(cls, toy.NULL_CLASS)

    def student(z, t):
        return gmm.eps(z, t, cls, sched)

    x0_hat = gmm.means[torch.randint(0, 8, (n,), generator=torch.Generator().manual_seed(1))]
    x0_hat = x0_hat + 0.15 * torch.randn(
        n, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    out = inter_segment_loss(
        student,
        setup.teacher_fn(cls),
        x0_hat,
        m,
        sched,
        "epsilon",
        p,
        generator=torch.Generator().manual_seed(3),
    )

    # the same draws, in the order inter_segment_loss makes them: segment, then noise
    gen = torch.Generator().manual_seed(3)
    seg = torch.randint(0, num_segments, (n,), generator=gen)
    noise = torch.randn(x0_hat.shape, generator=gen, dtype=torch.float64)
    assert set(seg.tolist()) == set(range(num_segments))
    t_m, t_n = torch.tensor(m)[seg], torch.tensor(m)[seg + 1]
    a, s = _scaled_linear_alpha_sigma(t_m)
    z = a * x0_hat + s * noise
    prediction = gmm.posterior_mean(z, a, s, cls)
    for k in range(p):
        t_cur = t_m - torch.round((t_m - t_n).double() * k / p).long()
        t_nxt = t_m - torch.round((t_m - t_n).double() * (k + 1) / p).long()
        a, s = _scaled_linear_alpha_sigma(t_cur)
        x_c, x_u = gmm.posterior_mean(z, a, s, cls), gmm.posterior_mean(z, a, s, null)
        eps_c, eps_u = (z - a * x_c) / s, (z - a * x_u) / s
        eps = eps_u + 3.0 * (eps_c - eps_u)
        x0 = (z - s * eps) / a
        a2, s2 = _scaled_linear_alpha_sigma(t_nxt)
        z = a2 * x0 + s2 * eps
    a, s = _scaled_linear_alpha_sigma(t_n)
    target = gmm.posterior_mean(z, a, s, cls)

    torch.testing.assert_close(out.prediction, prediction, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.target, target, atol=1e-4, rtol=1e-4)
    assert out.loss.item() > 1e-3  # a non-trivial target: the student is not the guided teacher
