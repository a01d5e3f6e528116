"""Reference values for every function of diffalign.di_star.losses, computed element by element in plain
Python: each check pins one formula (sign, scale, units, default) that a mutant could change."""

import math

import pytest
import torch

from diffalign.di_star import losses as L

ALPHA = torch.tensor([0.6, 0.8])
SIGMA = torch.tensor([0.8, 0.6])


def _rows(t):
    return [row.flatten().tolist() for row in t]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _batch(seed=0, shape=(2, 3)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_expand_like_shapes_and_batch_check():
    like = torch.zeros(2, 3, 4)
    assert L.expand_like(torch.tensor([1.0, 2.0]), like).shape == (2, 1, 1)
    assert L.expand_like(torch.tensor(3.0), like).ndim == 0
    for bad in (torch.ones(3), torch.ones(1)):
        with pytest.raises(ValueError, match="per-sample values have batch"):
            L.expand_like(bad, like)


def test_cfg_definition():
    u, c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    torch.testing.assert_close(
        L.classifier_free_guidance(u, c, 2.5), torch.tensor([1 + 2.5 * 2, -2 + 2.5 * 2])
    )


def test_distance_value_and_gradient_defaults_are_pseudo_huber_with_c_one():
    y = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(L.distance_value(y), torch.tensor([math.sqrt(26) - 1, 0.0]))
    torch.testing.assert_close(
        L.distance_value(y, "pseudo_huber", 2.0), torch.tensor([math.sqrt(29) - 2, 0.0])
    )
    torch.testing.assert_close(L.distance_value(y, "l2"), torch.tensor([25.0, 0.0]))
    torch.testing.assert_close(L.distance_gradient(y), y / torch.tensor([[math.sqrt(26)], [1.0]]))
    torch.testing.assert_close(L.distance_gradient(y, "l2"), 2 * y)
    # the gradient is the derivative of the value (finite differences)
    h = 1e-4
    yy = y.double()
    for c in (1.0, 0.5):
        num = L.distance_value(yy + torch.tensor([[h, 0.0], [0, 0]]), huber_c=c) - L.distance_value(
            yy, huber_c=c
        )
        assert num[0].item() / h == pytest.approx(L.distance_gradient(yy, huber_c=c)[0, 0].item(), rel=1e-3)


def test_distance_argument_checks():
    y = torch.ones(1, 2)
    for c in (0.0, -1.0):
        with pytest.raises(ValueError, match="huber_c > 0"):
            L.distance_value(y, "pseudo_huber", c)
    L.distance_value(y, "l2", 0.0)  # c does not matter for l2
    with pytest.raises(ValueError, match="unknown distance"):
        L.distance_gradient(y, "l1")


def _generator_reference(eps_fake, eps_ref, noise, sigma, weight, distance, c):
    out = []
    for f, r, n, s, w in zip(_rows(eps_fake), _rows(eps_ref), _rows(noise), sigma.tolist(), weight):
        diff = [a - b for a, b in zip(f, r)]
        bracket = [(a - b) / s for a, b in zip(n, f)]
        if distance == "l2":
            direction = [2 * d / s for d in diff]
        else:
            norm = math.sqrt(sum(d * d for d in diff) + c * c * s * s)
            direction = [d / norm for d in diff]
        out.append(w * _dot(direction, bracket))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("distance,c", [("pseudo_huber", 1.0), ("pseudo_huber", 0.3), ("l2", 1.0)])
def test_generator_loss_against_elementwise_reference(distance, c):
    eps_fake, eps_ref, noise = _batch(3), _batch(4), _batch(5)
    sigma, weight = SIGMA.double(), [0.5, 2.0]
    got = L.di_star_generator_loss(
        eps_fake, eps_ref, noise, sigma, torch.tensor(weight).double(), distance, c
    )
    torch.testing.assert_close(
        got, _generator_reference(eps_fake, eps_ref, noise, sigma, weight, distance, c)
    )


def test_generator_loss_defaults_weight_one_pseudo_huber_c_one():
    eps_fake, eps_ref, noise = _batch(6), _batch(7), _batch(8)
    sigma = SIGMA.double()
    ref = _generator_reference(eps_fake, eps_ref, noise, sigma, [1.0, 1.0], "pseudo_huber", 1.0)
    torch.testing.assert_close(L.di_star_generator_loss(eps_fake, eps_ref, noise, sigma), ref)
    with pytest.raises(ValueError, match="huber_c > 0"):
        L.di_star_generator_loss(eps_fake, eps_ref, noise, sigma, huber_c=0.0)


def test_score_surrogate_against_reference():
    fake, ref, glq = _batch(9), _batch(10), _batch(11)
    for distance, c in (("pseudo_huber", 1.0), ("pseudo_huber", 0.2), ("l2", 1.0)):
        got = L.score_divergence_surrogate(fake, ref, glq, distance, c)
        want = []
        for f, r, q in zip(_rows(fake), _rows(ref), _rows(glq)):
            u = [b - a for a, b in zip(f, r)]
            if distance == "l2":
                d = [2 * x for x in u]
            else:
                norm = math.sqrt(sum(x * x for x in u) + c * c)
                d = [x / norm for x in u]
            want.append(_dot(d, [a - b for a, b in zip(f, q)]))
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(
        L.score_divergence_surrogate(fake, ref, glq),
        L.score_divergence_surrogate(fake, ref, glq, "pseudo_huber", 1.0),
    )


def test_implicit_cfg_and_kl_losses_values_and_gradient_only_through_x_t():
    cond, uncond, x_t = _batch(12), _batch(13), _batch(14).requires_grad_(True)
    sigma = SIGMA.double()
    got = L.implicit_cfg_reward_loss(cond, uncond, x_t, sigma, 4.0, torch.tensor([1.0, 0.5]).double())
    want = [
        w * 3.0 * _dot([(a - b) / s for a, b in zip(c_, u_)], x)
        for c_, u_, x, s, w in zip(
            _rows(cond), _rows(uncond), _rows(x_t.detach()), sigma.tolist(), [1.0, 0.5]
        )
    ]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    got.sum().backward()
    torch.testing.assert_close(x_t.grad[1], 0.5 * 3.0 * (cond[1] - uncond[1]) / sigma[1])
    # scale 1 means no extra guidance: zero loss; default weight is 1
    assert L.implicit_cfg_reward_loss(cond, uncond, x_t, sigma, 1.0).abs().max().item() == 0.0
    torch.testing.assert_close(
        L.implicit_cfg_reward_loss(cond, uncond, x_t, sigma, 2.0),
        L.implicit_cfg_reward_loss(cond, uncond, x_t, sigma, 2.0, 1.0),
    )

    fake, ref = _batch(15), _batch(16)
    x = _batch(17).requires_grad_(True)
    kl = L.kl_generator_loss(fake, ref, x, sigma, torch.tensor([2.0, 1.0]).double())
    want = [
        w * _dot([(b - a) / s for a, b in zip(f, r)], xx)
        for f, r, xx, s, w in zip(_rows(fake), _rows(ref), _rows(x.detach()), sigma.tolist(), [2.0, 1.0])
    ]
    torch.testing.assert_close(kl, torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(
        L.kl_generator_loss(fake, ref, x, sigma), L.kl_generator_loss(fake, ref, x, sigma, 1.0)
    )


def test_reward_loss_sign_and_scale():
    torch.testing.assert_close(L.reward_loss(torch.tensor([0.5, -1.0]), 4.0), torch.tensor([-2.0, 4.0]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_fake_score_dsm_targets_per_sample_mean(prediction_type):
    x0, noise, out = _batch(18), _batch(19), _batch(20)
    a, s = ALPHA.double(), SIGMA.double()
    target = {"epsilon": noise, "v_prediction": a[:, None] * noise - s[:, None] * x0, "sample": x0}[
        prediction_type
    ]
    want = [sum((p - q) ** 2 for p, q in zip(o, t)) / 3 for o, t in zip(_rows(out), _rows(target))]
    got = L.fake_score_dsm_loss(out, x0, noise, a, s, prediction_type)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    if prediction_type == "epsilon":
        torch.testing.assert_close(L.fake_score_dsm_loss(out, x0, noise, a, s), got)  # epsilon is the default
    with pytest.raises(ValueError, match="unknown prediction_type"):
        L.fake_score_dsm_loss(out, x0, noise, a, s, "flow")


def test_timestep_weights():
    a, s = ALPHA, SIGMA
    torch.testing.assert_close(L.timestep_weight(a, s, "constant"), torch.ones(2))
    torch.testing.assert_close(L.timestep_weight(a, s, "sigma"), s)
    torch.testing.assert_close(L.timestep_weight(a, s, "sigma_sq"), s * s)
    with pytest.raises(ValueError, match="unknown weighting"):
        L.timestep_weight(a, s, "snr")


def test_string_options_compared_by_value_not_identity():
    """Options read from a config file are equal but distinct string objects."""

    def fresh(s):
        return "".join(list(s))

    y = torch.tensor([[3.0, 4.0]])
    for distance in ("pseudo_huber", "l2"):
        torch.testing.assert_close(L.distance_value(y, fresh(distance)), L.distance_value(y, distance))
        torch.testing.assert_close(L.distance_gradient(y, fresh(distance)), L.distance_gradient(y, distance))
        args = (_batch(1), _batch(2), _batch(3), SIGMA.double())
        torch.testing.assert_close(
            L.di_star_generator_loss(*args, distance=fresh(distance)),
            L.di_star_generator_loss(*args, distance=distance),
        )
    x0, eps, out = _batch(4), _batch(5), _batch(6)
    a, s = ALPHA.double(), SIGMA.double()
    for kind in ("epsilon", "v_prediction", "sample"):
        torch.testing.assert_close(
            L.fake_score_dsm_loss(out, x0, eps, a, s, fresh(kind)),
            L.fake_score_dsm_loss(out, x0, eps, a, s, kind),
        )
    for weighting in ("constant", "sigma", "sigma_sq"):
        torch.testing.assert_close(
            L.timestep_weight(a, s, fresh(weighting)), L.timestep_weight(a, s, weighting)
        )


@pytest.mark.parametrize("name", ["aaa", "l1", "zzz", "Epsilon"])
def test_unknown_options_are_rejected_whatever_their_sort_order(name):
    y, a, s = _batch(1), ALPHA.double(), SIGMA.double()
    with pytest.raises(ValueError, match="unknown distance"):
        L.distance_value(y, name)
    with pytest.raises(ValueError, match="unknown distance"):
        L.di_star_generator_loss(y, y, y, s, distance=name)
    with pytest.raises(ValueError, match="unknown prediction_type"):
        L.fake_score_dsm_loss(y, y, y, a, s, name)
    with pytest.raises(ValueError, match="unknown weighting"):
        L.timestep_weight(a, s, name)


def test_batch_mismatch_message_names_both_batch_sizes():
    with pytest.raises(ValueError, match=r"^per-sample values have batch 3, tensor has 2$"):
        L.expand_like(torch.ones(3), torch.zeros(2, 5, 4))
