import math

import pytest
import torch

from diffalign.mlcm.losses import (
    classifier_free_guidance,
    consistency_distance,
    consistency_loss,
    direct_reward_loss,
    hinge_reward_loss,
)


def test_cfg_matches_definition_and_rejects_lcm_convention():
    cond, uncond = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    out = classifier_free_guidance(cond, uncond, 8.0)
    assert out.tolist() == [1.0 + 8.0 * 1.0, 1.0 + 8.0 * -2.0]
    assert torch.equal(classifier_free_guidance(cond, uncond, 1.0), cond)
    lcm_form = cond + 8.0 * (cond - uncond)  # LCM's x_c + w (x_c - x_u): a different scale convention
    assert not torch.allclose(out, lcm_form)


def test_l2_distance_brute_force():
    torch.manual_seed(0)
    a, b = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    d = consistency_distance(a, b, "l2")
    ref = torch.tensor(
        [
            sum((x - y) ** 2 for x, y in zip(a[i].flatten().tolist(), b[i].flatten().tolist())) / 16
            for i in range(3)
        ]
    )
    torch.testing.assert_close(d, ref)
    # negative control: RMS (sqrt of the mean) is not what the paper's L2 computes
    assert not torch.allclose(d, ref.sqrt())


def test_pseudo_huber_analytic():
    a = torch.tensor([[0.0, 3.0]])
    b = torch.tensor([[0.0, -1.0]])
    c = 0.5
    expected = (0.0 + (math.sqrt(16 + 0.25) - 0.5)) / 2
    assert consistency_distance(a, b, "pseudo_huber", c).item() == pytest.approx(expected)
    # small differences behave like d^2 / (2c), large ones like |d|
    small = consistency_distance(torch.tensor([[0.05]]), torch.zeros(1, 1), "pseudo_huber", 1.0).item()
    assert small == pytest.approx(0.05**2 / 2, rel=1e-2)
    # negative control: not plain L1
    assert consistency_distance(a, b, "pseudo_huber", c).item() != pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown loss kind"):
        consistency_distance(a, b, "l1")


def test_consistency_loss_stops_gradient_into_target():
    pred = torch.randn(2, 3, requires_grad=True)
    target = torch.randn(2, 3, requires_grad=True)
    loss = consistency_loss(pred, target)
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None
    torch.testing.assert_close(pred.grad, 2 * (pred - target).detach() / 6)


def test_perceptual_hook_adds_feature_distance():
    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    feats = lambda x: x.mean(dim=(2, 3)) * 2  # noqa: E731
    base = consistency_loss(pred, target)
    with_hook = consistency_loss(pred, target, features=feats, feature_weight=0.5)
    assert with_hook.item() == pytest.approx(base.item() + 0.5 * 4.0)


def test_hinge_reward_loss():
    pos = torch.tensor([17.0, 10.0])
    neg = torch.tensor([-1.0, 2.0])
    assert hinge_reward_loss(pos, 16.0, neg).item() == pytest.approx((0 + 0 + 6 + 2) / 2)
    # zero when every positive score clears the margin and every negative is <= 0
    assert hinge_reward_loss(torch.tensor([16.0, 20.0]), 16.0, torch.tensor([0.0, -3.0])).item() == 0.0
    # negative control: a missing relu on the positive term would reward over-shooting
    assert hinge_reward_loss(torch.tensor([30.0]), 16.0).item() == 0.0
    s = torch.tensor([0.2, 0.9], requires_grad=True)
    hinge_reward_loss(s, 0.5).backward()
    assert s.grad.tolist() == [-0.5, 0.0]


def test_direct_reward_loss():
    s = torch.tensor([0.2, 0.6], requires_grad=True)
    loss = direct_reward_loss(s)
    assert loss.item() == pytest.approx(-0.4)
    loss.backward()
    assert s.grad.tolist() == [-0.5, -0.5]
