"""Reference checks of diffalign.selma.losses aimed at mutants the first tests let through: the ``sample``
target, dtype handling, per-sample broadcasting and both directions of the shape checks."""

import pytest
import torch

from diffalign.selma.losses import diffusion_loss, diffusion_target, noisy_latents


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 2, 2, 2, generator=g).to(dtype)
    noise = torch.randn(3, 2, 2, 2, generator=g).to(dtype)
    ac = torch.tensor([0.9, 0.5, 0.1])
    t = torch.tensor([2, 0, 1])
    return x0, noise, ac, t


def test_forward_process_and_targets_per_sample_against_scalars():
    x0, noise, ac, t = _data()
    xt = noisy_latents(x0, noise, ac, t)
    for i, ti in enumerate(t.tolist()):
        a = float(ac[ti])
        torch.testing.assert_close(xt[i], a**0.5 * x0[i] + (1 - a) ** 0.5 * noise[i])
        v = diffusion_target(x0, noise, ac, t, "v_prediction")[i]
        torch.testing.assert_close(v, a**0.5 * noise[i] - (1 - a) ** 0.5 * x0[i])
    assert diffusion_target(x0, noise, ac, t, "epsilon") is noise
    assert diffusion_target(x0, noise, ac, t, "sample") is x0


def test_half_precision_inputs_keep_their_dtype_and_the_loss_is_float32():
    x0, noise, ac, t = _data(torch.bfloat16)
    xt = noisy_latents(x0, noise, ac, t)
    v = diffusion_target(x0, noise, ac, t, "v_prediction")
    assert xt.dtype == torch.bfloat16 and v.dtype == torch.bfloat16
    ref = ac[t].sqrt().view(-1, 1, 1, 1) * x0.float() + (1 - ac[t]).sqrt().view(-1, 1, 1, 1) * noise.float()
    torch.testing.assert_close(xt, ref.to(torch.bfloat16))
    pred = torch.full((2, 2), 1.0, dtype=torch.bfloat16)
    target = torch.full((2, 2), 1.0 + 2**-9, dtype=torch.float32)  # not representable in bfloat16
    loss = diffusion_loss(pred, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(2**-18, rel=1e-6)


def test_loss_is_the_mean_over_all_elements():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert diffusion_loss(pred, target).item() == pytest.approx((1 + 4 + 9 + 9) / 4)


def test_shape_checks_both_ways():
    for a, b in (((2, 3), (3, 2)), ((3, 2), (2, 3)), ((2, 2), (2, 3)), ((2, 3), (2, 2))):
        with pytest.raises(ValueError, match="shape"):
            diffusion_loss(torch.zeros(a), torch.zeros(b))


def test_prediction_type_compared_by_value_not_identity():
    """A prediction type read from a config file is an equal but distinct string object."""
    x0, noise, ac, t = _data()
    for kind in ("epsilon", "v_prediction", "sample"):
        fresh = "".join(list(kind))
        torch.testing.assert_close(
            diffusion_target(x0, noise, ac, t, fresh), diffusion_target(x0, noise, ac, t, kind)
        )


@pytest.mark.parametrize("kind", ["aaa", "flow", "zzz", "Epsilon"])
def test_unknown_prediction_types_are_rejected_whatever_their_sort_order(kind):
    x0, noise, ac, t = _data()
    with pytest.raises(ValueError, match="unsupported prediction_type"):
        diffusion_target(x0, noise, ac, t, kind)
